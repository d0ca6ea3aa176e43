"""The update history: every applied client update, archived and checksummed.

Per round the server commits, in this order: each client's delta, each
participant's new running sum of applied contributions, the new global state,
and last the round manifest (the commit point). A manifest names the previous
manifest of its lineage by key and sha256, so a model version's whole history
is a hash chain that can be verified object by object.

Running sums make forgetting cheap: ``sums[c]`` in a round's manifest is
``sum_t weight_c^t * delta_c^t`` over every round of that lineage up to and
including this one, so removing ``c`` needs one object read, however many
rounds there were. Sums are written as new objects each time they change
(never overwritten), so every version's sums stay available.

Key layout (relative to the store)::

    federations/<federation_id>/initial.safetensors
    federations/<federation_id>/rounds/<round:05d>/updates/<client_id>.safetensors
    federations/<federation_id>/rounds/<round:05d>/sums/<client_id>.safetensors
    federations/<federation_id>/rounds/<round:05d>/global.safetensors
    federations/<federation_id>/rounds/<round:05d>/manifest.json
    unlearning/<request_id>/forgotten.safetensors      (after subtraction)
    unlearning/<request_id>/global.safetensors         (after recovery)
    unlearning/<request_id>/sums/<client_id>.safetensors  (renormalised variant only)
    unlearning/<request_id>/manifest.json

A deletion is a node of the lineage too: its manifest names the source
version's manifest as parent, the running sum it subtracted, and the running
sums of the remaining clients, so later rounds and later deletions continue
from it like from any round.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from components.aggregation import ClientUpdate
from components.models import ModelSpec
from components.state import StateDict, add, clone_state
from components.store import ObjectRef, ObjectStore, sha256_bytes

ROUND_MANIFEST_SCHEMA = "fedforget/round-manifest@1"
UNLEARNING_MANIFEST_SCHEMA = "fedforget/unlearning-manifest@1"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_id(value: str, what: str = "identifier") -> str:
    """Accept ids safe to embed in object keys and tags (no '/', no '..')."""
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return value


# --------------------------------------------------------------------------- serialisation


_META_KEY = "fedforget"


def state_to_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """Serialise a state dict as safetensors, byte-for-byte reproducibly.

    safetensors writes its metadata map in hash order, so several metadata keys
    would give different bytes for the same content; all metadata therefore
    travels as one sorted JSON document under a single key.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return st_save(tensors, metadata={_META_KEY: json.dumps(dict(metadata), sort_keys=True)})


