"""Forgetting a client: dispatched to the protocol that produced the lineage.

Every manifest records the protocol (name and settings) whose step produced it;
a deletion's manifest carries its source's. ``forget_client`` rebuilds that
protocol and lets it remove the client (the weight protocol subtracts its
running sum: :mod:`components.federation.weights.forget`).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from components.core.refs import ObjectRef
from components.federation.protocol import ForgetResult, Protocol, protocol_from_record
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest


def new_request_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"del-{stamp}-{secrets.token_hex(4)}"


def protocol_of(manifest: Manifest) -> Protocol:
    """The protocol that produced the version at ``manifest``."""
    return protocol_from_record(manifest.protocol)


def forget_client(
    history: UpdateHistory, source: ObjectRef, source_manifest: Manifest, client_id: str, variant: str = "subtract"
) -> ForgetResult:
    """Remove ``client_id``'s contributions from the version at ``source``, as its protocol says.

    Every object read is checked against the sha256 recorded for it; a
    mismatch raises :class:`~components.lineage.store.IntegrityError` before
    anything is written.
    """
    return protocol_of(source_manifest).forget(history, source, source_manifest, client_id, variant)
