"""Few-shot federated fine-tuning: mixed-mode aggregation, torch.func meta steps, exact forgetting, convex rate.

Every check compares against an independent computation: numpy arithmetic
for the aggregation rule and the softmax-regression gradients, the archived
raw uploads for what a round applied, and a retrained federation for what
forgetting leaves after one round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from components.core.state import StateDict, add, subtract
from components.data.datasets import DIGIT_CLASSES, Split
from components.data.staging import stage_splits
from components.federation.fewshot.aggregation import aggregate_groups, group_weights
from components.federation.fewshot.convergence import fit_rate_constant, round_metrics, rounds_to_plateau
from components.federation.fewshot.model import GROUPS, group_of, initial_model, shared_backbone
from components.federation.fewshot.modes import LocalSettings, fomaml_step, local_train, loss_grad, reptile_step
from components.federation.fewshot.protocol import FewShotProtocol
from components.federation.protocol import UnlearningError, protocol_from_record
from components.federation.rounds import Federation, run_round, serial_map
from components.learning.train import TrainSettings, torch_threads
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore
from components.models.clip_backbone import TeacherSpec
from components.unlearning.forget import forget_client

TEACHER = TeacherSpec(preset="tiny")
MODES = {"c0": "linear-probe", "c1": "full", "c2": "meta", "c3": "meta"}
LOCAL = LocalSettings(steps=3, batch_size=8, meta_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # tiny ops: thread hand-offs on shared cores cost more than the work
        yield


@pytest.fixture(scope="module")
def tiny_start():
    backbone = shared_backbone(TEACHER)
    return initial_model(backbone, DIGIT_CLASSES, seed=0)


def shards(clients=MODES) -> dict[str, Split]:
    g = torch.Generator().manual_seed(0)
    return {
        cid: Split(torch.randint(0, 256, (12 + 4 * i, 8, 8), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (12 + 4 * i,), generator=g))
        for i, cid in enumerate(clients)
    }  # fmt: skip


def federate(tmp_path, start, rounds, exclude=(), name="fs"):
    spec, initial = start
    store = LocalStore(tmp_path / name)
    history = UpdateHistory(store)
    data = {c: s for c, s in shards().items() if c not in exclude}
    head = history.write_initial(name, initial, spec, 0)
    federation = Federation(name, history, store.url, spec, TrainSettings(), 5, "v1", stage_splits(store, data, "v1"))
    protocol = FewShotProtocol(TEACHER, LOCAL, MODES)
    state, results = initial, []
    for _ in range(rounds):
        result = run_round(protocol, federation, head, state, None, sorted(data), np.random.default_rng(0), serial_map)
        head, state = result.head, result.state
        results.append(result)
    return history, results


class Probe(nn.Module):
    """Softmax regression on fixed features: what a linear-probe client trains, with the identity as tower."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, classes, dtype=torch.float64)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


# --------------------------------------------------------------------------- the mixed-mode rule


def test_each_group_is_averaged_over_the_clients_that_trained_it():
    # Prepare: a base state and deltas over each mode's keys
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(3, 2, generator=g) for k in ("projection.weight", "adapter.fc.0.weight", "head.weight")}
    n = {"c0": 10, "c1": 20, "c2": 30}
    modes = {"c0": "linear-probe", "c1": "full", "c2": "meta"}
    deltas = {c: {k: torch.randn(3, 2, generator=g) for k in base if m != "linear-probe" or k.startswith("head")}
              for c, m in modes.items()}  # fmt: skip
    # Execute
    applied = aggregate_groups(base, deltas, modes, n)
    # Assert: the head over all three clients, adapter and projection over full + meta only (numpy)
    for key in base:
        members = ["c0", "c1", "c2"] if key.startswith("head") else ["c1", "c2"]
        total = sum(n[c] for c in members)
        expected = base[key].numpy() + sum(n[c] / total * deltas[c][key].numpy() for c in members)
        np.testing.assert_allclose(applied.state[key].numpy(), expected, rtol=1e-6)
    assert applied.weights["c0"] == {"head": 10 / 60}
    assert applied.weights["c1"] == {"adapter": 20 / 50, "head": 20 / 60, "projection": 20 / 50}
    # each contribution is weight * delta on the client's groups and zero elsewhere
    np.testing.assert_allclose(
        applied.contributions["c0"]["head.weight"], deltas["c0"]["head.weight"] * (10 / 60), rtol=1e-6
    )
    assert not applied.contributions["c0"]["adapter.fc.0.weight"].any()
    with pytest.raises(ValueError, match="does not train"):
        aggregate_groups(base, {"c0": deltas["c1"]}, {"c0": "linear-probe"}, n)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["linear-probe", "full", "meta"]), st.integers(1, 50)), min_size=1, max_size=6)
)
def test_the_contributions_add_up_to_the_step_and_group_weights_to_one(clients):
    modes = {f"c{i}": m for i, (m, _) in enumerate(clients)}
    n = {f"c{i}": k for i, (_, k) in enumerate(clients)}
    base = {f"{group}.w": torch.zeros(2) for group in GROUPS}
    deltas = {
        c: {k: torch.ones(2) for k in base if group_of(k) == "head" or m != "linear-probe"} for c, m in modes.items()
    }
    applied = aggregate_groups(base, deltas, modes, n)
    step = subtract(applied.state, base)
    total = {k: sum(c[k] for c in applied.contributions.values()) for k in base}
    for key in base:
        torch.testing.assert_close(step[key], total[key])
    for group in GROUPS:
        shares = [w[group] for w in group_weights(modes, n, GROUPS).values() if group in w]
        assert not shares or abs(sum(shares) - 1) < 1e-9


