"""The splitfed protocol: federated split learning (SplitFed v1, Thapa et al., 2022).

The model is cut after ``cut`` stages (:mod:`components.federation.split.model`).
Per round, each client

1. downloads the global *client part*;
2. per batch, runs its part and sends the activations and labels over the link;
   the server runs its part (its own copy for this client), takes the loss,
   steps, and sends back the gradient of the activations; the client
   back-propagates it and steps;
3. uploads its client part.

The server then aggregates the client parts with the configured strategy
(any of ``federate.strategy``, ``credit`` included) and its per-client server
parts with FedAvg over the clients the strategy kept (``n_i / sum n_j``), as
SplitFed v1 does.

Where the server half runs: in this implementation the server's per-batch step
runs inside the client's task, behind the message boundary above (activations
and labels in, activation gradients out, each message's bytes counted), so
clients still run anywhere the task runner sends them. The communication
record therefore counts what crosses the link in a deployment: activations,
labels and gradients per batch, and the client part down and up once per round.
The server part never crosses it.

Contribution record and forgetting: a client's applied contribution is its
client-part contribution as the strategy applied it, plus ``v_i`` times its
server-part delta. Both are recorded per client (one archived *applied*
update, weight 1), so forgetting is the weight protocol's subtraction of
running sums, exact with respect to what was applied. The ``renormalise``
variant rescales FedAvg weights, which this two-part aggregation does not
have: it is refused.

With one SGD optimiser per part, a client's local training is the same
computation as training the whole model on its data (the halves compose to the
model), so ``splitfed`` with FedAvg gives FedAvg's model: a test checks it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.core.records import ClientResult, ClientUpdate
from components.core.refs import ObjectRef
from components.core.state import StateDict, add, subtract, weighted_sum
from components.federation.client import check_results, load_base, load_shard, read_results, upload_delta
from components.federation.protocol import (
    ClientReply,
    ClientTask,
    ForgetResult,
    Protocol,
    RoundOutcome,
    UnlearningError,
    register_protocol,
)
from components.federation.split.model import SplitModel, check_cut, client_prefixes, is_client_key
from components.federation.weights.forget import forget_by_running_sums
from components.federation.weights.strategy import Strategy, strategy_from_record
from components.learning.train import prefer_channels_last, shuffled_batches
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest
from components.lineage.store import ObjectStore
from components.models.students import build_model


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def train_split_client(task: ClientTask) -> ClientReply:
    """One client's round of split learning; uploads the change of both parts, returns link byte counts."""
    if task.threads:
        torch.set_num_threads(task.threads)
    cut = int(task.settings["cut"])
    base = load_base(task)
    model = build_model(task.model)
    model.load_state_dict(base)
    prefer_channels_last(model)
    split = SplitModel(model, task.model.name, cut)
    prefixes = client_prefixes(task.model.name, cut)
    named = dict(model.named_parameters())
    client_params = [p for n, p in named.items() if is_client_key(n, prefixes)]
    server_params = [p for n, p in named.items() if not is_client_key(n, prefixes)]
    sgd = {"lr": task.train.lr, "momentum": task.train.momentum, "weight_decay": task.train.weight_decay}
    client_opt, server_opt = torch.optim.SGD(client_params, **sgd), torch.optim.SGD(server_params, **sgd)
    data = load_shard(task)
    inputs, labels = data.inputs(), data.labels
    generator = torch.Generator().manual_seed(task.seed)
    started = time.perf_counter()
    up = down = 0
    model.train()
    epoch_loss = float("nan")
    for _ in range(task.train.local_epochs):
        total, count = 0.0, 0
        for idx in shuffled_batches(len(data), task.train.batch_size, generator):
            client_opt.zero_grad(set_to_none=True)
            server_opt.zero_grad(set_to_none=True)
            # client: its part, forward
            activations = split.client_forward(inputs[idx])
            # ---- link, up: activations and labels
            received = activations.detach().requires_grad_()
            batch_labels = labels[idx]
            up += _nbytes(received) + _nbytes(batch_labels)
            # server: its part, loss, step; the activations' gradient goes back
            loss = F.cross_entropy(split.server_forward(received), batch_labels)
            loss.backward()
            server_opt.step()
            gradient = received.grad
            assert gradient is not None
            # ---- link, down: the gradient of the activations
            down += _nbytes(gradient)
            # client: back-propagate it through its part, step
            activations.backward(gradient)
            client_opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        epoch_loss = total / count
    compute_s = time.perf_counter() - started
    delta = subtract(model.state_dict(), base)
    client_part = sum(_nbytes(v) for k, v in base.items() if is_client_key(k, prefixes))
    metrics = {
        "train_loss": epoch_loss,
        "compute_s": compute_s,
        "activation_bytes_up": float(up),
        "gradient_bytes_down": float(down),
        "client_part_bytes": float(client_part),
    }
    return upload_delta(task, delta, len(data), metrics)


