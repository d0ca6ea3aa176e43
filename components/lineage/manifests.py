"""Manifests: the hash-chained record of every round and every deletion.

Schema ``@2`` (written now) records, besides what ``@1`` did, the protocol and
its settings (``protocol``: what :func:`components.federation.protocol.protocol_from_record`
rebuilds, so forgetting dispatches to the method that produced a lineage), each
client's upload and model spec, the contribution index (``index``: for the
weight protocol, ``running-sums``: each client's sum of applied
contributions), and the round's residual and carried server state, if any.

``@1`` manifests stay readable, unchanged on disk: they were all written by
the weight protocol with FedAvg, so on reading ``strategy`` becomes
``protocol = {"name": "weights", "strategy": ...}``, ``sums`` the running-sum
index, each client's upload its applied update, and residual and server state
absent. Nothing is rewritten (their hashes are in the chain).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from components.core.refs import ObjectRef
from components.models.students import ModelSpec

ROUND_MANIFEST_SCHEMA = "fedforget/round-manifest@2"
UNLEARNING_MANIFEST_SCHEMA = "fedforget/unlearning-manifest@2"
ROUND_MANIFEST_SCHEMA_V1 = "fedforget/round-manifest@1"
UNLEARNING_MANIFEST_SCHEMA_V1 = "fedforget/unlearning-manifest@1"
RUNNING_SUMS = "running-sums"
V1_PROTOCOL = {"name": "weights"}  # every @1 manifest was written by FedAvg weight averaging


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ref(data: Mapping[str, Any] | None) -> ObjectRef | None:
    return ObjectRef.from_dict(data) if data else None


def _refs(data: Mapping[str, Any]) -> dict[str, ObjectRef]:
    return {cid: ObjectRef.from_dict(ref) for cid, ref in data.items()}


def _index(data: Mapping[str, Any]) -> dict[str, ObjectRef]:
    """The running-sum index of an @2 manifest (``sums`` of an @1 one)."""
    if "index" in data:
        index = data["index"] or {}
        if index.get("kind") != RUNNING_SUMS:
            raise ValueError(f"unknown contribution index kind {index.get('kind')!r}")
        return _refs(index.get("entries") or {})
    return _refs(data.get("sums") or {})


@dataclass(frozen=True)
class ClientEntry:
    """One participant of a round as recorded in its manifest.

    ``update`` is the delta the server applied with ``weight`` (weight
    protocols; ``None`` for methods that exchange something else); ``upload``
    what the client sent, when it differs (a strategy clipped or perturbed it).
    ``objects`` are the client's other archived records of the round (soft
    labels, its personal state, ...); ``spec`` is the client's model when it is
    not the round's global model.
    """

    client_id: str
    num_examples: int
    weight: float
    update: ObjectRef | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    upload: ObjectRef | None = None
    spec: ModelSpec | None = None
    objects: Mapping[str, ObjectRef] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "num_examples": self.num_examples,
            "weight": self.weight,
            "update": self.update.to_dict() if self.update else None,
            "upload": self.upload.to_dict() if self.upload else None,
            "spec": self.spec.to_dict() if self.spec else None,
            "objects": {name: ref.to_dict() for name, ref in sorted(self.objects.items())},
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientEntry:
        return cls(
            client_id=str(data["client_id"]),
            num_examples=int(data["num_examples"]),
            weight=float(data["weight"]),
            update=_ref(data.get("update")),
            metrics=dict(data.get("metrics", {})),
            upload=_ref(data.get("upload")),
            spec=ModelSpec.from_dict(data["spec"]) if data.get("spec") else None,
            objects=_refs(data.get("objects") or {}),
        )


@dataclass(frozen=True)
class RoundManifest:
    """Everything a round changed, with the hash of every object it wrote."""

    federation_id: str
    server_round: int
    parent: ObjectRef | None
    base: ObjectRef
    global_state: ObjectRef
    model: ModelSpec
    protocol: Mapping[str, Any]
    clients: tuple[ClientEntry, ...]
    sums: Mapping[str, ObjectRef]  # the running-sum index of every client in the lineage
    data_version: str
    created_at: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    residual: ObjectRef | None = None  # applied for no client's sake (momentum carry, DP noise)
    server_state: ObjectRef | None = None  # carried into the next round (e.g. a momentum buffer)
    objects: Mapping[str, ObjectRef] = field(default_factory=dict)  # the server step's own records
    personal: Mapping[str, ObjectRef] = field(default_factory=dict)  # each client's latest own state

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": ROUND_MANIFEST_SCHEMA,
            "kind": "round",
            "federation_id": self.federation_id,
            "server_round": self.server_round,
            "parent": self.parent.to_dict() if self.parent else None,
            "base": self.base.to_dict(),
            "global": self.global_state.to_dict(),
            "model": self.model.to_dict(),
            "protocol": dict(self.protocol),
            "clients": [c.to_dict() for c in self.clients],
            "index": {"kind": RUNNING_SUMS, "entries": {cid: ref.to_dict() for cid, ref in sorted(self.sums.items())}},
            "residual": self.residual.to_dict() if self.residual else None,
            "server_state": self.server_state.to_dict() if self.server_state else None,
            "objects": {name: ref.to_dict() for name, ref in sorted(self.objects.items())},
            "personal": {cid: ref.to_dict() for cid, ref in sorted(self.personal.items())},
            "data_version": self.data_version,
            "created_at": self.created_at,
            "extra": dict(self.extra),
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundManifest:
        schema = data.get("schema")
        if schema not in (ROUND_MANIFEST_SCHEMA, ROUND_MANIFEST_SCHEMA_V1):
            raise ValueError(f"not a round manifest (schema {schema!r})")
        protocol = data.get("protocol") or {**V1_PROTOCOL, "strategy": dict(data["strategy"])}
        return cls(
            federation_id=str(data["federation_id"]),
            server_round=int(data["server_round"]),
            parent=_ref(data.get("parent")),
            base=ObjectRef.from_dict(data["base"]),
            global_state=ObjectRef.from_dict(data["global"]),
            model=ModelSpec.from_dict(data["model"]),
            protocol=dict(protocol),
            clients=tuple(ClientEntry.from_dict(c) for c in data["clients"]),
            sums=_index(data),
            data_version=str(data["data_version"]),
            created_at=str(data["created_at"]),
            extra=dict(data.get("extra", {})),
            residual=_ref(data.get("residual")),
            server_state=_ref(data.get("server_state")),
            objects=_refs(data.get("objects") or {}),
            personal=_refs(data.get("personal") or {}),
        )


@dataclass(frozen=True)
class UnlearningManifest:
    """A deletion: which client was removed from which version, how, and what resulted."""

    request_id: str
    forgotten_client: str
    variant: str
    parent: ObjectRef
    source_version: str
    server_round: int
    base: ObjectRef
    removed: ObjectRef
    forgotten_state: ObjectRef
    global_state: ObjectRef
    model: ModelSpec
    sums: Mapping[str, ObjectRef]
    round_scales: Mapping[str, float]
    recovery: Mapping[str, Any]
    data_version: str
    created_at: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    protocol: Mapping[str, Any] = field(default_factory=lambda: dict(V1_PROTOCOL))  # the source's
    server_state: ObjectRef | None = None  # the source's, carried on unchanged
    personal: Mapping[str, ObjectRef] = field(default_factory=dict)  # the source's, minus the client
    objects: Mapping[str, ObjectRef] = field(default_factory=dict)  # the forget step's own records
    registered_model: str | None = None  # the model whose client this is (None: written before scoping)
    guarantee: str | None = None  # replay | contributions | approximate (None: written before levels)

    client_ids: tuple[str, ...] = ()  # nobody trains in a deletion

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": UNLEARNING_MANIFEST_SCHEMA,
            "kind": "unlearning",
            "request_id": self.request_id,
            "forgotten_client": self.forgotten_client,
            "variant": self.variant,
            "parent": self.parent.to_dict(),
            "source_version": self.source_version,
            "server_round": self.server_round,
            "base": self.base.to_dict(),
            "removed": self.removed.to_dict(),
            "forgotten_state": self.forgotten_state.to_dict(),
            "global": self.global_state.to_dict(),
            "model": self.model.to_dict(),
            "protocol": dict(self.protocol),
            "index": {"kind": RUNNING_SUMS, "entries": {cid: ref.to_dict() for cid, ref in sorted(self.sums.items())}},
            "server_state": self.server_state.to_dict() if self.server_state else None,
            "personal": {cid: ref.to_dict() for cid, ref in sorted(self.personal.items())},
            "objects": {name: ref.to_dict() for name, ref in sorted(self.objects.items())},
            "round_scales": dict(sorted(self.round_scales.items())),
            "recovery": dict(self.recovery),
            "data_version": self.data_version,
            "created_at": self.created_at,
            "metrics": dict(self.metrics),
            "registered_model": self.registered_model,
            "guarantee": self.guarantee,
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnlearningManifest:
        schema = data.get("schema")
        if schema not in (UNLEARNING_MANIFEST_SCHEMA, UNLEARNING_MANIFEST_SCHEMA_V1):
            raise ValueError(f"not an unlearning manifest (schema {schema!r})")
        return cls(
            request_id=str(data["request_id"]),
            forgotten_client=str(data["forgotten_client"]),
            variant=str(data["variant"]),
            parent=ObjectRef.from_dict(data["parent"]),
            source_version=str(data["source_version"]),
            server_round=int(data["server_round"]),
            base=ObjectRef.from_dict(data["base"]),
            removed=ObjectRef.from_dict(data["removed"]),
            forgotten_state=ObjectRef.from_dict(data["forgotten_state"]),
            global_state=ObjectRef.from_dict(data["global"]),
            model=ModelSpec.from_dict(data["model"]),
            sums=_index(data),
            round_scales={k: float(v) for k, v in data.get("round_scales", {}).items()},
            recovery=dict(data.get("recovery", {})),
            data_version=str(data["data_version"]),
            created_at=str(data["created_at"]),
            metrics=dict(data.get("metrics", {})),
            protocol=dict(data.get("protocol") or V1_PROTOCOL),
            server_state=_ref(data.get("server_state")),
            personal=_refs(data.get("personal") or {}),
            objects=_refs(data.get("objects") or {}),
            registered_model=data.get("registered_model"),
            guarantee=data.get("guarantee"),
        )


Manifest = RoundManifest | UnlearningManifest


def manifest_from_bytes(data: bytes) -> Manifest:
    """Decode either kind of manifest, of either schema version."""
    payload = json.loads(data)
    schema = payload.get("schema") if isinstance(payload, dict) else None
    if schema in (ROUND_MANIFEST_SCHEMA, ROUND_MANIFEST_SCHEMA_V1):
        return RoundManifest.from_dict(payload)
    if schema in (UNLEARNING_MANIFEST_SCHEMA, UNLEARNING_MANIFEST_SCHEMA_V1):
        return UnlearningManifest.from_dict(payload)
    raise ValueError(f"unknown manifest schema {schema!r}")


@dataclass(frozen=True)
class LineageHead:
    """Where a federation continues from: a state, the running sums and the carried server state."""

    state: ObjectRef
    manifest: ObjectRef | None  # None for a fresh initial state
    server_round: int
    sums: Mapping[str, ObjectRef]
    server_state: ObjectRef | None = None
    personal: Mapping[str, ObjectRef] = field(default_factory=dict)

    @classmethod
    def of(cls, ref: ObjectRef, manifest: Manifest) -> LineageHead:
        """The head a committed manifest leaves (to resume or continue from)."""
        return cls(
            manifest.global_state, ref, manifest.server_round, dict(manifest.sums), manifest.server_state,
            dict(manifest.personal),
        )  # fmt: skip
