"""Aggregation strategies.

A strategy turns the results of one round's clients into a new global state and
says, for every client, the contribution it actually applied
(``weight * delta``). Forgetting a client later subtracts exactly those
contributions, so a strategy that clips, perturbs or re-weights updates must
report the delta and weight it really used.

FedAvg (McMahan et al., 2017) is the first strategy; robust and
distillation-based strategies subclass :class:`Strategy` (or :class:`FedAvg`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from components.state import StateDict, add, weighted_sum


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back after local training.

    Parameters
    ----------
    client_id
        The client's identifier.
    server_round
        The round the client trained in.
    num_examples
        Number of training examples the client used.
    delta
        Local model minus the global model the client started from.
    metrics
        Training metrics (e.g. ``train_loss``, ``compute_s``).
    """

    client_id: str
    server_round: int
    num_examples: int
    delta: StateDict = field(repr=False)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's update as the strategy applied it.

    The global model moved by ``weight * delta`` because of this client, so
    ``contribution()`` is exactly what forgetting the client must subtract.
    """

    client_id: str
    server_round: int
    num_examples: int
    weight: float
    delta: StateDict = field(repr=False)

    def contribution(self) -> StateDict:
        """The applied contribution ``weight * delta``."""
        return weighted_sum([self.delta], [self.weight])


def aggregate(results: Sequence[tuple[StateDict, float]]) -> StateDict:
    """Compute weighted average of deltas, weights normalised to sum 1."""
    weights = [w for _, w in results]
    total = float(sum(weights))
    return weighted_sum([d for d, _ in results], [w / total for w in weights])


class Strategy(ABC):
    """How a server picks clients and combines their results."""

    name: str = "strategy"

    def configure_fit(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> list[str]:
        """Choose the clients that train in ``server_round`` (default: all)."""
        if not available:
            raise ValueError(f"round {server_round}: no client is available to train")
        return list(available)

    @abstractmethod
    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
    ) -> tuple[StateDict, list[ClientUpdate]]:
        """Return the new global state and the updates as applied."""

    def describe(self) -> dict[str, object]:
        """The strategy's name and settings, for manifests and tracking."""
        return {"name": self.name}


class FedAvg(Strategy):
    """Federated averaging: weights proportional to ``num_examples``.

    Parameters
    ----------
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "fedavg"

    def __init__(self, clients_per_round: int | None = None) -> None:
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round

    def configure_fit(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> list[str]:
        chosen = super().configure_fit(server_round, available, rng)
        if self.clients_per_round is None or self.clients_per_round >= len(chosen):
            return chosen
        picked = rng.choice(len(chosen), size=self.clients_per_round, replace=False)
        return [chosen[i] for i in sorted(picked)]

    def weights(self, results: Sequence[ClientResult]) -> list[float]:
        """The weight applied to each result: ``n_i / sum_j n_j``."""
        total = sum(r.num_examples for r in results)
        if total <= 0:
            raise ValueError("cannot aggregate: the clients reported no training examples")
        return [r.num_examples / total for r in results]

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
    ) -> tuple[StateDict, list[ClientUpdate]]:
        if not results:
            raise ValueError(f"round {server_round}: no client results to aggregate")
        seen: set[str] = set()
        for r in results:
            if r.client_id in seen:
                raise ValueError(f"round {server_round}: client {r.client_id} reported twice")
            seen.add(r.client_id)
        weights = self.weights(results)
        updates = [
            ClientUpdate(r.client_id, server_round, r.num_examples, w, r.delta)
            for r, w in zip(results, weights)
        ]
        step = aggregate([(u.delta, u.weight) for u in updates])
        return add(global_state, step), updates

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "clients_per_round": self.clients_per_round}


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def build_strategy(name: str, **kwargs: object) -> Strategy:
    """Instantiate a registered strategy by name."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    return cls(**kwargs)  # type: ignore[arg-type]
