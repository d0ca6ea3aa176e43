"""Credit-based aggregation: random groups, per-group suspicion scores, dynamic exclusion.

After a patent on federated split learning. Every round:

1. **Groups.** The round's clients (in client-id order) are permuted by
   ``numpy.random.default_rng([seed, server_round])`` and split into
   ``min(num_groups, n)`` groups of near-equal size, so the groups are
   re-drawn every round and reproducible from the seed. An attacker cannot
   know in advance which clients it will be compared with.
2. **Suspicion score.** Within its group, client ``i`` scores
   ``s_i = 1 - cos(delta_i, median_g)``, its cosine dissimilarity (in
   ``[0, 2]``) to the group's coordinate-wise median, a reference that a
   minority of the group cannot drag. A group of one scores 0.
3. **Dynamic threshold.** Per group, ``t_g = median(s) + k * max(MAD(s), min_mad)``
   (MAD: median absolute deviation). Clients with ``s_i > t_g`` are excluded
   (weight 0); the floor ``min_mad`` keeps near-identical honest scores from
   excluding half the group on floating point noise. The client at the median
   score is never above ``t_g``, so every group keeps at least one client.
4. **Scaling coefficient.** ``s_i = n_i c_i / sum_{j in g, kept} n_j c_j`` with
   influence ``n_i = num_examples`` and credit ``c_i``, a decreasing function
   of the suspicion score *relative to the group*: ``c_i = 1`` for a score at
   or below the group's median, falling linearly to ``min_credit`` at the
   threshold, ``c_i = clip((t_g - score_i) / (t_g - median_g), min_credit, 1)``;
   an upload that opposes its group's centre (score >= 1, cosine <= 0) gets
   ``min_credit`` whatever its rank, since it would undo the group's step.
   (An absolute credit ``1 - score`` punished honest clients for being
   non-IID: with Dirichlet-skewed data their cosine to the median is far from 1,
   so their credits spread over 0.1-0.6 for no fault, and FedAvg's weighting
   was lost without attack. Relative to the group, the typical half of the
   group is trusted fully and only the suspicious tail is damped.)
5. **Client target.** The patent's step reads "the current weight minus the
   product of the ratio of learning rate and scaling coefficient with the loss
   information" and is truncated. Read as ``w - (lr / s_i) g_i`` it would
   *divide* by the coefficient and amplify exactly the low-credit clients, so
   we implement ``w_i' = w - lr * s_i * g_i``: the local delta already is
   ``-lr * g_i``, so the target is ``w + s_i * delta_i`` and the group's model
   is ``w + sum_i s_i delta_i`` (equivalently the ``s``-weighted average of
   the local models, the ``s_i`` summing to 1).
   **Norm bound.** The cosine score sees direction only, so a scaled (model
   replacement) upload would pass with full credit. Each delta therefore
   enters the target with its norm bounded by ``norm_bound`` times the
   round's median upload norm (over all groups, so that an honest majority
   of the round suffices): factor ``b_i = min(1, norm_bound * median ||delta|| /
   ||delta_i||)``, as norm clipping in Sun et al. 2019 ("Can you really
   backdoor federated learning?"). ``norm_bound = 0`` turns it off.
6. **Groups combined.** Each group's step is weighted by its share of the
   round's non-excluded examples.

Client ``i``'s applied weight is (group weight) x ``s_i`` x ``b_i`` on its unmodified
upload, so the sum of ``weight * delta`` over clients is the round's step
exactly and forgetting subtracts precisely what the client moved the model by.
Robustness needs an honest majority in every group: with few clients per
group an attacker majority can own a group's median.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from components.core.records import ClientResult, ClientUpdate
from components.core.state import StateDict
from components.federation.weights.robust import coordinate_median
from components.federation.weights.strategy import Aggregate, FedAvg, check_unique, register_strategy
from components.federation.weights.vectors import apply_updates, cosine, flat_vector


def draw_groups(client_ids: Sequence[str], num_groups: int, seed: int, server_round: int) -> list[list[str]]:
    """Split the clients into ``min(num_groups, n)`` random groups, drawn afresh for every round."""
    ids = sorted(client_ids)
    rng = np.random.default_rng([seed, server_round])
    order = rng.permutation(len(ids))
    count = max(1, min(num_groups, len(ids)))
    return [[ids[i] for i in sorted(part)] for part in np.array_split(order, count)]


def suspicion_scores(deltas: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """Cosine dissimilarity ``1 - cos(delta_i, median)`` of each delta to the group's coordinate-wise median."""
    if len(deltas) == 1:
        return [0.0]
    reference = flat_vector(coordinate_median(deltas))
    return [1.0 - cosine(flat_vector(d), reference) for d in deltas]


