"""Byzantine-robust aggregation rules, each with an exact per-client attribution.

Forgetting subtracts, per client, the running sum of ``weight * delta`` that a
strategy reports. A robust rule is not a weighted average of the uploads, so
each rule here states what every client's data actually moved the model by:

Coordinate-wise median and trimmed mean (Yin et al., 2018, "Byzantine-robust
distributed learning: towards optimal statistical rates")
    At every coordinate the clients' values are ranked (a stable sort, so ties
    are broken by client order and every rank belongs to exactly one client).
    The rule is a fixed linear combination of the ranks: the median takes the
    middle rank (odd count) or half of each of the two middle ranks (even
    count); the trimmed mean takes ``1 / (n - 2k)`` of every rank that is not
    among the ``k = floor(beta * n)`` lowest or highest. Client ``i`` is given
    the masked delta ``c[rank_i] * delta_i`` with weight 1.0 (``modified``):
    summed over the clients it is exactly the rule's step, ties included.
Multi-Krum (Blanchard et al., 2017, "Machine learning with adversaries:
Byzantine tolerant gradient descent")
    Each client is scored by the summed squared distance to its ``n - f - 2``
    nearest other updates; the ``m`` lowest scores are averaged. The selected
    clients are weighted by ``num_examples`` (as Flower's ``Krum``; the paper
    averages uniformly, which is the same when clients report equal sizes),
    the others get weight 0 and contribute nothing.
FLTrust (Cao et al., 2021, "FLTrust: Byzantine-robust federated learning via
trust bootstrapping")
    The server computes its own update ``g0`` on a small clean set. Client ``i``
    gets the trust score ``ReLU(cos(delta_i, g0))``, its delta is rescaled to
    ``||g0||`` and weighted by ``ts_i / sum ts``. The rescaled delta is what was
    applied (``modified``); integer buffers are not rescaled.

Norms, distances and cosines are taken over all floating point entries of a
state together (integer buffers such as ``num_batches_tracked`` are ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from components.core.records import ClientResult, ClientUpdate
from components.core.state import StateDict, weighted_sum
from components.federation.weights.strategy import Aggregate, FedAvg, check_unique, register_strategy
from components.federation.weights.vectors import apply_updates, cosine, flat_vector, scale_floating


def _check_keys(deltas: Sequence[Mapping[str, torch.Tensor]]) -> None:
    for d in deltas[1:]:
        if d.keys() != deltas[0].keys():
            raise ValueError("client deltas have different keys")


def _cast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Integer buffers are rounded back, as components.core.state does.
    return value.to(like.dtype) if like.is_floating_point() else value.round().to(like.dtype)


# --------------------------------------------------------------------------- coordinate-wise rules


def rank_shares(deltas: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]) -> list[StateDict]:
    """Each client's share of a rank-linear rule: ``coefficients[rank_i(j)] * delta_i[j]`` per coordinate ``j``.

    Ranks come from a stable sort, so tied values get distinct ranks in client
    order and the shares sum to the rule's value at every coordinate.
    """
    n = len(deltas)
    if n == 0 or len(coefficients) != n:
        raise ValueError(f"{n} deltas but {len(coefficients)} rank coefficients")
    _check_keys(deltas)
    coef = torch.tensor(list(coefficients), dtype=torch.float64)
    shares: list[StateDict] = [{} for _ in range(n)]
    for key, like in deltas[0].items():
        stacked = torch.stack([d[key].detach().double().reshape(-1) for d in deltas])  # n x numel
        order = torch.argsort(stacked, dim=0, stable=True)  # order[r, j]: the client of rank r at j
        factors = torch.empty_like(stacked).scatter_(0, order, coef.unsqueeze(1).expand_as(stacked).contiguous())
        parts = factors * stacked
        for i in range(n):
            shares[i][key] = _cast(parts[i].reshape(like.shape), like)
    return shares


def median_coefficients(n: int) -> list[float]:
    """Rank coefficients of the median: the middle rank, or half of each of the two middle ranks."""
    coef = [0.0] * n
    if n % 2:
        coef[n // 2] = 1.0
    else:
        coef[n // 2 - 1] = coef[n // 2] = 0.5
    return coef


def trimmed_coefficients(n: int, beta: float) -> list[float]:
    """Rank coefficients of the mean without the ``floor(beta * n)`` lowest and highest ranks."""
    k = int(beta * n)  # as scipy.stats.trim_mean and Flower's aggregate_trimmed_avg
    if n - 2 * k < 1:
        raise ValueError(f"trimming {k} of {n} clients at each end leaves none")
    return [1.0 / (n - 2 * k) if k <= r < n - k else 0.0 for r in range(n)]


def aggregate_median(deltas: Sequence[Mapping[str, torch.Tensor]]) -> list[StateDict]:
    """The clients' shares of the coordinate-wise median (their sum is the median)."""
    return rank_shares(deltas, median_coefficients(len(deltas)))


