"""Aggregating clients that trained different parameter sets, and the round's convergence record.

**The rule.** Each parameter group is averaged over the clients that trained
it, and only over them. With ``P_g`` the clients whose mode trains group
``g`` and ``n_i`` their example counts::

    w_i^g = n_i / sum_{j in P_g} n_j               (i in P_g; 0 otherwise)
    theta_g <- theta_g + sum_{i in P_g} w_i^g * delta_i^g

So the head (trained in every mode) is averaged over all clients, the
adapter and the unfrozen projection over the ``full`` and ``meta`` clients
only; a ``linear-probe`` client never dilutes a group it did not train, and
a group nobody trained stays as it was. ``meta`` deltas (a meta-gradient
step of the shared initialisation) and ``full`` deltas (plain SGD) are
averaged together: both move the one shared initialisation.

**The contribution record.** Client ``i`` contributed exactly
``c_i = (w_i^g * delta_i^g for every group g it trained, 0 elsewhere)``, and
``theta' = theta + sum_i c_i`` with no residual. The history archives each
``c_i`` as an applied update of weight 1 (the per-group weights are in the
round's record), and keeps the running sum ``S_i = sum_t c_i^t``, so
forgetting a client is ``theta_T - S_i`` in every mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from components.core.state import StateDict, add
from components.federation.fewshot.model import group_of
from components.federation.fewshot.modes import MODE_GROUPS, check_mode


@dataclass(frozen=True)
class MixedAggregate:
    """The new state, each client's applied contribution (all keys) and the per-group weights."""

    state: StateDict = field(repr=False)
    contributions: dict[str, StateDict] = field(repr=False)
    weights: dict[str, dict[str, float]]  # client -> group -> w_i^g


def group_weights(
    modes: Mapping[str, str], num_examples: Mapping[str, int], groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``w_i^g``: each client's share of the examples among the clients that trained group ``g``."""
    weights: dict[str, dict[str, float]] = {cid: {} for cid in modes}
    for group in groups:
        members = [cid for cid, mode in modes.items() if group in MODE_GROUPS[check_mode(mode)]]
        total = sum(num_examples[cid] for cid in members)
        if members and total <= 0:
            raise ValueError(f"group {group}: the clients that trained it reported no examples")
        for cid in members:
            weights[cid][group] = num_examples[cid] / total
    return weights


def aggregate_groups(
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    modes: Mapping[str, str],
    num_examples: Mapping[str, int],
) -> MixedAggregate:
    """Apply the rule of the module docstring to one round's deltas (each over its mode's keys)."""
    if not deltas:
        raise ValueError("no client deltas to aggregate")
    groups = sorted({group_of(k) for k in base})
    weights = group_weights({cid: modes[cid] for cid in deltas}, num_examples, groups)
    contributions: dict[str, StateDict] = {}
    for cid, delta in deltas.items():
        expected = {k for k in base if group_of(k) in weights[cid]}
        if set(delta) != expected:
            raise ValueError(f"client {cid} ({modes[cid]}) sent keys {sorted(set(delta) ^ expected)[:3]}... "
                             "that its mode does not train")  # fmt: skip
        contributions[cid] = {
            k: (delta[k].double() * weights[cid][group_of(k)]).to(v.dtype) if k in delta else torch.zeros_like(v)
            for k, v in base.items()
        }
    state = dict(base)
    for contribution in contributions.values():
        state = add(state, contribution)
    return MixedAggregate(state, contributions, weights)
