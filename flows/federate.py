"""Prefect flow ``federate``: rounds of a federation protocol with an archived, registered history.

Per round (:func:`components.federation.rounds.run_round`): the protocol picks
clients -> one ``train-client`` task per client on the task runner that
``federate.task_runner`` names -> ``aggregate`` (the protocol's server step)
-> ``archive-round`` (every object, then the manifest: the commit point;
retried) -> here: ``evaluate`` -> ``register-version`` (MLflow version with
lineage tags). After the last round ``champion`` moves as ``promote`` says. A
round that fails before its manifest is written leaves no registered version.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from components.config.runtime import Runtime
from components.config.sections import Config, load_config
from components.core.state import StateDict
from components.data.layout import SERVER_DIR, FederationData, dvc_dir_hash
from components.data.staging import stage_shards
from components.federation.client import evaluate_state
from components.federation.fewshot.convergence import round_metrics
from components.federation.fewshot.protocol import FewShotProtocol
from components.federation.rounds import Federation, RoundResult, run_round
from components.federation.weights.privacy import lineage_accountant, sampling_rate
from components.learning.train import torch_threads
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest
from components.lineage.retention import RetentionPass, apply_retention
from components.lineage.store import open_store
from components.lineage.tags import federation_run_tags, global_version_tags, privacy_tags
from components.models.students import ModelSpec, init_model
from components.unlearning.tombstones import removed_files
from flows.failpoints import failpoint
from flows.ledger import forgotten_for
from flows.locks import model_write_lock
from flows.methods import build_protocol, starting_point
from flows.progress import report_progress
from flows.promotion import collect_garbage_task, resume_head
from flows.promotion import promote as promote_version
from flows.reports.convergence import plot_convergence
from flows.runners import build_task_runner, prefect_call, prefect_client_map
from flows.teacher import teacher_task
from flows.tracking import Tracker, VersionInfo


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
    return tracker.register_model(run_id, spec, state, input_shape, f"global-round-{server_round:05d}", tags)


@task(name="apply-retention", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def retention_task(history: UpdateHistory, head: Any, keep_rounds: int, protect: list[Manifest]) -> RetentionPass:
    return apply_retention(history, head, keep_rounds, protect)


def new_federation_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"fed-{stamp}-{secrets.token_hex(3)}"


@flow(name="federate")
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
    with model_write_lock(config, runtime):  # no deletion changes the model while this runs
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
    # few-shot: the teacher's tower + adapter + text head, or a registered student (its clients recorded)
    spec, start, origin = starting_point(runtime, config, history, spec, meta["class_names"])
    protocol = build_protocol(
        config, runtime.data_dir(profile), store, data_version, spec, data.client_ids(), runtime.fewshot_cache_dir
    )
    federation_id = new_federation_id()
    # Resume (and its lineage check) first: a refused source leaves everything as it was.
    resumed = (
        None
        if fresh or not config.federate.resume
        else resume_head(tracker, history, spec, logger, protocol.name, _version(config.federate.resume_from))
    )
    if isinstance(protocol, FewShotProtocol):  # where the lineage started travels with it, resumed or not
        protocol.start = history.read_manifest(resumed[0].manifest).protocol.get("start") if resumed else origin
    collected = collect_garbage_task(tracker, runtime.store)
    if collected["objects"]:
        logger.warning(
            "removed %d objects that %d failed federation(s) and %d failed deletion(s) left uncommitted",
            collected["objects"], collected["federations"], collected["deletions"],
        )  # fmt: skip

    in_threads = config.federate.task_runner == "threads"
    threads = max(1, (os.cpu_count() or 1) // config.federate.max_workers)
    if resumed is None:
        initial = start if start is not None else init_model(spec, seed=config.federate.seed).state_dict()
        head = history.write_initial(federation_id, initial, spec, config.federate.seed)
        base_state: StateDict = {k: v.detach().clone() for k, v in initial.items()}
        server_state: StateDict | None = None
        parent_version: str | None = None
    else:
        head, champion = resumed
        base_state = history.read_state(head.state)
        server_state = history.read_state(head.server_state) if head.server_state else None
        parent_version = champion.version

    # every record of a deletion counts (intent, manifest, tombstone, registry): one removed reopens nothing
    forgotten = set(forgotten_for(tracker, store))
    gone = removed_files(store)  # shards a deletion removed from the data folder (of this model or another)
    available = [
        cid for cid in data.client_ids()
        if cid not in forgotten and (data.client_path(cid).is_file() or _relative(data, cid) not in gone)
    ]  # fmt: skip
    left_out = sorted(set(data.client_ids()) - set(available))
    if left_out:
        logger.warning("excluding forgotten clients (or whose shard a deletion removed) from training: %s",
                       ", ".join(left_out))  # fmt: skip
    dp = config.federate.dp_noise_multiplier
    accountant = lineage_accountant(history, head.manifest, len(available)) if dp else None
    federation = Federation(
        federation_id=federation_id, history=history, store_url=str(runtime.store), model=spec,
        train=config.train.settings(), seed=config.federate.seed, data_version=data_version,
        shards=stage_shards(store, data, data_version, available),
        sizes={cid: data.num_examples(cid) for cid in available}, threads=None if in_threads else threads,
        min_fit_clients=config.federate.min_fit_clients,
    )  # fmt: skip
    if getattr(protocol, "holds_all_updates", False):
        logger.info(
            "strategy %s needs every update of a round at once: the server holds up to %d updates in memory",
            config.federate.strategy, config.federate.clients_per_round or len(available),
        )  # fmt: skip
    # sums retention never drops what forgetting from the champion needs (its live running sums)
    protected = [history.read_manifest(head.manifest)] if resumed is not None and head.manifest else []
    run_tags = federation_run_tags(
        federation_id=federation_id, profile=profile, data_version=data_version, store=store.url,
        protocol=protocol.name, resumed_from=parent_version, flow_run_id=str(current_flow_run.id),
    )  # fmt: skip
    run_id = tracker.start_run(federation_id, tags=run_tags)
    sections = ("data", "model", "train", "federate")
    tracker.log_params(run_id, {f"{s}.{k}": v for s in sections for k, v in getattr(config, s).model_dump().items()})
    rng = np.random.default_rng([config.federate.seed, head.server_round])
    rows: list[dict[str, float]] = []
    versions: list[VersionInfo] = []
    first, last = head.server_round + 1, head.server_round + config.federate.rounds
    logger.info(
        "federation %s: rounds %d-%d over %d clients (%s runner), store %s, tracking %s",
        federation_id, first, last, len(available), config.federate.task_runner, store.url, runtime.tracking_uri,
    )  # fmt: skip
    call = prefect_call(config)
    try:
        with build_task_runner(config) as runner, torch_threads(threads if in_threads else None):
            client_map = prefect_client_map(runner, protocol, config.federate.client_timeout_s)
            for server_round in range(first, last + 1):
                failpoint(f"federate:before-round:{server_round}")
                result = run_round(
                    protocol, federation, head, base_state, server_state, available, rng, client_map, call
                )
                test, evaluate_s = _timed(
                    evaluate_task,
                    spec,
                    result.state,
                    str(data.root / "test.safetensors"),
                    config.federate.eval_batch_size,
                )
                tags = global_version_tags(
                    server_round=server_round, federation_id=federation_id, clients=[r.client_id for r in result.replies],
                    manifest=result.manifest_ref, data_version=data_version, parent_version=parent_version,
                    protocol=protocol.name,
                )  # fmt: skip
                tags["test_accuracy"] = f"{test['accuracy']:.6f}"
                if accountant is not None:  # this round's noise, then epsilon over the whole lineage
                    if dp > 0:  # the same rate rule as the lineage replay
                        local = config.federate.local_dp() is not None
                        accountant.step(dp, sampling_rate(local, len(result.replies), len(available)))
                    epsilon = accountant.epsilon(config.federate.dp_delta)
                    tags.update(privacy_tags(epsilon, config.federate.dp_delta, dp))
                    tracker.log_metrics(run_id, {"dp_epsilon": epsilon}, step=server_round)
                failpoint(f"federate:before-register:{server_round}")
                version, register_s = _timed(
                    register_version_task, tracker, run_id, spec, result.state, input_shape, server_round, tags
                )
                if result.failures:
                    logger.warning(
                        "round %d: left out %s", server_round,
                        "; ".join(f"{f.client_id} ({f.reason})" for f in result.failures),
                    )  # fmt: skip
                retention_s = 0.0
                if config.history.retention == "sums":
                    dropped, retention_s = _timed(
                        retention_task, history, result.manifest_ref, config.history.keep_rounds, protected
                    )
                    if dropped.dropped:
                        logger.info(
                            "retention: dropped %d objects of round %d", len(dropped.dropped), dropped.server_round
                        )
                row = _round_row(result, test, evaluate_s, register_s) | {"retention_s": retention_s}
                tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "round"}, step=server_round)
                if result.outcome.record:  # the strategy's decisions (credit: groups, scores, thresholds, excluded)
                    record = json.dumps(dict(result.outcome.record), indent=2, sort_keys=True, default=str)
                    tracker.log_bytes(run_id, record.encode(), f"rounds/round-{server_round:04d}.json")
                rows.append(row)
                versions.append(version)
                logger.info(
                    "round %d: %d clients, test accuracy %.4f, version %s",
                    server_round, len(result.replies), test["accuracy"], version.version,
                )  # fmt: skip
                report_progress(server_round - first + 1, last - first + 1, row, version.version)
                head, base_state, server_state = result.head, result.state, result.outcome.server_state
                parent_version = version.version
        promotion = promote_version(tracker, history, versions[-1], rows[-1]["test_accuracy"], data, config, promote)
        logger.info("champion: %s", promotion["decision"])
        tracker.log_figure(run_id, plot_convergence(rows), "convergence.png")
        if config.federate.prefit_teacher and config.unlearn.teacher == "clip":
            # Deletions reuse it: fitting it now keeps it off a deletion's critical path.
            server_version = dvc_dir_hash(runtime.data_dir(profile) / SERVER_DIR)
            teacher_run_id, _, _ = teacher_task(tracker, config, runtime, server_version)
            tracker.set_tags(run_id, {"teacher_run_id": teacher_run_id})
        tracker.set_tags(run_id, {"final_version": versions[-1].version})
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):  # MLflow may be what failed: keep the original error
            tracker.end_run(run_id, "FAILED")
        raise

    return {
        "federation_id": federation_id,
        "run_id": run_id,
        "prefect_flow_run_id": str(current_flow_run.id),
        "profile": profile,
        "protocol": protocol.describe(),
        "task_runner": config.federate.task_runner,
        "store": store.url,
        "tracking_uri": runtime.tracking_uri,
        "data_version": data_version,
        "resumed_from_version": resumed[1].version if resumed else None,
        "champion_version": versions[-1].version if promotion["promoted"] else promotion["champion"],
        "final_version": versions[-1].version,
        "promotion": promotion,
        "excluded_clients": left_out,
        "rounds": [{**row, "version": v.version} for row, v in zip(rows, versions)],
    }


def _relative(data: FederationData, client_id: str) -> str:
    """A client's shard as a deletion's tombstone names it (relative to the profile's data folder)."""
    return data.client_path(client_id).relative_to(data.root.parent).as_posix()


def _version(number: int | None) -> str | None:
    return None if number is None else str(number)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def _bytes(result: RoundResult) -> dict[str, float]:
    """Bytes the round's clients uploaded and downloaded (the weight protocols send the model both ways)."""
    comm = result.outcome.record.get("communication")
    if comm:  # a protocol that accounts for itself (soft labels: labels up, the consensus down)
        upload, download = dict(comm["upload_bytes"]), dict(comm["download_bytes"])
    else:
        upload = {r.client_id: int(r.upload.size or 0) if r.upload else 0 for r in result.replies}
        download = upload
    reference = {}  # what FedAvg would move on the same global model, where the protocol reports it
    if comm and "fedavg_upload_bytes_per_client" in comm:
        reference = {
            "fedavg_upload_bytes": float(comm["fedavg_upload_bytes_per_client"] * len(upload)),
            "fedavg_download_bytes": float(comm["fedavg_download_bytes_per_client"] * len(download)),
        }
    return {
        "upload_bytes": float(sum(upload.values())),
        "download_bytes": float(sum(download.values())),
        **{f"upload_bytes.{cid}": float(n) for cid, n in upload.items()},
        **{f"download_bytes.{cid}": float(n) for cid, n in download.items()},
        **reference,
    }


def _round_row(
    result: RoundResult, test: Mapping[str, float], evaluate_s: float, register_s: float
) -> dict[str, float]:
    """The per-round metrics logged to MLflow and shown by the CLI."""
    metrics = [r.metrics for r in result.replies]
    compute = [m.get("compute_s", 0.0) for m in metrics]
    timings = dict(result.timings)
    return {
        "round": float(result.server_round),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_loss": float(np.mean([m.get("train_loss", np.nan) for m in metrics])),
        "clients": float(len(metrics)),
        "failed_clients": float(len(result.failures)),
        "excluded_clients": float(len(result.outcome.record.get("excluded", []))),
        **_bytes(result),
        "client_compute_s_sum": float(sum(compute)),
        "client_compute_s_max": float(max(compute)),
        **timings,
        "evaluate_s": evaluate_s,
        "register_s": register_s,
        "round_s": sum(timings.values()) + evaluate_s + register_s,
        **_convergence(result),
    }


def _convergence(result: RoundResult) -> dict[str, float]:
    """A protocol's convergence record as metrics (few-shot: global and client loss and accuracy, update norm,
    mean drift, gradient dissimilarity; each client's drift and update norm)."""
    record = result.outcome.record.get("convergence")
    if not record:
        return {}
    out = {f"convergence.{k}": v for k, v in round_metrics(record).items()}
    for name in ("drift", "client_update_norms"):
        out |= {f"{name}.{cid}": float(v) for cid, v in (record.get(name) or {}).items()}
    return out


def run_federate(
    profile: str = "default",
    rounds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    fresh: bool = False,
    project: str | None = None,
    promote: str = "always",
) -> dict[str, Any]:
    """Run the flow (what the CLI calls; the flow builds its own task runner from params)."""
    return federate(
        profile=profile, rounds=rounds, overrides=dict(overrides or {}), fresh=fresh, project=project, promote=promote
    )
