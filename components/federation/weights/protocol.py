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
from components.federation.client import stream_results, train_weights_client
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

    A streaming strategy (FedAvg) folds each upload into the aggregate as
    it is read and keeps only its reference, so the server step holds
    ``O(model)`` for any number of clients; a rule that needs every update at
    once (``strategy.holds_all_updates``) reads them all.

    Parameters
    ----------
    strategy
        FedAvg or any registered :class:`Strategy` (``federate.strategy``).
    update_dtype
        ``float16``: clients upload half-precision deltas (``history.update_dtype``);
        the server applies exactly those values, widened to float32.
    local_dp
        ``{"clipping_norm": C, "noise_multiplier": sigma}``: every client clips its
        delta to ``C`` and adds ``N(0, (sigma C)^2)`` before upload (local DP,
        ``federate.dp_mode: local``). The noise is drawn from the OS's randomness,
        never from the federation's seed, which the server knows.
    """

    name = "weights"

    def __init__(
        self, strategy: Strategy, update_dtype: str = "float32", local_dp: Mapping[str, float] | None = None
    ) -> None:
        if update_dtype not in ("float32", "float16"):
            raise ValueError(f"update_dtype must be float32 or float16, not {update_dtype!r}")
        if local_dp is not None and not (local_dp["clipping_norm"] > 0 and local_dp["noise_multiplier"] >= 0):
            raise ValueError(f"local_dp needs clipping_norm > 0 and noise_multiplier >= 0, got {dict(local_dp)}")
        self.strategy = strategy
        self.update_dtype = update_dtype
        self.local_dp = dict(local_dp) if local_dp is not None else None

    @property
    def holds_all_updates(self) -> bool:
        return self.strategy.holds_all_updates

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        settings: dict[str, Any] = {"update_dtype": self.update_dtype} if self.update_dtype != "float32" else {}
        if self.local_dp is not None:
            settings["local_dp"] = dict(self.local_dp)
        return settings

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
        announced = [(r.client_id, r.num_examples) for r in replies]
        results = stream_results(server_round, replies, store)
        applied = self.strategy.aggregate_stream(server_round, base, announced, results, server_state)
        return RoundOutcome(applied.state, applied.updates, applied.residual, applied.server_state, applied.record)

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        return forget_by_running_sums(history, source, manifest, client_id, variant)

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name, "strategy": self.strategy.describe()}
        if self.update_dtype != "float32":
            described["update_dtype"] = self.update_dtype
        if self.local_dp is not None:
            described["local_dp"] = dict(self.local_dp)
        return described


@register_protocol("weights")
def _from_record(record: Mapping[str, Any]) -> Protocol:
    strategy = strategy_from_record(record.get("strategy") or {"name": "fedavg"})
    return WeightAveraging(strategy, str(record.get("update_dtype", "float32")), record.get("local_dp"))


def weight_protocol(strategy: str, update_dtype: str = "float32", **settings: Any) -> WeightAveraging:
    """The weight protocol with the named strategy (what ``federate.strategy`` selects)."""
    return WeightAveraging(build_strategy(strategy, **settings), update_dtype)