class SplitFed(Protocol):
    """Federated split learning: client parts aggregated by ``strategy``, server parts by FedAvg.

    Parameters
    ----------
    strategy
        The rule for the client parts (``federate.strategy``; DP wraps it as usual).
    cut
        Stages of the model that run on the client (``federate.split_cut``).
    model_name
        The student architecture (its stages say where the cut falls).
    """

    name = "splitfed"

    def __init__(self, strategy: Strategy, cut: int = 2, model_name: str = "cnn") -> None:
        check_cut(model_name, cut)
        self.strategy = strategy
        self.cut = int(cut)
        self.model_name = model_name

    @property
    def holds_all_updates(self) -> bool:
        return True  # every client's server part is averaged after the strategy decided

    def configure_fit(self, server_round: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        return self.strategy.configure_fit(server_round, available, rng)

    def client_model(self, client_id: str, global_model: Any) -> Any:
        if global_model.name != self.model_name:
            raise ValueError(f"splitfed was set up for model {self.model_name!r}, not {global_model.name!r}")
        return global_model

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        return {"cut": self.cut}

    def client_step(self, task: ClientTask) -> ClientReply:
        return train_split_client(task)

    def server_step(
        self,
        server_round: int,
        base: Mapping[str, Any],
        server_state: StateDict | None,
        replies: Sequence[ClientReply],
        store: ObjectStore,
    ) -> RoundOutcome:
        results = read_results(replies, store)
        check_results(server_round, results)
        prefixes = self._prefixes(base)
        client_keys = [k for k in base if is_client_key(k, prefixes)]
        server_keys = [k for k in base if not is_client_key(k, prefixes)]
        # 1. the client parts, by the strategy (its record: groups, scores, exclusions, weights)
        parts = [
            ClientResult(r.client_id, r.server_round, r.num_examples, {k: r.delta[k] for k in client_keys})
            for r in results
        ]
        applied = self.strategy.aggregate_fit(server_round, {k: base[k] for k in client_keys}, parts, server_state)
        by_client = {u.client_id: u for u in applied.updates}
        # 2. the server parts, FedAvg over the clients the strategy kept
        kept = [r for r in results if r.client_id in by_client and by_client[r.client_id].weight != 0]
        total = sum(r.num_examples for r in kept)
        server_weights = {r.client_id: r.num_examples / total for r in kept} if total else {}
        updates, contributions = [], []
        for r in results:
            update = by_client.get(r.client_id)
            client_contribution = update.contribution() if update is not None else None
            v = server_weights.get(r.client_id, 0.0)
            composite: StateDict = {}
            for k in base:
                if k in client_keys:
                    composite[k] = (
                        client_contribution[k] if client_contribution is not None else torch.zeros_like(r.delta[k])
                    )
                else:
                    composite[k] = weighted_sum([{k: r.delta[k]}], [v])[k]
            contributions.append(composite)
            updates.append(ClientUpdate(r.client_id, server_round, r.num_examples, 1.0, composite, upload=r.upload,
                                        modified=True))  # fmt: skip
        server_step = weighted_sum([{k: c[k] for k in server_keys} for c in contributions], [1.0] * len(contributions))
        state = {**applied.state, **add({k: base[k] for k in server_keys}, server_step)}
        residual = None
        if applied.residual is not None:
            residual = {**applied.residual, **{k: torch.zeros_like(base[k]) for k in server_keys}}
        record = dict(applied.record) | {
            "split": {"cut": self.cut, "client_keys": len(client_keys), "server_weights": server_weights},
            "communication": self._communication(results),
        }
        ordered = {k: state[k] for k in base}
        return RoundOutcome(ordered, updates, residual, applied.server_state, record)

    def _prefixes(self, base: Mapping[str, Any]) -> tuple[str, ...]:
        prefixes = client_prefixes(self.model_name, self.cut)
        if not any(is_client_key(k, prefixes) for k in base):
            raise ValueError(f"the state has no {self.model_name} client part at cut {self.cut}")
        return prefixes

    @staticmethod
    def _communication(results: Sequence[ClientResult]) -> dict[str, dict[str, int]]:
        """Per client: activations + labels + its client part up; gradients + the client part down."""
        up, down = {}, {}
        for r in results:
            m = r.metrics
            up[r.client_id] = int(m.get("activation_bytes_up", 0) + m.get("client_part_bytes", 0))
            down[r.client_id] = int(m.get("gradient_bytes_down", 0) + m.get("client_part_bytes", 0))
        return {"upload_bytes": up, "download_bytes": down}

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        if variant != "subtract":
            raise UnlearningError(
                "splitfed forgets by subtraction only: renormalise rescales FedAvg weights, and a splitfed round "
                "aggregates two parts by two rules (set unlearn.variant: subtract)"
            )
        return forget_by_running_sums(history, source, manifest, client_id, variant)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "strategy": self.strategy.describe(), "cut": self.cut, "model": self.model_name}


@register_protocol("splitfed")
def _from_record(record: Mapping[str, Any]) -> Protocol:
    strategy = strategy_from_record(record.get("strategy") or {"name": "fedavg"})
    return SplitFed(strategy, int(record.get("cut", 2)), str(record.get("model", "cnn")))
