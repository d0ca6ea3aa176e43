"""The lineage guard: no path may produce or promote a model whose lineage holds a forgotten client."""

from __future__ import annotations

import threading
from collections import OrderedDict

from components.core.refs import ObjectRef
from components.federation.protocol import UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, UnlearningManifest
from components.lineage.store import ObjectStore
from components.unlearning.tombstones import read_tombstone, tombstoned_clients


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
    """Clients in a model through its starting point: a registered student a few-shot federation started
    from holds its pretraining clients, and no deletion in the derived lineage can take them out."""
    return {str(c) for c in (manifest.protocol.get("start") or {}).get("clients") or []}


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
