"""Keeping it deleted: intents, tombstones, and finding every stored object of a client for the purge.

A client id means something only inside one data partition, so both records
are scoped by the registered model the client trained: ``intents/<model>/<client>.json``
(written before a deletion registers anything) and ``tombstones/<model>/<client>.json``
(written when it completes). Tombstones of stores written before scoping
(``tombstones/<client>.json``) name no model: they are read as applying to
every model, which refuses more, never less.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from components.core.ids import validate_id
from components.core.refs import ObjectRef, sha256_bytes
from components.federation.protocol import UnlearningError
from components.lineage.store import ObjectStore

TOMBSTONE_SCHEMA = "fedforget/tombstone@2"
INTENT_SCHEMA = "fedforget/deletion-intent@1"
TOMBSTONE_PREFIX = "tombstones/"
INTENT_PREFIX = "intents/"


def validate_client_id(client_id: str) -> str:
    """Client ids become object keys and tag values: allow a safe alphabet only."""
    try:
        return validate_id(client_id, "client id")
    except ValueError as exc:
        raise UnlearningError(str(exc)) from None


# --------------------------------------------------------------------------- keeping it deleted


def validate_model_name(model: str) -> str:
    """Registered model names scope deletion records: they become one folder of a key."""
    try:
        return validate_id(model, "registered model name")
    except ValueError as exc:
        raise UnlearningError(str(exc)) from None


def tombstone_key(model: str, client_id: str) -> str:
    return f"{TOMBSTONE_PREFIX}{validate_model_name(model)}/{validate_client_id(client_id)}.json"


def legacy_tombstone_key(client_id: str) -> str:
    """Where a store written before scoping keeps a client's tombstone (it names no model)."""
    return f"{TOMBSTONE_PREFIX}{validate_client_id(client_id)}.json"


def _read_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    return json.loads(store.get(key)) if store.exists(key) else None


def read_tombstone(store: ObjectStore, model: str, client_id: str) -> dict[str, Any] | None:
    """The client's tombstone under ``model`` (or an unscoped legacy one), or ``None``."""
    return _read_json(store, tombstone_key(model, client_id)) or _read_json(store, legacy_tombstone_key(client_id))


def tombstone_ref(store: ObjectStore, model: str, client_id: str) -> ObjectRef | None:
    """The reference (key and sha256) of the client's scoped tombstone, if there is one."""
    key = tombstone_key(model, client_id)
    if not store.exists(key):
        return None
    data = store.get(key)
    return ObjectRef(key, sha256_bytes(data), len(data))


def _names_under(store: ObjectStore, prefix: str) -> set[str]:
    return {
        k[len(prefix) :].removesuffix(".json")
        for k in store.list(prefix)
        if k.endswith(".json") and "/" not in k[len(prefix) :]
    }


def tombstoned_clients(store: ObjectStore, model: str) -> set[str]:
    """Every client forgotten from ``model`` (and, from a legacy store, every unscoped tombstone)."""
    return _names_under(store, f"{TOMBSTONE_PREFIX}{validate_model_name(model)}/") | _names_under(
        store, TOMBSTONE_PREFIX
    )


# --------------------------------------------------------------------------- intents


def intent_key(model: str, client_id: str) -> str:
    return f"{INTENT_PREFIX}{validate_model_name(model)}/{validate_client_id(client_id)}.json"


def record_intent(
    store: ObjectStore, *, model: str, client_id: str, request_id: str, reason: str | None = None
) -> dict[str, Any]:
    """Record, before anything is registered, that ``client_id`` is being deleted from ``model``.

    Every producer (federate, the gate, export, serve) refuses the client from
    then on, whether or not the deletion completes. Write-once: a second
    deletion of the same client keeps the first intent (and its request id).
    """
    existing = read_intent(store, model, client_id)
    if existing is not None:
        return existing
    record = {
        "schema": INTENT_SCHEMA,
        "model": model,
        "client_id": client_id,
        "request_id": validate_id(request_id, "request id"),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
    }
    store.put(
        intent_key(model, client_id), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), overwrite=False
    )
    return record


def read_intent(store: ObjectStore, model: str, client_id: str) -> dict[str, Any] | None:
    return _read_json(store, intent_key(model, client_id))


def intended_clients(store: ObjectStore, model: str) -> set[str]:
    """Clients whose deletion from ``model`` was recorded (completed or not)."""
    return _names_under(store, f"{INTENT_PREFIX}{validate_model_name(model)}/")


def delete_objects(store: ObjectStore, refs: list[ObjectRef]) -> None:
    for ref in refs:
        store.delete(ref.key)


def _entry(item: ObjectRef | tuple[str, ObjectRef]) -> dict[str, Any]:
    what, ref = item if isinstance(item, tuple) else (None, item)
    return ref.to_dict() | ({"what": what} if what else {})


def write_tombstone(
    store: ObjectStore,
    *,
    model: str,
    client_id: str,
    request_id: str,
    source_version: str,
    resulting_version: str,
    variant: str,
    unlearning_manifest: ObjectRef,
    purged: list[ObjectRef] | list[tuple[str, ObjectRef]],
    reason: str | None = None,
    guarantee: str | None = None,
    files: list[dict[str, Any]] | None = None,
) -> ObjectRef:
    """Record the deletion durably: who, from which model, when, what resulted, hashes of what was purged
    (store objects, and the prepared ``files`` removed from the data folder).

    No update data goes into a tombstone. Written once; a retry returns the
    existing record's reference.
    """
    existing = tombstone_ref(store, model, client_id)
    if existing is not None:
        return existing
    record = {
        "schema": TOMBSTONE_SCHEMA,
        "model": model,
        "client_id": client_id,
        "request_id": request_id,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_version": source_version,
        "resulting_version": resulting_version,
        "variant": variant,
        "unlearning_manifest": unlearning_manifest.to_dict(),
        "purged": [_entry(item) for item in purged],
        "reason": reason,
        "guarantee": guarantee,
        "files": list(files or []),  # prepared shard files removed from the data folder (path, sha256)
    }
    payload = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    return store.put(tombstone_key(model, client_id), payload, overwrite=False)


def removed_files(store: ObjectStore) -> set[str]:
    """Prepared files (relative to a profile's data folder) that any deletion, of any model, removed."""
    found: set[str] = set()
    for key in store.list(TOMBSTONE_PREFIX):
        if key.endswith(".json"):
            try:
                found |= {str(item["path"]) for item in json.loads(store.get(key)).get("files") or []}
            except (ValueError, KeyError, TypeError):
                continue
    return found
