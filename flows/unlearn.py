"""Prefect flow ``unlearn``: forget one client, restore quality, register, keep it deleted.

Steps (each a tracked task): validate the request -> record the intent (from
then on every producer refuses the client) -> forget (as the lineage's protocol
says, every object hash-checked) -> fit or reuse the teacher -> distil on the
few-shot server data -> evaluate -> archive the deletion (its manifest last) ->
register the unlearned version and move ``champion`` -> complete: flag and
retire the versions that still contain the client, tombstone, purge what the
manifests say holds it (store objects, staged and prepared shards), keep
``champion`` clean, sign the receipt.

Re-running after a crash or a failure completes what is missing (a registered
deletion is only trusted once its manifest is read); re-running after success
reports the existing deletion and its receipt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from components.config.runtime import Runtime
from components.config.sections import Config, VerificationConfig, load_config, registered_model_profiles
from components.core.ids import validate_id
from components.core.refs import ObjectRef
from components.core.state import StateDict
from components.data.datasets import Split
from components.data.layout import FEDERATION_DIR, SERVER_DIR, FederationData, dvc_dir_hash, read_split
from components.federation.protocol import ForgetResult, UnlearningError
from components.learning.distill import distill, teacher_logits_for
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, UnlearningManifest, utc_now
from components.lineage.store import open_store
from components.lineage.tags import (
    TEACHER_TAINT_TAG,
    manifest_ref_from_tags,
    unlearned_version_tags,
    unlearning_run_tags,
)
from components.models.students import ModelSpec, build_model
from components.unlearning.forget import forget_client, new_request_id, protocol_of
from components.unlearning.guard import check_clean, present_clients, start_clients
from components.unlearning.purge import (
    derived_objects,
    model_manifests,
)
from components.unlearning.tombstones import (
    read_tombstone,
    record_intent,
    validate_client_id,
)
from components.unlearning.verify import deletion_checks, model_from_state
from flows.completion import DeletionContext, complete_deletion
from flows.failpoints import failpoint
from flows.ledger import forgotten_for, verified_deletion
from flows.locks import model_write_lock
from flows.teacher import teacher_task
from flows.tracking import Tracker, VersionInfo

# --------------------------------------------------------------------------- tasks


@task(name="forget", cache_policy=NO_CACHE)
def forget_task(
    store_url: str, source: ObjectRef, source_manifest: Manifest, client_id: str, variant: str
) -> ForgetResult:
    return forget_client(UpdateHistory(open_store(store_url)), source, source_manifest, client_id, variant)


@task(name="distill", cache_policy=NO_CACHE)
def distill_task(
    spec: ModelSpec, state: StateDict, few_shot: Split, logits: torch.Tensor, config: Config
) -> tuple[StateDict, dict[str, float]]:
    student = build_model(spec)
    student.load_state_dict(state)
    generator = torch.Generator().manual_seed(config.unlearn.seed)
    metrics = distill(student, few_shot, logits, config.distill.settings(), generator)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, metrics


@task(name="global-model-teacher", cache_policy=NO_CACHE)
def global_teacher_task(spec: ModelSpec, state: StateDict, few_shot: Split) -> torch.Tensor:
    """The pre-deletion model as the (frozen) teacher: its logits on the few-shot set."""
    teacher = build_model(spec)
    teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher_logits_for(teacher, few_shot.inputs())


@task(name="verify", cache_policy=NO_CACHE)
def evaluate_task(
    spec: ModelSpec, state: StateDict, test: Split, client: Split | None, verification: VerificationConfig
) -> dict[str, float]:
    return deletion_checks(model_from_state(spec, state), test, client, **verification.model_dump())


@task(name="archive-deletion", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=2)
def archive_task(store_url: str, **kwargs: Any) -> tuple[ObjectRef, UnlearningManifest]:
    return UpdateHistory(open_store(store_url)).commit_unlearning(**kwargs)


@task(name="register-unlearned", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_task(
    tracker: Tracker,
    run_id: str,
    spec: ModelSpec,
    state: StateDict,
    input_shape: tuple[int, ...],
    tags: Mapping[str, str],
) -> VersionInfo:
    version = tracker.register_model(run_id, spec, state, input_shape, f"unlearned-{tags['request_id']}", tags)
    tracker.set_alias(version.version)
    return version


# --------------------------------------------------------------------------- flow


@flow(name="unlearn")
def unlearn(
    client_id: str,
    version: str | None = None,
    request_id: str | None = None,
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    project: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Forget ``client_id`` from ``version`` (default: the champion) and register the result.

    Parameters
    ----------
    client_id
        The client whose contributions must go.
    version
        The registered version to unlearn from; default the ``champion`` alias.
    request_id
        The deletion request's id (generated when absent); recorded everywhere.
    profile, overrides, project
        As for ``federate``.
    reason
        Free text kept in the tombstone (e.g. the ticket of the request).
    """
    client_id = validate_client_id(client_id)
    request_id = validate_id(request_id, "request id") if request_id else new_request_id()
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile, dict(overrides or {}))
    if config.unlearn.teacher == "global-model" and not config.unlearn.force_teacher:
        raise UnlearningError(
            f"unlearn.teacher=global-model distils from the version that still contains {client_id}, so it can "
            "put the client back: use clip (default) or none. To run it anyway (a literature baseline), force it "
            "with --force-teacher: the new version is then tagged teacher_contains_forgotten_client=true and "
            "audits flag it. Nothing changed."
        )
    with model_write_lock(config, runtime):  # after any retraining in progress, on the model it produced
        return _unlearn(runtime, config, client_id, version, request_id, profile, reason)


