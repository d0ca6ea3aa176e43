"""Aggregation strategies of the weight protocol.

A strategy turns the results of one round's clients into a new global state and
says, for every client, the contribution it actually applied
(``weight * delta``). Forgetting a client later subtracts exactly those
contributions, so a strategy that clips, perturbs or re-weights updates must
report the delta and weight it really used.

FedAvg (McMahan et al., 2017) is the first strategy; robust and
distillation-based strategies subclass :class:`Strategy` (or :class:`FedAvg`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from components.core.records import ClientResult, ClientUpdate
from components.core.state import StateDict, add, cast_to, weighted_sum


def aggregate(results: Sequence[tuple[StateDict, float]]) -> StateDict:
    """Compute weighted average of deltas, weights normalised to sum 1."""
    weights = [w for _, w in results]
    total = float(sum(weights))
    return weighted_sum([d for d, _ in results], [w / total for w in weights])


@dataclass(frozen=True)
class Aggregate:
    """What a strategy applied in one round (see :class:`~components.federation.protocol.RoundOutcome`).

    ``state = global + sum(weight * delta over updates) + residual``: the
    updates are attributed to their clients, the residual to none of them.
    """

    state: StateDict = field(repr=False)
    updates: list[ClientUpdate]
    residual: StateDict | None = field(default=None, repr=False)
    server_state: StateDict | None = field(default=None, repr=False)
    record: Mapping[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """How a server picks clients and combines their weight updates.

    ``holds_all_updates``: the rule needs every update of a round at once
    (a median, Krum, credit scores), so a round holds ``clients x model`` in
    memory. A streaming rule (FedAvg) folds one update at a time
    (:meth:`aggregate_stream`) and holds ``O(model)`` however many clients.
    """

    name: str = "strategy"
    holds_all_updates: bool = True

    def configure_fit(self, server_round: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
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
        server_state: StateDict | None = None,
    ) -> Aggregate:
        """Return the new global state and exactly what was applied, per client and as residual."""

    def aggregate_stream(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        announced: Sequence[tuple[str, int]],
        results: Iterable[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        """Aggregate results that arrive one at a time; ``announced`` is ``(client_id, num_examples)``
        of each, in arrival order, known before any delta is read.

        The default materialises them (the rule needs all at once: ``holds_all_updates``).
        """
        return self.aggregate_fit(server_round, global_state, list(results), server_state)

    def describe(self) -> dict[str, Any]:
        """The strategy's name and settings, for manifests and tracking (``build_strategy`` inverts it)."""
        return {"name": self.name}


def check_unique(server_round: int, results: Sequence[ClientResult]) -> None:
    """Refuse a round in which a client reported twice or nobody reported."""
    if not results:
        raise ValueError(f"round {server_round}: no client results to aggregate")
    seen: set[str] = set()
    for r in results:
        if r.client_id in seen:
            raise ValueError(f"round {server_round}: client {r.client_id} reported twice")
        seen.add(r.client_id)


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Make a strategy class available to ``federate.strategy`` and to manifests' records."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        STRATEGIES[name] = cls
        return cls

    return decorator


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Federated averaging: weights proportional to ``num_examples``.

    Parameters
    ----------
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "fedavg"
    holds_all_updates = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass with its own rule (ranks, scores, other weights) is not a plain streamed sum
        # unless it says so.
        super().__init_subclass__(**kwargs)
        if {"aggregate_fit", "weights"} & vars(cls).keys() and "holds_all_updates" not in vars(cls):
            cls.holds_all_updates = True

    def __init__(self, clients_per_round: int | None = None) -> None:
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round

    def configure_fit(self, server_round: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
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
        server_state: StateDict | None = None,
    ) -> Aggregate:
        check_unique(server_round, results)
        weights = self.weights(results)
        updates = [
            ClientUpdate(r.client_id, server_round, r.num_examples, w, r.delta, upload=r.upload)
            for r, w in zip(results, weights)
        ]
        step = aggregate([(u.delta, u.weight) for u in updates])
        return Aggregate(add(global_state, step), updates)

    def aggregate_stream(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        announced: Sequence[tuple[str, int]],
        results: Iterable[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        """FedAvg folding one delta at a time: the same sums, in the same order, as :meth:`aggregate_fit`.

        The weights ``n_i / sum_j n_j`` come from ``announced``; each delta is
        added to a float64 accumulator and dropped, so memory is two models
        (the accumulator and the delta being folded) for any number of clients.
        """
        if self.holds_all_updates:  # a subclass whose rule is not a plain weighted sum
            return super().aggregate_stream(server_round, global_state, announced, results, server_state)
        if not announced:
            raise ValueError(f"round {server_round}: no client results to aggregate")
        if len({cid for cid, _ in announced}) != len(announced):
            raise ValueError(f"round {server_round}: a client reported twice")
        total = sum(n for _, n in announced)
        if total <= 0:
            raise ValueError("cannot aggregate: the clients reported no training examples")
        accumulator: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}  # the first delta's, as weighted_sum casts
        updates: list[ClientUpdate] = []
        for (cid, n), result in zip(announced, results, strict=True):
            if (result.client_id, result.num_examples) != (cid, n):
                raise ValueError(f"round {server_round}: result of {result.client_id} arrived out of order")
            weight = n / total
            if not accumulator:
                accumulator = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in result.delta.items()}
                dtypes = {k: v.dtype for k, v in result.delta.items()}
            elif accumulator.keys() != result.delta.keys():
                raise ValueError(f"round {server_round}: the update of {cid} has other keys than the others")
            for key, acc in accumulator.items():
                acc += result.delta[key].double() * float(weight)
            # The upload is already archived: keep its reference, not its tensors.
            kept = None if result.upload is not None else result.delta
            updates.append(ClientUpdate(cid, server_round, n, weight, kept, upload=result.upload))
        step = {k: cast_to(acc, dtypes[k]) for k, acc in accumulator.items()}
        return Aggregate(add(global_state, step), updates)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "clients_per_round": self.clients_per_round}


# Modules whose strategies register themselves on import (they import this module,
# so they are loaded on first use rather than at import time).
BUILTIN_STRATEGY_MODULES = (
    "components.federation.weights.robust",
    "components.federation.weights.credit",
    "components.federation.weights.privacy",
)


def available_strategies() -> list[str]:
    for module in BUILTIN_STRATEGY_MODULES:
        importlib.import_module(module)
    return sorted(STRATEGIES)


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """Instantiate a registered strategy by name."""
    available_strategies()
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    return cls(**kwargs)


def strategy_from_record(record: Mapping[str, Any]) -> Strategy:
    """The strategy a manifest recorded (its ``describe()``)."""
    settings = {k: v for k, v in record.items() if k != "name"}
    return build_strategy(str(record.get("name")), **settings)
