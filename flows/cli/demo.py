"""``fedforget demo``: prepare, federate, forget a client, audit, on the quick profile."""

from __future__ import annotations

import os
from typing import Any

from flows.cli.app import QUICK_PROFILE, UsageError, VerboseOpt, app, console, out, quiet, run_verb
from flows.cli.data import prepare_data
from flows.cli.tables import rounds_table, unlearn_table
from flows.cli.verbs import federate_with_progress, run_unlearn


@app.command()
def demo(verbose: VerboseOpt = False) -> None:
    """The whole story on the quick profile: prepare, federate, forget a client, audit, summary."""
    quiet(verbose)
    out.rule("[bold]FedForget demo[/bold] (profile quick)")
    data = run_verb(prepare_data, QUICK_PROFILE)
    out.print(
        f"1. data: {data['dataset']}, {data['clients']} clients with Dirichlet label skew "
        f"{data['label_skew']:.2f}, version {data['data_version'][:12]}"
    )
    summary = run_verb(federate_with_progress, QUICK_PROFILE, None, {}, True)
    out.print("2. federation: every client update archived with its sha256, every round registered")
    out.print(rounds_table(summary))
    target = _demo_target(summary)
    out.print(f"3. deletion request: forget [bold]{target}[/bold] (the remaining client with the most training data)")
    served = _served_unlearning(QUICK_PROFILE)
    if served:
        out.print(f"   (through `fedforget serve`: request -> event -> {served})")
        result = run_verb(_unlearn_via_serve, target, QUICK_PROFILE)
    else:
        result = run_verb(run_unlearn, target, None, None, QUICK_PROFILE, {}, "demo")
    out.print(unlearn_table(result))
    teacher_acc = result["distill"].get("teacher_test_accuracy")
    out.print(
        f"   {target}'s running sum was subtracted, then quality restored by distillation from the "
        f"CLIP-Adapter teacher" + (f" (teacher test accuracy {teacher_acc:.4f})" if teacher_acc else "")
    )
    out.print(
        f"   {target}: {result['purged']} archived objects purged, tombstone written, "
        f"versions {', '.join(result['flagged_versions'])} tagged contains_forgotten_clients"
        + (" and their weights retired" if result.get("retired_versions") else "")
        + f"; champion -> version {result['version']}"
    )
    from flows.audit import audit_flow

    checked = run_verb(audit_flow, client=target, profile=QUICK_PROFILE)
    report = checked["report"]
    out.print(
        f"4. audit of version {report['version']}: {target} "
        f"{'[red]PRESENT[/red]' if report['client']['present'] else '[green]absent[/green]'}; "
        f"{report['objects']['checked']} archived objects checked ({report['objects']['ok']} ok, "
        f"{report['objects']['purged']} purged, {report['objects']['retired']} retired by the deletion), "
        f"{len(report['findings'])} findings"
    )
    out.rule("where to look")
    from components.config.runtime import Runtime

    runtime = Runtime.from_env()
    out.print(f"champion: models:/{_model_name(QUICK_PROFILE)}@champion = version {result['version']}")
    out.print(f"tombstone: {summary['store']}/tombstones/{_model_name(QUICK_PROFILE)}/{target}.json")
    if result.get("receipt"):
        out.print(
            f"signed receipt: {summary['store']}/receipts/{_model_name(QUICK_PROFILE)}/{result['request_id']}.json"
            " (check it: fedforget receipt verify FILE)"
        )
    out.print(f"audit report: {checked['files']['markdown']}")
    out.print(f"update archive: {summary['store']}/federations/{summary['federation_id']}/")
    out.print(f"MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    if runtime.default_tracking:
        out.print("Prefect: prefect server start   (then http://127.0.0.1:4200)")


def _served_unlearning(profile: str) -> str | None:
    """The unlearning deployment's name if a Prefect server runs one that a runner polls."""
    if not os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import DeploymentStatus

        from components.config.runtime import Runtime
        from components.config.sections import load_config
        from flows.operations import deployment_names

        runtime = Runtime.from_env()
        name = deployment_names(load_config(runtime.params_path, profile))["unlearn"]
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(name)
        return name if deployment.status == DeploymentStatus.READY else None
    except Exception:  # no server, no deployment: run the flow directly
        return None


def _unlearn_via_serve(client: str, profile: str, timeout_s: float = 600) -> dict[str, Any]:
    """File a deletion request, wait for `serve` to apply it, and read the result back."""
    import time

    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.lineage.store import open_store
    from components.unlearning.requests import RequestBook
    from components.unlearning.tombstones import read_tombstone
    from flows.operations import request_deletion as file_request
    from flows.tracking import Tracker

    request, _, _ = file_request(client, "demo", profile)
    runtime = Runtime.from_env()
    book = RequestBook(open_store(runtime.store))
    deadline = time.monotonic() + timeout_s
    with console.status(f"request {request.request_id} filed; waiting for `fedforget serve` to apply it..."):
        while (current := book.get(request.request_id)).status not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise UsageError(f"request {request.request_id} is still {current.status} after {timeout_s:.0f} s")
            time.sleep(1)
    if current.status == "failed":
        raise UsageError(f"request {request.request_id} failed: {current.error}")
    registry = load_config(runtime.params_path, profile).registry
    tracker = Tracker(runtime, registry)
    tags = tracker.version(current.version).tags
    tombstone = read_tombstone(open_store(runtime.store), registry.model_name, client) or {"purged": []}
    teacher_metrics = (
        tracker.run_metrics(tags["teacher_run_id"]) if tags.get("teacher_run_id", "none") != "none" else {}
    )
    return {
        "client_id": client,
        "request_id": request.request_id,
        "source_version": tags["source_version"],
        "version": current.version,
        "metrics": {
            k: float(v) for k, v in tags.items() if k.startswith(("test_accuracy_", "forgotten_client_accuracy_"))
        },
        "distill": {"teacher_test_accuracy": teacher_metrics.get("test_accuracy")} if teacher_metrics else {},
        "purged": len(tombstone["purged"]),
        "flagged_versions": [
            v.version for v in tracker.versions() if client in v.tags.get("contains_forgotten_clients", "")
        ],
    }


def _demo_target(summary: dict[str, Any]) -> str:
    """The client with the most training data that is not forgotten yet (the most visible deletion).

    A second ``make demo`` in the same checkout trains without the client the
    first one forgot (deleted stays deleted) and forgets the next one.
    """
    from components.config.runtime import Runtime
    from components.data.layout import FederationData

    data = FederationData(Runtime.from_env().data_dir(QUICK_PROFILE) / "federation")
    remaining = [cid for cid in data.client_ids() if cid not in set(summary["excluded_clients"])]
    if len(remaining) < 2:
        raise UsageError("every demo client but one is forgotten already: `rm -rf .fedforget` starts the demo over")
    return max(remaining, key=data.num_examples)


def _model_name(profile: str) -> str:
    from components.config.runtime import Runtime
    from components.config.sections import load_config

    runtime = Runtime.from_env()
    return load_config(runtime.params_path, profile).registry.model_name
