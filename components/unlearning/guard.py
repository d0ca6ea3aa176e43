"""The lineage guard: no path may produce or promote a model whose lineage holds a forgotten client."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from components.core.refs import ObjectRef
from components.federation.protocol import UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, UnlearningManifest, manifest_from_bytes
from components.lineage.store import ObjectStore
from components.unlearning.tombstones import intended_clients, read_intent, read_tombstone, tombstoned_clients

Forgotten = Mapping[str, Mapping[str, Any]]  # client id -> what records its deletion (source, request id, version)


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
    so a client either record names counts as present, and so are the clients
    of a registered starting point (:func:`start_clients`). Every manifest read is
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
        present = frozenset(replayed | set(manifest.sums) | start_clients(manifest))
        _PRESENT.put(ref.sha256, present)
    return present


def start_clients(manifest: Manifest) -> set[str]:
    """Clients in a model through its starting point, as ``<model>/<client>``: a registered student a few-shot
    federation started from holds its pretraining clients, and no deletion in the derived lineage can take
    them out. The prefix keeps them apart from the derived federation's own clients of the same id."""
    start = manifest.protocol.get("start") or {}
    model = start.get("model")
    return {f"{model}/{c}" if model else str(c) for c in start.get("clients") or []}


def unlearning_manifests(store: ObjectStore) -> list[UnlearningManifest]:
    """Every deletion manifest in the store (``unlearning/<request>/manifest.json``); unreadable ones skipped."""
    found = []
    for key in store.list("unlearning/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json":
            try:
                manifest = manifest_from_bytes(store.get(key))
            except (ValueError, KeyError):
                continue
            if isinstance(manifest, UnlearningManifest):
                found.append(manifest)
    return found


def forgotten_clients(store: ObjectStore, model: str, also: Forgotten | None = None) -> dict[str, dict[str, Any]]:
    """Every client deleted (or being deleted) from ``model``, by any of the records that say so.

    Three records in the store, each enough on its own: the tombstone, the
    intent written before the deletion registered anything, and the deletion's
    own manifest; ``also`` adds records from elsewhere (the registry's
    ``unlearned`` versions). Removing one record reopens nothing.
    """
    found: dict[str, dict[str, Any]] = {}
    for client_id in sorted(tombstoned_clients(store, model)):
        record = read_tombstone(store, model, client_id) or {}
        found[client_id] = {"source": "tombstone", "request_id": record.get("request_id"),
                            "version": record.get("resulting_version")}  # fmt: skip
    for client_id in sorted(intended_clients(store, model) - set(found)):
        record = read_intent(store, model, client_id) or {}
        found[client_id] = {"source": "intent", "request_id": record.get("request_id"), "version": None}
    for manifest in unlearning_manifests(store):
        if manifest.registered_model in (None, model):  # an unscoped (older) manifest counts everywhere
            found.setdefault(manifest.forgotten_client, {"source": "deletion manifest",
                             "request_id": manifest.request_id, "version": None})  # fmt: skip
    for client_id, record in (also or {}).items():
        found.setdefault(client_id, dict(record))
    return found


def registry_deletions(tags: Iterable[Mapping[str, str]]) -> dict[str, dict[str, Any]]:
    """client id -> its deletion, from registered versions' tags (``kind=unlearned``; ``_version`` names the
    version): the registry's record, kept outside the store."""
    found: dict[str, dict[str, Any]] = {}
    for t in tags:
        if t.get("kind") == "unlearned" and t.get("forgotten_client"):
            found.setdefault(t["forgotten_client"], {"source": "registry", "request_id": t.get("request_id"),
                                                     "version": t.get("_version")})  # fmt: skip
    return found


def forgotten_in(
    history: UpdateHistory, store: ObjectStore, manifest_ref: ObjectRef, model: str, forgotten: Forgotten | None = None
) -> list[str]:
    """The forgotten clients still present in the model at ``manifest_ref`` (sorted).

    ``forgotten`` is :func:`forgotten_clients` of ``model`` (read when not
    given). Clients of a registered starting point (``<model>/<client>``) are
    checked against their own model's records.
    """
    present = present_clients(history, manifest_ref)
    forgotten = forgotten_clients(store, model) if forgotten is None else forgotten
    tainted = {c for c in present if "/" not in c and c in forgotten}
    others: dict[str, dict[str, Any]] = {}
    for qualified in present - tainted:
        if "/" in qualified:
            other, client_id = qualified.split("/", 1)
            if other not in others:
                others[other] = forgotten_clients(store, other)
            if client_id in others[other]:
                tainted.add(qualified)
    return sorted(tainted)


def check_clean(
    history: UpdateHistory, store: ObjectStore, manifest_ref: ObjectRef, version: str, action: str, remedy: str,
    model: str, forgotten: Forgotten | None = None, allow: Collection[str] = (),
) -> None:  # fmt: skip
    """Refuse (``TaintedLineageError``) a version whose lineage holds a forgotten client.

    ``action`` says what was refused (e.g. "resume training from"), ``remedy``
    how to proceed; the message names the clients, their deletion requests and
    the versions those deletions produced. ``allow`` names clients the caller
    is removing itself (a deletion resumed after a failure).
    """
    forgotten = forgotten_clients(store, model) if forgotten is None else forgotten
    tainted = [c for c in forgotten_in(history, store, manifest_ref, model, forgotten) if c not in allow]
    if not tainted:
        return
    details = []
    for client_id in tainted:
        record = forgotten.get(client_id, {})
        state = "being forgotten" if record.get("source") == "intent" else "forgotten"
        details.append(
            f"{client_id} ({state} by request {record.get('request_id') or '?'}, "
            f"deletion version {record.get('version') or '?'})"
        )
    raise TaintedLineageError(
        f"refusing to {action} version {version}: its lineage still contains forgotten client(s) "
        f"{'; '.join(details)}; nothing changed. {remedy}",
        version,
        tainted,
    )