def dynamic_threshold(scores: Sequence[float], mad_factor: float, min_mad: float) -> float:
    """``median(scores) + mad_factor * max(MAD(scores), min_mad)``."""
    values = np.asarray(scores, dtype=np.float64)
    center = float(np.median(values))
    mad = float(np.median(np.abs(values - center)))
    return center + mad_factor * max(mad, min_mad)


def relative_credits(scores: Sequence[float], threshold: float, min_credit: float) -> list[float]:
    """``clip((t - s) / (t - median(s)), min_credit, 1)``: full credit up to the group's median score.

    A score of 1 or more (cosine <= 0: the upload opposes its group's centre, and would undo the group's
    step) gets ``min_credit`` whatever its rank.
    """
    center = float(np.median(np.asarray(scores, dtype=np.float64)))
    span = threshold - center
    out = []
    for score in scores:
        if score >= 1.0:
            out.append(min_credit)
        elif score <= center or span <= 0:
            out.append(1.0)
        else:
            out.append(min(1.0, max(min_credit, (threshold - score) / span)))
    return out


def norm_factors(deltas: Sequence[Mapping[str, torch.Tensor]], norm_bound: float) -> tuple[list[float], float | None]:
    """``min(1, norm_bound * median ||delta|| / ||delta_i||)`` per delta, and the bound (``None`` when off)."""
    if norm_bound <= 0 or not deltas:
        return [1.0] * len(deltas), None
    norms = [float(torch.linalg.vector_norm(flat_vector(d))) for d in deltas]
    bound = norm_bound * float(np.median(norms))
    return [1.0 if n <= bound or n == 0 else bound / n for n in norms], bound


def scaling_coefficients(num_examples: Sequence[int], credits: Sequence[float]) -> list[float]:
    """``n_i c_i / sum_j n_j c_j``: influence times credit, normalised within the group."""
    products = [n * c for n, c in zip(num_examples, credits)]
    total = sum(products)
    if total <= 0:
        raise ValueError("cannot scale a group whose clients have no examples or credit")
    return [p / total for p in products]


@dataclass(frozen=True)
class CreditDecision:
    """One round's credit bookkeeping: what was scored, excluded and applied."""

    groups: list[list[str]]
    scores: dict[str, float]
    thresholds: list[float]
    excluded: list[str]
    weights: dict[str, float]  # group weight x in-group coefficient x norm factor; 0 for the excluded
    credits: dict[str, float]
    norm_factors: dict[str, float]
    norm_bound: float | None

    def to_record(self) -> dict[str, Any]:
        return {
            "rule": "credit",
            "groups": self.groups,
            "scores": self.scores,
            "thresholds": self.thresholds,
            "excluded": self.excluded,
            "credits": self.credits,
            "norm_bound": self.norm_bound,
            "norm_factors": self.norm_factors,
            "weights": self.weights,
        }


