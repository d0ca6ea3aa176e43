"""Prefect flow ``federate``: rounds of FedAvg with an archived, registered history.

Per round: pick clients -> train them as parallel tasks -> check and aggregate
-> archive every update, running sum, the global state and the manifest (the
commit point) -> evaluate -> register the global model in MLflow with lineage
tags. After the last round the ``champion`` alias moves to the final version.
A round that fails before its manifest is written leaves no registered version.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from components.aggregation import ClientResult, ClientUpdate, Strategy, build_strategy
from components.config import Config, Runtime, load_config
from components.data import SERVER_DIR, FederationData, dvc_dir_hash
from components.federation import (
    ClientJob,
    check_results,
    client_seed,
    evaluate_state,
    global_version_tags,
    manifest_ref_from_tags,
    run_client,
)
from components.history import LineageHead, Manifest, UpdateHistory, uncommitted_round_objects
from components.models import ModelSpec, init_model
from components.state import StateDict
from components.store import ObjectRef, open_store
from components.training import torch_threads
from components.unlearning import TaintedLineageError, check_clean, forgotten_in, tombstoned_clients
from flows.locks import model_write_lock
from flows.progress import report_progress
from flows.teacher import teacher_task
from flows.tracking import Tracker, VersionInfo

COLLECTED_TAG = "archive_collected"
TAINTED_EVENT = "fedforget.model.tainted"  # an alias points at a version that holds a forgotten client


@task(name="train-client", cache_policy=NO_CACHE, task_run_name="train-{job.client_id}-r{job.server_round}")
def train_client_task(job: ClientJob) -> ClientResult:
    return run_client(job)


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate_task(
    strategy: Strategy, server_round: int, base: StateDict, results: Sequence[ClientResult]
) -> tuple[StateDict, list[ClientUpdate]]:
    check_results(server_round, results)
    return strategy.aggregate_fit(server_round, base, results)


@task(name="archive-round", cache_policy=NO_CACHE)
def archive_round_task(
    store_url: str,
    federation_id: str,
    server_round: int,
    head: LineageHead,
    updates: Sequence[ClientUpdate],
    new_state: StateDict,
    model: ModelSpec,
    strategy: Mapping[str, Any],
    data_version: str,
    metrics: Mapping[str, Mapping[str, float]],
) -> tuple[ObjectRef, Manifest]:
    history = UpdateHistory(open_store(store_url))
    return history.commit_round(
        federation_id, server_round, head, updates, new_state, model, strategy,
        data_version, metrics,
    )  # fmt: skip


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(spec: ModelSpec, state: StateDict, test_path: str, batch_size: int) -> dict[str, float]:
    return evaluate_state(spec, state, test_path, batch_size)


@task(name="register-version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_version_task(
    tracker: Tracker,
    run_id: str,
    spec: ModelSpec,
    state: StateDict,
    input_shape: tuple[int, ...],
    server_round: int,
    tags: Mapping[str, str],
) -> VersionInfo:
    return tracker.register_model(
        run_id, spec, state, input_shape, f"global-round-{server_round:05d}", tags
    )


@task(name="collect-failed-runs", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def collect_garbage_task(tracker: Tracker, store_url: str) -> dict[str, int]:
    """Delete what failed runs left in the store: rounds never committed, deletions never registered.

    Only runs whose MLflow run ended FAILED are touched (a run still marked
    RUNNING, e.g. after a hard crash, is left alone); each is collected once.
    """
    store = open_store(store_url)
    removed = {"federations": 0, "deletions": 0, "objects": 0}
    for run_id, tags in tracker.failed_runs("federation", unless_tag=COLLECTED_TAG):
        keys = uncommitted_round_objects(store, tags["federation_id"])
        for key in keys:
            store.delete(key)
        removed["federations"] += 1
        removed["objects"] += len(keys)
        tracker.set_tags(run_id, {COLLECTED_TAG: str(len(keys))})
    for run_id, tags in tracker.failed_runs("unlearning", unless_tag=COLLECTED_TAG):
        keys = []
        if not tracker.find_versions(request_id=tags["request_id"]):  # never registered: unreferenced
            keys = store.list(UpdateHistory.unlearning_prefix(tags["request_id"]))
            for key in keys:
                store.delete(key)
        removed["deletions"] += 1
        removed["objects"] += len(keys)
        tracker.set_tags(run_id, {COLLECTED_TAG: str(len(keys))})
    return removed


def new_federation_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"fed-{stamp}-{secrets.token_hex(3)}"


def build_task_runner(config: Config) -> ThreadPoolTaskRunner | ProcessPoolTaskRunner:
    """The task runner that trains clients in parallel (``federate.task_runner``)."""
    workers = config.federate.max_workers
    if config.federate.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    return ThreadPoolTaskRunner(max_workers=workers)


def _resume_head(
    tracker: Tracker, history: UpdateHistory, spec: ModelSpec, logger: Any
) -> tuple[LineageHead, VersionInfo] | None:
    champion = tracker.alias()
    if champion is None:
        return None
    ref = manifest_ref_from_tags(champion.tags)
    alias = tracker.registry.champion_alias
    try:
        check_clean(
            history, history.store, ref, champion.version, "resume training from",
            f"The {alias} alias was moved to it (a rollback?): point {alias} at a version without them "
            "(the deletion's version or a later one), or start over with --fresh.",
        )  # fmt: skip
    except TaintedLineageError as exc:
        logger.error("%s", exc)
        emit_tainted_event(tracker.registry.model_name, champion.version, exc.clients, alias)
        raise
    manifest = history.read_manifest(ref)
    if manifest.model != spec:
        raise ValueError(
            f"champion version {champion.version} is a {manifest.model.to_dict()} model but "
            f"params ask for {spec.to_dict()}; start over with --fresh"
        )
    logger.info("resuming from champion version %s (round %s)", champion.version, manifest.server_round)
    return LineageHead.of(ref, manifest), champion


def emit_tainted_event(model_name: str, version: str, clients: Sequence[str], alias: str) -> None:
    """Tell Prefect (and whoever automates on its events) that an alias points at a tainted version.

    Best effort: without a reachable API the error is still raised and logged.
    """
    try:
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        emit_event(
            event=TAINTED_EVENT,
            resource={"prefect.resource.id": f"fedforget.model.{model_name}.{version}"},
            payload={"version": version, "alias": alias, "forgotten_clients": list(clients)},
        )
        EventsWorker.drain_all(timeout=5)  # the run is about to fail: send it now
    except Exception:  # noqa: BLE001 - the refusal itself must not depend on the event bus
        pass


def _promote(
    tracker: Tracker, history: UpdateHistory, final: VersionInfo, accuracy: float,
    data: FederationData, config: Config, rule: str,
) -> dict[str, Any]:  # fmt: skip
    """Move ``champion`` to ``final`` as the rule says; tag a rejected version with the reason."""
    current = tracker.alias()
    decision: dict[str, Any] = {"rule": rule, "champion": current.version if current else None, "promoted": False}
    check_clean(
        history, history.store, manifest_ref_from_tags(final.tags), final.version, "promote",
        "Its clients were forgotten while it trained; run the federation again.",
    )  # fmt: skip
    if current is not None and current.version != final.version:
        if forgotten_in(history, history.store, manifest_ref_from_tags(current.tags)):
            # A champion that still holds a forgotten client is no yardstick: a clean candidate replaces it.
            rule = "always" if rule == "gate" else rule
            decision["champion_tainted"] = True
    if rule == "never":
        decision["decision"] = f"left at version {decision['champion']} (promote: never)"
        return decision
    if rule == "gate" and current is not None and current.version != final.version:
        # The champion is re-evaluated on today's test set, like the candidate.
        manifest = history.read_manifest(manifest_ref_from_tags(current.tags))
        champion_accuracy = evaluate_state(
            manifest.model, history.read_state(manifest.global_state), str(data.root / "test.safetensors"),
            config.federate.eval_batch_size,
        )["accuracy"]  # fmt: skip
        tolerance = config.operations.gate_tolerance
        decision |= {"champion_accuracy": champion_accuracy, "candidate_accuracy": accuracy, "tolerance": tolerance}
        if accuracy < champion_accuracy - tolerance:
            reason = (
                f"test accuracy {accuracy:.4f} < champion version {current.version}'s {champion_accuracy:.4f} "
                f"- tolerance {tolerance}"
            )
            tracker.set_version_tag(final.version, "rejected", reason)
            decision["decision"] = f"version {final.version} rejected: {reason}"
            return decision
    tracker.set_alias(final.version)
    decision["promoted"] = True
    decision["decision"] = f"version {final.version} promoted"
    return decision


def _plot_convergence(rows: Sequence[Mapping[str, float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc_ax.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    loss_ax.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="test")
    loss_ax.plot(rounds, [r["train_loss"] for r in rows], marker="o", label="train (mean)")
    loss_ax.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    loss_ax.legend()
    fig.tight_layout()
    return fig


@flow(name="federate", task_runner=ThreadPoolTaskRunner(max_workers=2))
def federate(
    profile: str = "default",
    rounds: int | None = None,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    project: str | None = None,
    promote: str = "always",
) -> dict[str, Any]:
    """Run ``rounds`` rounds of federated training and register every global model.

    Parameters
    ----------
    profile
        The params profile (``default`` or one under ``profiles:``).
    rounds
        Overrides ``federate.rounds``.
    overrides
        Dotted params overrides, e.g. ``{"train.lr": 0.01}``.
    fresh
        Start from a new initial model even if a ``champion`` exists.
    project
        The project folder (default: found from the working directory).
    promote
        ``always`` moves ``champion`` to the last version; ``gate`` only if its
        test accuracy is at least the champion's minus ``operations.gate_tolerance``
        (otherwise the version is tagged ``rejected`` with the reason); ``never``
        leaves ``champion`` alone.
    """
    if promote not in ("always", "gate", "never"):
        raise ValueError(f"promote must be always, gate or never, not {promote!r}")
    runtime = Runtime.from_env(project)
    extra = dict(overrides or {})
    if rounds is not None:
        extra["federate.rounds"] = rounds
    config = load_config(runtime.params_path, profile, extra)
    with model_write_lock(config):  # no deletion changes the model while this runs
        return _federate(runtime, config, profile, fresh, promote)


def _federate(runtime: Runtime, config: Config, profile: str, fresh: bool, promote: str) -> dict[str, Any]:
    logger = get_run_logger()
    data = FederationData(runtime.data_dir(profile) / "federation")
    meta = data.meta
    spec = config.model.spec(len(meta["class_names"]), tuple(meta["image_shape"]))
    input_shape = (1, *meta["image_shape"])
    data_version = dvc_dir_hash(data.root)
    store = open_store(runtime.store)
    history = UpdateHistory(store)
    tracker = Tracker(runtime, config.registry)
    strategy = build_strategy(config.federate.strategy, clients_per_round=config.federate.clients_per_round)
    federation_id = new_federation_id()
    # Resume (and its lineage check) first: a refused source leaves everything as it was.
    resumed = None if fresh or not config.federate.resume else _resume_head(tracker, history, spec, logger)
    collected = collect_garbage_task(tracker, runtime.store)
    if collected["objects"]:
        logger.warning(
            "removed %d objects that %d failed federation(s) and %d failed deletion(s) left uncommitted",
            collected["objects"], collected["federations"], collected["deletions"],
        )  # fmt: skip

    threads = max(1, (os.cpu_count() or 1) // config.federate.max_workers)
    in_threads = config.federate.task_runner == "threads"

    if resumed is None:
        initial = init_model(spec, seed=config.federate.seed).state_dict()
        head = history.write_initial(federation_id, initial, spec, config.federate.seed)
        base_state: StateDict = {k: v.detach().clone() for k, v in initial.items()}
        parent_version: str | None = None
    else:
        head, champion = resumed
        base_state = history.read_state(head.state)
        parent_version = champion.version

    run_id = tracker.start_run(
        federation_id,
        tags={
            "kind": "federation",
            "federation_id": federation_id,
            "profile": profile,
            "data_version": data_version,
            "store": store.url,
            "resumed_from_version": parent_version or "none",
            "prefect_flow_run_id": str(current_flow_run.id),
        },
    )
    flat = {f"{section}.{k}": v for section in ("data", "model", "train", "federate") for k, v in getattr(config, section).model_dump().items()}
    tracker.log_params(run_id, flat)
    archive = archive_round_task.with_options(
        retries=config.federate.archive_retries,
        retry_delay_seconds=config.federate.archive_retry_delay_s,
    )
    forgotten = tombstoned_clients(store)
    available = [cid for cid in data.client_ids() if cid not in forgotten]
    if forgotten & set(data.client_ids()):
        logger.warning(
            "excluding forgotten (tombstoned) clients from training: %s",
            ", ".join(sorted(forgotten & set(data.client_ids()))),
        )
    rng = np.random.default_rng([config.federate.seed, head.server_round])
    rows: list[dict[str, float]] = []
    versions: list[VersionInfo] = []
    first, last = head.server_round + 1, head.server_round + config.federate.rounds
    logger.info(
        "federation %s: rounds %d-%d over %d clients, store %s, tracking %s",
        federation_id, first, last, len(available), store.url, runtime.tracking_uri,
    )  # fmt: skip
    try:
        for server_round in range(first, last + 1):
            started = time.perf_counter()
            selected = strategy.configure_fit(server_round, available, rng)
            jobs = [
                ClientJob(
                    client_id=cid,
                    server_round=server_round,
                    data_path=str(data.client_path(cid)),
                    model=spec,
                    train=config.train.settings(),
                    base=head.state,
                    store_url=str(runtime.store),
                    seed=client_seed(config.federate.seed, server_round, cid),
                    threads=None if in_threads else threads,
                )
                for cid in selected
            ]
            # Largest shards first: with uneven (Dirichlet) shards this keeps every
            # worker busy until the end of the round instead of one tail client alone.
            jobs.sort(key=lambda j: -data.num_examples(j.client_id))
            with torch_threads(threads if in_threads else None):
                futures = [train_client_task.submit(job) for job in jobs]
                results = sorted((f.result() for f in futures), key=lambda r: r.client_id)
            trained = time.perf_counter()
            new_state, updates = aggregate_task(strategy, server_round, base_state, results)
            aggregated = time.perf_counter()
            client_metrics = {r.client_id: dict(r.metrics) for r in results}
            manifest_ref, manifest = archive(
                str(runtime.store), federation_id, server_round, head, updates, new_state,
                spec, strategy.describe(), data_version, client_metrics,
            )  # fmt: skip
            archived = time.perf_counter()
            test = evaluate_task(spec, new_state, str(data.root / "test.safetensors"), config.federate.eval_batch_size)
            evaluated = time.perf_counter()
            tags = global_version_tags(
                server_round=server_round,
                federation_id=federation_id,
                clients=selected,
                manifest=manifest_ref,
                data_version=data_version,
                parent_version=parent_version,
            )
            tags["test_accuracy"] = f"{test['accuracy']:.6f}"
            version = register_version_task(tracker, run_id, spec, new_state, input_shape, server_round, tags)
            registered = time.perf_counter()
            compute = [r.metrics.get("compute_s", 0.0) for r in results]
            row = {
                "round": float(server_round),
                "test_accuracy": test["accuracy"],
                "test_loss": test["loss"],
                "train_loss": float(np.mean([r.metrics.get("train_loss", np.nan) for r in results])),
                "clients": float(len(results)),
                "client_compute_s_sum": float(sum(compute)),
                "client_compute_s_max": float(max(compute)),
                "train_phase_s": trained - started,
                "aggregate_s": aggregated - trained,
                "archive_s": archived - aggregated,
                "evaluate_s": evaluated - archived,
                "register_s": registered - evaluated,
                "round_s": registered - started,
            }
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "round"}, step=server_round)
            rows.append(row)
            versions.append(version)
            logger.info(
                "round %d: %d clients, test accuracy %.4f, version %s",
                server_round, len(results), test["accuracy"], version.version,
            )  # fmt: skip
            report_progress(server_round - first + 1, last - first + 1, row, version.version)
            head = LineageHead.of(manifest_ref, manifest)
            base_state = new_state
            parent_version = version.version
        promotion = _promote(tracker, history, versions[-1], rows[-1]["test_accuracy"], data, config, promote)
        logger.info("champion: %s", promotion["decision"])
        tracker.log_figure(run_id, _plot_convergence(rows), "convergence.png")
        if config.federate.prefit_teacher and config.unlearn.teacher == "clip":
            # Deletions reuse it: fitting it now keeps it off a deletion's critical path.
            server_version = dvc_dir_hash(runtime.data_dir(profile) / SERVER_DIR)
            teacher_run_id, _, _ = teacher_task(tracker, config, runtime, server_version)
            tracker.set_tags(run_id, {"teacher_run_id": teacher_run_id})
        tracker.set_tags(run_id, {"final_version": versions[-1].version})
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise

    return {
        "federation_id": federation_id,
        "run_id": run_id,
        "prefect_flow_run_id": str(current_flow_run.id),
        "profile": profile,
        "store": store.url,
        "tracking_uri": runtime.tracking_uri,
        "data_version": data_version,
        "resumed_from_version": resumed[1].version if resumed else None,
        "champion_version": tracker.alias().version if promotion["promoted"] else (promotion["champion"] or None),
        "final_version": versions[-1].version,
        "promotion": promotion,
        "excluded_clients": sorted(forgotten & set(data.client_ids())),
        "rounds": [{**row, "version": v.version} for row, v in zip(rows, versions)],
    }


def run_federate(
    profile: str = "default",
    rounds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    fresh: bool = False,
    project: str | None = None,
    promote: str = "always",
) -> dict[str, Any]:
    """Run the flow with the task runner the params ask for (what the CLI calls)."""
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile, dict(overrides or {}))
    configured = federate.with_options(task_runner=build_task_runner(config))
    return configured(
        profile=profile, rounds=rounds, overrides=dict(overrides or {}), fresh=fresh, project=project, promote=promote
    )
