"""Grouping clients by their soft labels, one reliable label per group, and the consensus.

Pure numpy and scikit-learn over a ``K x N x C`` array: K clients' class
probabilities on the N examples of the public set D.

Measure
    The Jensen-Shannon divergence in bits (base-2 logarithms, so it lies in
    ``[0, 1]``), averaged over the public examples:
    ``d(i, j) = mean_n JS(p_i[n], p_j[n])``. It is symmetric, bounded and
    finite where a client gives a class zero probability (KL would not be).
Clustering
    Average-linkage agglomerative clustering on that precomputed matrix
    (scikit-learn ``AgglomerativeClustering``): groups merge while their mean
    pairwise divergence stays below ``distance_threshold``, or until
    ``num_groups`` groups remain when that is given.
Pick (``pick``)
    Per group and per public example, the member whose label is closest (JS)
    to the group's example-weighted mean label (default). Under label skew a
    client that never saw a class can be *confidently* wrong on it, so the
    lowest-entropy rule (``lowest-entropy``, kept for comparison) rewards
    exactly the unreliable labels; the member nearest the mean is the group's
    most typical answer, robust to one outlying member, and still one client's
    actual (sharp) prediction rather than a blur.
Combination (``group_weight``, ``calibrate``)
    With ``calibrate``, each group's picked labels are first divided by the
    group's mean label over D (its prior: a group over-predicts the classes it
    holds) and renormalised, the prior correction for label shift. The groups
    are then averaged with weights ``examples`` (their members' examples),
    ``uniform``, or ``confidence``: per example, the group's examples times
    ``1 - H(q) / log2(C)``, so a group speaks for an example as far as its
    (corrected) label is decisive there.

``grouping="none"`` makes every client its own group: no pick, and with
``examples`` weights and no calibration the consensus is plain federated
distillation (FD / FedMD-style), the example-weighted mean of every label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GROUPINGS = ("none", "similarity")
GROUP_WEIGHTS = ("examples", "uniform", "confidence")
PICKS = ("closest-to-mean", "lowest-entropy")
_EPS = 1e-12


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    return -(p * np.log2(np.clip(p, _EPS, None))).sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits of the distributions along the last axis."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)
    return np.clip(_entropy_bits(m) - 0.5 * (_entropy_bits(p) + _entropy_bits(q)), 0.0, 1.0)


def pairwise_divergence(labels: np.ndarray) -> np.ndarray:
    """``K x K`` matrix of mean (over examples) Jensen-Shannon divergences between clients."""
    k = labels.shape[0]
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = float(js_divergence(labels[i], labels[j]).mean())
    return out


def group_clients(distances: np.ndarray, threshold: float, num_groups: int | None = None) -> np.ndarray:
    """Group index per client (numbered by first member), by average-linkage clustering.

    ``num_groups`` (at most the number of clients) overrides ``threshold``.
    """
    k = distances.shape[0]
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    if num_groups is not None and num_groups >= k:
        return np.arange(k, dtype=np.int64)
    from sklearn.cluster import AgglomerativeClustering

    clustering = AgglomerativeClustering(
        n_clusters=num_groups,
        distance_threshold=None if num_groups is not None else threshold,
        metric="precomputed",
        linkage="average",
    )
    raw = clustering.fit_predict(distances)
    # scikit-learn's numbering is arbitrary: renumber by first member so records are stable.
    order = {g: i for i, g in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[g] for g in raw], dtype=np.int64)


def pick_reliable(
    labels: np.ndarray, weights: np.ndarray, rule: str = "closest-to-mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Per example, one member's label and which member (``rule``: see the module docstring).

    ``labels`` are one group's ``M x N x C`` labels, ``weights`` its members'
    weights; ties go to the first member.
    """
    if rule == "lowest-entropy":
        chosen = _entropy_bits(labels).argmin(axis=0)
        return labels[chosen, np.arange(labels.shape[1])], chosen
    mean = np.tensordot(weights / weights.sum(), labels, axes=1)  # N x C
    chosen = js_divergence(labels, mean[None]).argmin(axis=0)  # N
    return labels[chosen, np.arange(labels.shape[1])], chosen


@dataclass(frozen=True)
class Consensus:
    """The combined soft labels of a round and how they were obtained.

    ``groups`` is each client's group; ``picks`` the client index (into the
    round's clients) whose label each group used per example (``N x G``);
    ``group_weights`` the groups' shares before any per-example confidence;
    ``distances`` the clients' pairwise divergences (zeros without grouping).
    """

    probs: np.ndarray
    groups: np.ndarray
    picks: np.ndarray
    group_weights: np.ndarray
    distances: np.ndarray


def soft_label_consensus(
    labels: np.ndarray,
    num_examples: Sequence[int],
    grouping: str = "similarity",
    threshold: float = 0.1,
    num_groups: int | None = None,
    group_weight: str = "examples",
    pick: str = "closest-to-mean",
    calibrate: bool = False,
) -> Consensus:
    """The round's consensus from ``K x N x C`` client labels (see the module docstring)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {GROUPINGS}")
    if group_weight not in GROUP_WEIGHTS:
        raise ValueError(f"unknown group weight {group_weight!r}; choose one of {GROUP_WEIGHTS}")
    labels = np.asarray(labels, dtype=np.float64)
    sizes = np.asarray(num_examples, dtype=np.float64)
    k, n, _ = labels.shape
    if grouping == "none":  # every client its own group: the weighted mean of all labels
        distances, groups = np.zeros((k, k)), np.arange(k, dtype=np.int64)
    else:
        distances = pairwise_divergence(labels)
        groups = group_clients(distances, threshold, num_groups)
    count = int(groups.max()) + 1
    picked, picks, weights = [], np.zeros((n, count), dtype=np.int64), np.zeros(count)
    for g in range(count):
        members = np.flatnonzero(groups == g)
        label, chosen = pick_reliable(labels[members], sizes[members], pick)
        picked.append(label)
        picks[:, g] = members[chosen]
        weights[g] = sizes[members].sum() if group_weight == "examples" else 1.0
    weights /= weights.sum()
    stacked = np.stack(picked)  # G x N x C
    if calibrate:
        stacked = stacked / np.clip(stacked.mean(axis=1, keepdims=True), _EPS, None)
        stacked /= stacked.sum(axis=-1, keepdims=True)
    if group_weight == "confidence":
        sizes_g = np.array([sizes[groups == g].sum() for g in range(count)])
        conf = 1.0 - _entropy_bits(stacked) / np.log2(stacked.shape[-1])  # G x N
        w = sizes_g[:, None] * conf + _EPS
        probs = (w[..., None] * stacked).sum(0) / w.sum(0)[:, None]
    else:
        probs = np.tensordot(weights, stacked, axes=1)
    probs /= probs.sum(axis=1, keepdims=True)
    return Consensus(probs, groups, picks, weights, distances)
