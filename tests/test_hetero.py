"""Heterogeneous client models: profiles, ensemble distillation and a shared base, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import components.models.heads  # noqa: F401  (registers cnn-mlp-head)
from components.core.state import add, subtract
from components.data.datasets import Split, load_digits_dataset
from components.data.staging import stage_splits
from components.federation.hetero.common import HeteroForgetResult, initial_state, stage_images, stage_split, unpack
from components.federation.hetero.ensemble import AVERAGE, EnsembleDistillation, EnsembleSettings
from components.federation.hetero.profiles import Budget, ClientProfiles
from components.federation.hetero.shared_base import SharedBase, SharedBaseSettings, personalised_model
from components.federation.protocol import UnlearningError, protocol_from_record
from components.federation.rounds import Federation, run_round, serial_map
from components.learning.train import TrainSettings, torch_threads
from components.lineage.history import UpdateHistory, verify_manifest
from components.lineage.store import LocalStore
from components.models.students import ModelSpec, init_model
from components.unlearning.forget import forget_client
from components.unlearning.purge import stored_client_objects

DERIVED = {"num_classes": 10, "in_channels": 1, "image_size": 8}
TRAIN = TrainSettings(local_epochs=1, batch_size=16, lr=0.05)
RAW = load_digits_dataset()
SHARDS = {"c0": RAW.train.subset(range(0, 60)), "c1": RAW.train.subset(range(60, 160)),
          "c2": RAW.train.subset(range(160, 240))}  # fmt: skip
PUBLIC = RAW.train.images[300:380]
SERVER = RAW.train.subset(range(400, 460))
STUDENT = ModelSpec("mlp", {**DERIVED, "hidden": 24})
ENSEMBLE = ClientProfiles.from_params({
    "architectures": {"cnn-a": {"name": "cnn", "args": {"channels": [4, 8], "hidden": 16}},
                      "mlp-b": {"name": "mlp", "args": {"hidden": 16}, "local_epochs": 2}},
    "groups": [{"clients": ["c0", "c1"], "architecture": "cnn-a"}, {"clients": ["*"], "architecture": "mlp-b"}],
}).resolved(STUDENT)  # fmt: skip
BASE = {"channels": [4, 8], "hidden": 16}
SHARED = ClientProfiles.from_params({
    "architectures": {"linear": {"name": "cnn", "args": BASE},
                      "deep": {"name": "cnn-mlp-head", "args": {**BASE, "head_hidden": 8}}},
    "groups": [{"clients": ["c0"], "architecture": "deep"}, {"clients": ["*"], "architecture": "linear"}],
}).resolved(STUDENT)  # fmt: skip
GLOBAL = SHARED.spec_of("linear")


def federate(protocol, store, spec, rounds=2, clients=("c0", "c1", "c2")):
    history = UpdateHistory(store)
    state = init_model(spec, seed=1).state_dict()
    head = history.write_initial("fed-h", state, spec, 1)
    initial = {k: v.clone() for k, v in state.items()}
    staged = stage_splits(store, {c: SHARDS[c] for c in clients}, "v1")
    federation = Federation("fed-h", history, store.url, spec, TRAIN, 5, "v1", staged)
    server_state, rng, results = None, np.random.default_rng(0), []
    with torch_threads(1):
        for _ in range(rounds):
            result = run_round(protocol, federation, head, state, server_state, list(clients), rng, serial_map)
            results.append(result)
            head, state, server_state = result.head, result.state, result.outcome.server_state
    return history, initial, results


def close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=0, atol=atol)


def ensemble_protocol(store, fuse=True):
    settings = EnsembleSettings(epochs=1, forget_epochs=1, fuse_architectures=fuse)
    return EnsembleDistillation(ENSEMBLE, STUDENT, stage_images(store, PUBLIC, "v1"), settings, 3)


def shared_protocol(store, cls=SharedBase):
    settings = SharedBaseSettings(head_epochs=1, server_epochs=1, refit_epochs=1)
    return cls(SHARED, GLOBAL, stage_split(store, SERVER, "v1"), settings=settings, seed=3, train=TRAIN)


def test_profiles_match_groups_fill_in_budgets_sizes_and_round_trip():
    # Prepare
    section = {
        "architectures": {"small": {"name": "mlp", "args": {"hidden": 8}, "local_epochs": 1},
                          "wide": {"name": "mlp", "args": {"hidden": 64}, "time_cap_s": 5}},
        "groups": [{"clients": ["client_0[0-1]"], "architecture": "wide", "local_epochs": 3},
                   {"clients": "*", "architecture": "small"}],
    }  # fmt: skip
    # Execute
    profiles = ClientProfiles.from_params(section).resolved(STUDENT)
    rebuilt = ClientProfiles.from_record(profiles.describe())
    robin = ClientProfiles.from_params({**section, "groups": [], "assign": "round-robin"}, ["b", "a", "c"])
    # Assert
    assert profiles.profile("client_01").budget == Budget(local_epochs=3, time_cap_s=5.0)  # group over architecture
    assert profiles.profile("client_07").settings() == {"architecture": "small", "local_epochs": 1}
    assert profiles.spec_for("client_00") == ModelSpec("mlp", {**DERIVED, "hidden": 64})
    assert rebuilt == profiles and profiles.smallest() == "small"
    assert [robin.architecture_of(c) for c in ("a", "b", "c")] == ["small", "wide", "small"]
    assert profiles.client_records(["client_00"])["client_00"]["model"]["args"]["hidden"] == 64
    with pytest.raises(ValueError, match="names architecture"):
        ClientProfiles.from_params({**section, "groups": [{"clients": "*", "architecture": "huge"}]})
    with pytest.raises(ValueError, match="no client profile group"):
        ClientProfiles.from_params({**section, "groups": section["groups"][:1]}).profile("other")


def test_per_architecture_averages_are_the_example_weighted_means_of_the_uploads(tmp_path):
    # Prepare / Execute: one round, clients c0 and c1 train cnn-a, c2 trains mlp-b
    store = LocalStore(tmp_path)
    history, _, results = federate(ensemble_protocol(store), store, STUDENT, rounds=1)
    manifest = results[0].manifest
    # Assert: avg_a = theta_a^0 + sum_i n_i / n_a * delta_i, computed here with numpy
    for arch, members in (("cnn-a", ["c0", "c1"]), ("mlp-b", ["c2"])):
        start = initial_state(ENSEMBLE.spec_of(arch), 3, arch)
        total = sum(len(SHARDS[c]) for c in members)
        entries = {c.client_id: c for c in manifest.clients}
        expected = {k: v.numpy().astype(np.float64) for k, v in start.items()}
        for cid in members:
            delta = history.read_state(entries[cid].update)
            for key in expected:
                expected[key] = expected[key] + len(SHARDS[cid]) / total * delta[key].numpy().astype(np.float64)
            assert entries[cid].weight == pytest.approx(len(SHARDS[cid]) / total)
            assert entries[cid].spec == ENSEMBLE.spec_of(arch)  # the manifest records each client's model
        average = history.read_state(manifest.objects[f"{AVERAGE}{arch}"])
        for key, value in average.items():
            np.testing.assert_allclose(value.numpy(), expected[key], rtol=0, atol=1e-6)
    assert set(unpack(results[0].outcome.server_state)) == {"cnn-a", "mlp-b"}
    assert verify_manifest(store, manifest) == []


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """Two rounds of ensemble distillation through the production round function (shared: forgetting only reads)."""
    store = LocalStore(tmp_path_factory.mktemp("ensemble"))
    history, _, results = federate(ensemble_protocol(store), store, STUDENT)
    return history, results


def test_ensemble_distillation_forgets_exactly_from_its_architectures_average(ensemble_run):
    # Prepare
    history, results = ensemble_run
    ref, final = results[-1].manifest_ref, results[-1].manifest
    assert isinstance(protocol_from_record(final.protocol), EnsembleDistillation)
    averages = [
        {a: history.read_state(r.manifest.objects[f"{AVERAGE}{a}"]) for a in ("cnn-a", "mlp-b")} for r in results
    ]
    fused = [unpack(history.read_state(r.manifest.server_state)) for r in results]
    # Execute
    forgotten = forget_client(history, ref, final, "c0")
    # Assert: the average without c0 is the average minus c0's archived updates, and equals
    # theta^0 + S_c1 + R^1 (R^1 = fused^1 - avg^1: the server's distillation step, nobody's contribution)
    assert isinstance(forgotten, HeteroForgetResult)
    c0_updates = averages[-1]["cnn-a"]
    for result in results:
        entry = next(c for c in result.manifest.clients if c.client_id == "c0")
        c0_updates = subtract(c0_updates, {k: v * entry.weight for k, v in history.read_state(entry.update).items()})
    close(forgotten.objects[f"{AVERAGE}cnn-a"], c0_updates)
    step = subtract(fused[0]["cnn-a"], averages[0]["cnn-a"])
    rebuilt = add(add(initial_state(ENSEMBLE.spec_of("cnn-a"), 3, "cnn-a"), history.client_sum(final, "c1")), step)
    close(forgotten.objects[f"{AVERAGE}cnn-a"], rebuilt, atol=1e-5)
    close(forgotten.objects[f"{AVERAGE}mlp-b"], averages[-1]["mlp-b"], atol=0)  # other architectures untouched
    assert forgotten.state.keys() == results[-1].state.keys() and forgotten.removed == final.sums["c0"]
    # the only client of an architecture takes it out of the ensemble and of the next starting points
    without_c2 = forget_client(history, ref, final, "c2")
    assert set(without_c2.objects) == {f"{AVERAGE}cnn-a"} and set(unpack(without_c2.server_state)) == {"cnn-a"}
    with pytest.raises(UnlearningError, match="never contributed"):
        forget_client(history, ref, final, "c9")


def test_a_second_deletion_subtracts_the_first_again_when_its_averages_were_not_archived(ensemble_run):
    # Prepare: c0 forgotten and committed the way the unlearn flow commits today (no objects recorded)
    history, results = ensemble_run
    ref, final = results[-1].manifest_ref, results[-1].manifest
    first = forget_client(history, ref, final, "c0")
    first_ref, first_manifest = history.commit_unlearning(
        request_id="del-1", client_id="c0", variant="subtract", source=ref, source_version="2", source_manifest=final,
        removed=first.removed, forgotten_state=first.state, final_state=first.state, new_sums={}, round_scales={},
        recovery={}, data_version="v1", metrics={},
    )  # fmt: skip
    # Execute: forget c2 (the only mlp-b client) from the unlearned version
    second = forget_client(history, first_ref, first_manifest, "c2")
    # Assert: cnn-a's average is the archived one minus c0's sum, as after the first deletion
    close(second.objects[f"{AVERAGE}cnn-a"], first.objects[f"{AVERAGE}cnn-a"], atol=0)
    assert set(second.objects) == {f"{AVERAGE}cnn-a"}


def test_without_fusion_an_architecture_is_plain_fedavg_and_forgetting_leaves_no_residual(tmp_path):
    # Prepare: two rounds in which the ensemble is distilled into the student only
    store = LocalStore(tmp_path)
    history, _, results = federate(ensemble_protocol(store, fuse=False), store, STUDENT)
    ref, final = results[-1].manifest_ref, results[-1].manifest
    # Execute
    forgotten = forget_client(history, ref, final, "c0")
    # Assert: cnn-a's average without c0 is its initial state plus c1's running sum, nothing else
    expected = add(initial_state(ENSEMBLE.spec_of("cnn-a"), 3, "cnn-a"), history.client_sum(final, "c1"))
    close(forgotten.objects[f"{AVERAGE}cnn-a"], expected, atol=1e-5)
    close(unpack(forgotten.server_state)["cnn-a"], expected, atol=1e-5)


class WatchedSharedBase(SharedBase):
    """Records every key the server step reads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[str] = []

    def server_step(self, server_round, base, server_state, replies, store):
        get = store.get
        store.get = lambda key: (self.read.append(key), get(key))[1]
        try:
            return super().server_step(server_round, base, server_state, replies, store)
        finally:
            del store.get


