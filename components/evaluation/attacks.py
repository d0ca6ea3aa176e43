"""Attacks by malicious clients, for evaluating robust aggregation (never used in training).

Update attacks change what a client uploads:

``sign-flip``
    ``-delta`` (Damaskinos et al., 2018; the reverse-gradient attack).
``scaling``
    ``factor * delta``, model replacement (Bagdasaryan et al., 2020, "How to
    backdoor federated learning"); ``factor=10`` by default.
``gaussian``
    ``delta + N(0, std^2)`` on every floating entry (Blanchard et al., 2017).

Data attacks change what a client trains on:

``label-flip``
    ``y -> num_classes - 1 - y`` (Tolpegin et al., 2020).
``backdoor``
    A trigger patch on a fraction of the images, relabelled to a target class
    (:func:`components.unlearning.verify.poison`).

All are pure: inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from components.core.state import StateDict, add, scale
from components.data.datasets import Split
from components.unlearning.verify import poison


def sign_flip(delta: Mapping[str, torch.Tensor]) -> StateDict:
    """``-delta``."""
    return scale(delta, -1.0)


def scaling(delta: Mapping[str, torch.Tensor], factor: float = 10.0) -> StateDict:
    """``factor * delta`` (model replacement)."""
    return scale(delta, factor)


def gaussian(
    delta: Mapping[str, torch.Tensor], std: float = 1.0, generator: torch.Generator | None = None
) -> StateDict:
    """``delta`` plus ``N(0, std^2)`` noise on every floating entry."""
    noise = {
        k: (torch.randn(v.shape, dtype=torch.float64, generator=generator) * std).to(v.dtype)
        if v.is_floating_point()
        else torch.zeros_like(v)
        for k, v in delta.items()
    }
    return add(delta, noise)


def label_flip(split: Split, num_classes: int) -> Split:
    """The split with every label ``y`` replaced by ``num_classes - 1 - y``."""
    if len(split) and int(split.labels.max()) >= num_classes:
        raise ValueError(f"labels exceed num_classes={num_classes}")
    return Split(split.images.clone(), (num_classes - 1) - split.labels)


def backdoor(
    split: Split,
    fraction: float = 0.1,
    target_class: int = 0,
    trigger_size: int = 3,
    rng: np.random.Generator | None = None,
) -> Split:
    """The split with ``fraction`` of its images triggered and relabelled to ``target_class``."""
    poisoned, _ = poison(split, fraction, target_class, trigger_size, rng or np.random.default_rng(0))
    return poisoned


@dataclass(frozen=True)
class Attack:
    """A registered attack: what it targets and whether it draws random numbers."""

    name: str
    target: Literal["update", "data"]
    apply: Callable[..., Any]
    random: bool = False


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("sign-flip", "update", sign_flip),
        Attack("scaling", "update", scaling),
        Attack("gaussian", "update", gaussian, random=True),
        Attack("label-flip", "data", label_flip),
        Attack("backdoor", "data", backdoor, random=True),
    )
}


def _lookup(name: str, target: str) -> Attack:
    attack = ATTACKS.get(name)
    if attack is None or attack.target != target:
        known = sorted(n for n, a in ATTACKS.items() if a.target == target)
        raise ValueError(f"unknown {target} attack {name!r}; known: {known}")
    return attack


def apply_update_attack(
    name: str, delta: Mapping[str, torch.Tensor], generator: torch.Generator | None = None, **params: Any
) -> StateDict:
    """The delta a malicious client uploads instead of ``delta`` (``params``: the attack's settings)."""
    attack = _lookup(name, "update")
    if attack.random:
        params["generator"] = generator
    return attack.apply(delta, **params)


def apply_data_attack(name: str, split: Split, rng: np.random.Generator | None = None, **params: Any) -> Split:
    """The data a malicious client trains on instead of ``split`` (``params``: the attack's settings)."""
    attack = _lookup(name, "data")
    if attack.random:
        params["rng"] = rng
    return attack.apply(split, **params)
