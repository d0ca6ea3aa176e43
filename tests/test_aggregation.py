"""FedAvg against an independent weighted average."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.records import ClientResult
from components.core.state import add, subtract
from components.federation.weights.strategy import FedAvg, build_strategy


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 2, generator=g), "b": torch.randn(2, generator=g)}


def result(cid: str, n: int, global_state, local_state, server_round: int = 1) -> ClientResult:
    return ClientResult(cid, server_round, n, subtract(local_state, global_state))


def test_fedavg_of_identical_states_returns_that_state():
    # Prepare
    g, local = state(0), state(1)
    results = [result(f"c{i}", n, g, local) for i, n in enumerate([5, 50, 500])]
    # Execute
    applied = FedAvg().aggregate_fit(1, g, results)
    new, _ = applied.state, applied.updates
    # Assert
    torch.testing.assert_close(new["w"], local["w"])
    torch.testing.assert_close(new["b"], local["b"])


def test_fedavg_weights_by_num_examples():
    # Prepare
    g = state(0)
    locals_ = [state(i) for i in (1, 2, 3)]
    sizes = [100, 300, 600]
    results = [result(f"c{i}", n, g, s) for i, (n, s) in enumerate(zip(sizes, locals_))]
    # Execute
    applied = FedAvg().aggregate_fit(1, g, results)
    new, updates = applied.state, applied.updates
    # Assert: the new model is the example-weighted average of the local models
    expected = np.average(np.stack([s["w"].numpy() for s in locals_]), axis=0, weights=sizes)
    np.testing.assert_allclose(new["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert [u.weight for u in updates] == pytest.approx([0.1, 0.3, 0.6])
    # and the applied contributions add up to the step that was taken
    step = updates[0].contribution()
    for u in updates[1:]:
        step = add(step, u.contribution())
    torch.testing.assert_close(add(g, step)["w"], new["w"])


def test_client_selection_is_seeded_and_sized():
    ids = [f"c{i}" for i in range(10)]
    strategy = FedAvg(clients_per_round=4)
    a = strategy.configure_fit(1, ids, np.random.default_rng(5))
    b = strategy.configure_fit(1, ids, np.random.default_rng(5))
    assert a == b and len(a) == 4 and set(a) <= set(ids)
    assert FedAvg().configure_fit(1, ids, np.random.default_rng(0)) == ids


def test_fedavg_refuses_bad_rounds():
    g = state(0)
    with pytest.raises(ValueError, match="no client results"):
        FedAvg().aggregate_fit(1, g, [])
    twice = [result("c0", 1, g, state(1)), result("c0", 1, g, state(2))]
    with pytest.raises(ValueError, match="reported twice"):
        FedAvg().aggregate_fit(1, g, twice)
    with pytest.raises(ValueError, match="no client is available"):
        FedAvg().configure_fit(1, [], np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedprox")
