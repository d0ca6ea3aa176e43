"""The soft-label protocol: grouping and picking against independent computations, a federation
through the production round function, its manifests, and forgetting as a recomputation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import jensenshannon, squareform

from components.data.datasets import load_digits_dataset
from components.data.staging import stage_splits
from components.federation.logits.client import FitSettings, fit_soft_labels, stage_public
from components.federation.logits.grouping import (
    group_clients,
    pairwise_divergence,
    pick_reliable,
    soft_label_consensus,
)
from components.federation.logits.protocol import SoftLabels
from components.federation.logits.server import SoftLabelSettings, server_seed
from components.federation.protocol import UnlearningError, protocol_from_record
from components.federation.rounds import Federation, run_round, serial_map
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory, manifest_objects, verify_manifest
from components.lineage.store import LocalStore
from components.models.students import ModelSpec, build_model, init_model
from components.unlearning.forget import forget_client

SPEC = ModelSpec("mlp", {"num_classes": 10, "image_size": 8, "hidden": 16})
OWN = ModelSpec("mlp", {"num_classes": 10, "image_size": 8, "hidden": 24})  # client c2's own architecture
TRAIN = TrainSettings(local_epochs=1, batch_size=16, lr=0.1, momentum=0.0)
SETTINGS = SoftLabelSettings(distance_threshold=0.05, client_epochs=1, server_epochs=1, forget_epochs=2,
                             batch_size=32, precision="float32")  # fmt: skip


def clustered_labels(seed: int = 0) -> np.ndarray:
    """Five clients' labels on 30 examples: two families (c0-c2 favour class 0, c3-c4 class 3)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(5, 30, 4))
    logits[:3, :, 0] += 3.0
    logits[3:, :, 3] += 3.0
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


# --------------------------------------------------------------------------- grouping and picking


def test_the_divergence_and_the_groups_match_scipy():
    # Prepare
    labels = clustered_labels()
    # Execute
    distances = pairwise_divergence(labels)
    groups = group_clients(distances, threshold=0.1)
    # Assert: mean JS divergence in bits (scipy returns its square root), average-linkage groups
    expected = np.array([[np.mean([jensenshannon(p, q, base=2) ** 2 for p, q in zip(a, b)]) for b in labels]
                         for a in labels])  # fmt: skip
    np.testing.assert_allclose(distances, expected, atol=1e-9)
    tree = linkage(squareform(expected, checks=False), method="average")
    reference = fcluster(tree, t=0.1, criterion="distance")
    assert [set(np.flatnonzero(groups == g)) for g in np.unique(groups)] == [
        set(np.flatnonzero(reference == g)) for g in dict.fromkeys(reference)
    ]
    assert groups.tolist() == [0, 0, 0, 1, 1]  # the two families, numbered by first member
    assert group_clients(distances, threshold=0.1, num_groups=5).tolist() == [0, 1, 2, 3, 4]


def test_the_pick_is_the_member_closest_to_the_group_mean():
    labels, weights = clustered_labels()[:3], np.array([10.0, 30.0, 20.0])
    picked, chosen = pick_reliable(labels, weights)
    mean = (weights[:, None, None] * labels).sum(0) / weights.sum()
    for n in range(labels.shape[1]):
        divergences = [jensenshannon(labels[m, n], mean[n], base=2) ** 2 for m in range(3)]
        assert chosen[n] == int(np.argmin(divergences))
        np.testing.assert_array_equal(picked[n], labels[chosen[n], n])


def test_the_consensus_combines_one_label_per_group():
    # Prepare
    labels, sizes = clustered_labels(), np.array([10, 30, 20, 5, 40])
    # Execute
    consensus = soft_label_consensus(labels, sizes, "similarity", 0.1, group_weight="confidence", calibrate=True)
    # Assert: an independent loop over examples and groups
    expected = np.zeros(labels.shape[1:])
    for n in range(labels.shape[1]):
        parts, weights = [], []
        for members in ([0, 1, 2], [3, 4]):
            label = labels[consensus.picks[n, len(parts)], n]
            assert consensus.picks[n, len(parts)] in members
            prior = np.array([labels[consensus.picks[i, len(parts)], i] for i in range(labels.shape[1])]).mean(0)
            q = label / prior / (label / prior).sum()
            entropy = -(q * np.log2(q)).sum()
            parts.append(q)
            weights.append(sizes[members].sum() * (1 - entropy / 2.0))
        expected[n] = np.average(parts, axis=0, weights=weights)
    np.testing.assert_allclose(consensus.probs, expected / expected.sum(1, keepdims=True), atol=1e-9)
    assert consensus.groups.tolist() == [0, 0, 0, 1, 1]


