"""The weight protocol: clients upload weight deltas, a strategy averages them.

Its contribution record is, per client and round, the delta applied and its
weight (:class:`~components.core.records.ClientUpdate`); a residual that belongs
to no client (server momentum, DP noise) is recorded on its own. The history
keeps a running sum of each client's applied contributions, so forgetting is
one subtraction (:mod:`components.federation.weights.forget`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from components.core.refs import ObjectRef
from components.core.state import StateDict
from components.federation.client import check_results, read_results, train_weights_client
from components.federation.protocol import (
    ClientReply,
    ClientTask,
    ForgetResult,
    Protocol,
    RoundOutcome,
    register_protocol,
)
from components.federation.weights.forget import forget_by_running_sums
from components.federation.weights.strategy import Strategy, build_strategy, strategy_from_record
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest
from components.lineage.store import ObjectStore


class WeightAveraging(Protocol):
    """Clients train the global model and upload deltas; ``strategy`` combines them.

    Parameters
    ----------
    strategy
        FedAvg or any registered :class:`Strategy` (``federate.strategy``).
    """

    name = "weights"

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_fit(self, server_round: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        return self.strategy.configure_fit(server_round, available, rng)

    def client_step(self, task: ClientTask) -> ClientReply:
        return train_weights_client(task)

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
        applied = self.strategy.aggregate_fit(server_round, base, results, server_state)
        return RoundOutcome(applied.state, applied.updates, applied.residual, applied.server_state, applied.record)

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        return forget_by_running_sums(history, source, manifest, client_id, variant)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "strategy": self.strategy.describe()}


@register_protocol("weights")
def _from_record(record: Mapping[str, Any]) -> Protocol:
    return WeightAveraging(strategy_from_record(record.get("strategy") or {"name": "fedavg"}))


def weight_protocol(strategy: str, **settings: Any) -> WeightAveraging:
    """The weight protocol with the named strategy (what ``federate.strategy`` selects)."""
    return WeightAveraging(build_strategy(strategy, **settings))
