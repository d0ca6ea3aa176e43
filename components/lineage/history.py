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

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from components.core.ids import validate_id
from components.core.records import ClientUpdate
from components.core.refs import ObjectRef, sha256_bytes
from components.core.serialize import state_from_bytes, state_to_bytes
from components.core.state import StateDict, add, clone_state, widen
from components.lineage.manifests import (
    ClientEntry,
    LineageHead,
    Manifest,
    RoundManifest,
    UnlearningManifest,
    manifest_from_bytes,
    utc_now,
)
from components.lineage.store import ObjectStore
from components.models.students import ModelSpec

IO_WORKERS = 4  # object writes of one commit overlap (S3 requests and fsyncs are I/O-bound)


class UpdateHistory:
    """Reads and writes the archived history in an :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # ---- keys
    @staticmethod
    def federation_prefix(federation_id: str) -> str:
        return f"federations/{validate_id(federation_id, 'federation id')}/"

    def round_prefix(self, federation_id: str, server_round: int) -> str:
        return f"{self.federation_prefix(federation_id)}rounds/{server_round:05d}/"

    # ---- states
    def write_state(self, key: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> ObjectRef:
        return self.store.put(key, state_to_bytes(state, metadata), overwrite=False)

    def read_state(self, ref: ObjectRef) -> StateDict:
        """Read a state after checking its sha256."""
        return state_from_bytes(self.store.get_verified(ref))[0]

    def read_update(self, ref: ObjectRef) -> StateDict:
        """An archived update as the server applied it (a half-precision upload widened, exactly)."""
        return widen(self.read_state(ref))

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

    def iter_lineages(self, heads: Iterable[ObjectRef]) -> Iterator[tuple[ObjectRef, Manifest]]:
        """Every manifest of the lineages at ``heads``, each once (a lineage shared with an earlier head is
        left as soon as the walk reaches it), each verified."""
        seen: set[str] = set()
        for head in heads:
            for ref, manifest in self.iter_lineage(head):
                if ref.key in seen:
                    break  # the rest of this lineage was walked from another head
                seen.add(ref.key)
                yield ref, manifest

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
        protocol: Mapping[str, Any],
        data_version: str,
        metrics: Mapping[str, Mapping[str, float]] | None = None,
        extra: Mapping[str, Any] | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
        server_state: Mapping[str, torch.Tensor] | None = None,
        participants: Mapping[str, int] | None = None,
        client_objects: Mapping[str, Mapping[str, ObjectRef]] | None = None,
        server_objects: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        personal: Mapping[str, ObjectRef] | None = None,
        specs: Mapping[str, ModelSpec] | None = None,
    ) -> tuple[ObjectRef, RoundManifest]:
        """Archive one aggregated round; the manifest is written last.

        A client's upload, already in the store, is its archived update unless
        the strategy modified it (then the applied delta is written beside it,
        under ``applied/``). Running sums grow by ``weight * delta``; the
        residual and the carried server state are written as objects of their
        own. Methods that exchange something other than weight deltas record
        their clients' archived objects (``client_objects``, already in the
        store), their own (``server_objects``, written here) and each client's
        latest personal state (``personal``, carried along the lineage);
        ``participants`` (client id -> examples) names clients that trained
        without a weight update. Every object is write-once and content-checked,
        so re-running a commit that failed half-way (e.g. the store went down)
        finishes it without duplicating or altering what was already written.
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
            meta = {"kind": "update", "client_id": cid, "server_round": server_round,
                    "num_examples": update.num_examples, "weight": update.weight}  # fmt: skip
            if update.upload is not None and not update.modified:
                ref, upload = update.upload, None
            elif update.upload is not None and update.delta is not None:
                ref, upload = self.write_state(f"{prefix}applied/{cid}.safetensors", update.delta, meta), update.upload
            elif update.delta is not None:
                ref, upload = self.write_state(f"{prefix}updates/{cid}.safetensors", update.delta, meta), None
            else:
                raise ValueError(f"update of {cid}: no delta to archive")
            entry = ClientEntry(cid, update.num_examples, update.weight, ref, dict(metrics.get(cid, {})), upload)
            # A streamed update kept only its reference: read the delta back, one at a time per I/O worker.
            delta = update.delta if update.delta is not None else self.read_update(ref)
            contribution = update.contribution(delta)
            previous = head.sums.get(cid)
            running = add(self.read_state(previous), contribution) if previous else contribution
            sum_ref = self.write_state(
                f"{prefix}sums/{cid}.safetensors",
                running,
                {"kind": "running_sum", "client_id": cid, "server_round": server_round},
            )
            return entry, sum_ref

        def archive(name: str, state: Mapping[str, torch.Tensor] | None) -> ObjectRef | None:
            if state is None:
                return None
            meta = {"kind": name, "server_round": server_round, "model": model.to_dict()}
            return self.write_state(f"{prefix}{name}.safetensors", clone_state(state), meta)

        # Object writes are I/O-bound (S3 requests, fsync): overlap them. The
        # manifest, the commit point, is written only after all of them succeeded.
        ordered = sorted(updates, key=lambda u: u.client_id)
        with ThreadPoolExecutor(max_workers=IO_WORKERS) as pool:
            states = {name: pool.submit(archive, name, state) for name, state in
                      (("global", new_state), ("residual", residual), ("server_state", server_state))}  # fmt: skip
            archived = list(pool.map(archive_client, ordered))
            refs = {name: future.result() for name, future in states.items()}
        client_objects, specs = client_objects or {}, specs or {}
        by_id = {entry.client_id: entry for entry, _ in archived}
        for cid, n in (participants or {}).items():
            by_id.setdefault(cid, ClientEntry(validate_id(cid, "client id"), n, 0.0, None, dict(metrics.get(cid, {}))))
        entries = [
            replace(entry, objects=dict(client_objects.get(cid, {})), spec=specs.get(cid))
            for cid, entry in sorted(by_id.items())
        ]
        sums = dict(head.sums) | {entry.client_id: sum_ref for entry, sum_ref in archived}
        objects = {
            name: self.write_state(f"{prefix}{validate_id(name, 'object name')}.safetensors", clone_state(state),
                                   {"kind": name, "server_round": server_round})
            for name, state in sorted((server_objects or {}).items())
        }  # fmt: skip
        manifest = RoundManifest(
            federation_id=federation_id,
            server_round=server_round,
            parent=head.manifest,
            base=head.state,
            global_state=refs["global"],
            model=model,
            protocol=dict(protocol),
            clients=tuple(entries),
            sums=sums,
            data_version=data_version,
            created_at=utc_now(),
            extra=dict(extra or {}),
            residual=refs["residual"],
            server_state=refs["server_state"],
            objects=objects,
            personal=dict(head.personal) | dict(personal or {}),
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
        server_state: Mapping[str, torch.Tensor] | None = None,
        objects: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        registered_model: str | None = None,
        guarantee: str | None = None,
        drop_personal: Collection[str] = (),
    ) -> tuple[ObjectRef, UnlearningManifest]:
        """Archive a deletion: the forgotten and final states, changed sums, the manifest last.

        ``server_state`` replaces the source's carried server state when the
        protocol's forget rebuilt it (ensemble distillation: the architectures'
        models without the client), so a federation resumed from this deletion
        starts without the client; ``objects`` are the forget step's own records;
        ``registered_model`` scopes the client id, ``guarantee`` is the level given;
        ``drop_personal`` names other clients whose personal states were built
        from a model holding the client (they start again from the clean one).
        """
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
        carried = source_manifest.server_state
        if server_state is not None:
            meta = {"kind": "server_state", "request_id": request_id, "client_id": client_id}
            carried = self.write_state(f"{prefix}server_state.safetensors", clone_state(server_state), meta)
        own = {
            name: self.write_state(f"{prefix}{validate_id(name, 'object name')}.safetensors", clone_state(state),
                                   {"kind": name, "request_id": request_id})
            for name, state in sorted((objects or {}).items())
        }  # fmt: skip
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
            created_at=utc_now(),
            metrics=dict(metrics),
            protocol=dict(source_manifest.protocol),
            server_state=carried,
            objects=own,
            personal={
                cid: ref
                for cid, ref in source_manifest.personal.items()
                if cid != client_id and cid not in drop_personal
            },
            registered_model=registered_model,
            guarantee=guarantee,
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


