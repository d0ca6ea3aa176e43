"""Convergence tracking of a few-shot federation, and the shape of its rate.

Per round (:func:`convergence_record`, returned in ``RoundOutcome.record`` so
the flow can log it): the global and mean-client loss and accuracy, each
client's drift ``||delta_i - mean delta||``, the update norm and a
gradient-dissimilarity estimate. Across rounds: :func:`rounds_to_plateau`
and :func:`fit_rate_constant` (the ``C`` of an ``O(1/T)`` bound).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from components.core.state import StateDict, l2_norm, subtract
from components.federation.fewshot.aggregation import MixedAggregate
from components.federation.fewshot.model import group_of


def _group_view(state: Mapping[str, torch.Tensor], group: str) -> StateDict:
    return {k: v for k, v in state.items() if group_of(k) == group}


def client_drift(
    deltas: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """``||delta_i - mean delta||`` over the groups client ``i`` trained (mean: the group's weighted mean)."""
    means: dict[str, StateDict] = {}
    for group in {g for w in weights.values() for g in w}:
        members = [cid for cid in deltas if group in weights[cid]]
        views = [_group_view(deltas[cid], group) for cid in members]
        mean = {k: sum(weights[c][group] * v[k].double() for c, v in zip(members, views)) for k in views[0]}
        means[group] = mean
    drift = {}
    for cid, delta in deltas.items():
        total = 0.0
        for group in weights[cid]:
            total += sum(float((delta[k].double() - m).pow(2).sum()) for k, m in means[group].items())
        drift[cid] = total**0.5
    return drift


def gradient_dissimilarity(
    gradients: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, Mapping[str, float]]
) -> float | None:
    """``sum_g sum_i w_i^g ||g_i^g||^2 / sum_g ||sum_i w_i^g g_i^g||^2`` (B^2 of the B-dissimilarity).

    The usual ``E_i ||grad f_i||^2 / ||grad f||^2`` (Li et al., 2020, FedProx)
    taken per group over the clients that trained it. It is 1 when all clients
    share one gradient and grows with their heterogeneity; ``None`` when the
    mean gradient is zero.
    """
    numerator = denominator = 0.0
    for group in sorted({g for w in weights.values() for g in w}):
        members = [cid for cid in gradients if group in weights[cid]]
        views = [_group_view(gradients[cid], group) for cid in members]
        numerator += sum(weights[c][group] * l2_norm(v) ** 2 for c, v in zip(members, views))
        mean = {k: sum(weights[c][group] * v[k].double() for c, v in zip(members, views)) for k in views[0]}
        denominator += l2_norm(mean) ** 2
    return numerator / denominator if denominator > 0 else None


def convergence_record(
    base: Mapping[str, torch.Tensor],
    applied: MixedAggregate,
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    gradients: Mapping[str, Mapping[str, torch.Tensor]] | None,
    num_examples: Mapping[str, int],
    metrics: Mapping[str, Mapping[str, float]],
) -> dict[str, object]:
    """One round's convergence facts (JSON-ready; ``None`` where a quantity is undefined).

    ``global_*`` is the received model on the clients' training data
    (example-weighted: the federated objective), ``client_*_mean`` the
    clients' own trained models on the same data (unweighted mean).
    """
    total = sum(num_examples.values())
    drift = client_drift(deltas, applied.weights)

    def weighted(name: str) -> float:
        return sum(num_examples[c] * float(metrics[c][name]) for c in deltas) / total

    def mean(name: str) -> float:
        return sum(float(metrics[c][name]) for c in deltas) / len(deltas)

    return {
        "global_loss": weighted("global_loss"),
        "global_accuracy": weighted("global_accuracy"),
        "client_loss_mean": mean("train_loss"),
        "client_accuracy_mean": mean("train_accuracy"),
        "update_norm": l2_norm(subtract(applied.state, base)),
        "client_update_norms": {cid: l2_norm(d) for cid, d in sorted(deltas.items())},
        "drift": dict(sorted(drift.items())),
        "drift_mean": sum(drift.values()) / len(drift),
        "grad_dissimilarity": gradient_dissimilarity(gradients, applied.weights) if gradients else None,
    }


def rounds_to_plateau(curve: Sequence[float], tolerance: float = 0.01) -> int | None:
    """The first round (1-based) whose value is within ``tolerance`` of the curve's best."""
    values = np.asarray(curve, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).any():
        return None
    best = np.nanmax(values)
    return int(np.flatnonzero(values >= best - tolerance)[0]) + 1


def fit_rate_constant(suboptimality: Sequence[float], rounds: Sequence[int]) -> float:
    """The smallest ``C`` with ``s_t <= C / t`` over the given rounds: ``max_t t * s_t``."""
    return float(max(t * s for t, s in zip(rounds, suboptimality)))


def round_metrics(record: Mapping[str, object]) -> dict[str, float]:
    """The scalars of a round's ``convergence`` record, for a tracker (per-client maps and ``None`` left out)."""
    return {name: float(v) for name, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
