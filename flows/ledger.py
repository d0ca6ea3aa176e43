"""Who has been forgotten from a registered model, from every record that says so, and keeping champion clean.

The store holds three records of a deletion (intent, deletion manifest,
tombstone: :func:`components.unlearning.guard.forgotten_clients`); the
registry holds a fourth, the ``unlearned`` version's tags. Any one of them is
enough to refuse the client, so removing a tombstone reopens nothing. Tags are
never trusted to say a deletion *finished*: :func:`verified_deletion` reads the
version's manifest (hash-checked) first.
"""

from __future__ import annotations

from typing import Any

from components.lineage.history import UpdateHistory
from components.lineage.manifests import UnlearningManifest
from components.lineage.store import ObjectStore
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.guard import forgotten_clients, forgotten_in, present_clients, registry_deletions
from flows.tracking import Tracker, VersionInfo


def forgotten_for(tracker: Tracker, store: ObjectStore) -> dict[str, dict[str, Any]]:
    """Every client forgotten (or being forgotten) from the tracker's model, by any record."""
    return forgotten_clients(
        store,
        tracker.registry.model_name,
        also=registry_deletions([{**v.tags, "_version": v.version} for v in tracker.versions()]),
    )


def verified_deletion(tracker: Tracker, history: UpdateHistory, client_id: str) -> VersionInfo | None:
    """The registered version that completed ``client_id``'s deletion, if its manifest says so.

    A version's tags are not enough: its manifest (checked against the tagged
    sha256) must be a deletion of this client, by the tagged request, of this
    model, with the client absent from the result.
    """
    model = tracker.registry.model_name
    for version in reversed(tracker.find_versions(kind="unlearned", forgotten_client=client_id)):
        try:
            ref = manifest_ref_from_tags(version.tags)
            manifest = history.read_manifest(ref)
        except Exception:  # missing, changed or unreadable: not a completed deletion
            continue
        if (
            isinstance(manifest, UnlearningManifest)
            and manifest.forgotten_client == client_id
            and manifest.request_id == version.tags.get("request_id")
            and manifest.registered_model in (None, model)
            and client_id not in present_clients(history, ref)
        ):
            return version
    return None


def ensure_clean_champion(
    tracker: Tracker, history: UpdateHistory, forgotten: dict[str, dict[str, Any]], fallback: VersionInfo
) -> str | None:
    """Leave ``champion`` on a version free of every forgotten client: if it holds one (or is unset), move it
    to ``fallback`` (a deletion's version). Returns the version it moved to, ``None`` if it stayed."""
    model = tracker.registry.model_name
    champion = tracker.alias()
    if champion is not None and not forgotten_in(
        history, history.store, manifest_ref_from_tags(champion.tags), model, forgotten
    ):
        return None
    left = forgotten_in(history, history.store, manifest_ref_from_tags(fallback.tags), model, forgotten)
    if left:
        raise RuntimeError(
            f"{tracker.registry.champion_alias} holds a forgotten client and the deletion's version "
            f"{fallback.version} still holds {', '.join(left)}: point it at a clean version by hand"
        )
    tracker.set_alias(fallback.version)
    return fallback.version