def test_shared_base_heads_never_leave_their_clients(tmp_path):
    # Prepare / Execute: two rounds; c0 has a two-layer head, c1 and c2 the linear one
    store = LocalStore(tmp_path)
    protocol = shared_protocol(store, WatchedSharedBase)
    history, _, results = federate(protocol, store, GLOBAL)
    final = results[-1].manifest
    base_keys, head_keys = (set(part) for part in protocol.settings.split(results[-1].state))
    # Assert: uploads hold the base only, heads are the clients' personal states, the server read no head
    assert not any("/personal/" in key for key in protocol.read) and protocol.read
    for result in results:
        for entry in result.manifest.clients:
            assert set(history.read_state(entry.update)) == base_keys
            head = history.read_state(entry.objects["personal"])
            own = {k for k in init_model(SHARED.spec_for(entry.client_id), 0).state_dict() if k.startswith("fc2.")}
            assert set(head) == own and entry.spec == SHARED.spec_for(entry.client_id)
    assert set(final.personal) == {"c0", "c1", "c2"} and verify_manifest(store, final) == []
    c1_head = history.read_state(final.personal["c1"])
    assert not all(torch.equal(c1_head[k], results[-1].state[k]) for k in head_keys)  # the server trained its own
    spec, state = personalised_model(history, final, "c0")
    assert spec.name == "cnn-mlp-head" and all(torch.equal(state[k], results[-1].state[k]) for k in base_keys)


