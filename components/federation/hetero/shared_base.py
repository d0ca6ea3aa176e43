"""``shared-base``: one aggregated base, a personal head per client (FedPer / FedRep-style).

A model splits at a named layer: the head is every state key that starts
with one of ``head`` (e.g. ``fc2.``), the base is the rest. Clients whose
models differ only in their heads (``cnn`` and ``cnn-mlp-head``, say) share
the base.

Per round a client loads the global base and its own head (its personal
state; a seeded initialisation the first time), trains the head alone for
``head_epochs`` (FedRep), then everything within its budget (FedPer), uploads
the base's delta and keeps its head: the head is written as the client's
personal state (``personal/<client>.safetensors``, archived and hash-checked
like every object, indexed per client in the manifest) and never read by the
server. The base is combined by any weight :class:`~components.federation.weights.strategy.Strategy`,
so its contributions are exact ``weight * delta`` records with running sums
over the base's keys. The registered global model is the new base plus a
head trained on the server's labelled set (base frozen); that head's change is
recorded in the round's residual, so for every key
``global_T = global_0 + sum_i S_i + sum_t residual_t``.

Forgetting a client subtracts its base running sum, retrains the server head
on the new base (``refit_epochs``), and the client's head leaves the
personal index (the unlearning manifest drops it; the purge deletes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from components.core.refs import ObjectRef
from components.core.serialize import state_from_bytes, state_to_bytes
from components.core.state import StateDict, subtract, zeros_like
from components.data.datasets import Split
from components.federation.client import check_results, load_shard, read_results
from components.federation.hetero.common import (
    detached,
    freeze,
    model_with,
    read_split_ref,
    read_state_at,
    ref_from,
    seed_for,
    train_within_budget,
)
from components.federation.hetero.profiles import ClientProfiles
from components.federation.protocol import (
    ClientReply,
    ClientTask,
    ForgetResult,
    Protocol,
    RoundOutcome,
    UnlearningError,
    protocol_from_record,
    register_protocol,
)
from components.federation.weights.strategy import FedAvg, Strategy, strategy_from_record
from components.learning.train import TrainSettings, train_client
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest
from components.lineage.store import ObjectStore, open_store
from components.models.students import ModelSpec, init_model


@dataclass(frozen=True)
class SharedBaseSettings:
    """Where the model splits and how heads train (the ``shared_base`` params section)."""

    head: tuple[str, ...] = ("fc2.",)  # state-key prefixes of the head
    head_epochs: int = 1  # head-only epochs before the joint ones (0 = FedPer)
    server_epochs: int = 5  # the global model's head on the server set, each round
    server_lr: float = 0.05
    server_batch_size: int = 32
    refit_epochs: int = 5  # the global head retrained after a deletion

    def __post_init__(self) -> None:
        if not self.head:
            raise ValueError("shared-base needs at least one head prefix")
        object.__setattr__(self, "head", tuple(self.head))

    def is_head(self, key: str) -> bool:
        return key.startswith(self.head)

    def split(self, state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
        """``(base, head)`` parts of a state."""
        base = {k: v for k, v in state.items() if not self.is_head(k)}
        return base, {k: v for k, v in state.items() if self.is_head(k)}


class SharedBase(Protocol):
    """A base aggregated by ``strategy``; heads stay with their clients (see the module docstring).

    Parameters
    ----------
    profiles
        Every client's model (same base, any head) and budget, resolved.
    model
        The global model's spec: the base plus the server's head.
    server_set
        The server's labelled set (the few-shot set), staged in the store.
    strategy
        How base deltas combine (FedAvg or any registered weight strategy).
    settings
        The split and the heads' training.
    seed
        Heads' initial weights and the server head's shuffling.
    """

    name = "shared-base"

    def __init__(
        self,
        profiles: ClientProfiles,
        model: ModelSpec,
        server_set: ObjectRef,
        strategy: Strategy | None = None,
        settings: SharedBaseSettings | None = None,
        seed: int = 0,
        train: TrainSettings | None = None,
    ) -> None:
        self.profiles = profiles
        self.model = model
        self.server_set = server_set
        self.strategy = strategy or FedAvg()
        self.settings = settings or SharedBaseSettings()
        self.seed = seed
        self.train = train or TrainSettings()

    def configure_fit(self, server_round: int, available: Sequence[str], rng: Any) -> list[str]:
        return self.strategy.configure_fit(server_round, available, rng)

    def client_model(self, client_id: str, global_model: ModelSpec) -> ModelSpec:
        return self.profiles.spec_for(client_id)

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        return self.profiles.profile(client_id).settings()

    def client_step(self, task: ClientTask) -> ClientReply:
        if task.threads:
            torch.set_num_threads(task.threads)
        base, _ = self.settings.split(read_state_at(task.store_url, task.base))
        if task.personal is not None:
            head = read_state_at(task.store_url, task.personal)
        else:
            _, head = self.settings.split(
                init_model(task.model, seed_for(self.seed, "head", task.client_id)).state_dict()
            )
        model = model_with(task.model, {**base, **head})
        data = load_shard(task)
        generator = torch.Generator().manual_seed(task.seed)
        if self.settings.head_epochs:
            freeze(model, self.settings.head)
            train_client(model, data, replace(task.train, local_epochs=self.settings.head_epochs), generator)
            freeze(model, ())
        metrics = train_within_budget(model, data, task.train, task.settings, generator)
        trained_base, trained_head = self.settings.split(detached(model))
        meta = {"client_id": task.client_id, "server_round": task.server_round, "num_examples": len(data)}
        store = open_store(task.store_url)
        delta = subtract(trained_base, base)
        upload = store.put(task.upload_key, state_to_bytes(delta, {**meta, "kind": "update"}), overwrite=False)
        personal = store.put(
            task.object_key("personal"),
            state_to_bytes(trained_head, {**meta, "kind": "personal", "model": task.model.to_dict(),
                                          "head": list(self.settings.head)}),
            overwrite=False,
        )  # fmt: skip
        return ClientReply(
            task.client_id, task.server_round, len(data), upload,
            metrics={k: v for k, v in metrics.items() if k != "num_examples"}, objects={"personal": personal},
        )  # fmt: skip

    def server_step(
        self,
        server_round: int,
        base: Mapping[str, Any],
        server_state: StateDict | None,
        replies: Sequence[ClientReply],
        store: ObjectStore,
    ) -> RoundOutcome:
        results = read_results(replies, store)  # the uploads only: personal heads are never read here
        check_results(server_round, results)
        global_base, old_head = self.settings.split(base)
        for result in results:
            if result.delta.keys() != global_base.keys():
                raise ValueError(f"client {result.client_id} uploaded keys other than the shared base's")
        applied = self.strategy.aggregate_fit(server_round, global_base, results, server_state)
        new_head = self._server_head(applied.state, old_head, read_split_ref(store, self.server_set), server_round)
        residual = {**(applied.residual or zeros_like(global_base)), **subtract(new_head, old_head)}
        return RoundOutcome(
            state={**applied.state, **new_head}, updates=applied.updates, residual=residual,
            server_state=applied.server_state, record=dict(applied.record),
            client_objects={r.client_id: dict(r.objects) for r in replies},
            personal={r.client_id: r.objects["personal"] for r in replies},
            specs={r.client_id: self.profiles.spec_for(r.client_id) for r in replies},
        )  # fmt: skip

    def _server_head(
        self, base: StateDict, head: StateDict, data: Split, tag: int | str, epochs: int | None = None
    ) -> StateDict:
        """The global head trained on the server set over the frozen ``base``."""
        epochs = self.settings.server_epochs if epochs is None else epochs
        if epochs == 0:
            return dict(head)
        model = model_with(self.model, {**base, **head})
        freeze(model, self.settings.head)
        settings = replace(self.train, local_epochs=epochs, lr=self.settings.server_lr,
                           batch_size=self.settings.server_batch_size)  # fmt: skip
        train_client(model, data, settings, torch.Generator().manual_seed(seed_for(self.seed, "server-head", tag)))
        return self.settings.split(detached(model))[1]

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        if variant != "subtract":
            raise UnlearningError(f"shared-base forgets by subtraction only, not {variant!r}")
        if client_id not in manifest.sums:
            raise UnlearningError(
                f"client {client_id} never contributed to the lineage of this model version (or was already removed)"
            )
        removed = manifest.sums[client_id]
        base, head = self.settings.split(history.read_state(manifest.global_state))
        base = subtract(base, history.read_state(removed))
        head = self._server_head(
            base, head, read_split_ref(history.store, self.server_set), f"forget-{client_id}", self.settings.refit_epochs
        )  # fmt: skip
        return ForgetResult({**base, **head}, removed, {}, {}, objects_read=3)

    def served_model(self, history: UpdateHistory, manifest: Manifest, client_id: str) -> tuple[ModelSpec, StateDict]:
        return personalised_model(history, manifest, client_id)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "profiles": self.profiles.describe(),
            "model": self.model.to_dict(),
            "server_set": self.server_set.to_dict(),
            "strategy": self.strategy.describe(),
            "settings": {**asdict(self.settings), "head": list(self.settings.head)},
            "train": asdict(self.train),
            "seed": self.seed,
        }


@register_protocol("shared-base")
def _from_record(record: Mapping[str, Any]) -> Protocol:
    server_set = ref_from(record.get("server_set"))
    if server_set is None:
        raise UnlearningError("a shared-base record must name its server set")
    return SharedBase(
        ClientProfiles.from_record(record["profiles"]), ModelSpec.from_dict(record["model"]), server_set,
        strategy_from_record(record.get("strategy") or {"name": "fedavg"}),
        SharedBaseSettings(**record.get("settings", {})), int(record.get("seed", 0)),
        TrainSettings(**record["train"]) if record.get("train") else None,
    )  # fmt: skip


def personalised_model(history: UpdateHistory, manifest: Manifest, client_id: str) -> tuple[ModelSpec, StateDict]:
    """A client's own model at a version: the version's base plus the client's head.

    What ``fedforget export --client ID`` writes. Raises
    :class:`~components.federation.protocol.UnlearningError` for a client with
    no head in the version (never trained, or forgotten).
    """
    protocol = protocol_from_record(manifest.protocol)
    if not isinstance(protocol, SharedBase):
        raise UnlearningError(f"version made by {manifest.protocol.get('name')!r}: no personal heads")
    ref = manifest.personal.get(client_id)
    if ref is None:
        raise UnlearningError(f"client {client_id} has no personal head in this version (never trained or forgotten)")
    head, meta = state_from_bytes(history.store.get_verified(ref))
    spec = ModelSpec.from_dict(meta["model"]) if "model" in meta else protocol.profiles.spec_for(client_id)
    base, _ = protocol.settings.split(history.read_state(manifest.global_state))
    state = {**base, **head}
    model_with(spec, state)  # refuses a head that does not fit the base
    return spec, state
