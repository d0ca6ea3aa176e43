"""Few-shot federations without orchestration, measured every round (for the benchmark and tests).

:func:`simulate` runs the production round function
(:func:`~components.federation.rounds.run_round`) with the few-shot protocol,
committing to an :class:`~components.lineage.history.UpdateHistory` so that
forgetting runs exactly as in production, and after every round measures the
global model on the test set and each client's model on its own held-out
split. A client's model is the global one, except for a ``meta`` client: it
deploys the global initialisation adapted to its own examples
(:func:`client_state`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from components.core.refs import ObjectRef
from components.core.state import StateDict, l2_distance
from components.data.datasets import Split
from components.data.staging import stage_splits
from components.federation.fewshot.modes import LocalSettings, adapt, local_train, loss_and_accuracy
from components.federation.fewshot.protocol import FewShotProtocol
from components.federation.rounds import Federation, run_round, serial_map
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory
from components.models.students import ModelSpec, build_model
from components.unlearning.forget import forget_client

# Scalars of the protocol's convergence record kept per round (besides the evaluation's own).
RECORD_CURVES = (
    "global_loss",
    "global_accuracy",
    "client_loss_mean",
    "update_norm",
    "drift_mean",
    "grad_dissimilarity",
)


@dataclass(frozen=True)
class ClientData:
    """One client's labelled shard and held-out split, with their frozen features."""

    shard: Split
    features: torch.Tensor = field(repr=False)
    holdout_features: torch.Tensor = field(repr=False)
    holdout_labels: torch.Tensor = field(repr=False)


@dataclass
class FewShotRun:
    """A federation's final state, where it is archived, and what was measured every round."""

    state: StateDict = field(repr=False)
    manifest_ref: ObjectRef
    curves: dict[str, list[float | None]]
    client_accuracy: dict[str, float]
    compute_s: dict[str, float]  # per client, summed over rounds
    seconds: float


def client_state(
    protocol: FewShotProtocol, spec: ModelSpec, state: Mapping[str, torch.Tensor], client_id: str, data: ClientData
) -> StateDict:
    """The model ``client_id`` deploys: the global state, adapted first when its mode is ``meta``."""
    mode = protocol.mode_of(client_id)
    if mode != "meta" or protocol.local.adapt_steps == 0:
        return dict(state)
    return dict(state) | adapt(mode, build_model(spec), state, data.features, data.shard.labels, protocol.local)


def holdout_accuracy(model: torch.nn.Module, state: Mapping[str, torch.Tensor], data: ClientData) -> float | None:
    """Accuracy on the client's own held-out split (``None`` when it holds none)."""
    if len(data.holdout_labels) == 0:
        return None
    return loss_and_accuracy(model, state, data.holdout_features, data.holdout_labels)[1]


def simulate(
    protocol: FewShotProtocol,
    spec: ModelSpec,
    initial: Mapping[str, torch.Tensor],
    clients: Mapping[str, ClientData],
    test: tuple[torch.Tensor, torch.Tensor],
    rounds: int,
    seed: int,
    history: UpdateHistory,
    federation_id: str,
    exclude: Sequence[str] = (),
) -> FewShotRun:
    """``rounds`` rounds over ``clients`` minus ``exclude``, evaluated after each round."""
    started = time.perf_counter()
    ids = sorted(c for c in clients if c not in set(exclude))
    head = history.write_initial(federation_id, dict(initial), spec, seed)
    shards = stage_splits(history.store, {c: clients[c].shard for c in ids}, federation_id)
    federation = Federation(federation_id, history, history.store.url, spec, TrainSettings(), seed, federation_id,
                            shards, {c: len(clients[c].shard) for c in ids})  # fmt: skip
    model = build_model(spec)
    state, server_state, rng = dict(initial), None, np.random.default_rng([seed, 0])
    curves: dict[str, list[float | None]] = {}
    compute = dict.fromkeys(ids, 0.0)
    accuracy: dict[str, float] = {}
    result = None
    for _ in range(rounds):
        result = run_round(protocol, federation, head, state, server_state, ids, rng, serial_map)
        head, state, server_state = result.head, result.state, result.outcome.server_state
        for reply in result.replies:
            compute[reply.client_id] += float(reply.metrics["compute_s"])
        test_loss, test_accuracy = loss_and_accuracy(model, state, *test)
        accuracy = {}
        for c in ids:
            value = holdout_accuracy(model, client_state(protocol, spec, state, c, clients[c]), clients[c])
            if value is not None:
                accuracy[c] = value
        record = result.outcome.record["convergence"]
        point: dict[str, Any] = {
            "round": result.server_round,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "client_accuracy_mean": float(np.mean(list(accuracy.values()))) if accuracy else None,
            "client_accuracy_min": min(accuracy.values()) if accuracy else None,
            "client_train_accuracy_mean": record["client_accuracy_mean"],
            **{name: record[name] for name in RECORD_CURVES},
        }
        for name, value in point.items():
            curves.setdefault(name, []).append(value)
    if result is None:
        raise ValueError("a federation needs at least one round")
    return FewShotRun(state, result.manifest_ref, curves, accuracy, compute, time.perf_counter() - started)