def _derived_personal(history: UpdateHistory, source: ObjectRef, client_id: str) -> set[str]:
    """Clients whose personal state at ``source`` was built from a model that held ``client_id`` (purged with
    it: the deletion's version names none of them, so they start again from the clean model)."""
    source_manifest = history.read_manifest(source)
    derived = {ref.key for _, ref in derived_objects(history, model_manifests(history, [source]), client_id)}
    return {cid for cid, ref in source_manifest.personal.items() if cid != client_id and ref.key in derived}


def _source_for(
    ctx: DeletionContext, client_id: str, version: str | None
) -> tuple[VersionInfo, ObjectRef, Manifest, str]:
    """The version to forget ``client_id`` from, checked: clean of other forgotten clients, holding the
    client, and with a forgetting method whose guarantee is allowed. Refusals change nothing."""
    tracker, history, store, config, model = ctx.tracker, ctx.history, ctx.store, ctx.config, ctx.model
    source = tracker.version(version) if version else tracker.alias()
    if source is None:
        what = f"version {version}" if version else f"alias {config.registry.champion_alias!r}"
        hint = tracker.missing(what, registered_model_profiles(ctx.runtime.params_path))
        raise UnlearningError(f"nothing to unlearn from: {hint}; nothing changed")
    source_ref = manifest_ref_from_tags(source.tags)
    source_manifest = history.read_manifest(source_ref)
    champion = tracker.alias() if version else source
    check_clean(
        history, store, source_ref, source.version, f"unlearn {client_id} from",
        f"Unlearn from the current {config.registry.champion_alias} (version "
        f"{champion.version if champion else 'none'}), which is free of forgotten clients, or omit --version.",
        model, forgotten_for(tracker, store), allow={client_id},
    )  # fmt: skip
    if client_id not in present_clients(history, source_ref):  # any protocol's index, not only running sums
        others = sorted(c for c in start_clients(source_manifest) if c.endswith(f"/{client_id}"))
        hint = (
            f" Its starting point holds {', '.join(others)}: another model's client of the same id; forget it "
            "there (fedforget unlearn on that model's profile)."
            if others else ""
        )  # fmt: skip
        raise UnlearningError(
            f"client {client_id} never contributed to version {source.version} (or its lineage); nothing changed.{hint}"
        )
    guarantee = protocol_of(source_manifest).guarantee(config.unlearn.variant)
    if guarantee == "approximate" and not config.unlearn.allow_approximate:
        raise UnlearningError(
            f"this model's forgetting method keeps part of {client_id}'s direct contribution (guarantee "
            "approximate): choose a method that removes every contribution (ensemble distillation: "
            "federate.ensemble.forget_from=initial), or opt in with --set unlearn.allow_approximate=true (the "
            "version is then tagged forgetting=approximate); nothing changed"
        )
    return source, source_ref, source_manifest, guarantee


