"""Versions a deletion leaves holding the client: flag them, and retire their weights.

A deletion registers a version without the client; every other registered
version whose lineage (replayed from the manifests) still holds it is tagged
``contains_forgotten_clients`` and, under ``unlearn.retire_tainted:
delete-weights``, loses its weights (registry artifacts and archived states),
with a retirement record written first. Other registered models of the same
tracking store are scanned as well: a few-shot federation started from this
model's student holds its clients through that starting point.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import CONTAINS_TAG, RETIRED_TAG, manifest_ref_from_tags
from components.unlearning.guard import present_clients
from components.unlearning.retire import delete_retired_states, read_retirement, tainted_states, write_retirement
from flows.tracking import Tracker, VersionInfo


def tainted_versions(tracker: Tracker, history: UpdateHistory, client_id: str, skip: str | None) -> list[VersionInfo]:
    """Registered versions whose lineage (replayed from the manifests) still holds the client."""
    found = []
    for version in tracker.versions():
        if version.version == skip or "manifest_key" not in version.tags:
            continue
        try:
            present = present_clients(history, manifest_ref_from_tags(version.tags))
        except Exception:  # a broken reference is the audit's finding, not a reason to stop
            continue
        if client_id in present:
            found.append(version)
    return found


@task(name="flag-versions", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def flag_versions_task(tracker: Tracker, store_url: str, client_id: str, skip: str) -> list[str]:
    """Tag every version whose lineage still contains the client."""
    flagged = []
    for version in tainted_versions(tracker, UpdateHistory(open_store(store_url)), client_id, skip):
        present = set(filter(None, version.tags.get(CONTAINS_TAG, "").split(",")))
        tracker.set_version_tag(version.version, CONTAINS_TAG, ",".join(sorted(present | {client_id})))
        flagged.append(version.version)
    return flagged


@task(name="retire-tainted", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=2)
def retire_task(
    tracker: Tracker, store_url: str, client_id: str, request_id: str, mode: str, skip: str, derived: bool = False
) -> list[str]:
    """``delete-weights``: delete the weights of every version that still holds the client (idempotent);
    ``derived``: ``tracker`` is another registered model whose lineages start from this one's versions."""
    if mode != "delete-weights":
        return []
    store = open_store(store_url)
    history = UpdateHistory(store)
    model = tracker.registry.model_name
    record = read_retirement(store, request_id, model if derived else None)
    if record is None:  # the record first, then the deletes: a crash in between is finished by the next run
        versions = tainted_versions(tracker, history, client_id, skip)
        if derived and not versions:
            return []
        states = tainted_states(history, [manifest_ref_from_tags(v.tags) for v in versions], client_id)
        record = write_retirement(
            store, request_id=request_id, client_id=client_id, versions=[v.version for v in versions], states=states,
            model=model, derived=derived,
        )  # fmt: skip
    delete_retired_states(store, record)
    for version in record["versions"]:
        tracker.retire_weights(version)
        tracker.set_version_tag(
            version, RETIRED_TAG, f"weights deleted: its lineage holds {client_id}, forgotten by request {request_id}"
        )
    return list(record["versions"])


def derived_trackers(tracker: Tracker) -> list[Tracker]:
    """Every other registered model of the tracking store (their versions whose lineage lives elsewhere,
    or holds no forgotten client, are left alone by the scans)."""
    own = tracker.registry.model_name
    return [
        Tracker(tracker.runtime, tracker.registry.model_copy(update={"model_name": name}))
        for name in tracker.model_names()
        if name != own
    ]