def local_only(
    spec: ModelSpec,
    initial: Mapping[str, torch.Tensor],
    clients: Mapping[str, ClientData],
    test: tuple[torch.Tensor, torch.Tensor],
    mode: str,
    local: LocalSettings,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Each client fine-tunes alone, ``steps`` steps in ``mode``; its own model on its held-out split."""
    model = build_model(spec)
    accuracy, tests, compute = {}, [], []
    for i, (cid, data) in enumerate(sorted(clients.items())):
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        trained = local_train(
            mode, model, initial, data.features, data.shard.labels, replace(local, steps=steps), generator
        )
        state = dict(initial) | trained.params
        compute.append(trained.metrics["compute_s"])
        tests.append(loss_and_accuracy(model, state, *test)[1])
        value = holdout_accuracy(model, state, data)
        if value is not None:
            accuracy[cid] = value
    return {"client_accuracy": accuracy, "test_accuracy": float(np.mean(tests)), "compute_s": float(np.mean(compute))}


def forgetting_against_retraining(
    protocol: FewShotProtocol,
    spec: ModelSpec,
    initial: Mapping[str, torch.Tensor],
    clients: Mapping[str, ClientData],
    test: tuple[torch.Tensor, torch.Tensor],
    original: FewShotRun,
    rounds: int,
    seed: int,
    history: UpdateHistory,
    target: str,
) -> dict[str, Any]:
    """Forget ``target`` from ``original`` (subtraction) and compare with a federation retrained without it."""
    started = time.perf_counter()
    forgotten = forget_client(history, original.manifest_ref, history.read_manifest(original.manifest_ref), target)
    forget_s = time.perf_counter() - started
    retrain = simulate(protocol, spec, initial, clients, test, rounds, seed, history, "retrain", exclude=[target])
    model = build_model(spec)
    others = [c for c in sorted(clients) if c != target]

    def measured(state: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
        values = [
            holdout_accuracy(model, client_state(protocol, spec, state, c, clients[c]), clients[c]) for c in others
        ]
        kept = [v for v in values if v is not None]
        target_value = holdout_accuracy(
            model, client_state(protocol, spec, state, target, clients[target]), clients[target]
        )
        return {
            "test_accuracy": loss_and_accuracy(model, state, *test)[1],
            "others_accuracy_mean": float(np.mean(kept)) if kept else None,
            "target_accuracy": target_value,
        }

    return {
        "target": target,
        "mode": protocol.mode_of(target),
        "forget_s": forget_s,
        "retrain_s": retrain.seconds,
        "l2_forgotten_to_retrain": l2_distance(forgotten.state, retrain.state),
        "l2_original_to_retrain": l2_distance(original.state, retrain.state),
        "original": measured(original.state),
        "forgotten": measured(forgotten.state),
        "retrain": measured(retrain.state),
    }