def manifest_objects(manifest: Manifest) -> list[tuple[str, ObjectRef]]:
    """Every object a manifest references (besides its parent manifest), with what it is."""
    refs = [("base state", manifest.base), ("global state", manifest.global_state)]
    if isinstance(manifest, RoundManifest):
        r = manifest.server_round
        for c in manifest.clients:
            if c.update is not None:
                refs.append((f"update of {c.client_id} (round {r})", c.update))
            if c.upload is not None:
                refs.append((f"upload of {c.client_id} (round {r})", c.upload))
            refs += [(f"{name} of {c.client_id} (round {r})", ref) for name, ref in sorted(c.objects.items())]
        extra = (("residual", manifest.residual), ("server state", manifest.server_state))
        refs += [(f"{name} (round {r})", ref) for name, ref in extra if ref]
        refs += [(f"{name} (round {r})", ref) for name, ref in sorted(manifest.objects.items())]
    else:
        refs.append((f"running sum of {manifest.forgotten_client} (subtracted)", manifest.removed))
        refs.append(("state after subtraction", manifest.forgotten_state))
        if manifest.server_state is not None:
            refs.append(("server state after the deletion", manifest.server_state))
        refs += [(f"{name} (deletion)", ref) for name, ref in sorted(manifest.objects.items())]
    refs += [(f"running sum of {cid}", ref) for cid, ref in sorted(manifest.sums.items())]
    refs += [(f"personal state of {cid}", ref) for cid, ref in sorted(manifest.personal.items())]
    return refs


def object_owners(manifest: Manifest) -> dict[str, str]:
    """key -> the client whose data or contribution the object holds, for a manifest's per-client objects
    (uploads, applied updates, per-client records, running sums, personal states, a deletion's removed sum)."""
    owners: dict[str, str] = {}
    if isinstance(manifest, RoundManifest):
        for c in manifest.clients:
            for ref in (c.update, c.upload, *c.objects.values()):
                if ref is not None:
                    owners[ref.key] = c.client_id
    else:
        owners[manifest.removed.key] = manifest.forgotten_client
    owners |= {ref.key: cid for cid, ref in manifest.sums.items()}
    owners |= {ref.key: cid for cid, ref in manifest.personal.items()}
    return owners


def verify_manifest(store: ObjectStore, manifest: Manifest) -> list[str]:
    """Check every object a manifest references; return the problems found."""
    problems = []
    for what, ref in manifest_objects(manifest):
        if not store.exists(ref.key):
            problems.append(f"{what}: {ref.key} is missing")
            continue
        actual = sha256_bytes(store.get(ref.key))
        if actual != ref.sha256:
            problems.append(f"{what}: {ref.key} sha256 {actual} != recorded {ref.sha256}")
    return problems
