"""Keeping it deleted: tombstones, and finding every stored object of a client for the purge."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from components.core.ids import validate_id
from components.core.refs import ObjectRef, sha256_bytes
from components.federation.protocol import UnlearningError
from components.lineage.store import ObjectStore

TOMBSTONE_SCHEMA = "fedforget/tombstone@1"


def validate_client_id(client_id: str) -> str:
    """Client ids become object keys and tag values: allow a safe alphabet only."""
    try:
        return validate_id(client_id, "client id")
    except ValueError as exc:
        raise UnlearningError(str(exc)) from None


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


# Per-client objects are files named by client id one folder below these levels:
# federations/<id>/rounds/<r>/<kind>/<client>, unlearning/<id>/<kind>/<client>,
# datasets/<version>/clients/<client>. (Round-level objects sit one level higher.)
_CLIENT_KEY_DEPTH = {"federations": 6, "unlearning": 4, "datasets": 4}


def list_client_objects(store: ObjectStore, client_id: str) -> list[ObjectRef]:
    """Every stored object holding the client's data or contributions, with its hash.

    Every per-client record of every method (uploads, applied updates, running
    sums, soft labels, personal states) and its staged training shards
    (``datasets/<version>/clients/``).
    """
    validate_client_id(client_id)
    name = f"{client_id}.safetensors"
    refs = []
    for top, depth in _CLIENT_KEY_DEPTH.items():
        for key in store.list(f"{top}/"):
            parts = key.split("/")
            if parts[-1] == name and len(parts) == depth:
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
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
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
