"""Forgetting a client: subtract exactly what it contributed, keep it deleted.

Two variants, both exact with respect to the archived history:

``subtract`` (default)
    ``W' = W - S_c`` where ``S_c`` is the client's running sum of applied
    contributions along the source version's lineage: one object read, however
    many rounds. Every other client's contribution stays exactly as applied.

``renormalise``
    Additionally, in every round the client took part in, the contributions of
    the clients still present are rescaled so that their weights again sum to
    what the round's present clients weighed before the deletion (for FedAvg:
    ``p_i -> p_i / (1 - p_c)``). This mimics FedAvg without the client, but it
    reads every archived update of those rounds (cost grows with rounds x
    clients) and amplifies updates that were computed against a model that
    still contained the client, which is why it is not the default.

Per-round scales are recorded in unlearning manifests (``round_scales``), and
the running sums of the rescaled clients are rewritten, so later deletions
(of either variant) remain exact.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from components.history import Manifest, RoundManifest, UnlearningManifest, UpdateHistory, validate_id
from components.state import StateDict, add, subtract, weighted_sum, zeros_like
from components.store import ObjectRef, ObjectStore, sha256_bytes

VARIANTS = ("subtract", "renormalise")
TOMBSTONE_SCHEMA = "fedforget/tombstone@1"


class UnlearningError(ValueError):
    """A deletion request that cannot be carried out as asked (nothing was changed)."""


class TaintedLineageError(UnlearningError):
    """A model version whose lineage still holds a forgotten (tombstoned) client.

    Training from it, unlearning from it or promoting it would bring the
    client's contributions back; every path that produces or promotes a model
    refuses it, with nothing changed.
    """

    def __init__(self, message: str, version: str, clients: list[str]) -> None:
        super().__init__(message)
        self.version = version
        self.clients = clients


def validate_client_id(client_id: str) -> str:
    """Client ids become object keys and tag values: allow a safe alphabet only."""
    try:
        return validate_id(client_id, "client id")
    except ValueError as exc:
        raise UnlearningError(str(exc)) from None


def new_request_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"del-{stamp}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class ForgetResult:
    """The state without the client and what changed in the lineage's bookkeeping."""

    state: StateDict = field(repr=False)
    removed: ObjectRef
    new_sums: dict[str, StateDict] = field(repr=False)
    round_scales: dict[str, float]
    objects_read: int


def _lineage_scales_and_forgotten(
    history: UpdateHistory, source: ObjectRef
) -> tuple[list[tuple[ObjectRef, RoundManifest]], dict[str, float], set[str]]:
    """Rounds of the lineage (newest first), current round scales, clients already forgotten."""
    rounds: list[tuple[ObjectRef, RoundManifest]] = []
    scales: dict[str, float] = {}
    forgotten: set[str] = set()
    for ref, manifest in history.iter_lineage(source):
        if isinstance(manifest, UnlearningManifest):
            forgotten.add(manifest.forgotten_client)
            for key, value in manifest.round_scales.items():
                scales.setdefault(key, value)  # the newest deletion's scale wins
        else:
            rounds.append((ref, manifest))
    return rounds, scales, forgotten


def forget_client(
    history: UpdateHistory,
    source: ObjectRef,
    source_manifest: Manifest,
    client_id: str,
    variant: str = "subtract",
) -> ForgetResult:
    """Remove ``client_id``'s applied contributions from the source version.

    Every object read is checked against the sha256 recorded for it; a
    mismatch raises :class:`~components.store.IntegrityError` before anything
    is written.
    """
    if variant not in VARIANTS:
        raise UnlearningError(f"unknown forgetting variant {variant!r}; choose {' or '.join(VARIANTS)}")
    if client_id not in source_manifest.sums:
        raise UnlearningError(
            f"client {client_id} never contributed to the lineage of this model version "
            "(or was already removed from it)"
        )
    removed = source_manifest.sums[client_id]
    state = history.read_state(source_manifest.global_state)
    state = subtract(state, history.read_state(removed))
    if variant == "subtract":
        return ForgetResult(state, removed, {}, {}, objects_read=2)

    rounds, scales, forgotten = _lineage_scales_and_forgotten(history, source)
    reads = 2 + len(rounds)
    correction = zeros_like(state)
    sum_corrections: dict[str, StateDict] = {}
    new_scales: dict[str, float] = {}
    for ref, manifest in rounds:
        weights = {c.client_id: c.weight for c in manifest.clients}
        if client_id not in weights:
            continue
        present = [c for c in manifest.clients if c.client_id not in forgotten and c.client_id != client_id]
        scale = scales.get(ref.key, 1.0)
        total_before = scale * (weights[client_id] + sum(c.weight for c in present))
        remaining = sum(c.weight for c in present)
        new_scale = total_before / remaining if remaining > 0 else 0.0
        new_scales[ref.key] = new_scale
        if not present or new_scale == scale:
            continue
        factor = new_scale - scale
        for entry in present:
            delta = history.read_state(entry.update)
            reads += 1
            extra = weighted_sum([delta], [factor * entry.weight])
            correction = add(correction, extra)
            previous = sum_corrections.get(entry.client_id)
            sum_corrections[entry.client_id] = extra if previous is None else add(previous, extra)
    new_sums = {
        cid: add(history.read_state(source_manifest.sums[cid]), extra)
        for cid, extra in sum_corrections.items()
    }
    reads += len(new_sums)
    return ForgetResult(add(state, correction), removed, new_sums, new_scales, objects_read=reads)


# --------------------------------------------------------------------------- keeping it deleted


def tombstone_key(client_id: str) -> str:
    return f"tombstones/{validate_client_id(client_id)}.json"


