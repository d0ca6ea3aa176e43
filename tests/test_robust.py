"""Robust rules (median, trimmed mean, Multi-Krum, FLTrust) against independent computations.

Every rule must report exactly what it applied: the sum of ``weight * delta``
over its updates is the model's step, ties and even counts included, so that
forgetting a client subtracts precisely its share.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core.records import ClientResult
from components.core.state import add
from components.data.datasets import Split
from components.data.staging import stage_splits
from components.federation.protocol import protocol_from_record
from components.federation.rounds import Federation, run_round, serial_map
from components.federation.weights.protocol import WeightAveraging, weight_protocol
from components.federation.weights.robust import FedMedian, FedTrimmedMean, FLTrust, MultiKrum, krum_scores
from components.federation.weights.strategy import FedAvg, build_strategy
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore
from components.models.students import ModelSpec, init_model
from components.unlearning.forget import forget_client

SHAPES = {"w": (2, 3), "b": (3,)}


def make_state(values: np.ndarray) -> dict[str, torch.Tensor]:
    flat = torch.as_tensor(np.asarray(values, dtype=np.float32))
    w, b = flat[:6].reshape(2, 3), flat[6:9]
    return {"w": w.clone(), "b": b.clone()}


def flat(state) -> np.ndarray:
    return np.concatenate([state[k].double().numpy().reshape(-1) for k in SHAPES])


def results_of(deltas, sizes=None, server_round: int = 1) -> list[ClientResult]:
    sizes = sizes or [10] * len(deltas)
    return [ClientResult(f"c{i}", server_round, n, d) for i, (d, n) in enumerate(zip(deltas, sizes))]


def attribution_gap(global_state, applied) -> float:
    """max |(new - global) - (sum of weight * delta + residual)|, all in float64."""
    gap = 0.0
    for key, g in global_state.items():
        moved = applied.state[key].double() - g.double()
        total = sum(u.weight * u.delta[key].double() for u in applied.updates)
        if applied.residual is not None:
            total = total + applied.residual[key].double()
        gap = max(gap, float((moved - total).abs().max()))
    return gap


def step_of(global_state, applied) -> np.ndarray:
    return flat(applied.state) - flat(global_state)


GLOBAL = make_state(np.linspace(-1, 1, 9))
TIED = [make_state(v) for v in ([1, 2, 2, 0, 0, 5, 1, 1, 1], [2, 2, 1, 0, 3, 5, 1, 1, 1],
                                [1, 0, 2, 0, 3, 5, 2, 1, 1], [2, 2, 2, 0, 0, 5, 2, 1, 1])]  # fmt: skip


@pytest.mark.parametrize("n", [3, 4])  # odd and even counts, with ties
def test_median_matches_numpy_and_its_shares_sum_to_it(n):
    # Prepare
    deltas = TIED[:n]
    # Execute
    applied = FedMedian().aggregate_fit(1, GLOBAL, results_of(deltas))
    # Assert: the step is numpy's median and the clients' shares add up to it
    expected = np.median(np.stack([flat(d) for d in deltas]), axis=0)
    np.testing.assert_allclose(step_of(GLOBAL, applied), expected, atol=1e-6)
    assert attribution_gap(GLOBAL, applied) < 1e-6
    assert all(u.weight == 1.0 and u.modified for u in applied.updates)
    # a share is the client's own delta masked by a factor in {0, 1/2, 1}
    for u, d in zip(applied.updates, deltas):
        ratio = flat(u.delta)[flat(d) != 0] / flat(d)[flat(d) != 0]
        assert set(np.round(ratio, 6)) <= {0.0, 0.5, 1.0}


@pytest.mark.parametrize(("n", "beta"), [(4, 0.25), (5, 0.2), (5, 0.0), (4, 0.1)])
def test_trimmed_mean_matches_an_independent_sort(n, beta):
    # Prepare
    deltas = [*TIED, make_state(np.arange(9) - 4.0)][:n]
    k = int(beta * n)
    # Execute
    applied = FedTrimmedMean(beta=beta).aggregate_fit(1, GLOBAL, results_of(deltas))
    # Assert
    ordered = np.sort(np.stack([flat(d) for d in deltas]), axis=0)
    expected = ordered[k : n - k].mean(axis=0)
    np.testing.assert_allclose(step_of(GLOBAL, applied), expected, atol=1e-6)
    assert attribution_gap(GLOBAL, applied) < 1e-6


def test_trimmed_mean_refuses_to_trim_everything():
    with pytest.raises(ValueError, match="beta"):
        FedTrimmedMean(beta=0.5)


def brute_force_krum(vectors: np.ndarray, f: int) -> np.ndarray:
    n = len(vectors)
    closest = min(n - 1, max(1, n - f - 2))
    scores = []
    for i in range(n):
        d = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[:closest]))
    return np.asarray(scores)


def test_multi_krum_matches_brute_force_and_excluded_clients_contribute_nothing():
    # Prepare: seven random clients, two of them far away
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(7, 9))
    vectors[[2, 5]] += 20.0
    deltas, sizes = [make_state(v) for v in vectors], [5, 10, 15, 20, 25, 30, 35]
    # Execute
    applied = MultiKrum(num_malicious=2, num_selected=3).aggregate_fit(1, GLOBAL, results_of(deltas, sizes))
    # Assert: scores and selection as a brute-force Krum
    scores = brute_force_krum(np.stack([flat(d) for d in deltas]), 2)
    np.testing.assert_allclose(krum_scores(deltas, 2), scores, rtol=1e-6)
    selected = sorted(np.argsort(scores, kind="stable")[:3])
    assert applied.record["selected"] == [f"c{i}" for i in selected]
    assert set(applied.record["excluded"]).isdisjoint(applied.record["selected"])
    total = sum(sizes[i] for i in selected)
    expected = sum(sizes[i] / total * flat(deltas[i]) for i in selected)
    np.testing.assert_allclose(step_of(GLOBAL, applied), expected, atol=1e-6)
    for i, u in enumerate(applied.updates):
        assert u.weight == (pytest.approx(sizes[i] / total) if i in selected else 0.0)
        if i not in selected:
            assert np.abs(flat(u.contribution())).max() == 0.0
    assert attribution_gap(GLOBAL, applied) < 1e-6
    json.dumps(applied.record)  # goes into the manifest


def test_fltrust_matches_the_paper_formula():
    # Prepare: a server update g0 and three clients, one pointing away from it
    rng = np.random.default_rng(5)
    g0 = rng.normal(size=9)
    vectors = [g0 * 3 + rng.normal(size=9) * 0.5, g0 * 0.5 + rng.normal(size=9), -g0]
    deltas = [make_state(v) for v in vectors]
    server = make_state(g0)
    # Execute
    applied = FLTrust(server_update=lambda state: server).aggregate_fit(1, GLOBAL, results_of(deltas))
    # Assert: ts = relu(cos), deltas rescaled to ||g0||, weights ts / sum ts
    g0 = flat(server)
    vs = [flat(d) for d in deltas]
    ts = np.array([max(0.0, v @ g0 / np.linalg.norm(v) / np.linalg.norm(g0)) for v in vs])
    expected = sum(t / ts.sum() * v * np.linalg.norm(g0) / np.linalg.norm(v) for t, v in zip(ts, vs))
    np.testing.assert_allclose(step_of(GLOBAL, applied), expected, atol=1e-5)
    assert applied.updates[2].weight == 0.0 and applied.record["excluded"] == ["c2"]
    assert applied.updates[0].modified and np.linalg.norm(flat(applied.updates[0].delta)) == pytest.approx(
        np.linalg.norm(g0), rel=1e-6
    )
    assert attribution_gap(GLOBAL, applied) < 1e-6


def test_fltrust_rebuilt_from_its_record_cannot_aggregate_but_describes_itself():
    rebuilt = build_strategy(**FLTrust(server_update=lambda s: s, clients_per_round=3).describe())
    assert rebuilt.describe() == {"name": "fltrust", "clients_per_round": 3}
    with pytest.raises(ValueError, match="server_update"):
        rebuilt.aggregate_fit(1, GLOBAL, results_of(TIED[:2]))


@pytest.mark.parametrize(
    "strategy",
    [FedMedian(2), FedTrimmedMean(0.2, 4), MultiKrum(1, None, 5), MultiKrum(2, 3), FLTrust(None, 2)],
)
def test_describe_rebuilds_the_strategy(strategy):
    record = strategy.describe()
    assert build_strategy(**record).describe() == record
    assert protocol_from_record(WeightAveraging(strategy).describe()).strategy.describe() == record


def test_with_30_percent_sign_flipped_clients_robust_rules_stay_close_to_the_honest_mean():
    # Prepare: seven honest clients around mu, three that upload -delta
    rng = np.random.default_rng(0)
    mu = rng.normal(size=9)
    honest = [mu + 0.1 * rng.normal(size=9) for _ in range(7)]
    attackers = [-(mu + 0.1 * rng.normal(size=9)) for _ in range(3)]
    deltas = [make_state(v) for v in honest + attackers]
    honest_mean = np.mean(honest, axis=0)
    server = make_state(mu + 0.1 * rng.normal(size=9))
    strategies = {
        "median": FedMedian(),
        "trimmed-mean": FedTrimmedMean(beta=0.3),
        "krum": MultiKrum(num_malicious=3),
        "fltrust": FLTrust(server_update=lambda state: server),
    }
    # Execute
    errors = {
        name: np.linalg.norm(step_of(GLOBAL, s.aggregate_fit(1, GLOBAL, results_of(deltas))) - honest_mean)
        for name, s in {**strategies, "fedavg": FedAvg()}.items()
    }
    # Assert: robust rules within 15% of ||mu||, FedAvg pulled ~60% away
    scale = np.linalg.norm(mu)
    for name in strategies:
        assert errors[name] < 0.15 * scale, (name, errors)
    assert errors["fedavg"] > 0.5 * scale


states = st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]), min_size=9, max_size=9)


@settings(max_examples=40, deadline=None, database=None)
@given(
    deltas=st.lists(states, min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 50), min_size=6, max_size=6),
    server=states,
)
def test_attribution_is_exact_for_every_robust_rule(deltas, sizes, server):
    # Prepare: few distinct values, so ties are the rule, not the exception
    global_state = make_state(np.arange(9) * 0.25)
    results = results_of([make_state(np.array(d)) for d in deltas], sizes[: len(deltas)])
    for strategy in (
        FedMedian(),
        FedTrimmedMean(beta=0.25),
        MultiKrum(num_malicious=1),
        MultiKrum(num_malicious=0, num_selected=1),
        FLTrust(server_update=lambda state: make_state(np.array(server))),
    ):
        # Execute
        applied = strategy.aggregate_fit(1, global_state, results)
        # Assert
        assert attribution_gap(global_state, applied) < 1e-6, strategy.name
        assert [u.client_id for u in applied.updates] == [r.client_id for r in results]


# --------------------------------------------------------------------------- through the round function


SPEC = ModelSpec("mlp", {"num_classes": 3, "image_size": 4, "hidden": 8})
TRAIN = TrainSettings(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0)


def federate(protocol, store, rounds: int = 2):
    g = torch.Generator().manual_seed(0)
    data = {}
    for i in range(4):
        n = 16 + 8 * i
        data[f"c{i}"] = Split(torch.randint(0, 256, (n, 4, 4), dtype=torch.uint8, generator=g),
                              torch.randint(0, 3, (n,), generator=g))  # fmt: skip
    history = UpdateHistory(store)
    state = init_model(SPEC, seed=1).state_dict()
    initial = {k: v.clone() for k, v in state.items()}
    head = history.write_initial("fed-r", state, SPEC, 1)
    federation = Federation("fed-r", history, store.url, SPEC, TRAIN, 5, "v1", stage_splits(store, data, "v1"))
    rng, result = np.random.default_rng(0), None
    for _ in range(rounds):
        result = run_round(protocol, federation, head, state, None, sorted(data), rng, serial_map)
        head, state = result.head, result.state
    return history, initial, result


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_forgetting_under_a_masked_rule_removes_exactly_the_clients_shares(tmp_path, name):
    # Prepare: two rounds of the rule through the production round function
    settings_ = {"beta": 0.25} if name == "trimmed-mean" else {}
    history, initial, last = federate(weight_protocol(name, **settings_), LocalStore(tmp_path))
    manifest = last.manifest
    assert all(entry.upload is not None for entry in manifest.clients)  # applied shares archived beside uploads
    sums = {cid: history.read_state(ref) for cid, ref in manifest.sums.items()}
    # Execute
    forgotten = forget_client(history, last.manifest_ref, manifest, "c1")
    # Assert: the initial model plus everyone else's shares
    expected = initial
    for cid in ("c0", "c2", "c3"):
        expected = add(expected, sums[cid])
    for key, value in forgotten.state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5)