# --------------------------------------------------------------------------- meta steps (torch.func) by hand


def softmax_grad(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of the mean cross-entropy of ``softmax(X W^T + b)``, by hand."""
    Z = X @ W.T + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    G = (P - np.eye(W.shape[0])[y]) / len(y)
    return G.T @ X, G.sum(0)


def test_fomaml_and_reptile_steps_equal_hand_computed_steps():
    # Prepare: a softmax regression (3 features, 2 classes) and three batches
    g = torch.Generator().manual_seed(3)
    module = Probe(3, 2)
    params = {"head.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
              "head.bias": torch.randn(2, generator=g, dtype=torch.float64)}  # fmt: skip
    batches = [
        (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g)) for _ in range(3)
    ]
    alpha, beta = 0.3, 0.7
    grad = loss_grad(module, {})
    W, b = params["head.weight"].numpy(), params["head.bias"].numpy()
    (Xs, ys), (Xq, yq), (Xr, yr) = [(x.numpy(), y.numpy()) for x, y in batches]
    # Execute
    fomaml = fomaml_step(grad, params, batches[0], batches[1], inner_steps=2, inner_lr=alpha, meta_lr=beta)
    reptile = reptile_step(grad, params, batches, inner_lr=alpha, meta_lr=beta)
    # Assert: FOMAML adapts twice on the support set, then applies the query gradient at phi to theta
    pW, pb = W, b
    for _ in range(2):
        gW, gb = softmax_grad(pW, pb, Xs, ys)
        pW, pb = pW - alpha * gW, pb - alpha * gb
    gW, gb = softmax_grad(pW, pb, Xq, yq)
    np.testing.assert_allclose(fomaml["head.weight"].numpy(), W - beta * gW, rtol=1e-12)
    np.testing.assert_allclose(fomaml["head.bias"].numpy(), b - beta * gb, rtol=1e-12)
    # Reptile: SGD over the three batches to phi, then theta + beta * (phi - theta)
    pW, pb = W, b
    for X, y in ((Xs, ys), (Xq, yq), (Xr, yr)):
        gW, gb = softmax_grad(pW, pb, X, y)
        pW, pb = pW - alpha * gW, pb - alpha * gb
    np.testing.assert_allclose(reptile["head.weight"].numpy(), W + beta * (pW - W), rtol=1e-12)
    np.testing.assert_allclose(reptile["head.bias"].numpy(), b + beta * (pb - b), rtol=1e-12)


# --------------------------------------------------------------------------- rounds, forgetting, retraining


def test_a_round_applies_exactly_the_recorded_contributions(two_rounds, tiny_start):
    # Prepare + Execute: two rounds with one client per mode (two meta clients)
    history, results = two_rounds
    manifest, outcome = results[-1].manifest, results[-1].outcome
    # Assert: the manifest names the protocol, each mode's uploads and the meta clients' personal states
    assert manifest.protocol["name"] == "few-shot" and manifest.protocol["modes"] == MODES
    assert {c.client_id: set(c.objects) for c in manifest.clients} == {
        "c0": {"gradient"}, "c1": {"gradient"}, "c2": {"gradient", "personal"}, "c3": {"gradient", "personal"}}  # fmt: skip
    assert set(manifest.personal) == {"c2", "c3"}
    # the raw uploads hold exactly the keys each mode trains
    raw = {c.client_id: history.read_state(c.upload) for c in manifest.clients}
    assert {group_of(k) for k in raw["c0"]} == {"head"}
    assert {group_of(k) for k in raw["c1"]} == {group_of(k) for k in tiny_start[1]}
    # the new state is the base plus per-group example-weighted raw deltas (recomputed here)
    base = history.read_state(manifest.base)
    n = {c.client_id: c.num_examples for c in manifest.clients}
    for key, value in base.items():
        members = [c for c in raw if key in raw[c]]
        total = sum(n[c] for c in members)
        expected = value.double() + sum(n[c] / total * raw[c][key].double() for c in members)
        torch.testing.assert_close(outcome.state[key].double(), expected, rtol=0, atol=1e-6)
    # the convergence record: drift of c0 = its head delta minus the head's weighted mean
    record = manifest.extra["convergence"]
    mean_head = {k: sum(n[c] / sum(n.values()) * raw[c][k].double() for c in raw) for k in raw["c0"]}
    drift = sum(float((raw["c0"][k].double() - mean_head[k]).pow(2).sum()) for k in raw["c0"]) ** 0.5
    assert record["drift"]["c0"] == pytest.approx(drift, rel=1e-6)
    assert record["grad_dissimilarity"] >= 1.0 - 1e-9  # B^2 >= 1 by Jensen
    scalars = round_metrics(record)  # what the flow logs every round
    assert {"global_loss", "global_accuracy", "client_loss_mean", "client_accuracy_mean", "update_norm",
            "drift_mean", "grad_dissimilarity"} == set(scalars)  # fmt: skip
    assert all(np.isfinite(v) for v in scalars.values())


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_start):
    with torch_threads(1):
        return federate(tmp_path_factory.mktemp("fewshot"), tiny_start, rounds=2)


@pytest.mark.parametrize("client", sorted(MODES))
def test_forgetting_is_exact_in_every_mode(two_rounds, tiny_start, client):
    # Prepare: two rounds (one client per mode, two meta clients)
    history, results = two_rounds
    ref, manifest = results[-1].manifest_ref, results[-1].manifest
    initial = tiny_start[1]
    # Execute
    forgotten = forget_client(history, ref, manifest, client)
    # Assert: the initial model plus every other client's contributions, archived round by round
    expected = initial
    for result in results:
        for entry in result.manifest.clients:
            if entry.client_id != client:
                expected = add(expected, history.read_state(entry.update))
    for key, value in forgotten.state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5)
    # the deletion drops the client's personal state from the lineage
    _, unlearned = history.commit_unlearning(
        request_id=f"del-{client}", client_id=client, variant="subtract", source=ref, source_version="1",
        source_manifest=manifest, removed=forgotten.removed, forgotten_state=forgotten.state,
        final_state=forgotten.state, new_sums={}, round_scales={}, recovery={}, data_version="v1", metrics={},
    )  # fmt: skip
    assert client not in unlearned.personal and set(unlearned.personal) == {"c2", "c3"} - {client}
    with pytest.raises(UnlearningError, match="subtraction only"):
        forget_client(history, ref, manifest, client, variant="renormalise")


def test_after_one_round_forgetting_scales_retraining_by_the_remaining_share(tmp_path, tiny_start):
    # Prepare: one round with all clients; the same round retrained without c1 (clients' seeds depend on them only)
    history, results = federate(tmp_path, tiny_start, rounds=1)
    _, retrained = federate(tmp_path, tiny_start, rounds=1, exclude=["c1"], name="retrain")
    manifest = results[0].manifest
    # Execute
    forgotten = forget_client(history, results[0].manifest_ref, manifest, "c1").state
    # Assert: per group, forgotten - initial == (1 - w_c1) * (retrained - initial)
    initial = tiny_start[1]
    n = {c.client_id: c.num_examples for c in manifest.clients}
    for key, value in initial.items():
        members = ["c0", "c1", "c2", "c3"] if group_of(key) == "head" else ["c1", "c2", "c3"]
        share = 1 - n["c1"] / sum(n[c] for c in members)
        expected = value.double() + share * (retrained[0].state[key].double() - value.double())
        torch.testing.assert_close(forgotten[key].double(), expected, rtol=0, atol=1e-6)


def test_the_protocol_record_rebuilds_the_protocol():
    protocol = FewShotProtocol(TEACHER, LOCAL, MODES, default_mode="linear-probe", track_gradients=False)
    rebuilt = protocol_from_record(protocol.describe())
    assert isinstance(rebuilt, FewShotProtocol) and rebuilt.describe() == protocol.describe()
    assert rebuilt.mode_of("c2") == "meta" and rebuilt.mode_of("new") == "linear-probe"


# --------------------------------------------------------------------------- convergence on a convex problem


def test_federated_logistic_regression_stays_under_a_fitted_c_over_t_curve():
    """FedAvg (linear-probe mode, E=5 full-batch local steps) on an L2-regularised, strongly convex problem.

    With a decaying step ``eta_t = 2 / (t + 2)`` the suboptimality ``F(w_t) - F*``
    of heterogeneous clients (shifted feature means) decreases and stays under
    ``C / t`` with ``C`` fitted on the first quarter of the rounds (the rate of
    Li et al., 2020, "On the convergence of FedAvg on non-IID data").
    """
    # Prepare: four clients with shifted features, labels from one logistic model; F* by L-BFGS
    g = torch.Generator().manual_seed(0)
    d, mu, rounds = 5, 0.1, 40
    w_true = torch.randn(2, d, generator=g, dtype=torch.float64)
    data = {}
    for i in range(4):
        x = torch.randn(40 + 20 * i, d, generator=g, dtype=torch.float64) + 1.5 * torch.randn(
            d, generator=g, dtype=torch.float64
        )
        data[f"c{i}"] = (x, torch.multinomial(F.softmax(x @ w_true.t(), 1), 1, generator=g).squeeze(1))
    total = sum(len(y) for _, y in data.values())

    def objective(state: StateDict) -> torch.Tensor:
        W, b = state["head.weight"], state["head.bias"]
        loss = sum(F.cross_entropy(x @ W.t() + b, y, reduction="sum") for x, y in data.values()) / total
        return loss + 0.5 * mu * (W.pow(2).sum() + b.pow(2).sum())

    optimum = {"head.weight": torch.zeros(2, d, dtype=torch.float64, requires_grad=True),
               "head.bias": torch.zeros(2, dtype=torch.float64, requires_grad=True)}  # fmt: skip
    lbfgs = torch.optim.LBFGS(list(optimum.values()), max_iter=500, tolerance_grad=1e-14,
                              tolerance_change=1e-16, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        lbfgs.zero_grad()
        value = objective(optimum)
        value.backward()
        return value

    lbfgs.step(closure)
    best = float(objective(optimum).detach())
    model = Probe(d, 2)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    modes, n = dict.fromkeys(data, "linear-probe"), {c: len(y) for c, (_, y) in data.items()}
    # Execute: rounds of local full-batch steps (the linear-probe code path) and the mixed-mode rule
    gaps = []
    for t in range(1, rounds + 1):
        local = LocalSettings(steps=5, batch_size=10**6, lr=2.0 / (t + 2), weight_decay=mu)
        deltas = {}
        for c, (x, y) in data.items():
            trained = local_train("linear-probe", model, state, x, y, local, torch.Generator().manual_seed(t))
            deltas[c] = {k: v - state[k] for k, v in trained.params.items()}
        state = aggregate_groups(state, deltas, modes, n).state
        gaps.append(float(objective(state)) - best)
    # Assert: positive, decreasing, and under C / t after the fit window
    gaps_array, ts = np.array(gaps), np.arange(1, rounds + 1)
    quarter = rounds // 4
    constant = fit_rate_constant(gaps_array[:quarter], ts[:quarter])
    assert gaps_array.min() > 0 and np.all(np.diff(gaps_array) <= 1e-12)
    assert np.all(gaps_array[quarter:] <= constant / ts[quarter:])
    assert gaps_array[-1] < gaps_array[0] / 100


def test_rounds_to_plateau_is_the_first_round_near_the_best():
    assert rounds_to_plateau([0.2, 0.5, 0.795, 0.8, 0.7], tolerance=0.01) == 3
    assert rounds_to_plateau([float("nan"), float("nan")]) is None


def test_device_profiles_assign_modes_by_group_then_round_robin_then_default():
    from components.federation.fewshot.devices import assign_devices

    devices = {"weak": {"mode": "linear-probe"}, "strong": {"mode": "full"}}
    ids = ["client_00", "client_01", "client_02", "client_03"]
    groups = [{"clients": ["client_03"], "device": "weak"}]
    round_robin = assign_devices(devices, groups, "round-robin", ids, "meta")
    assert {c: (d.device, d.mode) for c, d in round_robin.items()} == {
        "client_00": ("weak", "linear-probe"), "client_01": ("strong", "full"),
        "client_02": ("weak", "linear-probe"), "client_03": ("weak", "linear-probe"),
    }  # fmt: skip
    by_groups = assign_devices(devices, groups, "groups", ids, "meta")
    assert by_groups["client_03"].mode == "linear-probe"
    assert {by_groups[c].device for c in ids[:3]} == {"default"} and by_groups["client_00"].mode == "meta"
    with pytest.raises(ValueError, match="needs a mode"):
        assign_devices({"weak": {}}, [], "round-robin", ids, "full")
