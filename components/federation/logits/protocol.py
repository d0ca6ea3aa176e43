"""The soft-label protocol: clients exchange soft labels on a public set D, grouped by similarity.

Every round has the method's five stages: local **training**, soft-label
**prediction** on D (both in :func:`~components.federation.logits.client.train_soft_label_client`),
**grouping** of the clients and **aggregation** of one reliable label per group
(:func:`~components.federation.logits.grouping.soft_label_consensus`), and
**fitting** of the consensus, by every client at the start of its next round
and by the server, which distils it into a global student (FedDF-style, Lin et
al., 2020): that student is the round's servable ``state``.

What a round archives: each client's soft labels and personal state
(``client_objects``, ``personal``), the consensus and the grouping as tensors
(``server_objects``: ``consensus.probs``; ``grouping.groups``, ``.picks``,
``.group_weights``, ``.distances``) and in the record the groups by client id,
how many examples each client's label was picked for, and the bytes moved
against what FedAvg would move with the global model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from components.core.refs import ObjectRef
from components.core.serialize import state_from_bytes, state_to_bytes
from components.core.state import StateDict, non_finite_keys
from components.federation.logits.client import labels_from_bytes, load_public, train_soft_label_client
from components.federation.logits.forget import forget_soft_labels
from components.federation.logits.server import (
    SoftLabelSettings,
    distil_student,
    grouping_objects,
    grouping_record,
    round_consensus,
    server_seed,
)
from components.federation.protocol import (
    ClientReply,
    ClientTask,
    ForgetResult,
    Protocol,
    RoundOutcome,
    UnlearningError,
    register_protocol,
)
from components.lineage.history import UpdateHistory
from components.lineage.manifests import LineageHead, Manifest
from components.lineage.store import ObjectStore
from components.models.students import ModelSpec


class SoftLabels(Protocol):
    """Soft-label federated distillation with optional client grouping (``federate.protocol=soft-labels``).

    Parameters
    ----------
    public
        The public set D staged in the store
        (:func:`~components.federation.logits.client.stage_public`).
    model
        The global student the server distils (the federation's model).
    settings
        The method's knobs.
    architectures
        Client id -> its own model when it is not the global one (a client
        with its own architecture starts from its own initialisation).
    """

    name = "soft-labels"

    def __init__(
        self,
        public: ObjectRef,
        model: ModelSpec,
        settings: SoftLabelSettings | None = None,
        architectures: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        self.public = public
        self.model = model
        self.settings = settings or SoftLabelSettings()
        self.architectures = dict(architectures or {})

    # ---- client side
    def own_architecture(self, client_id: str) -> bool:
        """Whether the client's model differs from the global student (compared as recorded)."""
        spec = self.architectures.get(client_id)
        return spec is not None and json.dumps(spec.to_dict(), sort_keys=True) != json.dumps(
            self.model.to_dict(), sort_keys=True
        )

    def client_model(self, client_id: str, global_model: ModelSpec) -> ModelSpec:
        return self.architectures[client_id] if self.own_architecture(client_id) else global_model

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        own = self.own_architecture(client_id)
        return {**asdict(self.settings.fit(self.settings.client_epochs)), "precision": self.settings.precision,
                "init": "own" if own else "global", "init_seed": self.settings.seed}  # fmt: skip

    def round_inputs(self, server_round: int, head: LineageHead, store: ObjectStore) -> Mapping[str, ObjectRef]:
        inputs = {"public": self.public}
        if head.manifest is not None:
            # A deletion's manifest names no consensus: that round's clients fit none.
            consensus = UpdateHistory(store).read_manifest(head.manifest).objects.get("consensus")
            if consensus is not None:
                inputs["consensus"] = consensus
        return inputs

    def client_step(self, task: ClientTask) -> ClientReply:
        return train_soft_label_client(task)

    # ---- server side
    def read_labels(self, replies: Sequence[ClientReply], store: ObjectStore, server_round: int) -> list[torch.Tensor]:
        """Each reply's soft labels, hash-checked and validated (never trust a client)."""
        size = len(load_public(store.url, self.public))
        labels = []
        for reply in replies:
            if reply.server_round != server_round or reply.num_examples <= 0 or "soft_labels" not in reply.objects:
                raise ValueError(
                    f"client {reply.client_id} answered for round {reply.server_round} with {reply.num_examples} "
                    f"examples and objects {sorted(reply.objects)}; round {server_round} needs its soft labels"
                )
            probs = labels_from_bytes(store.get_verified(reply.objects["soft_labels"]))
            ok = probs.dim() == 2 and probs.shape[0] == size and not non_finite_keys({"p": probs})
            if not ok or bool((probs < 0).any()) or not torch.allclose(probs.sum(1), torch.ones(size), atol=1e-2):
                raise ValueError(
                    f"round {server_round}: the soft labels of {reply.client_id} are not {size} distributions"
                )
            labels.append(probs)
        if len({tuple(p.shape) for p in labels}) > 1:
            raise ValueError(f"round {server_round}: clients sent soft labels of different shapes")
        return labels

    def server_step(
        self,
        server_round: int,
        base: Mapping[str, Any],
        server_state: StateDict | None,
        replies: Sequence[ClientReply],
        store: ObjectStore,
    ) -> RoundOutcome:
        if not replies:
            raise ValueError(f"round {server_round}: no client replied")
        labels = self.read_labels(replies, store, server_round)
        clients = [r.client_id for r in replies]
        consensus = round_consensus(self.settings, labels, [r.num_examples for r in replies])
        public = load_public(store.url, self.public)
        fit = self.settings.fit(self.settings.server_epochs)
        state = distil_student(
            self.model, base, public, consensus.probs, fit, server_seed(self.settings.seed, server_round)
        )
        objects = grouping_objects(consensus, self.settings.precision)
        record = {
            "grouping": self.settings.grouping,
            **grouping_record(consensus, clients),
            "communication": self.communication(server_round, replies, objects["consensus"], base),
        }
        return RoundOutcome(
            state=state,
            updates=[],
            record=record,
            participants={r.client_id: r.num_examples for r in replies},
            client_objects={r.client_id: dict(r.objects) for r in replies},
            server_objects=objects,
            personal={r.client_id: r.objects["personal"] for r in replies},
            specs={c: self.architectures[c] for c in clients if self.own_architecture(c)},
        )

    def communication(
        self, server_round: int, replies: Sequence[ClientReply], consensus: StateDict, base: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Bytes per client this round, against FedAvg's model upload and download on the global model.

        Upload: the soft labels. Download: the consensus written now (fitted
        next round). The personal state is archived for serving, not sent to
        other parties; D is read once per client (``public_bytes``).
        """
        down = len(state_to_bytes(consensus, {"kind": "consensus", "server_round": server_round}))
        model = len(state_to_bytes(dict(base), {}))
        upload = {r.client_id: int(r.objects["soft_labels"].size or 0) for r in replies}
        return {
            "upload_bytes": upload,
            "download_bytes": {c: down for c in upload},
            "personal_archive_bytes": {r.client_id: int(r.objects["personal"].size or 0) for r in replies},
            "public_bytes": int(self.public.size or 0),
            "fedavg_upload_bytes_per_client": model,
            "fedavg_download_bytes_per_client": model,
            "upload_bytes_total": sum(upload.values()),
            "fedavg_upload_bytes_total": model * len(upload),
        }

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        return forget_soft_labels(self, history, source, client_id, variant)

    def served_model(self, history: UpdateHistory, manifest: Manifest, client_id: str) -> tuple[ModelSpec, StateDict]:
        """The client's own model (its last archived personal state; clients keep theirs across rounds)."""
        ref = manifest.personal.get(client_id)
        if ref is None:
            raise UnlearningError(f"client {client_id} has no model of its own in this version")
        state, meta = state_from_bytes(history.store.get_verified(ref))
        return (ModelSpec.from_dict(meta["model"]) if "model" in meta else manifest.model), state

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public": self.public.to_dict(),
            "model": self.model.to_dict(),
            "settings": asdict(self.settings),
            "architectures": {c: s.to_dict() for c, s in sorted(self.architectures.items())},
        }


@register_protocol("soft-labels")
def _from_record(record: Mapping[str, Any]) -> Protocol:
    return SoftLabels(
        ObjectRef.from_dict(record["public"]),
        ModelSpec.from_dict(record["model"]),
        SoftLabelSettings.from_dict(record.get("settings") or {}),
        {c: ModelSpec.from_dict(s) for c, s in (record.get("architectures") or {}).items()},
    )
