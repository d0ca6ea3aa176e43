"""Retiring tainted versions: the model states that still embed a forgotten client.

After a deletion every version whose lineage still holds the client is tagged
``contains_forgotten_clients``. With ``unlearn.retire_tainted: delete-weights``
their weights go too: the registry's model artifacts (in flows) and, in the
archive, the states those versions' steps produced (a round's global state,
residual and carried server state; a deletion's states). Registry entries,
tags and manifests stay, so lineage and audits remain whole; the audit
reports the deleted states as *retired*, against the hashes recorded here.

The record ``retirements/<request_id>.json`` is written (once) before anything
is deleted, so a crash in between leaves a record naming every object, and the
next run deletes what is left.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from components.core.ids import validate_id
from components.core.refs import ObjectRef
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest, RoundManifest
from components.lineage.store import ObjectStore
from components.unlearning.guard import present_clients

RETIREMENT_SCHEMA = "fedforget/retirement@1"
RETIRE_MODES = ("tag", "delete-weights")


def retirement_key(request_id: str, model: str | None = None) -> str:
    """Where a deletion's retirement record lives: one per registered model whose versions it retires (the
    deleting model's under the request id; a model derived from it, e.g. a few-shot federation started
    from its student, under ``<request id>.<model>``)."""
    return f"retirements/{request_id}.json" if model is None else f"retirements/{request_id}.{validate_id(model)}.json"


def produced_states(manifest: Manifest) -> list[tuple[str, ObjectRef]]:
    """The model states a step produced (its inputs are its parent's products)."""
    states = [("global state", manifest.global_state)]
    if isinstance(manifest, RoundManifest):
        states += [
            (name, ref)
            for name, ref in (("residual", manifest.residual), ("server state", manifest.server_state))
            if ref
        ]
    else:
        states.append(("state after subtraction", manifest.forgotten_state))
    return states


def tainted_states(history: UpdateHistory, heads: Iterable[ObjectRef], client_id: str) -> list[tuple[str, ObjectRef]]:
    """States produced anywhere in the lineages of ``heads`` at a step that still held ``client_id``."""
    found: dict[str, tuple[str, ObjectRef]] = {}
    for ref, manifest in history.iter_lineages(heads):
        if client_id in present_clients(history, ref):
            for what, state in produced_states(manifest):
                found.setdefault(state.key, (f"{what} (round {manifest.server_round})", state))
    return sorted(found.values(), key=lambda item: item[1].key)


def write_retirement(
    store: ObjectStore, *, request_id: str, client_id: str, versions: list[str], states: list[tuple[str, ObjectRef]],
    model: str | None = None, derived: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Record what will be deleted (write-once: an existing record is kept and returned); ``model`` names the
    registered model whose ``versions`` these are, ``derived`` that it is not the deleting one."""
    existing = read_retirement(store, request_id, model if derived else None)
    if existing is not None:
        return existing
    record = {
        "schema": RETIREMENT_SCHEMA,
        "request_id": request_id,
        "model": model,
        "client_id": client_id,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": sorted(versions, key=int),
        "states": [{"what": what, **ref.to_dict()} for what, ref in states],
    }
    store.put(
        retirement_key(request_id, model if derived else None),
        (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
        overwrite=False,
    )
    return record


def read_retirement(store: ObjectStore, request_id: str, model: str | None = None) -> dict[str, Any] | None:
    key = retirement_key(request_id, model)
    return json.loads(store.get(key)) if store.exists(key) else None


def read_retirements(store: ObjectStore) -> list[dict[str, Any]]:
    """Every retirement record (unreadable ones are skipped: the audit reports what it cannot explain)."""
    records = []
    for key in store.list("retirements/"):
        try:
            records.append(json.loads(store.get(key)))
        except (ValueError, KeyError):
            continue
    return records


def delete_retired_states(store: ObjectStore, record: dict[str, Any]) -> int:
    """Delete the archived states a record names; return how many were still there."""
    deleted = 0
    for state in record["states"]:
        if store.exists(state["key"]):
            store.delete(state["key"])
            deleted += 1
    return deleted
