"""Where a federation starts and what it may promote: the champion, the lineage guard, the gate.

``resume_head`` continues from ``champion`` only if its lineage holds no
forgotten client (else it logs, emits ``fedforget.model.tainted`` and refuses);
``promote`` moves ``champion`` as ``always``/``gate``/``never`` say, never to a
tainted candidate; ``collect_garbage_task`` removes what failed runs left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.config.sections import Config
from components.data.layout import FederationData
from components.federation.client import evaluate_state
from components.lineage.history import UpdateHistory, uncommitted_round_objects
from components.lineage.manifests import LineageHead
from components.lineage.store import open_store
from components.lineage.tags import REJECTED_TAG, manifest_ref_from_tags
from components.models.students import ModelSpec
from components.unlearning.guard import TaintedLineageError, check_clean, forgotten_in
from flows.ledger import forgotten_for
from flows.tracking import Tracker, VersionInfo

COLLECTED_TAG = "archive_collected"
TAINTED_EVENT = "fedforget.model.tainted"  # an alias points at a version that holds a forgotten client


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


def resume_head(
    tracker: Tracker, history: UpdateHistory, spec: ModelSpec, logger: Any, protocol: str | None = None,
    version: str | None = None,
) -> tuple[LineageHead, VersionInfo] | None:  # fmt: skip
    """Where training continues: the champion (``None`` without one), or registered ``version`` when given
    (``federate.resume_from``). Refused when its lineage holds a forgotten client or another model."""
    alias = tracker.registry.champion_alias
    if version is None:
        champion = tracker.alias()
        if champion is None:
            return None
        advice = (f"The {alias} alias was moved to it (a rollback?): point {alias} at a version without them "
                  "(the deletion's version or a later one), or start over with --fresh.")  # fmt: skip
    else:
        champion = tracker.version(version)
        if champion is None:
            raise ValueError(f"federate.resume_from: no version {version} of model {tracker.registry.model_name}")
        advice = "Choose a version without them (the deletion's version or a later one), or start over with --fresh."
    ref = manifest_ref_from_tags(champion.tags)
    try:
        check_clean(
            history, history.store, ref, champion.version, "resume training from", advice,
            tracker.registry.model_name, forgotten_for(tracker, history.store),
        )  # fmt: skip
    except TaintedLineageError as exc:
        logger.error("%s", exc)
        emit_tainted_event(tracker.registry.model_name, champion.version, exc.clients, alias)
        raise
    manifest = history.read_manifest(ref)
    if manifest.model != spec:
        raise ValueError(
            f"version {champion.version} is a {manifest.model.to_dict()} model but "
            f"params ask for {spec.to_dict()}; start over with --fresh"
        )
    recorded = str(manifest.protocol.get("name", "weights"))
    if protocol is not None and recorded != protocol:
        raise ValueError(
            f"version {champion.version} was trained with the {recorded} protocol but params ask for "
            f"{protocol}; start over with --fresh"
        )
    what = "champion version" if version is None else "version"
    logger.info("resuming from %s %s (round %s)", what, champion.version, manifest.server_round)
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
    except Exception:  # the refusal itself must not depend on the event bus
        pass


def promote(
    tracker: Tracker, history: UpdateHistory, final: VersionInfo, accuracy: float,
    data: FederationData, config: Config, rule: str,
) -> dict[str, Any]:  # fmt: skip
    """Move ``champion`` to ``final`` as the rule says; tag a rejected version with the reason."""
    current = tracker.alias()  # read once: the model-write lock keeps it still
    model, forgotten = tracker.registry.model_name, forgotten_for(tracker, history.store)
    decision: dict[str, Any] = {"rule": rule, "champion": current.version if current else None, "promoted": False}
    check_clean(
        history, history.store, manifest_ref_from_tags(final.tags), final.version, "promote",
        "Its clients were forgotten while it trained; run the federation again.", model, forgotten,
    )  # fmt: skip
    if (
        current is not None
        and current.version != final.version
        and forgotten_in(history, history.store, manifest_ref_from_tags(current.tags), model, forgotten)
    ):
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
            tracker.set_version_tag(final.version, REJECTED_TAG, reason)
            decision["decision"] = f"version {final.version} rejected: {reason}"
            return decision
    tracker.set_alias(final.version)
    decision["promoted"] = True
    decision["decision"] = f"version {final.version} promoted"
    return decision
