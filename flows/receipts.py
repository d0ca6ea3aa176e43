"""``fedforget receipt verify FILE``: check a deletion receipt's signature, then every hash it names again.

The signature is checked against the operator's public key (``--public-key``,
else the public half of the project's signing key). Then the unlearning
manifest and the tombstone are read from the store and hashed, the new
version's registry tags compared, the weights the registry serves for it
hashed, and every retired version checked to serve nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.receipts import (
    ReceiptError,
    load_public_key,
    load_signing_key,
    public_key_pem,
    receipt_from_bytes,
    recheck,
    verify_signature,
)
from flows.completion import RECEIPT_KEY_FILE
from flows.tracking import Tracker


def verify_receipt_file(
    path: str | Path, public_key: str | Path | None = None, project: str | None = None
) -> dict[str, Any]:
    """Verify the receipt at ``path``; returns ``{"valid": bool, "problems": [...], "receipt": ...}``.

    A receipt that cannot be read at all raises :class:`ReceiptError`.
    """
    file = Path(path)
    if not file.is_file():
        raise ReceiptError(f"no receipt file at {file}")
    receipt = receipt_from_bytes(file.read_bytes())
    runtime = Runtime.from_env(project)
    if public_key is not None:
        trusted = load_public_key(Path(public_key).read_text())
    else:
        trusted = load_public_key(public_key_pem(load_signing_key(runtime.state_dir / RECEIPT_KEY_FILE)))
    problems: list[str] = []
    try:
        verify_signature(receipt, trusted)
    except ReceiptError as exc:
        problems.append(f"signature: {exc}")
    config = load_config(runtime.params_path)
    tracker = Tracker(runtime, config.registry.model_copy(update={"model_name": str(receipt.get("model"))}))
    history = UpdateHistory(open_store(runtime.store))
    versions = {v.version: dict(v.tags) for v in tracker.versions()}

    def served(version: str) -> str | None:
        tags = versions.get(version) or {}
        keys = None
        if "manifest_key" in tags:  # compare over the archived state's tensors (an export may carry more)
            try:
                manifest = history.read_manifest(manifest_ref_from_tags(tags))
                keys = sorted(history.read_state(manifest.global_state))
            except Exception:  # a retired state: compare every tensor the registry serves
                keys = None
        try:
            return tracker.served_weights(version, keys)
        except Exception as exc:  # an artifact that no longer loads is not the receipt's weights
            return f"unreadable ({type(exc).__name__})"

    problems += recheck(receipt, history.store, versions, served)
    return {"valid": not problems, "problems": problems, "receipt": receipt, "path": str(file)}


def receipt_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True)
