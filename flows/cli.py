"""``fedforget``: the command line, one verb per job.

Heavy libraries (torch, prefect, mlflow, dvc) are imported inside the verbs, so
``fedforget --help`` is instant and logging is configured before they load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="fedforget",
    help="Federated learning with on-demand unlearning, tracked in MLflow and orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="params profile: default or one under profiles:")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="override a param, e.g. --set train.lr=0.01 (repeatable)"),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect and MLflow logs")]

QUICK_PROFILE = "quick"


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _quiet(verbose: bool) -> None:
    """Configure logging of the libraries before they are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        import warnings

        warnings.filterwarnings("ignore", module="mlflow")
        warnings.filterwarnings("ignore", message=".*Dim.AUTO.*")


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; user-fixable errors become a message and exit code 2."""
    from components.config import ConfigError
    from components.data import DataError
    from components.store import StoreError

    try:
        return fn(*args, **kwargs)
    except (UsageError, ConfigError, DataError, StoreError, ValueError, KeyError) as exc:  # incl. UnlearningError, RequestError
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        console.print(f"[red]error:[/red] {message}")
        raise typer.Exit(2) from None


def _overrides(items: list[str] | None, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--set key=value`` items, then the verb's own flags (those given) on top."""
    from components.config import parse_override

    overrides = dict(parse_override(item) for item in items or [])
    overrides.update({key: value for key, value in (flags or {}).items() if value is not None})
    return overrides


# --------------------------------------------------------------------------- prepare


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run DVC with this interpreter's scripts first on PATH (stage commands use them)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, text=True, capture_output=True
    )


def _ensure_remote_bucket(root: Path, remote: str | None) -> None:
    """DVC does not create buckets: create the S3 remote's bucket if it is missing."""
    listed = _dvc(root, "remote", "list")
    remotes = dict(line.split()[:2] for line in listed.stdout.splitlines() if len(line.split()) >= 2)
    if remote is None:
        default = _dvc(root, "remote", "default").stdout.strip()
        remote = default or None
    url = remotes.get(remote or "", "")
    if url.startswith("s3://"):
        from components.store import S3Store

        S3Store(url[len("s3://") :].split("/", 1)[0])._ensure_bucket()


def stage_name(profile: str) -> str:
    """The dvc.yaml stage that prepares ``profile``'s data."""
    return "prepare" if profile == "default" else f"prepare_{profile}"


def prepare_data(profile: str, use_dvc: bool = True, push: bool = True) -> dict[str, Any]:
    """Validate params and raw data, then reproduce the DVC stage (and push it)."""
    from components.config import Runtime, load_config
    from components.data import FEDERATION_DIR, SERVER_DIR, dvc_dir_hash
    from components.prepare import check, prepare

    runtime = Runtime.from_env()
    config = load_config(runtime.params_path, profile)  # every section, not just data
    raw = check(config.data, runtime.raw_dir)  # fails before DVC deletes any old output
    out_dir = runtime.data_dir(profile)
    dvc_used = use_dvc and (runtime.root / ".dvc").is_dir() and (runtime.root / "dvc.yaml").is_file()
    if dvc_used:
        result = _dvc(runtime.root, "repro", stage_name(profile))
        if result.returncode != 0:
            raise UsageError(f"`dvc repro {stage_name(profile)}` failed:\n{result.stderr.strip() or result.stdout.strip()}")
        if push:
            remote = os.environ.get("FEDFORGET_DVC_REMOTE") or None
            _ensure_remote_bucket(runtime.root, remote)
            pushed = _dvc(runtime.root, "push", *(["-r", remote] if remote else []), stage_name(profile))
            if pushed.returncode != 0:
                raise UsageError(f"`dvc push` failed:\n{pushed.stderr.strip() or pushed.stdout.strip()}")
    else:
        prepare(config.data, out_dir, raw)
    meta = json.loads((out_dir / FEDERATION_DIR / "meta.json").read_text())
    return {
        "profile": profile,
        "dataset": meta["dataset"],
        "clients": len(meta["clients"]),
        "label_skew": meta["label_skew"],
        "test": meta["test"]["num_examples"],
        "data_dir": str(out_dir),
        "data_version": dvc_dir_hash(out_dir / FEDERATION_DIR),
        "server_data_version": dvc_dir_hash(out_dir / SERVER_DIR),
        "dvc": dvc_used,
    }


