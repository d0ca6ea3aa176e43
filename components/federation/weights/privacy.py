"""Differentially private updates: clipping, Gaussian noise and its accounting.

Server side (central DP, as Flower's ``DifferentialPrivacyServerSideFixedClipping``
after McMahan et al., 2018, "Learning differentially private recurrent
language models"): :class:`DPServerSide` wraps any strategy, clips every
client's delta to L2 norm ``C`` before delegating, and adds
``N(0, (sigma * C / n)^2)`` to every coordinate of the averaged step. The
clipped delta is what the client contributed (``modified`` where clipping
changed it); the noise belongs to no client and is the round's ``residual``,
so forgetting a client subtracts its clipped contributions and leaves the
noise, which never depended on it, in place.

The ``C / n`` calibration assumes that every client's contribution is bounded
by ``C / n``, i.e. an inner strategy with uniform weights (Flower makes the
same assumption); with FedAvg's ``num_examples`` weights the largest client's
bound is ``p_max * C`` and the guarantee is weaker than the accountant reports.

Client side (local DP): :func:`perturb_locally` clips and noises a delta
before upload; the noise is then part of the client's own upload and is
attributed to (and forgotten with) that client.

:class:`PrivacyAccountant` tracks epsilon over rounds with Opacus' RDP
accountant (Mironov, 2017), one ``step`` per round with the sampling rate of
clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from components.core.records import ClientResult
from components.core.state import StateDict, add, l2_norm
from components.federation.weights.strategy import (
    Aggregate,
    Strategy,
    check_unique,
    register_strategy,
    strategy_from_record,
)
from components.federation.weights.vectors import scale_floating


def clip_delta(delta: Mapping[str, torch.Tensor], max_norm: float) -> tuple[StateDict, float]:
    """``delta`` scaled to L2 norm at most ``max_norm`` (over all floating entries) and the factor used."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = l2_norm(delta)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return scale_floating(delta, factor), factor