def credit_weights(
    client_ids: Sequence[str],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    *,
    server_round: int,
    seed: int = 0,
    num_groups: int = 2,
    mad_factor: float = 3.0,
    min_mad: float = 0.01,
    min_credit: float = 0.01,
    norm_bound: float = 1.0,
) -> CreditDecision:
    """Steps 1 to 6 of the module docstring: the weight applied to every client's delta."""
    index = {cid: i for i, cid in enumerate(client_ids)}
    groups = draw_groups(client_ids, num_groups, seed, server_round)
    scores: dict[str, float] = {}
    thresholds: list[float] = []
    excluded: list[str] = []
    in_group: dict[str, float] = {}
    credit_of: dict[str, float] = {}
    group_examples: list[int] = []
    factors, bound = norm_factors(deltas, norm_bound)
    factor_of = dict(zip(client_ids, factors))
    for group in groups:
        group_scores = suspicion_scores([deltas[index[c]] for c in group])
        threshold = dynamic_threshold(group_scores, mad_factor, min_mad)
        kept = [(c, s) for c, s in zip(group, group_scores) if s <= threshold]
        if not kept:  # unreachable with a median-based threshold; kept for safety
            kept = [min(zip(group, group_scores), key=lambda cs: cs[1])]
        scores.update(zip(group, group_scores))
        thresholds.append(threshold)
        excluded += [c for c in group if c not in dict(kept)]
        credit_all = dict(zip(group, relative_credits(group_scores, threshold, min_credit)))
        credits = [credit_all[c] for c, _ in kept]
        credit_of.update((c, credit_all[c]) for c, _ in kept)
        coefficients = scaling_coefficients([num_examples[index[c]] for c, _ in kept], credits)
        in_group.update((c, coef) for (c, _), coef in zip(kept, coefficients))
        group_examples.append(sum(num_examples[index[c]] for c, _ in kept))
    total = sum(group_examples)
    group_weight = {c: n / total for group, n in zip(groups, group_examples) for c in group}
    weights = {cid: group_weight[cid] * in_group.get(cid, 0.0) * factor_of[cid] for cid in client_ids}
    return CreditDecision(groups, scores, thresholds, sorted(excluded), weights, credit_of, factor_of, bound)


@register_strategy("credit")
class CreditAggregation(FedAvg):
    """Credit-based robust aggregation over randomly re-drawn groups (see the module docstring).

    Parameters
    ----------
    num_groups
        Groups per round (at least 2; fewer when fewer clients take part).
    mad_factor
        ``k`` in the per-group threshold ``median + k * MAD`` of suspicion scores.
    min_mad
        Floor of the MAD, in units of cosine dissimilarity.
    min_credit
        Lowest credit a kept client gets (at the group's threshold).
    norm_bound
        Bounds each delta's norm at this multiple of the round's median upload norm (0: off).
    seed
        Seeds the groups: ``default_rng([seed, server_round])``.
    clients_per_round
        How many clients train per round; ``None`` means all available.
    """

    name = "credit"

    def __init__(
        self,
        num_groups: int = 2,
        mad_factor: float = 3.0,
        min_mad: float = 0.01,
        min_credit: float = 0.01,
        norm_bound: float = 1.0,
        seed: int = 0,
        clients_per_round: int | None = None,
    ) -> None:
        super().__init__(clients_per_round)
        if num_groups < 2:
            raise ValueError(f"num_groups must be at least 2, got {num_groups}")
        if mad_factor < 0 or min_mad < 0 or not 0 < min_credit <= 1:
            raise ValueError("need mad_factor >= 0, min_mad >= 0 and 0 < min_credit <= 1")
        if norm_bound < 0:
            raise ValueError(f"norm_bound must be >= 0 (0: off), got {norm_bound}")
        self.norm_bound = norm_bound
        self.num_groups = num_groups
        self.mad_factor = mad_factor
        self.min_mad = min_mad
        self.min_credit = min_credit
        self.seed = seed

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        check_unique(server_round, results)
        decision = credit_weights(
            [r.client_id for r in results],
            [r.delta for r in results],
            [r.num_examples for r in results],
            server_round=server_round,
            seed=self.seed,
            num_groups=self.num_groups,
            mad_factor=self.mad_factor,
            min_mad=self.min_mad,
            min_credit=self.min_credit,
            norm_bound=self.norm_bound,
        )
        updates = [
            ClientUpdate(r.client_id, server_round, r.num_examples, decision.weights[r.client_id], r.delta,
                         upload=r.upload)
            for r in results
        ]  # fmt: skip
        return Aggregate(apply_updates(global_state, updates), updates, record=decision.to_record())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_groups": self.num_groups,
            "mad_factor": self.mad_factor,
            "min_mad": self.min_mad,
            "min_credit": self.min_credit,
            "norm_bound": self.norm_bound,
            "seed": self.seed,
        }