def aggregate_trimmed_mean(deltas: Sequence[Mapping[str, torch.Tensor]], beta: float) -> list[StateDict]:
    """The clients' shares of the coordinate-wise ``beta``-trimmed mean (their sum is the trimmed mean)."""
    return rank_shares(deltas, trimmed_coefficients(len(deltas), beta))


def coordinate_median(deltas: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The coordinate-wise median of ``deltas`` (the mean of the two middle values for an even count)."""
    shares = aggregate_median(deltas)
    return weighted_sum(shares, [1.0] * len(shares))


class _RankRule(FedAvg):
    """A coordinate-wise rule whose clients are attributed their masked shares."""

    def shares(self, deltas: Sequence[StateDict]) -> list[StateDict]:
        raise NotImplementedError

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        check_unique(server_round, results)
        shares = self.shares([r.delta for r in results])
        updates = [
            ClientUpdate(r.client_id, server_round, r.num_examples, 1.0, share, upload=r.upload, modified=True)
            for r, share in zip(results, shares)
        ]
        return Aggregate(apply_updates(global_state, updates), updates, record={"rule": self.name})


@register_strategy("median")
class FedMedian(_RankRule):
    """Coordinate-wise median; client ``i`` is attributed its masked delta (weight 1.0).

    Parameters
    ----------
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "median"

    def shares(self, deltas: Sequence[StateDict]) -> list[StateDict]:
        return aggregate_median(deltas)


@register_strategy("trimmed-mean")
class FedTrimmedMean(_RankRule):
    """Coordinate-wise trimmed mean; client ``i`` is attributed its masked, ``1/(n-2k)``-scaled delta.

    Parameters
    ----------
    beta
        Fraction of clients trimmed at each end, in ``[0, 0.5)``.
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.1, clients_per_round: int | None = None) -> None:
        super().__init__(clients_per_round)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def shares(self, deltas: Sequence[StateDict]) -> list[StateDict]:
        return aggregate_trimmed_mean(deltas, self.beta)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}


# --------------------------------------------------------------------------- Multi-Krum


def krum_scores(deltas: Sequence[Mapping[str, torch.Tensor]], num_malicious: int) -> list[float]:
    """Krum score of each delta: summed squared distance to its ``n - f - 2`` nearest others.

    With too few clients for the guarantee (``n <= 2f + 2``) at least one
    neighbour is used, as Flower does.
    """
    n = len(deltas)
    if n == 1:
        return [0.0]
    vectors = torch.stack([flat_vector(d) for d in deltas])
    closest = min(n - 1, max(1, n - num_malicious - 2))
    scores = []
    for i in range(n):
        distances = (vectors - vectors[i]).pow(2).sum(1)  # one row at a time: memory O(n * numel)
        others = torch.cat([distances[:i], distances[i + 1 :]])
        scores.append(float(torch.sort(others).values[:closest].sum()))
    return scores


def multi_krum(
    deltas: Sequence[Mapping[str, torch.Tensor]], num_malicious: int, num_selected: int | None = None
) -> tuple[list[int], list[float]]:
    """Indices of the ``num_selected`` lowest Krum scores (default ``n - f``) and all scores."""
    scores = krum_scores(deltas, num_malicious)
    m = len(deltas) - num_malicious if num_selected is None else num_selected
    m = min(len(deltas), max(1, m))
    order = np.argsort(np.asarray(scores), kind="stable")  # ties: lower client index first
    return sorted(int(i) for i in order[:m]), scores


@register_strategy("krum")
class MultiKrum(FedAvg):
    """Multi-Krum: average the ``num_selected`` updates with the lowest Krum scores.

    Parameters
    ----------
    num_malicious
        ``f``, the number of Byzantine clients the rule tolerates.
    num_selected
        ``m``, how many clients are averaged (1 is plain Krum); ``None`` means
        ``n - f`` of the round's ``n`` clients.
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "krum"

    def __init__(
        self, num_malicious: int = 0, num_selected: int | None = None, clients_per_round: int | None = None
    ) -> None:
        super().__init__(clients_per_round)
        if num_malicious < 0 or (num_selected is not None and num_selected < 1):
            raise ValueError(f"need num_malicious >= 0 and num_selected >= 1, got {num_malicious}, {num_selected}")
        self.num_malicious = num_malicious
        self.num_selected = num_selected

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        check_unique(server_round, results)
        selected, scores = multi_krum([r.delta for r in results], self.num_malicious, self.num_selected)
        chosen = set(selected)
        weights = dict(zip(selected, self.weights([results[i] for i in selected])))
        updates = [
            ClientUpdate(r.client_id, server_round, r.num_examples, weights.get(i, 0.0), r.delta, upload=r.upload)
            for i, r in enumerate(results)
        ]
        record = {
            "rule": self.name,
            "scores": {r.client_id: s for r, s in zip(results, scores)},
            "selected": [results[i].client_id for i in selected],
            "excluded": [r.client_id for i, r in enumerate(results) if i not in chosen],
        }
        return Aggregate(apply_updates(global_state, updates), updates, record=record)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_malicious": self.num_malicious, "num_selected": self.num_selected}


# --------------------------------------------------------------------------- FLTrust


def fltrust_weights(
    deltas: Sequence[Mapping[str, torch.Tensor]], server_delta: Mapping[str, torch.Tensor]
) -> tuple[list[float], list[float], list[float]]:
    """Trust scores ``ReLU(cos(delta_i, g0))``, weights ``ts_i / sum ts`` and rescale factors ``||g0|| / ||delta_i||``.

    All weights are 0 when no client has a positive trust score (the round
    then leaves the model unchanged).
    """
    g0 = flat_vector(server_delta)
    g0_norm = float(g0.norm())
    trust, factors = [], []
    for d in deltas:
        v = flat_vector(d)
        trust.append(max(0.0, cosine(v, g0)))
        norm = float(v.norm())
        factors.append(g0_norm / norm if norm > 0 else 0.0)
    total = sum(trust)
    weights = [t / total if total > 0 else 0.0 for t in trust]
    return trust, weights, factors


@register_strategy("fltrust")
class FLTrust(FedAvg):
    """FLTrust: trust-weighted average of client deltas rescaled to the server's update norm.

    Parameters
    ----------
    server_update
        Global state -> the server's own delta on its small clean set. It
        cannot be recorded in a manifest: a strategy rebuilt by
        ``build_strategy("fltrust")`` has none and refuses to aggregate, but
        forgetting never needs it (it only reads the archived running sums).
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "fltrust"

    def __init__(
        self,
        server_update: Callable[[StateDict], StateDict] | None = None,
        clients_per_round: int | None = None,
    ) -> None:
        super().__init__(clients_per_round)
        self.server_update = server_update

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        check_unique(server_round, results)
        if self.server_update is None:
            raise ValueError("FLTrust needs server_update (the server's delta on its clean set) to aggregate")
        server_delta = self.server_update(dict(global_state))
        trust, weights, factors = fltrust_weights([r.delta for r in results], server_delta)
        updates = []
        for r, w, f in zip(results, weights, factors):
            if w > 0:  # the rescaled delta is what was applied
                updates.append(ClientUpdate(r.client_id, server_round, r.num_examples, w, scale_floating(r.delta, f),
                                            upload=r.upload, modified=True))  # fmt: skip
            else:  # contributes nothing: keep the upload as it was
                updates.append(ClientUpdate(r.client_id, server_round, r.num_examples, 0.0, r.delta, upload=r.upload))
        record = {
            "rule": self.name,
            "trust": {r.client_id: t for r, t in zip(results, trust)},
            "excluded": [r.client_id for r, w in zip(results, weights) if w == 0],
            "server_update_norm": float(flat_vector(server_delta).norm()),
        }
        return Aggregate(apply_updates(global_state, updates), updates, record=record)


def fltrust_server_update(spec: Any, server_set: Any, train: Any, seed: int) -> Callable[[StateDict], StateDict]:
    """FLTrust's server update: the server trains the global model on its small clean set; the delta.

    ``spec`` the global model, ``server_set`` a labelled split (the few-shot set), ``train`` the
    server's training settings; the shuffling is seeded, so the update depends only on the state.
    """
    from components.core.state import subtract
    from components.learning.train import train_client
    from components.models.students import build_model

    def update(state: StateDict) -> StateDict:
        model = build_model(spec)
        model.load_state_dict(dict(state))
        train_client(model, server_set, train, torch.Generator().manual_seed(seed))
        return subtract(model.state_dict(), state)

    return update
