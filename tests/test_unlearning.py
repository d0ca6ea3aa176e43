"""Forgetting against independent recomputation from the archived manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load as np_load

from components.core.records import ClientResult
from components.federation.protocol import UnlearningError
from components.federation.weights.protocol import weight_protocol
from components.federation.weights.strategy import FedAvg
from components.lineage.history import UpdateHistory
from components.lineage.store import IntegrityError, LocalStore
from components.models.students import ModelSpec
from components.unlearning.forget import forget_client
from components.unlearning.purge import stored_client_objects
from components.unlearning.tombstones import (
    delete_objects,
    read_tombstone,
    tombstoned_clients,
    validate_client_id,
    write_tombstone,
)

SPEC = ModelSpec("mlp", {"num_classes": 3, "image_size": 2, "hidden": 4})
FEDAVG = weight_protocol("fedavg").describe()  # the protocol record manifests carry


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(4, 4, generator=g), "fc1.bias": torch.randn(4, generator=g)}


def federate(store, schedule, head=None, fid="fed-u"):
    """Run FedAvg rounds on random deltas; return the history, manifest refs and initial state."""
    history = UpdateHistory(store)
    initial = random_state(0)
    if head is None:
        head = history.write_initial(fid, initial, SPEC, seed=0)
    state = history.read_state(head.state)
    refs = []
    for rnd, clients in schedule.items():
        results = [ClientResult(c, rnd, n, random_state(1000 * rnd + i)) for i, (c, n) in enumerate(clients)]
        applied = FedAvg().aggregate_fit(rnd, state, results)
        state, updates = applied.state, applied.updates
        ref, _ = history.commit_round(fid, rnd, head, updates, state, SPEC, FEDAVG, "v1")
        head = history.head_of(ref)
        refs.append(ref)
    return history, refs, initial


def archived_rounds(store, final_ref):
    """Raw manifests of a lineage, oldest first, read without the history API."""
    out, ref = [], final_ref.key
    while ref:
        manifest = json.loads(store.get(ref))
        out.append(manifest)
        ref = manifest["parent"]["key"] if manifest.get("parent") else None
    return out[::-1]


def recompute(store, final_ref, initial, keep, scale_round=lambda m: 1.0):
    """W_0 + sum over rounds of scale * sum_{kept clients} weight * delta, in float64."""
    total = {k: v.double().numpy().copy() for k, v in initial.items()}
    for manifest in archived_rounds(store, final_ref):
        if manifest["kind"] != "round":
            continue
        s = scale_round(manifest)
        for entry in manifest["clients"]:
            if entry["client_id"] in keep:
                delta = np_load(store.get(entry["update"]["key"]))
                for k in total:
                    total[k] += s * entry["weight"] * delta[k].astype(np.float64)
    return total


def assert_state_close(state, expected):
    for k, v in expected.items():
        np.testing.assert_allclose(state[k].double().numpy(), v, rtol=1e-5, atol=1e-5)


def test_two_clients_one_round_forgetting_a_leaves_initial_plus_b(tmp_path):
    # Prepare
    store = LocalStore(tmp_path)
    history, refs, initial = federate(store, {1: [("A", 10), ("B", 30)]})
    manifest = history.read_manifest(refs[-1])
    # Execute
    result = forget_client(history, refs[-1], manifest, "A")
    # Assert: W_0 + w_B * delta_B, computed independently
    delta_b = random_state(1001)
    expected = {k: initial[k].double().numpy() + 0.75 * delta_b[k].double().numpy() for k in initial}
    assert_state_close(result.state, expected)
    assert result.removed == manifest.sums["A"] and result.objects_read == 2


SCHEDULE = {
    1: [("A", 10), ("B", 30), ("C", 60)],
    2: [("A", 50), ("C", 50)],
    3: [("B", 20), ("C", 20)],
    4: [("A", 5), ("B", 5), ("C", 10)],
}


def test_subtracting_over_several_rounds_equals_recomputation(tmp_path):
    store = LocalStore(tmp_path)
    history, refs, initial = federate(store, SCHEDULE)
    manifest = history.read_manifest(refs[-1])
    result = forget_client(history, refs[-1], manifest, "A")
    assert_state_close(result.state, recompute(store, refs[-1], initial, keep={"B", "C"}))


def test_renormalised_variant_equals_recomputation(tmp_path):
    store = LocalStore(tmp_path)
    history, refs, initial = federate(store, SCHEDULE)
    manifest = history.read_manifest(refs[-1])
    result = forget_client(history, refs[-1], manifest, "A", variant="renormalise")

    def scale(m):  # FedAvg without A: p_i / (1 - p_A) in rounds where A took part
        weight_a = sum(e["weight"] for e in m["clients"] if e["client_id"] == "A")
        return 1.0 / (1.0 - weight_a)

    assert_state_close(result.state, recompute(store, refs[-1], initial, keep={"B", "C"}, scale_round=scale))
    # the rewritten running sums of B and C hold their rescaled contributions
    assert sorted(result.new_sums) == ["B", "C"]
    assert len(result.round_scales) == 3  # rounds 1, 2 and 4


def unlearn(history, ref, client, variant, request_id):
    """Forget and commit the deletion as the flow does (without recovery training)."""
    manifest = history.read_manifest(ref)
    result = forget_client(history, ref, manifest, client, variant)
    new_ref, _ = history.commit_unlearning(
        request_id=request_id, client_id=client, variant=variant, source=ref, source_version="x",
        source_manifest=manifest, removed=result.removed, forgotten_state=result.state,
        final_state=result.state, new_sums=result.new_sums, round_scales=result.round_scales,
        recovery={"teacher": "none"}, data_version="none", metrics={},
    )  # fmt: skip
    return new_ref


@pytest.mark.parametrize("first", ["subtract", "renormalise"])
def test_chained_deletions_stay_exact(tmp_path, first):
    # Prepare: forget A, then train more rounds on top, then forget B
    store = LocalStore(tmp_path)
    history, refs, initial = federate(store, SCHEDULE)
    after_a = unlearn(history, refs[-1], "A", first, "del-a")
    head = history.head_of(after_a)
    history, more, _ = federate(store, {5: [("B", 10), ("C", 30)]}, head=head, fid="fed-v")
    # Execute
    manifest = history.read_manifest(more[-1])
    result = forget_client(history, more[-1], manifest, "B")

    # Assert: only C's contributions (with A's rounds rescaled if the first deletion renormalised)
    def scale(m):
        if first == "subtract" or m["server_round"] == 5:
            return 1.0
        weight_a = sum(e["weight"] for e in m["clients"] if e["client_id"] == "A")
        return 1.0 / (1.0 - weight_a)

    assert_state_close(result.state, recompute(store, more[-1], initial, keep={"C"}, scale_round=scale))
    with pytest.raises(UnlearningError, match="never contributed"):
        forget_client(history, more[-1], manifest, "A")


def test_forgetting_a_client_that_never_took_part_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    history, refs, _ = federate(store, {1: [("A", 1), ("B", 1)]})
    manifest = history.read_manifest(refs[-1])
    with pytest.raises(UnlearningError, match="never contributed"):
        forget_client(history, refs[-1], manifest, "Z")
    with pytest.raises(UnlearningError, match="unknown forgetting variant"):
        forget_client(history, refs[-1], manifest, "A", variant="approximate")


def test_a_tampered_running_sum_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    history, refs, _ = federate(store, {1: [("A", 1), ("B", 1)]})
    manifest = history.read_manifest(refs[-1])
    path = tmp_path / manifest.sums["A"].key
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        forget_client(history, refs[-1], manifest, "A")


def test_purge_and_tombstone(tmp_path):
    store = LocalStore(tmp_path)
    history, refs, _ = federate(store, SCHEDULE)
    purged = stored_client_objects(history, [refs[-1]], "A")  # what the manifests say holds A
    assert len(purged) == 6  # 3 updates + 3 running sums
    delete_objects(store, purged)
    assert stored_client_objects(history, [refs[-1]], "A") == []
    assert stored_client_objects(history, [refs[-1]], "B") != []  # nobody else's
    ref = write_tombstone(
        store, model="m", client_id="A", request_id="del-1", source_version="4", resulting_version="5",
        variant="subtract", unlearning_manifest=refs[-1], purged=purged,
    )  # fmt: skip
    again = write_tombstone(
        store, model="m", client_id="A", request_id="del-2", source_version="4", resulting_version="6",
        variant="subtract", unlearning_manifest=refs[-1], purged=[],
    )  # fmt: skip
    assert ref == again  # the first record stands
    record = read_tombstone(store, "m", "A")
    assert record["request_id"] == "del-1" and len(record["purged"]) == 6
    assert "sha256" in record["purged"][0] and tombstoned_clients(store, "m") == {"A"}
    assert read_tombstone(store, "m", "B") is None
    # scoped: another model's client of the same id is not forgotten
    assert read_tombstone(store, "other", "A") is None and tombstoned_clients(store, "other") == set()


@pytest.mark.parametrize("bad", ["../A", "a/b", "", "A B", "x" * 65, "-lead"])
def test_client_ids_are_validated(bad):
    with pytest.raises(UnlearningError, match="invalid client id"):
        validate_client_id(bad)