@app.command()
def prepare(
    profile: ProfileOpt = "default",
    dvc: Annotated[bool, typer.Option(help="run through DVC (dvc repro + dvc push)")] = True,
    push: Annotated[bool, typer.Option(help="push the data to the DVC remote ($FEDFORGET_DVC_REMOTE, else DVC's default)")] = True,
) -> None:
    """Prepare the data: client shards, test set and few-shot server set under data/<profile>/."""
    _quiet(False)
    summary = _run(prepare_data, profile, dvc, push)
    out.print(
        f"prepared [bold]{summary['dataset']}[/bold] ({summary['profile']}): {summary['clients']} clients "
        f"(label skew {summary['label_skew']:.2f}), {summary['test']} test examples -> {summary['data_dir']}\n"
        f"data version {summary['data_version']}" + ("" if summary["dvc"] else " (without DVC)")
    )


# --------------------------------------------------------------------------- federate


def _federate_with_progress(
    profile: str, rounds: int | None, overrides: dict[str, Any], fresh: bool
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.federate import run_federate
    from flows.progress import progress_callback

    with Progress(
        TextColumn("[bold]federate[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        job = bar.add_task("starting (Prefect, MLflow)...", total=rounds)

        def on_round(done: int, total: int, metrics: Any, version: str) -> None:
            bar.update(
                job,
                completed=done,
                total=total,
                description=f"round {int(metrics['round'])}: accuracy {metrics['test_accuracy']:.3f} -> v{version}",
            )

        with progress_callback(on_round):
            return run_federate(profile=profile, rounds=rounds, overrides=overrides, fresh=fresh)


def _rounds_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"federation {summary['federation_id']}")
    for column in ("round", "clients", "test acc", "test loss", "round s", "version"):
        table.add_column(column, justify="right")
    for row in summary["rounds"]:
        table.add_row(
            str(int(row["round"])),
            str(int(row["clients"])),
            f"{row['test_accuracy']:.4f}",
            f"{row['test_loss']:.4f}",
            f"{row['round_s']:.1f}",
            row["version"],
        )
    return table


@app.command()
def federate(
    profile: ProfileOpt = "default",
    rounds: Annotated[Optional[int], typer.Option("--rounds", "-r", min=1, help="overrides federate.rounds")] = None,
    fresh: Annotated[bool, typer.Option(help="start from a new model, not from champion")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run rounds of FedAvg; archive every update; register every round's model."""
    _quiet(verbose)
    summary = _run(_federate_with_progress, profile, rounds, _overrides(set_), fresh)
    if json_out:
        out.print_json(json.dumps(summary))
        return
    out.print(_rounds_table(summary))
    out.print(f"champion -> version {summary['champion_version']}  (store {summary['store']})")


# --------------------------------------------------------------------------- unlearn


def _run_unlearn(client: str, version: str | None, request_id: str | None, profile: str,
                 overrides: dict[str, Any], reason: str | None) -> dict[str, Any]:  # fmt: skip
    from flows.unlearn import unlearn as unlearn_flow

    with console.status(f"unlearning {client} (forget, teacher, distil, register)..."):
        return unlearn_flow(
            client_id=client, version=version, request_id=request_id, profile=profile,
            overrides=overrides, reason=reason,
        )  # fmt: skip


def _unlearn_table(result: dict[str, Any]) -> Table:
    m = result["metrics"]
    table = Table(title=f"forgot {result['client_id']}: version {result['source_version']} -> {result['version']}")
    table.add_column("")
    table.add_column("test accuracy", justify="right")
    table.add_column(f"accuracy on {result['client_id']}'s data", justify="right")
    rows = [("before (source version)", "before"), ("after subtraction", "forgotten"), ("after recovery", "after")]
    for label, suffix in rows:
        client_acc = m.get(f"forgotten_client_accuracy_{suffix}")
        table.add_row(label, f"{m[f'test_accuracy_{suffix}']:.4f}", "-" if client_acc is None else f"{client_acc:.4f}")
    return table


@app.command()
def unlearn(
    client: Annotated[str, typer.Option("--client", "-c", help="the client to forget")],
    version: Annotated[Optional[str], typer.Option(help="registered version to unlearn from (default: champion)")] = None,
    variant: Annotated[Optional[str], typer.Option(help="subtract (default) or renormalise")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="clip (default), global-model or none")] = None,
    request_id: Annotated[Optional[str], typer.Option(help="id of the deletion request (generated if absent)")] = None,
    reason: Annotated[Optional[str], typer.Option(help="kept in the tombstone, e.g. a ticket id")] = None,
    profile: ProfileOpt = "default",
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Forget a client: subtract its contributions, distil from the teacher, register, purge."""
    _quiet(verbose)
    overrides = _overrides(set_, {"unlearn.variant": variant, "unlearn.teacher": teacher})
    result = _run(_run_unlearn, client, version, request_id, profile, overrides, reason)
    if json_out:
        out.print_json(json.dumps(result))
        return
    if result["status"] != "unlearned":
        out.print(
            f"{result['client_id']} was already forgotten (request {result['request_id']}): "
            f"version {result['version']}; nothing changed"
        )
        return
    out.print(_unlearn_table(result))
    out.print(
        f"champion -> version {result['version']} (request {result['request_id']}, {result['variant']}, "
        f"teacher {result['teacher']}); {result['purged']} archived objects of {result['client_id']} purged; "
        f"versions still containing it, now tagged: {', '.join(result['flagged_versions']) or 'none'}"
    )


# --------------------------------------------------------------------------- audit


@app.command()
def audit(
    version: Annotated[Optional[str], typer.Option(help="the registered version to audit")] = None,
    alias: Annotated[Optional[str], typer.Option(help="or an alias (default: champion)")] = None,
    client: Annotated[Optional[str], typer.Option(help="answer whether this client's contributions are in it")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="folder for audit.md, lineage.png, audit.json")] = None,
    profile: ProfileOpt = "default",
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """What is in a model version: lineage, deletions, every archived hash verified.

    Exit status: 0 verified (with --client: the client is absent), 1 the client
    is present, 3 findings (a missing or changed object, a broken tag), 2 usage.
    """
    _quiet(verbose)

    def run() -> dict[str, Any]:
        from flows.audit import audit_flow

        with console.status("auditing (walking the lineage, hashing every archived object)..."):
            return audit_flow(version=version, alias=alias, client=client, profile=profile, out_dir=str(out_dir) if out_dir else None)

    result = _run(run)
    report = result["report"]
    if json_out:
        out_console_json(report)
    else:
        _print_audit(report, result)
    raise typer.Exit(result["exit_code"])


def out_console_json(data: dict[str, Any]) -> None:
    # Plain print: rich would wrap long lines of machine-readable output.
    print(json.dumps(data, indent=2, sort_keys=True))


def _print_audit(report: dict[str, Any], result: dict[str, Any]) -> None:
    from components.audit_render import VERDICTS

    out.print(f"[bold]version {report['version']}[/bold] ({report['version_kind']}): {VERDICTS[report['verdict']]}")
    if report["client"] is not None:
        c = report["client"]
        out.print(f"client {c['client_id']}: {'[red]PRESENT[/red]' if c['present'] else '[green]absent[/green]'}")
    table = Table(title="lineage (newest first)")
    for column in ("step", "version", "round", "clients / deletion", "flags"):
        table.add_column(column)
    for node in report["lineage"]:
        if node["deletion"]:
            what = f"deleted {node['deletion']['client_id']} (request {node['deletion']['request_id']})"
        else:
            what = ", ".join(f"{c['client_id']}:{c['weight']:.2f}" for c in node["clients"])
        flags = ("contains forgotten " + ",".join(node["contains_forgotten_clients"])) if node["contains_forgotten_clients"] else ""
        table.add_row(node["kind"], node["version"] or "-", str(node["server_round"]), what, flags)
    out.print(table)
    o = report["objects"]
    out.print(f"objects: {o['checked']} checked, {o['ok']} ok, {o['purged']} purged, {o['missing']} missing, {o['mismatch']} changed")
    for finding in report["findings"]:
        out.print(f"[red]finding[/red] {finding['kind']}: {finding['message']}")
    out.print(f"report: {result['files']['markdown']} (logged to MLflow run {result['run_id']})")


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    profile: ProfileOpt = "default",
    quick: Annotated[bool, typer.Option("--quick", help="the quick profile (tiny, a few minutes)")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="fashion-mnist, mnist or digits")] = None,
    clients: Annotated[Optional[int], typer.Option(min=2, help="number of clients K")] = None,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="federation rounds R")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="number of seeds")] = None,
    target_client: Annotated[Optional[str], typer.Option(help="the client to forget (default: the largest)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="results folder (results.md, results.json, plots)")] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Measure forgetting and recovery against retraining from scratch (backdoor, MIA, timings)."""
    _quiet(verbose)
    overrides = _overrides(set_, {
        "evaluate.data.dataset": dataset, "evaluate.data.num_clients": clients, "evaluate.rounds": rounds,
        "evaluate.seeds": seeds, "evaluate.target_client": target_client,
    })  # fmt: skip
    chosen = QUICK_PROFILE if quick else profile

    def run() -> dict[str, Any]:
        from flows.evaluate import evaluate_flow

        with console.status("evaluating: Original, Retrain and three unlearning methods per seed..."):
            return evaluate_flow(profile=chosen, overrides=overrides, out_dir=str(out_dir) if out_dir else None)

    result = _run(run)
    if json_out:
        out_console_json({k: result[k] for k in ("config", "summary", "targets", "files", "run_id", "all_finite")})
        return
    print(Path(result["files"]["results_md"]).read_text())
    out.print(f"results: {Path(result['files']['results_md']).parent} (MLflow run {result['run_id']})")


# --------------------------------------------------------------------------- operations


@app.command()
def serve(
    profile: ProfileOpt = "default",
    sweep: Annotated[bool, typer.Option(help="start requests whose event was lost")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the scheduled retraining and the event-triggered unlearning deployments (blocks)."""
    _quiet(verbose)
    from components.config import Runtime, load_config

    def run() -> None:
        from flows.operations import deployment_names, serve as serve_deployments

        runtime = Runtime.from_env()
        config = load_config(runtime.params_path, profile)
        names = deployment_names(config)
        out.print(
            f"serving {names['retrain']} (cron '{config.operations.retrain_cron}' {config.operations.timezone}, "
            f"promote: {config.operations.promote}) and {names['unlearn']} (event fedforget.deletion.requested); "
            f"file requests with `fedforget request-deletion --client <id>`; Ctrl+C to stop"
        )
        serve_deployments(profile=profile, sweep=sweep)

    _run(run)


@app.command("request-deletion")
def request_deletion(
    client: Annotated[str, typer.Option("--client", "-c", help="the client whose data must be forgotten")],
    reason: Annotated[Optional[str], typer.Option(help="kept with the request and in the tombstone")] = None,
    profile: ProfileOpt = "default",
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the request as JSON")] = False,
) -> None:
    """File a deletion request (durably, then as an event); `fedforget serve` applies it."""
    _quiet(verbose)
    from flows.operations import request_deletion as file_request

    request, new, emitted = _run(file_request, client, reason, profile)
    if json_out:
        out_console_json({**request.to_dict(), "new": new, "event_emitted": emitted})
        return
    if not new:
        out.print(f"a request for {client} is already {request.status}: {request.request_id}")
        return
    out.print(request.request_id)
    if not emitted:
        console.print(
            "[yellow]the request is filed, but its event could not be sent to Prefect; "
            "`fedforget serve` will pick it up[/yellow]"
        )


@app.command()
def requests(
    profile: ProfileOpt = "default",
    json_out: Annotated[bool, typer.Option("--json", help="print the requests as JSON")] = False,
) -> None:
    """List deletion requests and their status (pending, running, done, failed)."""
    _quiet(False)

    def run() -> list[Any]:
        from components.config import Runtime
        from components.requests import RequestBook
        from components.store import open_store

        return RequestBook(open_store(Runtime.from_env().store)).all()

    found = _run(run)
    if json_out:
        out_console_json({"requests": [r.to_dict() for r in found]})
        return
    table = Table(title="deletion requests")
    for column in ("request", "client", "status", "filed", "updated", "version", "reason / error"):
        table.add_column(column)
    for r in found:
        table.add_row(r.request_id, r.client_id, r.status, r.created_at[:19], r.updated_at[:19], r.version or "-", r.error or r.reason or "")
    out.print(table)


# --------------------------------------------------------------------------- teacher


@app.command()
def teacher(
    profile: ProfileOpt = "default",
    refit: Annotated[bool, typer.Option(help="fit again even if a teacher for this data exists")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Fit (or find) the CLIP-Adapter teacher for the current few-shot data version."""
    _quiet(verbose)

    def run() -> dict[str, Any]:
        from flows.teacher import teacher as teacher_flow

        with console.status("fitting the teacher (open_clip backbone frozen, adapter trained)..."):
            return teacher_flow(profile=profile, overrides=_overrides(set_), refit=refit)

    result = _run(run)
    if json_out:
        out.print_json(json.dumps(result))
        return
    m = result["metrics"]
    out.print(
        f"teacher ({result['preset']}) run {result['run_id']} "
        f"{'reused' if result['reused'] else 'fitted'} for few-shot data {result['data_version'][:12]}: "
        f"few-shot val accuracy {m['val_accuracy']:.4f}, test-subset accuracy {m.get('test_accuracy', float('nan')):.4f}"
    )


# --------------------------------------------------------------------------- demo


@app.command()
def demo(verbose: VerboseOpt = False) -> None:
    """The whole story on the quick profile: prepare, federate, forget a client, audit, summary."""
    _quiet(verbose)
    out.rule("[bold]FedForget demo[/bold] (profile quick)")
    data = _run(prepare_data, QUICK_PROFILE)
    out.print(
        f"1. data: {data['dataset']}, {data['clients']} clients with Dirichlet label skew "
        f"{data['label_skew']:.2f}, version {data['data_version'][:12]}"
    )
    summary = _run(_federate_with_progress, QUICK_PROFILE, None, {}, True)
    out.print("2. federation: every client update archived with its sha256, every round registered")
    out.print(_rounds_table(summary))
    target = _demo_target(summary)
    out.print(f"3. deletion request: forget [bold]{target}[/bold] (the client with the most training data)")
    served = _served_unlearning(QUICK_PROFILE)
    if served:
        out.print(f"   (through `fedforget serve`: request -> event -> {served})")
        result = _run(_unlearn_via_serve, target, QUICK_PROFILE)
    else:
        result = _run(_run_unlearn, target, None, None, QUICK_PROFILE, {}, "demo")
    out.print(_unlearn_table(result))
    teacher_acc = result["distill"].get("teacher_test_accuracy")
    out.print(
        f"   {target}'s running sum was subtracted, then quality restored by distillation from the "
        f"CLIP-Adapter teacher" + (f" (teacher test accuracy {teacher_acc:.4f})" if teacher_acc else "")
    )
    out.print(
        f"   {target}: {result['purged']} archived objects purged, tombstone written, "
        f"versions {', '.join(result['flagged_versions'])} tagged contains_forgotten_clients; "
        f"champion -> version {result['version']}"
    )
    from flows.audit import audit_flow

    checked = _run(audit_flow, client=target, profile=QUICK_PROFILE)
    report = checked["report"]
    out.print(
        f"4. audit of version {report['version']}: {target} "
        f"{'[red]PRESENT[/red]' if report['client']['present'] else '[green]absent[/green]'}; "
        f"{report['objects']['checked']} archived objects checked ({report['objects']['ok']} ok, "
        f"{report['objects']['purged']} purged by the deletion), {len(report['findings'])} findings"
    )
    out.rule("where to look")
    from components.config import Runtime

    runtime = Runtime.from_env()
    out.print(f"champion: models:/{_model_name(QUICK_PROFILE)}@champion = version {result['version']}")
    out.print(f"tombstone: {summary['store']}/tombstones/{target}.json")
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

        from components.config import Runtime, load_config
        from flows.operations import deployment_names

        runtime = Runtime.from_env()
        name = deployment_names(load_config(runtime.params_path, profile))["unlearn"]
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(name)
        return name if str(deployment.status).upper().endswith("READY") and "NOT" not in str(deployment.status).upper() else None
    except Exception:  # noqa: BLE001 - no server, no deployment: run the flow directly
        return None


def _unlearn_via_serve(client: str, profile: str, timeout_s: float = 600) -> dict[str, Any]:
    """File a deletion request, wait for `serve` to apply it, and read the result back."""
    import time

    from components.config import Runtime, load_config
    from components.requests import RequestBook
    from components.store import open_store
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
    tracker = Tracker(runtime, load_config(runtime.params_path, profile).registry)
    tags = tracker.version(current.version).tags
    tombstone = json.loads(open_store(runtime.store).get(f"tombstones/{client}.json"))
    teacher_metrics = tracker.run_metrics(tags["teacher_run_id"]) if tags.get("teacher_run_id", "none") != "none" else {}
    return {
        "client_id": client,
        "request_id": request.request_id,
        "source_version": tags["source_version"],
        "version": current.version,
        "metrics": {k: float(v) for k, v in tags.items() if k.startswith(("test_accuracy_", "forgotten_client_accuracy_"))},
        "distill": {"teacher_test_accuracy": teacher_metrics.get("test_accuracy")} if teacher_metrics else {},
        "purged": len(tombstone["purged"]),
        "flagged_versions": [v.version for v in tracker.versions() if client in v.tags.get("contains_forgotten_clients", "")],
    }


def _demo_target(summary: dict[str, Any]) -> str:
    """The client with the most training data (the deletion with the most visible effect)."""
    from components.config import Runtime
    from components.data import FederationData

    data = FederationData(Runtime.from_env().data_dir(QUICK_PROFILE) / "federation")
    return max(data.client_ids(), key=data.num_examples)


def _model_name(profile: str) -> str:
    from components.config import Runtime, load_config

    runtime = Runtime.from_env()
    return load_config(runtime.params_path, profile).registry.model_name


def main() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