def gaussian_noise(like: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> StateDict:
    """``N(0, std^2)`` on every floating entry of a state shaped as ``like`` (zeros on integer entries)."""
    return {
        k: (torch.randn(v.shape, dtype=torch.float64, generator=generator) * std).to(v.dtype)
        if v.is_floating_point()
        else torch.zeros_like(v)
        for k, v in like.items()
    }


def round_generator(seed: int, server_round: int) -> torch.Generator:
    """A torch generator that depends only on (seed, round)."""
    state = np.random.SeedSequence([seed, server_round]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def perturb_locally(
    delta: Mapping[str, torch.Tensor], clipping_norm: float, noise_multiplier: float, generator: torch.Generator
) -> StateDict:
    """Local DP: clip ``delta`` to ``clipping_norm`` and add ``N(0, (noise_multiplier * clipping_norm)^2)``.

    A client applies this before upload, so the noise is its own and is
    attributed to it like the rest of its update.
    """
    clipped, _ = clip_delta(delta, clipping_norm)
    return add(clipped, gaussian_noise(clipped, noise_multiplier * clipping_norm, generator))


@register_strategy("dp-server")
class DPServerSide(Strategy):
    """Central DP with fixed clipping around any strategy.

    Parameters
    ----------
    strategy
        The inner strategy, or its recorded ``describe()`` (how
        ``build_strategy("dp-server", strategy={...}, ...)`` rebuilds it).
    noise_multiplier
        ``sigma``: noise std in units of the clipping norm.
    clipping_norm
        ``C``: every client's delta is clipped to this L2 norm.
    seed
        Seeds the noise: one ``torch.Generator`` per ``(seed, server_round)``.
    """

    name = "dp-server"

    def __init__(
        self,
        strategy: Strategy | Mapping[str, Any] | None = None,
        noise_multiplier: float = 1.0,
        clipping_norm: float = 1.0,
        seed: int = 0,
    ) -> None:
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError(
                f"need noise_multiplier >= 0 and clipping_norm > 0, got {noise_multiplier}, {clipping_norm}"
            )
        if strategy is None:
            strategy = {"name": "fedavg"}
        self.strategy = strategy if isinstance(strategy, Strategy) else strategy_from_record(strategy)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.seed = seed

    def configure_fit(self, server_round: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        return self.strategy.configure_fit(server_round, available, rng)

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        check_unique(server_round, results)
        clipped, factors = [], {}
        for r in results:
            delta, factor = clip_delta(r.delta, self.clipping_norm)
            clipped.append(dataclasses.replace(r, delta=delta))
            factors[r.client_id] = factor
        inner = self.strategy.aggregate_fit(server_round, global_state, clipped, server_state)
        # The applied delta differs from the upload wherever clipping changed it.
        updates = [u if factors[u.client_id] == 1.0 else dataclasses.replace(u, modified=True) for u in inner.updates]
        std = self.noise_multiplier * self.clipping_norm / len(results)
        noise = gaussian_noise(inner.state, std, round_generator(self.seed, server_round))
        residual = noise if inner.residual is None else add(inner.residual, noise)
        record = {
            **inner.record,
            "dp": {
                "noise_std": std,
                "clipped": sorted(c for c, f in factors.items() if f < 1.0),
                "noise_multiplier": self.noise_multiplier,
                "clipping_norm": self.clipping_norm,
            },
        }
        return Aggregate(add(inner.state, noise), updates, residual, inner.server_state, record)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "strategy": self.strategy.describe(),
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "seed": self.seed,
        }


class PrivacyAccountant:
    """Epsilon spent over rounds of the Gaussian mechanism, via Opacus' RDP accountant.

    Call :meth:`step` once per round with that round's noise multiplier and
    client sampling rate (``clients_per_round / num_clients``).
    """

    def __init__(self) -> None:
        from opacus.accountants import RDPAccountant  # slow to import: only when accounting

        self._accountant = RDPAccountant()
        self.rounds = 0

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise ValueError(
                f"need noise_multiplier > 0 and 0 < sample_rate <= 1, got {noise_multiplier}, {sample_rate}"
            )
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.rounds += 1

    def epsilon(self, delta: float) -> float:
        """Epsilon of ``(epsilon, delta)``-DP after the rounds so far (0.0 before any)."""
        return float(self._accountant.get_epsilon(delta))


def sampling_rate(local: bool, participants: int, num_clients: int) -> float:
    """A noised round's sampling rate: participants over clients (central), 1 under local DP.

    Local DP: each upload is a Gaussian mechanism the server sees as is (no amplification by sampling: it
    knows who took part), so epsilon is that of a client that took part in every round.
    """
    return 1.0 if local else min(1.0, participants / max(1, num_clients))


def lineage_accountant(history: Any, manifest_ref: Any, num_clients: int) -> PrivacyAccountant:
    """The accountant after every noised round in the lineage ending at ``manifest_ref`` (oldest first).

    A round counts when its manifest records the ``dp-server`` strategy with a
    positive noise multiplier (its sampling rate: its participants over
    ``num_clients``), or the weight protocol's ``local_dp`` (rate 1: epsilon of
    a client that took part in every round). Deletions add no noise and spend nothing.
    """
    noised: list[tuple[float, float]] = []
    ref = manifest_ref
    while ref is not None:
        manifest = history.read_manifest(ref)
        protocol = getattr(manifest, "protocol", None) or {}
        strategy = protocol.get("strategy") or {}
        if strategy.get("name") == "dp-server" and float(strategy.get("noise_multiplier", 0)) > 0:
            rate = sampling_rate(False, len(manifest.client_ids), num_clients)
            noised.append((float(strategy["noise_multiplier"]), rate))
        elif (protocol.get("local_dp") or {}).get("noise_multiplier", 0) > 0 and hasattr(manifest, "clients"):
            noised.append((float(protocol["local_dp"]["noise_multiplier"]), sampling_rate(True, 0, num_clients)))
        ref = manifest.parent
    accountant = PrivacyAccountant()
    for sigma, rate in reversed(noised):
        accountant.step(sigma, rate)
    return accountant
