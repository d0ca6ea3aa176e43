"""The verbs: federate, unlearn, audit, evaluate, serve, request-deletion, requests, teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli.app import (
    QUICK_PROFILE,
    ProfileOpt,
    SetOpt,
    UsageError,
    VerboseOpt,
    app,
    console,
    out,
    overrides_from,
    quiet,
    run_verb,
)
from flows.cli.tables import out_console_json, print_audit, rounds_table, unlearn_table


def federate_with_progress(profile: str, rounds: int | None, overrides: dict[str, Any], fresh: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from flows.federate import run_federate
    from flows.progress import progress_callback

    runtime = Runtime.from_env()
    load_config(runtime.params_path, profile, overrides)  # bad params: one clear error before anything starts
    with Progress(
        TextColumn("[bold]federate[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,  # the rounds table follows; a failure leaves only its one-line error
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


@app.command()
def federate(
    profile: ProfileOpt = "default",
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", min=1, help="overrides federate.rounds")] = None,
    fresh: Annotated[bool, typer.Option(help="start from a new model, not from champion")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run rounds of FedAvg; archive every update; register every round's model."""
    quiet(verbose)
    summary = run_verb(federate_with_progress, profile, rounds, overrides_from(set_), fresh)
    if json_out:
        out.print_json(json.dumps(summary))
        return
    out.print(rounds_table(summary))
    out.print(f"champion -> version {summary['champion_version']}  (store {summary['store']})")


def run_unlearn(client: str, version: str | None, request_id: str | None, profile: str,
                 overrides: dict[str, Any], reason: str | None) -> dict[str, Any]:  # fmt: skip
    from flows.unlearn import unlearn as unlearn_flow

    with console.status(f"unlearning {client} (forget, teacher, distil, register)..."):
        return unlearn_flow(
            client_id=client, version=version, request_id=request_id, profile=profile,
            overrides=overrides, reason=reason,
        )  # fmt: skip


@app.command()
def unlearn(
    client: Annotated[str, typer.Option("--client", "-c", help="the client to forget")],
    version: Annotated[str | None, typer.Option(help="registered version to unlearn from (default: champion)")] = None,
    variant: Annotated[str | None, typer.Option(help="subtract (default) or renormalise")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="clip (default) or none; global-model needs --force-teacher")
    ] = None,
    force_teacher: Annotated[
        bool, typer.Option(help="allow the global-model teacher, which saw the client (the version is flagged)")
    ] = False,
    request_id: Annotated[str | None, typer.Option(help="id of the deletion request (generated if absent)")] = None,
    reason: Annotated[str | None, typer.Option(help="kept in the tombstone, e.g. a ticket id")] = None,
    profile: ProfileOpt = "default",
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Forget a client: subtract its contributions, distil from the teacher, register, purge."""
    quiet(verbose)
    overrides = overrides_from(
        set_, {"unlearn.variant": variant, "unlearn.teacher": teacher, "unlearn.force_teacher": force_teacher or None}
    )
    result = run_verb(run_unlearn, client, version, request_id, profile, overrides, reason)
    if json_out:
        out.print_json(json.dumps(result))
        return
    if result["status"] != "unlearned":
        out.print(
            f"{result['client_id']} was already forgotten (request {result['request_id']}): "
            f"version {result['version']}; nothing changed"
        )
        return
    out.print(unlearn_table(result))
    out.print(
        f"champion -> version {result['version']} (request {result['request_id']}, guarantee {result['guarantee']}, "
        f"{result['variant']}, teacher {result['teacher']}); {result['purged']} archived objects of "
        f"{result['client_id']} purged; versions still containing it, now tagged: "
        f"{', '.join(result['flagged_versions']) or 'none'}; signed receipt in the store under "
        f"receipts/ (fedforget receipt verify FILE)"
    )


@app.command()
def audit(
    version: Annotated[str | None, typer.Option(help="the registered version to audit")] = None,
    alias: Annotated[str | None, typer.Option(help="or an alias (default: champion)")] = None,
    client: Annotated[str | None, typer.Option(help="answer whether this client's contributions are in it")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="folder for audit.md, lineage.png, audit.json")] = None,
    profile: ProfileOpt = "default",
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """What is in a model version: lineage, deletions, every archived hash verified.

    Exit status: 0 verified (with --client: the client is absent), 1 the client
    is present, 3 findings (a missing or changed object, a broken tag), 2 usage.
    """
    quiet(verbose)

    def run() -> dict[str, Any]:
        from flows.audit import audit_flow

        with console.status("auditing (walking the lineage, hashing every archived object)..."):
            return audit_flow(
                version=version, alias=alias, client=client, profile=profile, out_dir=str(out_dir) if out_dir else None
            )

    result = run_verb(run)
    report = result["report"]
    if json_out:
        out_console_json(report)
    else:
        print_audit(report, result)
    raise typer.Exit(result["exit_code"])


@app.command()
def evaluate(
    suite: Annotated[
        str, typer.Argument(help="unlearning (the default), distillation, fewshot, heterogeneous or robustness")
    ] = "unlearning",
    profile: ProfileOpt = "default",
    quick: Annotated[bool, typer.Option("--quick", help="the quick profile (tiny, a few minutes)")] = False,
    dataset: Annotated[str | None, typer.Option(help="fashion-mnist, mnist or digits")] = None,
    clients: Annotated[int | None, typer.Option(min=2, help="number of clients K")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="federation rounds R")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="number of seeds")] = None,
    target_client: Annotated[str | None, typer.Option(help="the client to forget (default: the largest)")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="results folder (results.md, results.json, plots)")
    ] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Benchmark a suite; plain `evaluate` measures forgetting and recovery against retraining (backdoor, MIA, timings)."""
    quiet(verbose)
    if suite != "unlearning":
        _evaluate_suite(suite, quick, seeds, rounds, set_, out_dir, json_out, dataset, clients, target_client)
        return
    overrides = overrides_from(set_, {
        "evaluate.data.dataset": dataset, "evaluate.data.num_clients": clients, "evaluate.rounds": rounds,
        "evaluate.seeds": seeds, "evaluate.target_client": target_client,
    })  # fmt: skip
    chosen = QUICK_PROFILE if quick else profile

    def run() -> dict[str, Any]:
        from flows.evaluate import evaluate_flow

        with console.status("evaluating: Original, Retrain and three unlearning methods per seed..."):
            return evaluate_flow(profile=chosen, overrides=overrides, out_dir=str(out_dir) if out_dir else None)

    result = run_verb(run)
    if json_out:
        out_console_json({k: result[k] for k in ("config", "summary", "targets", "files", "run_id", "all_finite")})
        return
    print(Path(result["files"]["results_md"]).read_text())
    out.print(f"results: {Path(result['files']['results_md']).parent} (MLflow run {result['run_id']})")