def _unlearn(
    runtime: Runtime, config: Config, client_id: str, version: str | None, request_id: str,
    profile: str, reason: str | None,
) -> dict[str, Any]:  # fmt: skip
    logger = get_run_logger()
    started = time.perf_counter()
    started_at = utc_now()
    store_url = runtime.store
    store = open_store(store_url)
    history = UpdateHistory(store)
    tracker = Tracker(runtime, config.registry)
    ctx = DeletionContext(runtime, config, profile, store, history, tracker)
    model = ctx.model

    # 1. Validate: already forgotten -> finish leftovers, report; registered but unfinished -> complete.
    tombstone = read_tombstone(store, model, client_id)
    done = verified_deletion(tracker, history, client_id)  # its manifest read: tags alone prove nothing
    if done is not None:
        what = "already forgotten" if tombstone else "registered but unfinished"
        logger.info("the deletion of %s (version %s) is %s: completing it", client_id, done.version, what)
        extra = complete_deletion(ctx, done, client_id, reason, started_at)
        return {"status": "already_forgotten" if tombstone else "completed", "client_id": client_id,
                "version": done.version, "request_id": done.tags["request_id"], **extra}  # fmt: skip
    if tombstone is not None:
        raise UnlearningError(
            f"{client_id} has a tombstone (request {tombstone.get('request_id')}) but no registered version of "
            f"{model} verifies its deletion: the registry or the archive was changed. Run `fedforget audit`; "
            "nothing changed"
        )
    source, source_ref, source_manifest, guarantee = _source_for(ctx, client_id, version)
    validated = time.perf_counter()

    data = FederationData(runtime.data_dir(profile) / FEDERATION_DIR)
    server_dir = runtime.data_dir(profile) / SERVER_DIR
    # Read once: three evaluations, a teacher and the distillation share them.
    test = data.test()
    shard = data.root / "clients" / f"{client_id}.safetensors"
    client = data.client(client_id) if client_id in data.meta["clients"] and shard.is_file() else None
    source_state = history.read_state(source_manifest.global_state)
    spec = source_manifest.model
    input_shape = (1, *data.meta["image_shape"])
    # 2. Forget (reads only): a refusal here (e.g. objects dropped by retention) leaves no run behind.
    result = forget_task(store_url, source_ref, source_manifest, client_id, config.unlearn.variant)
    forgotten = time.perf_counter()
    # The intent is durable before anything is written or registered: from here every producer refuses the client.
    record_intent(store, model=model, client_id=client_id, request_id=request_id, reason=reason)
    run_id = tracker.start_run(request_id, tags=unlearning_run_tags(
        request_id=request_id, client_id=client_id, source_version=source.version, variant=config.unlearn.variant,
        teacher=config.unlearn.teacher, flow_run_id=str(current_flow_run.id),
    ))  # fmt: skip
    try:
        # 3-4. Recover quality by distillation (unless teacher is none).
        teacher_run_id, server_version, distill_metrics = "none", "none", {}
        final_state = result.state
        if config.unlearn.teacher != "none":
            server_version = dvc_dir_hash(server_dir)
            few_shot = read_split(server_dir / "few_shot.safetensors")
            if config.unlearn.teacher == "clip":
                teacher_run_id, teacher_metrics, logits = teacher_task(tracker, config, runtime, server_version)
                distill_metrics.update({f"teacher_{k}": v for k, v in teacher_metrics.items()})
            else:
                logits = global_teacher_task(spec, source_state, few_shot)
            teacher_done = time.perf_counter()
            final_state, metrics = distill_task(spec, result.state, few_shot, logits, config)
            distill_metrics.update(metrics)
        else:
            teacher_done = time.perf_counter()
        distilled = time.perf_counter()

        # 5. Evaluate before / after forgetting / after recovery.
        checks = config.verification
        before = evaluate_task(spec, source_state, test, client, checks)
        after_forget = evaluate_task(spec, result.state, test, client, checks)
        after = (
            evaluate_task(spec, final_state, test, client, checks) if final_state is not result.state else after_forget
        )
        evaluated = time.perf_counter()
        metrics = {f"{k}_before": v for k, v in before.items()}
        metrics |= {f"{k}_forgotten": v for k, v in after_forget.items()}
        metrics |= {f"{k}_after": v for k, v in after.items()}

        failpoint("unlearn:after-distill")
        # 6. Archive the deletion (manifest last).
        recovery = {
            "teacher": config.unlearn.teacher,
            "teacher_run_id": teacher_run_id,
            "teacher_preset": config.teacher.preset if config.unlearn.teacher == "clip" else None,
            "distill": config.distill.model_dump() if config.unlearn.teacher != "none" else None,
        }
        manifest_ref, _ = archive_task(
            store_url, request_id=request_id, client_id=client_id, variant=config.unlearn.variant,
            source=source_ref, source_version=source.version, source_manifest=source_manifest,
            removed=result.removed, forgotten_state=result.state, final_state=final_state,
            new_sums=result.new_sums, round_scales=result.round_scales, recovery=recovery,
            data_version=server_version, metrics=metrics,
            # a protocol whose forget rebuilt the server's carried state (ensemble: the architectures' models)
            server_state=getattr(result, "server_state", None), objects=getattr(result, "objects", None),
            registered_model=model, guarantee=guarantee, drop_personal=_derived_personal(history, source_ref, client_id),
        )  # fmt: skip
        archived = time.perf_counter()

        failpoint("unlearn:before-register")
        # 7. Register the unlearned version and move champion.
        tags = unlearned_version_tags(
            client_id=client_id, request_id=request_id, source_version=source.version,
            source_federation_id=source.tags.get("federation_id", "none"), variant=config.unlearn.variant,
            teacher=config.unlearn.teacher, teacher_run_id=teacher_run_id, data_version=server_version,
            server_round=source_manifest.server_round, manifest=manifest_ref, metrics=metrics, guarantee=guarantee,
        )  # fmt: skip
        if config.unlearn.teacher == "global-model":
            tags[TEACHER_TAINT_TAG] = "true"
        registered_version = register_task(tracker, run_id, spec, final_state, input_shape, tags)
        registered = time.perf_counter()

        # 8-10. Flag versions that still contain the client, tombstone, purge.
        extra = complete_deletion(ctx, registered_version, client_id, reason, started_at)
        finished = time.perf_counter()
        timings = {
            "validate_s": validated - started,
            "forget_s": forgotten - validated,
            "teacher_s": teacher_done - forgotten,
            "distill_s": distilled - teacher_done,
            "evaluate_s": evaluated - distilled,
            "archive_s": archived - evaluated,
            "register_s": registered - archived,
            "finalise_s": finished - registered,
            "total_s": finished - started,
        }
        tracker.log_metrics(
            run_id, {**metrics, **distill_metrics, **timings, "objects_read": result.objects_read}, step=0
        )
        tracker.log_dict(run_id, {"client_id": client_id, "request_id": request_id, "source_version": source.version,
                                  "version": registered_version.version, "before": before,
                                  "after_subtraction": after_forget, "after_recovery": after}, "verification.json")  # fmt: skip
        tracker.set_tags(run_id, {"unlearned_version": registered_version.version})
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):  # MLflow may be what failed: keep the original error
            tracker.end_run(run_id, "FAILED")
        raise
    logger.info(
        "forgot %s from version %s -> version %s (test accuracy %.4f -> %.4f -> %.4f)",
        client_id, source.version, registered_version.version, before["test_accuracy"],
        after_forget["test_accuracy"], after["test_accuracy"],
    )  # fmt: skip
    return {
        "status": "unlearned",
        "client_id": client_id,
        "request_id": request_id,
        "source_version": source.version,
        "version": registered_version.version,
        "variant": config.unlearn.variant,
        "guarantee": guarantee,
        "teacher": config.unlearn.teacher,
        "teacher_run_id": teacher_run_id,
        "run_id": run_id,
        "prefect_flow_run_id": str(current_flow_run.id),
        "metrics": metrics,
        "distill": distill_metrics,
        "timings": timings,
        **extra,
    }