def state_from_bytes(data: bytes) -> tuple[StateDict, dict[str, Any]]:
    """Inverse of :func:`state_to_bytes`: the tensors and the decoded metadata."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    raw_meta = (header.get("__metadata__") or {}).get(_META_KEY, "{}")
    return dict(st_load(data)), json.loads(raw_meta)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class ClientEntry:
    """One participant of a round as recorded in its manifest."""

    client_id: str
    num_examples: int
    weight: float
    update: ObjectRef
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "num_examples": self.num_examples,
            "weight": self.weight,
            "update": self.update.to_dict(),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientEntry:
        return cls(
            client_id=str(data["client_id"]),
            num_examples=int(data["num_examples"]),
            weight=float(data["weight"]),
            update=ObjectRef.from_dict(data["update"]),
            metrics=dict(data.get("metrics", {})),
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
    strategy: Mapping[str, Any]
    clients: tuple[ClientEntry, ...]
    sums: Mapping[str, ObjectRef]
    data_version: str
    created_at: str
    extra: Mapping[str, Any] = field(default_factory=dict)

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
            "strategy": dict(self.strategy),
            "clients": [c.to_dict() for c in self.clients],
            "sums": {cid: ref.to_dict() for cid, ref in sorted(self.sums.items())},
            "data_version": self.data_version,
            "created_at": self.created_at,
            "extra": dict(self.extra),
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundManifest:
        if data.get("schema") != ROUND_MANIFEST_SCHEMA:
            raise ValueError(f"not a round manifest (schema {data.get('schema')!r})")
        return cls(
            federation_id=str(data["federation_id"]),
            server_round=int(data["server_round"]),
            parent=ObjectRef.from_dict(data["parent"]) if data.get("parent") else None,
            base=ObjectRef.from_dict(data["base"]),
            global_state=ObjectRef.from_dict(data["global"]),
            model=ModelSpec.from_dict(data["model"]),
            strategy=dict(data["strategy"]),
            clients=tuple(ClientEntry.from_dict(c) for c in data["clients"]),
            sums={cid: ObjectRef.from_dict(ref) for cid, ref in data["sums"].items()},
            data_version=str(data["data_version"]),
            created_at=str(data["created_at"]),
            extra=dict(data.get("extra", {})),
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
            "sums": {cid: ref.to_dict() for cid, ref in sorted(self.sums.items())},
            "round_scales": dict(sorted(self.round_scales.items())),
            "recovery": dict(self.recovery),
            "data_version": self.data_version,
            "created_at": self.created_at,
            "metrics": dict(self.metrics),
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnlearningManifest:
        if data.get("schema") != UNLEARNING_MANIFEST_SCHEMA:
            raise ValueError(f"not an unlearning manifest (schema {data.get('schema')!r})")
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
            sums={cid: ObjectRef.from_dict(ref) for cid, ref in data["sums"].items()},
            round_scales={k: float(v) for k, v in data.get("round_scales", {}).items()},
            recovery=dict(data.get("recovery", {})),
            data_version=str(data["data_version"]),
            created_at=str(data["created_at"]),
            metrics=dict(data.get("metrics", {})),
        )


Manifest = RoundManifest | UnlearningManifest


def manifest_from_bytes(data: bytes) -> Manifest:
    """Decode either kind of manifest."""
    payload = json.loads(data)
    schema = payload.get("schema") if isinstance(payload, dict) else None
    if schema == ROUND_MANIFEST_SCHEMA:
        return RoundManifest.from_dict(payload)
    if schema == UNLEARNING_MANIFEST_SCHEMA:
        return UnlearningManifest.from_dict(payload)
    raise ValueError(f"unknown manifest schema {schema!r}")


@dataclass(frozen=True)
class LineageHead:
    """Where a federation continues from: a state and the running sums of its lineage."""

    state: ObjectRef
    manifest: ObjectRef | None  # None for a fresh initial state
    server_round: int
    sums: Mapping[str, ObjectRef]

    @classmethod
    def of(cls, ref: ObjectRef, manifest: Manifest) -> LineageHead:
        """The head a committed manifest leaves (to resume or continue from)."""
        return cls(manifest.global_state, ref, manifest.server_round, dict(manifest.sums))


class UpdateHistory:
    """Reads and writes the archived history in an :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore, io_workers: int = 4) -> None:
        self.store = store
        self.io_workers = io_workers

    # ---- keys
    @staticmethod
    def federation_prefix(federation_id: str) -> str:
        return f"federations/{validate_id(federation_id, 'federation id')}/"

    def round_prefix(self, federation_id: str, server_round: int) -> str:
        return f"{self.federation_prefix(federation_id)}rounds/{server_round:05d}/"

    # ---- states
    def write_state(
        self, key: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> ObjectRef:
        return self.store.put(key, state_to_bytes(state, metadata), overwrite=False)

    def read_state(self, ref: ObjectRef) -> StateDict:
        """Read a state after checking its sha256."""
        return state_from_bytes(self.store.get_verified(ref))[0]

    def write_initial(
        self, federation_id: str, state: Mapping[str, torch.Tensor], model: ModelSpec, seed: int
    ) -> LineageHead:
        key = f"{self.federation_prefix(federation_id)}initial.safetensors"
        ref = self.write_state(key, state, {"kind": "initial", "model": model.to_dict(), "seed": seed})
        return LineageHead(state=ref, manifest=None, server_round=0, sums={})

    # ---- manifests
    def read_manifest(self, ref: ObjectRef) -> Manifest:
        """Read a manifest of either kind after checking its sha256."""
        return manifest_from_bytes(self.store.get_verified(ref))

    def head_of(self, manifest_ref: ObjectRef) -> LineageHead:
        """The lineage head a registered version points at, for resuming from it."""
        return LineageHead.of(manifest_ref, self.read_manifest(manifest_ref))

    def iter_lineage(self, manifest_ref: ObjectRef) -> Iterator[tuple[ObjectRef, Manifest]]:
        """Manifests from ``manifest_ref`` back to the first round, each verified."""
        ref: ObjectRef | None = manifest_ref
        while ref is not None:
            manifest = self.read_manifest(ref)
            yield ref, manifest
            ref = manifest.parent

    def client_sum(self, manifest: Manifest, client_id: str) -> StateDict:
        """The running sum of ``client_id``'s applied contributions at ``manifest``."""
        try:
            ref = manifest.sums[client_id]
        except KeyError:
            raise KeyError(
                f"client {client_id} has no contribution in the lineage of "
                f"{manifest.federation_id} round {manifest.server_round}"
            ) from None
        return self.read_state(ref)

    def commit_round(
        self,
        federation_id: str,
        server_round: int,
        head: LineageHead,
        updates: Sequence[ClientUpdate],
        new_state: Mapping[str, torch.Tensor],
        model: ModelSpec,
        strategy: Mapping[str, Any],
        data_version: str,
        metrics: Mapping[str, Mapping[str, float]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[ObjectRef, RoundManifest]:
        """Archive one aggregated round; the manifest is written last.

        Every object is write-once and content-checked, so re-running a commit
        that failed half-way (e.g. the store went down) finishes it without
        duplicating or altering what was already written.
        """
        if server_round != head.server_round + 1:
            raise ValueError(f"round {server_round} does not follow round {head.server_round}")
        prefix = self.round_prefix(federation_id, server_round)
        metrics = metrics or {}
        for update in updates:
            validate_id(update.client_id, "client id")
            if update.server_round != server_round:
                raise ValueError(f"update of {update.client_id} is for round {update.server_round}")

        def archive_client(update: ClientUpdate) -> tuple[ClientEntry, ObjectRef]:
            cid = update.client_id
            meta = {
                "kind": "update",
                "client_id": cid,
                "server_round": server_round,
                "num_examples": update.num_examples,
                "weight": update.weight,
            }
            ref = self.write_state(f"{prefix}updates/{cid}.safetensors", update.delta, meta)
            entry = ClientEntry(cid, update.num_examples, update.weight, ref, dict(metrics.get(cid, {})))
            contribution = update.contribution()
            previous = head.sums.get(cid)
            running = add(self.read_state(previous), contribution) if previous else contribution
            sum_ref = self.write_state(
                f"{prefix}sums/{cid}.safetensors",
                running,
                {"kind": "running_sum", "client_id": cid, "server_round": server_round},
            )
            return entry, sum_ref

        def archive_global() -> ObjectRef:
            return self.write_state(
                f"{prefix}global.safetensors",
                clone_state(new_state),
                {"kind": "global", "server_round": server_round, "model": model.to_dict()},
            )

        # Object writes are I/O-bound (S3 requests, fsync): overlap them. The
        # manifest, the commit point, is written only after all of them succeeded.
        ordered = sorted(updates, key=lambda u: u.client_id)
        with ThreadPoolExecutor(max_workers=self.io_workers) as pool:
            global_future = pool.submit(archive_global)
            archived = list(pool.map(archive_client, ordered))
            global_ref = global_future.result()
        entries = [entry for entry, _ in archived]
        sums = dict(head.sums) | {entry.client_id: sum_ref for entry, sum_ref in archived}
        manifest = RoundManifest(
            federation_id=federation_id,
            server_round=server_round,
            parent=head.manifest,
            base=head.state,
            global_state=global_ref,
            model=model,
            strategy=dict(strategy),
            clients=tuple(entries),
            sums=sums,
            data_version=data_version,
            created_at=_now(),
            extra=dict(extra or {}),
        )
        return self._commit_manifest(f"{prefix}manifest.json", manifest)

    def _commit_manifest(self, key: str, manifest: Manifest) -> tuple[ObjectRef, Manifest]:
        if self.store.exists(key):
            # A previous attempt committed it: keep the record that exists.
            existing = self.store.get(key)
            ref = ObjectRef(key, sha256_bytes(existing), len(existing))
            return ref, self.read_manifest(ref)
        return self.store.put(key, manifest.to_bytes(), overwrite=False), manifest

    @staticmethod
    def unlearning_prefix(request_id: str) -> str:
        return f"unlearning/{validate_id(request_id, 'request id')}/"

    def commit_unlearning(
        self,
        *,
        request_id: str,
        client_id: str,
        variant: str,
        source: ObjectRef,
        source_version: str,
        source_manifest: Manifest,
        removed: ObjectRef,
        forgotten_state: Mapping[str, torch.Tensor],
        final_state: Mapping[str, torch.Tensor],
        new_sums: Mapping[str, Mapping[str, torch.Tensor]],
        round_scales: Mapping[str, float],
        recovery: Mapping[str, Any],
        data_version: str,
        metrics: Mapping[str, float],
    ) -> tuple[ObjectRef, UnlearningManifest]:
        """Archive a deletion: the forgotten and final states, changed sums, the manifest last."""
        prefix = self.unlearning_prefix(request_id)
        model = source_manifest.model
        forgotten_ref = self.write_state(
            f"{prefix}forgotten.safetensors", clone_state(forgotten_state),
            {"kind": "forgotten", "request_id": request_id, "client_id": client_id, "model": model.to_dict()},
        )  # fmt: skip
        global_ref = self.write_state(
            f"{prefix}global.safetensors", clone_state(final_state),
            {"kind": "unlearned", "request_id": request_id, "client_id": client_id, "model": model.to_dict()},
        )  # fmt: skip
        sums = {cid: ref for cid, ref in source_manifest.sums.items() if cid != client_id}
        for cid, running in sorted(new_sums.items()):
            sums[cid] = self.write_state(
                f"{prefix}sums/{validate_id(cid, 'client id')}.safetensors",
                running,
                {"kind": "running_sum", "client_id": cid, "request_id": request_id},
            )
        manifest = UnlearningManifest(
            request_id=request_id,
            forgotten_client=client_id,
            variant=variant,
            parent=source,
            source_version=source_version,
            server_round=source_manifest.server_round,
            base=source_manifest.global_state,
            removed=removed,
            forgotten_state=forgotten_ref,
            global_state=global_ref,
            model=model,
            sums=sums,
            round_scales=dict(round_scales),
            recovery=dict(recovery),
            data_version=data_version,
            created_at=_now(),
            metrics=dict(metrics),
        )
        ref, committed = self._commit_manifest(f"{prefix}manifest.json", manifest)
        if not isinstance(committed, UnlearningManifest):
            raise ValueError(f"{ref.key} holds a manifest of another kind")
        return ref, committed


def uncommitted_round_objects(store: ObjectStore, federation_id: str) -> list[str]:
    """Objects of a federation's rounds that never got their manifest (never committed).

    When no round of the federation was committed, its initial state is
    included too. Only call this for a federation known to have stopped.
    """
    prefix = UpdateHistory.federation_prefix(federation_id)
    keys = store.list(prefix)

    def round_of(key: str) -> str | None:
        parts = key[len(prefix) :].split("/")
        return parts[1] if len(parts) > 2 and parts[0] == "rounds" else None

    committed = {round_of(k) for k in keys if k.endswith("/manifest.json")}
    garbage = [k for k in keys if round_of(k) is not None and round_of(k) not in committed]
    if not committed:
        garbage += [k for k in keys if k == f"{prefix}initial.safetensors"]
    return garbage


def verify_manifest(store: ObjectStore, manifest: Manifest) -> list[str]:
    """Check every object a manifest references; return the problems found."""
    problems = []
    refs = [("base", manifest.base), ("global", manifest.global_state)]
    if isinstance(manifest, RoundManifest):
        refs += [(f"update of {c.client_id}", c.update) for c in manifest.clients]
    else:
        refs += [("forgotten state", manifest.forgotten_state)]
    refs += [(f"running sum of {cid}", ref) for cid, ref in manifest.sums.items()]
    for what, ref in refs:
        if not store.exists(ref.key):
            problems.append(f"{what}: {ref.key} is missing")
            continue
        actual = sha256_bytes(store.get(ref.key))
        if actual != ref.sha256:
            problems.append(f"{what}: {ref.key} sha256 {actual} != recorded {ref.sha256}")
    return problems
