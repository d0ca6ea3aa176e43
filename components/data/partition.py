"""Federated partitioning: Dirichlet label skew, few-shot server sets, client ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# --------------------------------------------------------------------------- partitioning


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split indices into ``num_clients`` label-skewed shards.

    For every class, the proportions of its examples given to each client are
    drawn from Dirichlet(alpha * 1_K) (Hsu et al., 2019); draws are repeated
    until every client holds at least ``min_size`` examples. Smaller ``alpha``
    means stronger skew. Returns sorted, disjoint index arrays covering
    ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    if num_clients < 2:
        raise ValueError(f"num_clients must be >= 2, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each")
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].append(part)
        merged = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(len(m) for m in merged) >= min_size:
            return merged
    raise ValueError(
        f"no Dirichlet({alpha}) draw gave every one of {num_clients} clients "
        f"{min_size} examples in {max_tries} tries; raise alpha or lower min_client_examples"
    )


def few_shot_indices(labels: np.ndarray, shots: int, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """Pick exactly ``shots`` indices of every class (sorted)."""
    labels = np.asarray(labels)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    picked = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} examples, fewer than {shots} shots")
        picked.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels), minlength=num_classes).astype(int).tolist()


def label_skew(labels: np.ndarray, shards: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each shard's and the overall label mix.

    0 means every shard has the overall label distribution; values near 1 mean
    shards hold mostly classes that are rare overall.
    """
    labels = np.asarray(labels)
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for shard in shards:
        mix = np.bincount(labels[shard], minlength=num_classes) / max(len(shard), 1)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def client_ids(num_clients: int) -> list[str]:
    """Stable client identifiers: ``client_00``, ``client_01``, ..."""
    width = max(2, len(str(num_clients - 1)))
    return [f"client_{i:0{width}d}" for i in range(num_clients)]
