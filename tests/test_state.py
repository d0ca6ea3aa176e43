"""State-dict arithmetic: results against numpy, inputs never mutated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core import state as S


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "steps": torch.tensor(seed * 10, dtype=torch.int64),
    }


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "op",
    [
        lambda a, b: S.add(a, b),
        lambda a, b: S.subtract(a, b),
        lambda a, b: S.scale(a, 0.3),
        lambda a, b: S.weighted_sum([a, b], [0.2, 0.5]),
        lambda a, b: S.weighted_average([a, b], [3, 1]),
        lambda a, b: S.clone_state(a),
        lambda a, b: S.zeros_like(a),
    ],
)
def test_operations_never_mutate_their_inputs(op):
    # Prepare
    a, b = make_state(1), make_state(2)
    a0, b0 = snapshot(a), snapshot(b)
    # Execute
    result = op(a, b)
    result["w"].add_(100.0)  # the result must not alias an input either
    # Assert
    assert_same(a, a0)
    assert_same(b, b0)


def test_weighted_average_matches_numpy():
    states = [make_state(i) for i in range(3)]
    weights = [10, 30, 60]
    result = S.weighted_average(states, weights)
    expected = np.average(np.stack([s["w"].numpy() for s in states]), axis=0, weights=weights)
    np.testing.assert_allclose(result["w"].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert result["w"].dtype == torch.float32
    # integer buffers are averaged and rounded back to their dtype
    assert result["steps"].dtype == torch.int64
    assert int(result["steps"]) == round(np.average([0, 10, 20], weights=weights))


def test_add_then_subtract_round_trips():
    a, b = make_state(1), make_state(2)
    back = S.subtract(S.add(a, b), b)
    torch.testing.assert_close(back["w"], a["w"])


def test_mismatched_states_are_refused():
    a = make_state(1)
    with pytest.raises(ValueError, match="different keys"):
        S.add(a, {"w": a["w"]})
    with pytest.raises(ValueError, match="shape"):
        S.add(a, {**a, "w": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="positive sum"):
        S.weighted_average([a], [0])


def test_finite_checks():
    a = make_state(1)
    assert S.is_finite(a) and S.non_finite_keys(a) == []
    bad = {**a, "b": torch.tensor([1.0, float("nan"), 0.0])}
    assert not S.is_finite(bad)
    assert S.non_finite_keys(bad) == ["b"]


def test_norms_match_numpy():
    a, b = make_state(1), make_state(2)
    flat = np.concatenate([(a[k] - b[k]).numpy().ravel() for k in ("w", "b")])
    assert S.l2_distance(a, b) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-6)
    assert S.max_abs_difference(a, a) == 0.0