def read_tombstone(store: ObjectStore, client_id: str) -> dict[str, Any] | None:
    """The client's tombstone, or ``None`` if it was never forgotten."""
    key = tombstone_key(client_id)
    if not store.exists(key):
        return None
    return json.loads(store.get(key))


def tombstoned_clients(store: ObjectStore) -> set[str]:
    """Every client that has been forgotten (and must never train again)."""
    return {k.rsplit("/", 1)[-1].removesuffix(".json") for k in store.list("tombstones/") if k.endswith(".json")}


def list_client_objects(store: ObjectStore, client_id: str) -> list[ObjectRef]:
    """Every archived object holding the client's updates or running sums, with its hash."""
    validate_client_id(client_id)
    name = f"{client_id}.safetensors"
    refs = []
    for prefix in ("federations/", "unlearning/"):
        for key in store.list(prefix):
            parts = key.split("/")
            if parts[-1] == name and len(parts) >= 2 and parts[-2] in ("updates", "sums"):
                data = store.get(key)
                refs.append(ObjectRef(key, sha256_bytes(data), len(data)))
    return refs


def delete_objects(store: ObjectStore, refs: list[ObjectRef]) -> None:
    for ref in refs:
        store.delete(ref.key)


def write_tombstone(
    store: ObjectStore,
    *,
    client_id: str,
    request_id: str,
    source_version: str,
    resulting_version: str,
    variant: str,
    unlearning_manifest: ObjectRef,
    purged: list[ObjectRef],
    reason: str | None = None,
) -> ObjectRef:
    """Record the deletion durably: who, when, what resulted, hashes of what was purged.

    No update data goes into a tombstone. Written once; a retry with the same
    content is a no-op.
    """
    existing = read_tombstone(store, client_id)
    if existing is not None:
        data = store.get(tombstone_key(client_id))
        return ObjectRef(tombstone_key(client_id), sha256_bytes(data), len(data))
    record = {
        "schema": TOMBSTONE_SCHEMA,
        "client_id": client_id,
        "request_id": request_id,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_version": source_version,
        "resulting_version": resulting_version,
        "variant": variant,
        "unlearning_manifest": unlearning_manifest.to_dict(),
        "purged": [ref.to_dict() for ref in purged],
        "reason": reason,
    }
    payload = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    return store.put(tombstone_key(client_id), payload, overwrite=False)


def purge_client(store: ObjectStore, client_id: str) -> list[ObjectRef]:
    """Delete every archived update and running sum of the client; return their hashes."""
    refs = list_client_objects(store, client_id)
    delete_objects(store, refs)
    return refs


# --------------------------------------------------------------------------- lineage guard


class _PresentCache:
    """Clients present at a manifest, keyed by the manifest's sha256.

    A manifest's bytes fix its parent's hash, so the answer for a given sha256
    never changes: entries need no invalidation. A bounded LRU.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str) -> frozenset[str] | None:
        with self._lock:
            found = self._items.get(sha256)
            if found is not None:
                self._items.move_to_end(sha256)
            return found

    def put(self, sha256: str, present: frozenset[str]) -> None:
        with self._lock:
            self._items[sha256] = present
            self._items.move_to_end(sha256)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_PRESENT = _PresentCache()


def present_clients(history: UpdateHistory, manifest_ref: ObjectRef) -> frozenset[str]:
    """Clients whose contributions are in the model at ``manifest_ref``, from the manifests.

    Replays the lineage oldest first: a round adds its participants, a deletion
    removes its client. The head manifest's running-sum index is added on top,
    so a client either record names counts as present. Every manifest read is
    hash-checked; the walk stops at the first ancestor already cached, so it
    costs at most one read per step of the lineage, once per version.
    """
    cached = _PRESENT.get(manifest_ref.sha256)
    if cached is not None:
        return cached
    chain: list[tuple[ObjectRef, Manifest]] = []
    present: frozenset[str] = frozenset()
    ref: ObjectRef | None = manifest_ref
    while ref is not None:
        known = _PRESENT.get(ref.sha256)
        if known is not None:
            present = known
            break
        manifest = history.read_manifest(ref)
        chain.append((ref, manifest))
        ref = manifest.parent
    for ref, manifest in reversed(chain):
        if isinstance(manifest, UnlearningManifest):
            replayed = set(present) - {manifest.forgotten_client}
        else:
            replayed = set(present) | set(manifest.client_ids)
        present = frozenset(replayed | set(manifest.sums))
        _PRESENT.put(ref.sha256, present)
    return present


def forgotten_in(history: UpdateHistory, store: ObjectStore, manifest_ref: ObjectRef) -> list[str]:
    """The tombstoned clients still present in the model at ``manifest_ref`` (sorted)."""
    tombstones = tombstoned_clients(store)
    if not tombstones:
        return []
    return sorted(present_clients(history, manifest_ref) & tombstones)


def check_clean(
    history: UpdateHistory, store: ObjectStore, manifest_ref: ObjectRef, version: str, action: str, remedy: str
) -> None:
    """Refuse (``TaintedLineageError``) a version whose lineage holds a forgotten client.

    ``action`` says what was refused (e.g. "resume training from"), ``remedy``
    how to proceed; the message names the clients, their deletion requests and
    the versions those deletions produced.
    """
    tainted = forgotten_in(history, store, manifest_ref)
    if not tainted:
        return
    details = []
    for client_id in tainted:
        record = read_tombstone(store, client_id) or {}
        details.append(
            f"{client_id} (forgotten by request {record.get('request_id', '?')}, "
            f"deletion version {record.get('resulting_version', '?')})"
        )
    raise TaintedLineageError(
        f"refusing to {action} version {version}: its lineage still contains forgotten client(s) "
        f"{'; '.join(details)}; nothing changed. {remedy}",
        version,
        tainted,
    )

