"""Flat-vector helpers shared by the robust, credit and private strategies.

Norms, cosines and distances between updates are taken over all floating point
entries of a state together; integer buffers (``num_batches_tracked``) carry no
direction and are left out or copied unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from components.core.records import ClientUpdate
from components.core.state import StateDict, add, weighted_sum


def flat_vector(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All floating point entries of ``state`` as one float64 vector (in key order)."""
    parts = [v.detach().double().reshape(-1) for v in state.values() if v.is_floating_point()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat vectors; 0.0 when either is zero."""
    norms = float(a.norm()) * float(b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


def scale_floating(state: Mapping[str, torch.Tensor], factor: float) -> StateDict:
    """``factor * state`` on floating point entries; integer buffers are copied unchanged."""
    return {
        k: (v.double() * float(factor)).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in state.items()
    }


def apply_updates(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> StateDict:
    """``global + sum(weight * delta)``: the state moves by exactly what the updates report."""
    step = weighted_sum([u.delta for u in updates], [u.weight for u in updates])
    return add(global_state, step)