def _evaluate_suite(
    suite: str, quick: bool, seeds: int | None, rounds: int | None, set_: list[str] | None, out_dir: Path | None,
    json_out: bool, *unlearning_only: Any,
) -> None:  # fmt: skip
    from flows.suites import suite_named

    def check() -> None:
        suite_named(suite)  # an unknown suite: one clear error
        if any(value is not None for value in unlearning_only):
            raise UsageError(
                "--dataset, --clients and --target-client belong to the unlearning suite; "
                f"set the {suite} suite's with --set {suite}.<setting>=<value>"
            )

    run_verb(check)
    overrides = overrides_from(set_, {f"{suite}.rounds": rounds})

    def run() -> dict[str, Any]:
        from flows.suites import suite_flow

        with console.status(f"evaluating {suite}: {suite_named(suite).about}..."):
            return suite_flow(
                suite=suite, quick=quick, seeds=seeds, overrides=overrides, out_dir=str(out_dir) if out_dir else None
            )

    result = run_verb(run)
    if json_out:
        out_console_json({k: result[k] for k in ("config", "rows", "targets", "files", "run_id") if k in result})
        return
    print(Path(result["files"]["results_md"]).read_text())
    out.print(f"results: {Path(result['files']['results_md']).parent} (MLflow run {result['run_id']})")