def test_without_grouping_the_consensus_is_the_example_weighted_mean():
    labels, sizes = clustered_labels(), np.array([10, 30, 20, 5, 40])
    consensus = soft_label_consensus(labels, sizes, "none")
    np.testing.assert_allclose(consensus.probs, np.average(labels, axis=0, weights=sizes), atol=1e-12)
    assert consensus.groups.tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- a federation on digits


def federate(tmp_path, settings: SoftLabelSettings = SETTINGS, rounds: int = 3, exclude: tuple[str, ...] = ()):
    """Three digits clients (c2 with its own architecture) through ``run_round`` on a LocalStore."""
    raw = load_digits_dataset()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(raw.train))
    store = LocalStore(tmp_path / "store")
    history = UpdateHistory(store)
    public_images = raw.train.images[torch.as_tensor(order[:120])]
    public = stage_public(store, public_images, "v1")
    by_class = raw.train.labels.numpy()[order[120:]]  # label skew: each client mostly its own classes
    shards = {f"c{i}": raw.train.subset(order[120:][(by_class % 3) == i][: 60 + 20 * i]) for i in range(3)}
    shards = {cid: split for cid, split in shards.items() if cid not in exclude}
    protocol = SoftLabels(public, SPEC, settings, architectures={"c2": OWN})
    state = init_model(SPEC, seed=1).state_dict()
    head = history.write_initial("fed-sl", state, SPEC, 1)
    federation = Federation("fed-sl", history, store.url, SPEC, TRAIN, 5, "v1", stage_splits(store, shards, "v1"))
    results, server_state = [], None
    for _ in range(rounds):
        result = run_round(protocol, federation, head, state, server_state, sorted(shards), rng, serial_map)
        results.append(result)
        head, state, server_state = result.head, result.state, result.outcome.server_state
    return history, protocol, public_images, results


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three rounds, shared by the tests that only read them (forgetting writes nothing)."""
    return federate(tmp_path_factory.mktemp("soft-labels"))


def test_a_federation_archives_labels_groups_picks_personal_states_and_bytes(federation):
    # Execute
    history, protocol, _, results = federation
    last = results[-1].manifest
    # Assert: per client its soft labels and personal state; the server's consensus and grouping
    assert all(set(c.objects) == {"personal", "soft_labels"} and c.update is None for c in last.clients)
    assert set(last.objects) == {"consensus", "grouping"} and verify_manifest(history.store, last) == []
    described = {what for what, _ in manifest_objects(last)}  # what the audit lists, each with its hash
    assert {"soft_labels of c1 (round 3)", "personal of c1 (round 3)", "consensus (round 3)",
            "grouping (round 3)"} <= described  # fmt: skip
    assert last.personal == {c.client_id: c.objects["personal"] for c in last.clients}
    assert {c.client_id: c.spec for c in last.clients} == {"c0": None, "c1": None, "c2": OWN}
    assert build_model(OWN).load_state_dict(history.read_state(last.personal["c2"])) is not None
    # the record names the groups, the picks and the bytes (soft labels vs FedAvg's model)
    record = last.extra
    assert sorted(c for g in record["groups"] for c in g) == ["c0", "c1", "c2"]
    assert sum(record["picks"].values()) == 120 * len(record["groups"])
    comm = record["communication"]
    assert comm["upload_bytes"] == {c.client_id: c.objects["soft_labels"].size for c in last.clients}
    assert comm["fedavg_upload_bytes_per_client"] > 0 and comm["download_bytes"]["c0"] > 120 * 10 * 4
    # the archived consensus is the grouping rule applied to the archived labels
    labels = np.stack([history.read_state(c.objects["soft_labels"])["probs"].numpy() for c in last.clients])
    expected = soft_label_consensus(labels, [c.num_examples for c in last.clients], "similarity", 0.05,
                                    group_weight="confidence", calibrate=True)  # fmt: skip
    archived = history.read_state(last.objects["consensus"])["probs"].numpy()
    np.testing.assert_allclose(archived, expected.probs, atol=1e-6)
    assert history.read_state(last.objects["grouping"])["groups"].tolist() == expected.groups.tolist()
    # round 2 on, clients fitted the previous consensus; the record rebuilds the protocol
    assert not any("fit_distill_loss" in c.metrics for c in results[0].manifest.clients)
    assert all("fit_distill_loss" in c.metrics for c in results[1].manifest.clients)
    assert protocol_from_record(last.protocol).describe() == protocol.describe()


def test_forgetting_recomputes_every_consensus_without_the_client(federation):
    # Prepare
    history, _, public, results = federation
    final_ref, final = results[-1].manifest_ref, results[-1].manifest
    # Execute: through the dispatch on the manifest's protocol record
    forgotten = forget_client(history, final_ref, final, "c1")
    # Assert: the final consensus from c0's and c2's archived labels, distilled from the initial state
    labels = [history.read_state(c.objects["soft_labels"])["probs"] for c in final.clients if c.client_id != "c1"]
    sizes = [c.num_examples for c in final.clients if c.client_id != "c1"]
    consensus = soft_label_consensus(np.stack([p.numpy() for p in labels]), sizes, "similarity", 0.05,
                                     group_weight="confidence", calibrate=True)  # fmt: skip
    student = build_model(SPEC)
    student.load_state_dict(history.read_state(results[0].manifest.base))
    generator = torch.Generator().manual_seed(server_seed(SETTINGS.seed, 3))
    fit = FitSettings(SETTINGS.temperature, SETTINGS.beta, SETTINGS.forget_epochs, SETTINGS.lr, SETTINGS.momentum,
                      SETTINGS.batch_size)  # fmt: skip
    fit_soft_labels(student, public, torch.from_numpy(consensus.probs).float(), fit, generator)
    for key, value in forgotten.state.items():
        torch.testing.assert_close(value, student.state_dict()[key], rtol=0, atol=1e-5)
    assert forgotten.removed == next(c for c in final.clients if c.client_id == "c1").objects["soft_labels"]
    assert forgotten.new_sums == {} and forgotten.round_scales == {}
    with pytest.raises(UnlearningError, match="never contributed"):
        forget_client(history, final_ref, final, "c9")


def test_replaying_the_lineage_without_removal_reproduces_the_archived_student(tmp_path):
    # Prepare: the replay variant; forgetting nobody is not offered, so replay with the protocol's own pieces
    from components.federation.logits.forget import recompute_consensus
    from components.federation.logits.server import distil_student, lineage_rounds

    settings = replace(SETTINGS, redistil="replay")
    history, _, public, results = federate(tmp_path, settings, rounds=2)
    rounds, forgotten = lineage_rounds(history, results[-1].manifest_ref)
    # Execute
    consensuses, _ = recompute_consensus(history, rounds, excluded=set())
    state = history.read_state(rounds[0].base)
    for manifest, consensus in zip(rounds, consensuses):
        state = distil_student(SPEC, state, public, consensus.probs, settings.fit(settings.server_epochs),
                               server_seed(settings.seed, manifest.server_round))  # fmt: skip
    # Assert: the server's own computation, replayed from the archive, gives the archived student
    assert forgotten == set() and [m.server_round for m in rounds] == [1, 2]
    archived = history.read_state(results[-1].manifest.global_state)
    for key, value in state.items():
        torch.testing.assert_close(value, archived[key], rtol=0, atol=1e-5)
    # and forgetting c0 under replay leaves a student that differs from it
    replayed = forget_client(history, results[-1].manifest_ref, results[-1].manifest, "c0").state
    assert any(not torch.equal(replayed[k], archived[k]) for k in archived)


def test_rewinding_gives_exactly_the_student_retrained_without_the_client(federation, tmp_path):
    # Prepare: the shared federation, and one round of the same federation without c1
    history, protocol, _, results = federation
    rewind = SoftLabels(protocol.public, SPEC, replace(SETTINGS, redistil="rewind"), protocol.architectures)
    _, _, _, retrained = federate(tmp_path, rounds=1, exclude=("c1",))
    # Execute: c1 took part from round 1, so rewinding goes back to round 1
    forgotten = rewind.forget(history, results[-1].manifest_ref, results[-1].manifest, "c1", "subtract")
    # Assert: the round-1 student of the federation that never had c1
    for key, value in retrained[0].state.items():
        torch.testing.assert_close(forgotten.state[key], value, rtol=0, atol=1e-6)
    assert retrained[0].manifest.client_ids == ["c0", "c2"]


def test_the_server_refuses_labels_that_are_not_distributions_on_d(tmp_path):
    # Prepare: D of 4 images, and one client that uploads 4 x 3 scores that do not sum to 1
    from components.federation.logits.client import labels_to_bytes
    from components.federation.protocol import ClientReply

    store = LocalStore(tmp_path)
    public = stage_public(store, torch.zeros(4, 8, 8, dtype=torch.uint8), "v1")
    protocol = SoftLabels(public, SPEC, SETTINGS)
    bad = store.put("x/soft_labels/c0.safetensors", labels_to_bytes(torch.full((4, 3), 0.5), "float32", {}))
    reply = ClientReply("c0", 1, 10, bad, objects={"soft_labels": bad})
    # Execute / Assert
    with pytest.raises(ValueError, match="not 4 distributions"):
        protocol.server_step(1, init_model(SPEC, 0).state_dict(), None, [reply], store)
    with pytest.raises(ValueError, match="needs its soft labels"):
        protocol.server_step(1, init_model(SPEC, 0).state_dict(), None, [replace(reply, objects={})], store)
