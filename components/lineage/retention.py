"""Archive retention: bounded storage while deletions stay exact and audits stay verifiable.

``history.retention: full`` keeps every object. ``sums`` keeps every manifest,
every round's global state and each client's *live* running sum, and drops,
once a round is ``keep_rounds`` rounds old,

- the round's per-client update objects (``updates/``, ``applied/``), and
- the round's running sums that a later round superseded.

The number of objects then grows with clients (one live sum each) plus one
global state and one manifest per round, not with rounds x clients.

Forgetting with ``subtract`` reads only the live running sum, so it is exact and
bit-identical under both settings. The ``renormalise`` variant rescales every
round's updates, so it needs them: it refuses once any was dropped
(:func:`check_updates_kept`). Forgetting from an older version whose superseded
sums were dropped is refused the same way.

Before deleting anything a pass writes ``retention/<federation_id>/<round>.json``
(write-once) naming every object with the sha256 its manifest recorded, so the
audit reports each as *dropped by retention* against that hash, and a pass that
crashed half-way is finished by the next one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from components.core.refs import ObjectRef
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, RoundManifest, utc_now
from components.lineage.store import ObjectNotFound, ObjectStore

RETENTION_SCHEMA = "fedforget/retention@1"
RETENTION_PREFIX = "retention/"
RETENTIONS = ("full", "sums")


class RetentionError(ValueError):
    """An operation needs archived objects that the retention policy dropped."""


@dataclass(frozen=True)
class RetentionPass:
    """What one pass dropped: the round it applied to and the objects (key, sha256) it deleted."""

    record_key: str | None
    server_round: int | None
    dropped: list[dict[str, Any]]


def record_key(federation_id: str, server_round: int) -> str:
    return f"{RETENTION_PREFIX}{federation_id}/{server_round:05d}.json"


def round_droppable(manifest: RoundManifest, live: set[str]) -> list[tuple[str, ObjectRef]]:
    """The objects of ``manifest``'s round that ``sums`` retention drops (none that ``live`` names)."""
    found: list[tuple[str, ObjectRef]] = []
    r = manifest.server_round
    for c in manifest.clients:
        if c.update is not None:
            found.append((f"update of {c.client_id} (round {r})", c.update))
        if c.upload is not None:
            found.append((f"upload of {c.client_id} (round {r})", c.upload))
    prefix = manifest.global_state.key.rsplit("/", 1)[0] + "/sums/"
    for cid, ref in manifest.sums.items():
        if ref.key.startswith(prefix):  # written this round (superseded since, unless live)
            found.append((f"running sum of {cid} (round {r}, superseded)", ref))
    unique: dict[str, tuple[str, ObjectRef]] = {}
    for what, ref in found:  # an applied delta may also be the upload: once, under its first name
        if ref.key not in live:
            unique.setdefault(ref.key, (what, ref))
    return list(unique.values())


def apply_retention(
    history: UpdateHistory,
    head: ObjectRef,
    keep_rounds: int,
    protect: Iterable[Manifest] = (),
    reason: str = "history.retention: sums",
) -> RetentionPass:
    """Drop the objects of the round ``keep_rounds`` rounds behind ``head`` (walking its lineage).

    Called after every committed round, so each round is handled once, with
    ``O(keep_rounds)`` manifest reads. The live sums of ``head`` and of every
    manifest in ``protect`` (the champion's, so it can still be forgotten
    from) are never dropped.
    """
    if keep_rounds < 1:
        raise ValueError(f"keep_rounds must be >= 1, got {keep_rounds}")
    store = history.store
    lineage = history.iter_lineage(head)
    _, newest = next(lineage)
    live = {ref.key for ref in newest.sums.values()}
    for manifest in protect:
        live |= {ref.key for ref in manifest.sums.values()}
    rounds_back = 0
    target: RoundManifest | None = None
    for _, manifest in lineage:  # the head's ancestors, newest first
        if not isinstance(manifest, RoundManifest):
            continue  # a deletion is a node of the lineage but not a round
        rounds_back += 1
        if rounds_back == keep_rounds:
            target = manifest
            break
    if target is None:
        return RetentionPass(None, None, [])
    key = record_key(target.federation_id, target.server_round)
    if store.exists(key):  # done before (or a crash after the record): finish the deletions
        record = json.loads(store.get(key))
        _delete(store, record["dropped"])
        return RetentionPass(key, target.server_round, record["dropped"])
    dropped = [
        {"what": what, "key": ref.key, "sha256": ref.sha256, "size": ref.size}
        for what, ref in round_droppable(target, live)
        if store.exists(ref.key)
    ]
    record = {
        "schema": RETENTION_SCHEMA,
        "federation_id": target.federation_id,
        "server_round": target.server_round,
        "reason": reason,
        "keep_rounds": keep_rounds,
        "created_at": utc_now(),
        "dropped": dropped,
    }
    store.put(key, json.dumps(record, indent=2, sort_keys=True).encode(), overwrite=False)
    _delete(store, dropped)
    return RetentionPass(key, target.server_round, dropped)


def _delete(store: ObjectStore, dropped: Iterable[Mapping[str, Any]]) -> None:
    for item in dropped:
        store.delete(str(item["key"]))


def read_retention_records(store: ObjectStore) -> list[dict[str, Any]]:
    """Every retention record (unreadable ones are skipped: the audit reports what it cannot explain)."""
    records = []
    for key in store.list(RETENTION_PREFIX):
        try:
            records.append(json.loads(store.get(key)))
        except (ValueError, KeyError, ObjectNotFound):
            continue
    return records


def dropped_objects(store: ObjectStore) -> dict[str, dict[str, Any]]:
    """key -> what a retention record says about it (what, sha256, round)."""
    return {
        str(item["key"]): {**item, "server_round": record.get("server_round"), "reason": record.get("reason")}
        for record in read_retention_records(store)
        for item in record.get("dropped", [])
    }


def check_updates_kept(
    store: ObjectStore,
    refs: Iterable[tuple[str, ObjectRef]],
    operation: str,
    hint: str = "Use the subtract variant, which needs only the live running sums, or keep history.retention: full",
) -> None:
    """Refuse ``operation`` when any of ``refs`` (what, ref) was dropped by retention (before any write)."""
    gone = [(what, ref) for what, ref in refs if not store.exists(ref.key)]
    if not gone:
        return
    dropped = dropped_objects(store)
    by_retention = [what for what, ref in gone if ref.key in dropped]
    if by_retention:
        raise RetentionError(
            f"{operation} needs {len(by_retention)} archived object(s) that history.retention: sums dropped "
            f"(e.g. the {by_retention[0]}); it cannot run on this lineage. {hint}"
        )
