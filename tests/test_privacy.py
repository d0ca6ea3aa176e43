"""Clipping, server-side and local DP noise, and the privacy accountant against Opacus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core.records import ClientResult
from components.core.state import add, l2_norm
from components.data.datasets import Split
from components.data.staging import stage_splits
from components.federation.protocol import protocol_from_record
from components.federation.rounds import Federation, run_round, serial_map
from components.federation.weights.credit import CreditAggregation
from components.federation.weights.privacy import DPServerSide, PrivacyAccountant, clip_delta, perturb_locally
from components.federation.weights.protocol import WeightAveraging
from components.federation.weights.robust import FedMedian, MultiKrum
from components.federation.weights.strategy import FedAvg, build_strategy
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore
from components.models.students import ModelSpec, init_model
from components.unlearning.forget import forget_client


def attribution_gap(global_state, applied) -> float:
    gap = 0.0
    for key, g in global_state.items():
        moved = applied.state[key].double() - g.double()
        total = sum(u.weight * u.delta[key].double() for u in applied.updates)
        if applied.residual is not None:
            total = total + applied.residual[key].double()
        gap = max(gap, float((moved - total).abs().max()))
    return gap


def test_clip_delta_bounds_the_norm_and_leaves_small_deltas_and_integer_buffers_alone():
    # Prepare
    delta = {"w": torch.full((3, 4), 2.0), "b": torch.ones(4), "n": torch.tensor(7)}
    before = {k: v.clone() for k, v in delta.items()}
    norm = float(np.sqrt(12 * 4 + 4))
    # Execute
    clipped, factor = clip_delta(delta, 1.5)
    same, one = clip_delta(delta, 100.0)
    # Assert
    assert factor == pytest.approx(1.5 / norm) and l2_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    torch.testing.assert_close(clipped["w"], before["w"] * factor)
    assert clipped["n"].item() == 7  # not part of the norm, not scaled
    assert one == 1.0 and all(torch.equal(same[k], before[k]) for k in before)
    assert all(torch.equal(delta[k], before[k]) for k in before)  # input untouched


def test_server_noise_has_the_right_std_and_is_the_round_residual():
    # Prepare: four clients, two of them over the clipping norm
    g = torch.Generator().manual_seed(0)
    global_state = {"w": torch.zeros(200, 200)}
    scales = [0.001, 0.002, 1.0, 2.0]
    results = [
        ClientResult(f"c{i}", 1, 10, {"w": torch.randn(200, 200, generator=g) * s}) for i, s in enumerate(scales)
    ]
    strategy = DPServerSide(FedAvg(), noise_multiplier=1.2, clipping_norm=0.5, seed=11)
    # Execute
    applied = strategy.aggregate_fit(1, global_state, results)
    # Assert: N(0, (sigma C / n)^2) per coordinate, attributed to no client
    noise = applied.residual["w"].double()
    expected_std = 1.2 * 0.5 / 4
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.02)  # sample std's error is ~0.4% here
    assert abs(float(noise.mean())) < 4 * expected_std / 200
    assert applied.record["dp"]["noise_std"] == pytest.approx(expected_std)
    assert applied.record["dp"]["clipped"] == ["c2", "c3"]
    assert [u.modified for u in applied.updates] == [False, False, True, True]
    assert all(l2_norm(u.delta) <= 0.5 * (1 + 1e-6) for u in applied.updates)
    assert attribution_gap(global_state, applied) < 1e-6
    # the same seed and round draw the same noise; another round draws other noise
    again = strategy.aggregate_fit(1, global_state, results)
    other = strategy.aggregate_fit(2, global_state, [ClientResult(r.client_id, 2, 10, r.delta) for r in results])
    assert torch.equal(again.residual["w"], applied.residual["w"])
    assert not torch.equal(other.residual["w"], applied.residual["w"])


def test_describe_nests_the_inner_strategy_and_rebuilds_it():
    # Prepare
    strategy = DPServerSide(FedMedian(clients_per_round=2), noise_multiplier=0.7, clipping_norm=3.0, seed=4)
    # Execute
    record = strategy.describe()
    rebuilt = build_strategy(**record)
    # Assert
    assert record == {"name": "dp-server", "strategy": {"name": "median", "clients_per_round": 2},
                      "noise_multiplier": 0.7, "clipping_norm": 3.0, "seed": 4}  # fmt: skip
    assert isinstance(rebuilt, DPServerSide) and isinstance(rebuilt.strategy, FedMedian)
    assert rebuilt.describe() == record
    assert protocol_from_record(WeightAveraging(strategy).describe()).strategy.describe() == record
    # client sampling is the inner strategy's
    assert len(rebuilt.configure_fit(1, ["a", "b", "c", "d"], np.random.default_rng(0))) == 2


states = st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]), min_size=6, max_size=6)


@settings(max_examples=30, deadline=None, database=None)
@given(deltas=st.lists(states, min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_attribution_is_exact_under_clipping_and_noise(deltas, seed):
    # Prepare
    global_state = {"w": torch.linspace(-1, 1, 6).reshape(2, 3)}
    results = [ClientResult(f"c{i}", 1, 5 + i, {"w": torch.tensor(d).reshape(2, 3)}) for i, d in enumerate(deltas)]
    for inner in (FedAvg(), FedMedian(), MultiKrum(num_malicious=1), CreditAggregation()):
        # Execute
        applied = DPServerSide(inner, noise_multiplier=0.3, clipping_norm=1.0, seed=seed).aggregate_fit(
            1, global_state, results
        )
        # Assert
        assert attribution_gap(global_state, applied) < 1e-6, inner.name
        assert all(l2_norm(u.delta) <= 1.0 + 1e-6 or u.weight == 0 for u in applied.updates)


def test_local_perturbation_clips_then_adds_noise_of_std_sigma_c():
    # Prepare
    g = torch.Generator().manual_seed(1)
    delta = {"w": torch.randn(300, 300, generator=g) * 5}
    before = delta["w"].clone()
    # Execute
    clipped_only = perturb_locally(delta, clipping_norm=2.0, noise_multiplier=0.0, generator=g)
    noisy = perturb_locally(delta, clipping_norm=2.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(2))
    # Assert
    assert l2_norm(clipped_only) == pytest.approx(2.0, rel=1e-6)
    noise = noisy["w"].double() - clipped_only["w"].double()
    assert float(noise.std()) == pytest.approx(0.5 * 2.0, rel=0.02)
    assert torch.equal(delta["w"], before)


def test_the_accountant_matches_opacus():
    # Prepare
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    ours, theirs = PrivacyAccountant(), RDPAccountant()
    assert ours.epsilon(1e-5) == 0.0
    # Execute: 20 rounds at sigma 1.1, 10 of 100 clients per round
    for _ in range(20):
        ours.step(noise_multiplier=1.1, sample_rate=0.1)
        theirs.step(noise_multiplier=1.1, sample_rate=0.1)
    # Assert: the same number as Opacus' accountant and as its analysis functions directly
    orders = RDPAccountant.DEFAULT_ALPHAS
    direct, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=0.1, noise_multiplier=1.1, steps=20, orders=orders),
                                  delta=1e-5)  # fmt: skip
    assert ours.rounds == 20
    assert ours.epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-12)
    assert ours.epsilon(1e-5) == pytest.approx(direct, rel=1e-12)


def test_epsilon_grows_with_rounds_and_falls_with_sigma():
    def epsilon(sigma: float, rounds: int) -> float:
        accountant = PrivacyAccountant()
        for _ in range(rounds):
            accountant.step(sigma, 0.2)
        return accountant.epsilon(1e-5)

    assert epsilon(1.0, 5) < epsilon(1.0, 10) < epsilon(1.0, 40)
    assert epsilon(0.8, 10) > epsilon(1.5, 10) > epsilon(4.0, 10)
    with pytest.raises(ValueError):
        PrivacyAccountant().step(1.0, 0.0)


# --------------------------------------------------------------------------- through the round function

SPEC = ModelSpec("mlp", {"num_classes": 3, "image_size": 4, "hidden": 8})
TRAIN = TrainSettings(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0)


def test_forgetting_under_server_dp_is_exact_up_to_the_recorded_noise(tmp_path):
    # Prepare: two rounds of DP FedAvg with a clipping norm the updates exceed
    g = torch.Generator().manual_seed(0)
    data = {f"c{i}": Split(torch.randint(0, 256, (24, 4, 4), dtype=torch.uint8, generator=g),
                           torch.randint(0, 3, (24,), generator=g)) for i in range(3)}  # fmt: skip
    store = LocalStore(tmp_path)
    history = UpdateHistory(store)
    state = init_model(SPEC, seed=1).state_dict()
    initial = {k: v.clone() for k, v in state.items()}
    head = history.write_initial("fed-dp", state, SPEC, 1)
    federation = Federation("fed-dp", history, store.url, SPEC, TRAIN, 5, "v1", stage_splits(store, data, "v1"))
    protocol = WeightAveraging(DPServerSide(FedAvg(), noise_multiplier=0.5, clipping_norm=0.05, seed=2))
    rng, residuals = np.random.default_rng(0), []
    for _ in range(2):
        last = run_round(protocol, federation, head, state, None, sorted(data), rng, serial_map)
        head, state = last.head, last.state
        residuals.append(history.read_state(last.manifest.residual))
    manifest = last.manifest
    assert manifest.extra["dp"]["clipped"] == ["c0", "c1", "c2"]
    assert protocol_from_record(manifest.protocol).describe() == protocol.describe()
    sums = {cid: history.read_state(ref) for cid, ref in manifest.sums.items()}
    # Execute
    forgotten = forget_client(history, last.manifest_ref, manifest, "c1")
    # Assert: initial + the other clients' clipped contributions + the noise of both rounds
    expected = add(add(add(add(initial, sums["c0"]), sums["c2"]), residuals[0]), residuals[1])
    for key, value in forgotten.state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5)
