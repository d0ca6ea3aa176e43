"""The credit strategy: random groups per round, suspicion scores, dynamic exclusion, exact attribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core.records import ClientResult
from components.federation.protocol import protocol_from_record
from components.federation.weights.credit import (
    CreditAggregation,
    draw_groups,
    dynamic_threshold,
    suspicion_scores,
)
from components.federation.weights.protocol import WeightAveraging
from components.federation.weights.strategy import FedAvg, build_strategy


def make_state(values) -> dict[str, torch.Tensor]:
    flat = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return {"w": flat[:6].reshape(2, 3).clone(), "b": flat[6:9].clone()}


def flat(state) -> np.ndarray:
    return np.concatenate([state["w"].double().numpy().reshape(-1), state["b"].double().numpy()])


def results_of(vectors, sizes=None, server_round: int = 1) -> list[ClientResult]:
    sizes = sizes or [10] * len(vectors)
    return [ClientResult(f"c{i:02d}", server_round, n, make_state(v)) for i, (v, n) in enumerate(zip(vectors, sizes))]


def attribution_gap(global_state, applied) -> float:
    gap = 0.0
    for key, g in global_state.items():
        moved = applied.state[key].double() - g.double()
        total = sum(u.weight * u.delta[key].double() for u in applied.updates)
        gap = max(gap, float((moved - total).abs().max()))
    return gap


GLOBAL = make_state(np.linspace(-1, 1, 9))
IDS = [f"c{i:02d}" for i in range(12)]


def test_groups_are_redrawn_every_round_and_reproducible_by_seed():
    # Execute
    by_round = [draw_groups(IDS, 3, seed=7, server_round=r) for r in (1, 2, 3)]
    # Assert: a partition into 3 near-equal groups, new each round, the same again for the same seed
    for groups in by_round:
        assert len(groups) == 3 and sorted(c for g in groups for c in g) == IDS
        assert {len(g) for g in groups} == {4}
    assert by_round[0] != by_round[1] != by_round[2]
    assert draw_groups(IDS, 3, seed=7, server_round=2) == by_round[1]
    assert draw_groups(list(reversed(IDS)), 3, seed=7, server_round=2) == by_round[1]  # order of arrival is irrelevant
    assert draw_groups(IDS, 3, seed=8, server_round=2) != by_round[1]
    # the strategy records the same groups
    applied = CreditAggregation(num_groups=3, seed=7).aggregate_fit(2, GLOBAL, results_of(np.eye(12, 9) + 1))
    assert applied.record["groups"] == by_round[1]


def test_fewer_clients_than_groups_gives_one_client_per_group():
    assert sorted(map(len, draw_groups(["a", "b"], 4, 0, 1))) == [1, 1]
    with pytest.raises(ValueError, match="num_groups"):
        CreditAggregation(num_groups=1)


def test_scores_and_threshold_match_an_independent_computation():
    # Prepare
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5, 9))
    # Execute
    scores = suspicion_scores([make_state(v) for v in vectors])
    threshold = dynamic_threshold(scores, 3.0, 0.01)
    # Assert: 1 - cosine to numpy's coordinate-wise median; median + 3 MAD
    median = np.median(vectors.astype(np.float32).astype(np.float64), axis=0)
    expected = [1 - v @ median / np.linalg.norm(v) / np.linalg.norm(median) for v in vectors.astype(np.float32)]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    mad = np.median(np.abs(np.array(expected) - np.median(expected)))
    assert threshold == pytest.approx(np.median(expected) + 3 * max(mad, 0.01), abs=1e-6)


def expected_credit(score: float, center: float, threshold: float) -> float:
    """The credit rule written out: min_credit against the centre, 1 up to the median, linear to the threshold."""
    if score >= 1:  # cosine <= 0: opposes the group's centre
        return 0.01
    return 1.0 if score <= center else min(1.0, max(0.01, (threshold - score) / (threshold - center)))


def test_weights_follow_credit_and_influence_and_an_outlier_is_excluded():
    # Prepare: one group (two groups of which one holds the outlier) of clients around mu
    rng = np.random.default_rng(2)
    mu = rng.normal(size=9)
    vectors = [mu + 0.05 * rng.normal(size=9) for _ in range(8)]
    vectors[3] = -mu  # the outlier
    sizes = [10, 20, 30, 40, 50, 60, 70, 80]
    strategy = CreditAggregation(num_groups=2, seed=3, norm_bound=0.0)  # the norm bound has its own test
    # Execute
    applied = strategy.aggregate_fit(1, GLOBAL, results_of(vectors, sizes))
    record = applied.record
    # Assert: the outlier is excluded and contributes nothing
    assert record["excluded"] == ["c03"]
    outlier = next(u for u in applied.updates if u.client_id == "c03")
    assert outlier.weight == 0.0 and np.abs(flat(outlier.contribution())).max() == 0.0
    # weights = (group's share of kept examples) x n_i c_i / sum_group n_j c_j, recomputed here
    size = dict(zip(IDS, sizes))
    kept_total = sum(n for c, n in size.items() if c != "c03")
    for group, threshold in zip(record["groups"], record["thresholds"]):
        kept = [c for c in group if c != "c03"]
        center = np.median([record["scores"][c] for c in group])  # credit relative to the whole group
        credit = {c: expected_credit(record["scores"][c], center, threshold) for c in kept}
        assert record["credits"] == pytest.approx({**record["credits"], **credit})
        assert min(credit.values()) < 1.0  # some kept client is damped, the typical half is not
        norm = sum(size[c] * credit[c] for c in kept)
        group_weight = sum(size[c] for c in kept) / kept_total
        for c in kept:
            assert record["weights"][c] == pytest.approx(group_weight * size[c] * credit[c] / norm, rel=1e-9)
    assert sum(record["weights"].values()) == pytest.approx(1.0)
    assert all(not u.modified for u in applied.updates)  # the uploads are applied as sent, scaled by weight
    assert attribution_gap(GLOBAL, applied) < 1e-6
    assert len(record["thresholds"]) == 2
    json.dumps(record)  # goes into the manifest


def test_a_scaled_upload_enters_with_its_norm_bounded_by_the_rounds_median():
    # Prepare: 7 honest clients around mu, 3 that upload 10x an honest update (model replacement)
    rng = np.random.default_rng(4)
    mu = rng.normal(size=9)
    honest = [mu + 0.3 * rng.normal(size=9) for _ in range(10)]
    vectors = [v * (10.0 if i >= 7 else 1.0) for i, v in enumerate(honest)]
    results = results_of(vectors)
    # Execute
    applied = CreditAggregation(num_groups=2, seed=1).aggregate_fit(1, GLOBAL, results)
    unbounded = CreditAggregation(num_groups=2, seed=1, norm_bound=0.0).aggregate_fit(1, GLOBAL, results)
    record = applied.record
    # Assert: the bound is the median norm (numpy), every contribution's norm is at most weight x bound
    norms = [np.linalg.norm(np.asarray(v, dtype=np.float32)) for v in vectors]
    assert record["norm_bound"] == pytest.approx(np.median(norms), rel=1e-5)
    for u, n in zip(applied.updates, norms):
        assert record["norm_factors"][u.client_id] == pytest.approx(min(1.0, np.median(norms) / n), rel=1e-5)
        unbounded_weight = u.weight / record["norm_factors"][u.client_id]
        assert np.linalg.norm(flat(u.contribution())) <= unbounded_weight * record["norm_bound"] * (1 + 1e-5)
    assert attribution_gap(GLOBAL, applied) < 1e-6
    # the step stays near the honest mean; without the bound the scaled uploads blow it up
    honest_mean = np.mean(honest, axis=0)
    step = flat(applied.state) - flat(GLOBAL)
    assert np.linalg.norm(step - honest_mean) < 0.5 * np.linalg.norm(honest_mean)
    assert np.linalg.norm(flat(unbounded.state) - flat(GLOBAL) - honest_mean) > 2 * np.linalg.norm(honest_mean)
    with pytest.raises(ValueError, match="norm_bound"):
        CreditAggregation(norm_bound=-1.0)


def test_with_30_percent_sign_flipped_clients_credit_stays_close_to_the_honest_mean():
    # Prepare: 14 honest clients, 6 sign-flipped; every group of the seed keeps an honest majority
    rng = np.random.default_rng(0)
    mu = rng.normal(size=9)
    honest = [mu + 0.1 * rng.normal(size=9) for _ in range(14)]
    attackers = [-(mu + 0.1 * rng.normal(size=9)) for _ in range(6)]
    results = results_of(honest + attackers)
    groups = draw_groups([r.client_id for r in results], 2, seed=0, server_round=1)
    assert all(sum(c >= "c14" for c in g) < len(g) / 2 for g in groups)  # the precondition, not luck
    # Execute
    applied = CreditAggregation(num_groups=2, seed=0).aggregate_fit(1, GLOBAL, results)
    plain = FedAvg().aggregate_fit(1, GLOBAL, results)
    # Assert
    honest_mean = np.mean(honest, axis=0)
    error = np.linalg.norm(flat(applied.state) - flat(GLOBAL) - honest_mean)
    assert applied.record["excluded"] == [f"c{i:02d}" for i in range(14, 20)]
    assert error < 0.1 * np.linalg.norm(mu)
    assert np.linalg.norm(flat(plain.state) - flat(GLOBAL) - honest_mean) > 0.5 * np.linalg.norm(mu)


def test_describe_rebuilds_the_strategy():
    strategy = CreditAggregation(
        num_groups=3, mad_factor=2.5, min_mad=0.02, min_credit=0.1, seed=9, clients_per_round=6
    )
    record = strategy.describe()
    assert record == {"name": "credit", "clients_per_round": 6, "num_groups": 3, "mad_factor": 2.5,
                      "min_mad": 0.02, "min_credit": 0.1, "norm_bound": 1.0, "seed": 9}  # fmt: skip
    assert build_strategy(**record).describe() == record
    assert protocol_from_record(WeightAveraging(strategy).describe()).strategy.describe() == record


states = st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]), min_size=9, max_size=9)


@settings(max_examples=40, deadline=None, database=None)
@given(
    vectors=st.lists(states, min_size=1, max_size=8),
    sizes=st.lists(st.integers(1, 50), min_size=8, max_size=8),
    num_groups=st.integers(2, 4),
    server_round=st.integers(1, 5),
)
def test_attribution_is_exact_and_every_group_keeps_a_client(vectors, sizes, num_groups, server_round):
    # Prepare
    results = results_of(vectors, sizes[: len(vectors)], server_round)
    # Execute
    applied = CreditAggregation(num_groups=num_groups).aggregate_fit(server_round, GLOBAL, results)
    # Assert
    assert attribution_gap(GLOBAL, applied) < 1e-6
    weights = applied.record["weights"]
    assert sum(weights.values()) <= 1.0 + 1e-9  # 1 less what the norm bound took off
    plain = CreditAggregation(num_groups=num_groups, norm_bound=0.0).aggregate_fit(server_round, GLOBAL, results)
    assert sum(plain.record["weights"].values()) == pytest.approx(1.0)
    for group in applied.record["groups"]:
        assert any(weights[c] > 0 for c in group)
    for u in applied.updates:
        assert (u.weight == 0.0) == (u.client_id in applied.record["excluded"])