@app.command()
def serve(
    profile: ProfileOpt = "default",
    sweep: Annotated[bool, typer.Option(help="start requests whose event was lost")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the scheduled retraining and the event-triggered unlearning deployments (blocks)."""
    quiet(verbose)

    def announce(config: Any) -> None:
        from flows.operations import deployment_names

        names = deployment_names(config)
        out.print(
            f"serving {names['retrain']} (cron '{config.operations.retrain_cron}' {config.operations.timezone}, "
            f"promote: {config.operations.promote}) and {names['unlearn']} (event fedforget.deletion.requested); "
            f"file requests with `fedforget request-deletion --client <id>`; Ctrl+C to stop"
        )

    def run() -> None:
        from flows.operations import serve as serve_deployments

        serve_deployments(profile=profile, sweep=sweep, on_start=announce)

    run_verb(run)


@app.command("request-deletion")
def request_deletion(
    client: Annotated[str, typer.Option("--client", "-c", help="the client whose data must be forgotten")],
    reason: Annotated[str | None, typer.Option(help="kept with the request and in the tombstone")] = None,
    profile: ProfileOpt = "default",
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the request as JSON")] = False,
) -> None:
    """File a deletion request (durably, then as an event); `fedforget serve` applies it."""
    quiet(verbose)
    from flows.operations import request_deletion as file_request

    request, new, emitted = run_verb(file_request, client, reason, profile)
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
    quiet(False)

    def run() -> list[Any]:
        from components.config.runtime import Runtime
        from components.lineage.store import open_store
        from components.unlearning.requests import RequestBook

        return RequestBook(open_store(Runtime.from_env().store)).all()

    found = run_verb(run)
    if json_out:
        out_console_json({"requests": [r.to_dict() for r in found]})
        return
    table = Table(title="deletion requests")
    for column in ("request", "model", "client", "status", "filed", "updated", "version", "reason / error"):
        table.add_column(column)
    for r in found:
        table.add_row(
            r.request_id,
            r.model or "-",
            r.client_id,
            r.status,
            r.created_at[:19],
            r.updated_at[:19],
            r.version or "-",
            r.error or r.reason or "",
        )
    out.print(table)


@app.command()
def export(
    client: Annotated[str, typer.Option(help="the client whose model to write")],
    out_path: Annotated[Path, typer.Option("--out", help="the file to write (safetensors, spec in its metadata)")],
    version: Annotated[str | None, typer.Option(help="the registered version (default: the champion)")] = None,
    profile: ProfileOpt = "default",
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Write the model a client serves at a version: its personalised model (shared base: the base and its
    own head; ensemble: its architecture's model; soft labels: its own), else the global one."""
    quiet(False)

    def run() -> dict[str, Any]:
        from flows.export import export_client_model

        return export_client_model(client, out_path, version, profile)

    result = run_verb(run)
    if json_out:
        out_console_json(result)
        return
    out.print(
        f"client {result['client_id']}: {result['model']['name']} model of version {result['version']} "
        f"({result['protocol']}) -> {result['path']} (sha256 {result['sha256'][:16]}..., {result['bytes']:,} bytes)"
    )


@app.command()
def teacher(
    profile: ProfileOpt = "default",
    refit: Annotated[bool, typer.Option(help="fit again even if a teacher for this data exists")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Fit (or find) the CLIP-Adapter teacher for the current few-shot data version."""
    quiet(verbose)

    def run() -> dict[str, Any]:
        from flows.teacher import teacher as teacher_flow

        with console.status("fitting the teacher (open_clip backbone frozen, adapter trained)..."):
            return teacher_flow(profile=profile, overrides=overrides_from(set_), refit=refit)

    result = run_verb(run)
    if json_out:
        out.print_json(json.dumps(result))
        return
    m = result["metrics"]
    out.print(
        f"teacher ({result['preset']}) run {result['run_id']} "
        f"{'reused' if result['reused'] else 'fitted'} for few-shot data {result['data_version'][:12]}: "
        f"few-shot val accuracy {m['val_accuracy']:.4f}, test-subset accuracy {m.get('test_accuracy', float('nan')):.4f}"
    )


receipt_app = typer.Typer(help="Signed deletion receipts.", no_args_is_help=True)
app.add_typer(receipt_app, name="receipt")


@receipt_app.command("verify")
def receipt_verify(
    file: Annotated[Path, typer.Argument(help="the receipt (JSON) a deletion produced")],
    public_key: Annotated[
        Path | None, typer.Option(help="the operator's Ed25519 public key (PEM); default: the project's key")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check a deletion receipt: its signature, then every hash it names against the store and the registry.

    Exit status: 0 valid, 3 it does not verify (each problem is listed), 2 usage (no such file, not a receipt).
    """
    quiet(False)

    def run() -> dict[str, Any]:
        from flows.receipts import verify_receipt_file

        return verify_receipt_file(file, public_key)

    result = run_verb(run)
    if json_out:
        out_console_json({k: v for k, v in result.items()})
    else:
        r = result["receipt"]
        head = f"receipt {r.get('request_id')}: {r.get('client_id')} forgotten from {r.get('model')}"
        if result["valid"]:
            out.print(f"{head} -> version {r.get('new_version')} ({r.get('guarantee')}): [green]valid[/green]")
        else:
            out.print(f"{head}: [red]does not verify[/red]")
            for problem in result["problems"]:
                out.print(f"  - {problem}", highlight=False)
    raise typer.Exit(0 if result["valid"] else 3)
