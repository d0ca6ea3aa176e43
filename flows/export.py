"""``fedforget export --client ID``: the model a client serves at a version, as one checked file.

The protocol that produced the version says what that is
(:meth:`~components.federation.protocol.Protocol.served_model`): the base plus
the client's own head (shared base), its architecture's model (ensemble
distillation), its own model (soft labels), else the global model. A
forgotten (tombstoned) client, or one whose contributions are not in the
version, gets nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config.runtime import Runtime
from components.config.sections import load_config, registered_model_profiles
from components.core.refs import sha256_bytes
from components.core.serialize import state_to_bytes
from components.federation.protocol import UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from components.models.students import build_model
from components.unlearning.forget import protocol_of
from components.unlearning.guard import check_clean, present_clients
from components.unlearning.tombstones import validate_client_id
from flows.ledger import forgotten_for
from flows.tracking import Tracker


def export_client_model(
    client_id: str, out: str | Path, version: str | None = None, profile: str = "default", project: str | None = None
) -> dict[str, Any]:
    """Write ``client_id``'s served model at ``version`` (default: the champion) to ``out`` (safetensors)."""
    validate_client_id(client_id)
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile)
    tracker = Tracker(runtime, config.registry)
    target = tracker.version(version) if version else tracker.alias()
    if target is None:
        what = f"version {version}" if version else f"alias {config.registry.champion_alias!r}"
        raise UnlearningError(tracker.missing(what, registered_model_profiles(runtime.params_path)))
    store = open_store(runtime.store)
    if client_id in forgotten_for(tracker, store):
        raise UnlearningError(
            f"client {client_id} was forgotten (or its deletion is under way): no model of it is exported"
        )
    history = UpdateHistory(store)
    ref = manifest_ref_from_tags(target.tags)
    check_clean(  # a version that still holds a forgotten client exports nothing, whoever asks
        history, store, ref, target.version, "export a client model from",
        f"Export from {config.registry.champion_alias} or another version without them.",
        config.registry.model_name, forgotten_for(tracker, store),
    )  # fmt: skip
    if client_id not in present_clients(history, ref):
        raise UnlearningError(f"client {client_id} has no contributions in version {target.version}")
    manifest = history.read_manifest(ref)
    spec, state = protocol_of(manifest).served_model(history, manifest, client_id)
    build_model(spec).load_state_dict(dict(state))  # refuses a state that does not fit its spec
    meta = {"kind": "client_model", "client_id": client_id, "version": target.version,
            "protocol": manifest.protocol.get("name"), "model": spec.to_dict()}  # fmt: skip
    data = state_to_bytes(state, meta)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return {
        **meta,
        "path": str(path),
        "sha256": sha256_bytes(data),
        "bytes": len(data),
    }