def test_shared_base_forgetting_subtracts_the_base_contributions_and_drops_the_head(tmp_path):
    # Prepare
    store = LocalStore(tmp_path)
    protocol = shared_protocol(store)
    history, initial, results = federate(protocol, store, GLOBAL)
    ref, final = results[-1].manifest_ref, results[-1].manifest
    split = protocol.settings.split
    # the global state is the initial one plus every client's base sum plus every residual (server heads)
    rebuilt = initial
    for part in [
        *(history.read_state(r) for r in final.sums.values()),
        *(history.read_state(r.manifest.residual) for r in results),
    ]:
        rebuilt = {k: v + part[k] if k in part else v for k, v in rebuilt.items()}  # fmt: skip
    close(results[-1].state, rebuilt, atol=1e-5)
    # Execute
    forgotten = forget_client(history, ref, final, "c1")
    unlearned_ref, unlearned = history.commit_unlearning(
        request_id="del-2", client_id="c1", variant="subtract", source=ref, source_version="2", source_manifest=final,
        removed=forgotten.removed, forgotten_state=forgotten.state, final_state=forgotten.state, new_sums={},
        round_scales={}, recovery={}, data_version="v1", metrics={},
    )  # fmt: skip
    # Assert: the base is the final base minus c1's archived weight * delta of every round (recomputed here)
    expected = split(results[-1].state)[0]
    for result in results:
        entry = next(c for c in result.manifest.clients if c.client_id == "c1")
        expected = subtract(expected, {k: v * entry.weight for k, v in history.read_state(entry.update).items()})
    close(split(forgotten.state)[0], expected)
    assert set(unlearned.personal) == {"c0", "c2"}
    with pytest.raises(UnlearningError, match="no personal head"):
        personalised_model(history, unlearned, "c1")
    _, state = personalised_model(history, unlearned, "c2")
    close(split(state)[0], split(forgotten.state)[0], atol=0)
    assert {ref.key.split("/")[-2] for ref in stored_client_objects(history, [unlearned_ref], "c1")} >= {
        "personal",
        "updates",
        "sums",
    }
    assert isinstance(protocol_from_record(unlearned.protocol), SharedBase) and unlearned_ref.key.endswith(".json")


def test_a_time_cap_stops_training_at_an_epoch_boundary():
    from components.federation.hetero.common import train_within_budget

    model = init_model(STUDENT, 0)
    data = Split(RAW.train.images[:32], RAW.train.labels[:32])
    capped = train_within_budget(model, data, TRAIN, {"local_epochs": 50, "time_cap_s": 1e-9}, torch.Generator())
    full = train_within_budget(model, data, TRAIN, {"local_epochs": 3}, torch.Generator())
    assert capped["epochs"] == 1.0 and full["epochs"] == 3.0
