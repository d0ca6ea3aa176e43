"""Partitioning, the few-shot split and the prepared layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from components.data.datasets import DIGIT_CLASSES, DataError, RawDataset, Split, load_raw
from components.data.layout import FederationData, PrepareSettings, dvc_dir_hash, prepare_data, read_split
from components.data.partition import dirichlet_partition, few_shot_indices, label_skew

LABELS = np.repeat(np.arange(10), 200)  # 2000 examples, 200 per class


def test_dirichlet_partition_is_seeded_disjoint_and_covers_the_data():
    parts = dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(1))
    again = dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)  # disjoint and complete
    assert all(len(p) >= 10 for p in parts)
    other = dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_skew_grows_as_alpha_falls():
    def mean_skew(alpha: float) -> float:
        return float(np.mean([
            label_skew(LABELS, dirichlet_partition(LABELS, 10, alpha, np.random.default_rng(s)), 10)
            for s in range(5)
        ]))  # fmt: skip

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.15 and skews[2] > 0.5


def test_dirichlet_partition_rejects_bad_params():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(LABELS, 4, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(LABELS, 1, 0.5, np.random.default_rng(0))


def test_few_shot_split_takes_exact_shots():
    idx = few_shot_indices(LABELS, 7, np.random.default_rng(0), 10)
    assert np.bincount(LABELS[idx], minlength=10).tolist() == [7] * 10
    assert len(np.unique(idx)) == len(idx)
    with pytest.raises(ValueError, match="fewer than"):
        few_shot_indices(LABELS, 201, np.random.default_rng(0), 10)


SETTINGS = PrepareSettings(dataset="digits", num_clients=4, alpha=0.5, shots=5, seed=3, min_client_examples=20)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def indexed_raw(n_train: int = 1000, n_test: int = 200) -> RawDataset:
    """A raw dataset whose every image encodes its own index (exact disjointness checks)."""

    def split(n: int, offset: int) -> Split:
        ids = np.arange(offset, offset + n)
        images = np.zeros((n, 8, 8), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
        return Split(torch.from_numpy(images), torch.from_numpy(ids % 10))

    return RawDataset("digits", split(n_train, 0), split(n_test, n_train), DIGIT_CLASSES, {"synthetic": "0"})


def image_ids(split: Split) -> set[int]:
    return set((split.images[:, 0, 0].int() * 256 + split.images[:, 0, 1].int()).tolist())


def test_prepare_writes_disjoint_shards_and_is_reproducible(tmp_path):
    # Prepare
    raw = indexed_raw()
    # Execute
    prepare_data(SETTINGS, tmp_path / "a", raw)
    prepare_data(SETTINGS, tmp_path / "b", raw)
    # Assert: byte-identical outputs, so DVC sees one data version
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert dvc_dir_hash(tmp_path / "a" / "federation") == dvc_dir_hash(tmp_path / "b" / "federation")
    fed = FederationData(tmp_path / "a" / "federation")
    assert fed.client_ids() == ["client_00", "client_01", "client_02", "client_03"]
    few = read_split(tmp_path / "a" / "server" / "few_shot.safetensors")
    assert np.bincount(few.labels.numpy(), minlength=10).tolist() == [5] * 10
    # shards and the few-shot set are pairwise disjoint and together cover the train split
    groups = [image_ids(fed.client(c)) for c in fed.client_ids()] + [image_ids(few)]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(raw.train)
    assert image_ids(fed.test()) == set(range(1000, 1200))


def test_prepare_caps_clients_and_test(tmp_path):
    capped = PrepareSettings(**{**vars(SETTINGS), "max_train_examples": 300, "test_size": 50})
    meta = prepare_data(capped, tmp_path, indexed_raw())
    fed = FederationData(tmp_path / "federation")
    assert sum(len(fed.client(c)) for c in fed.client_ids()) == 300
    assert len(fed.test()) == 50 == meta["federation"]["test"]["num_examples"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"num_clients": 1}, "num_clients"),
        ({"shots": 10_000}, "shots"),
    ],
)
def test_invalid_params_write_nothing(tmp_path, change, message):
    raw = indexed_raw()
    prepare_data(SETTINGS, tmp_path, raw)
    before = tree_digest(tmp_path)
    bad = PrepareSettings(**{**vars(SETTINGS), **change})
    with pytest.raises(ValueError, match=message):
        prepare_data(bad, tmp_path, raw)
    assert tree_digest(tmp_path) == before
    assert not any(p.name.startswith(".prepare-") for p in tmp_path.iterdir())


def test_missing_raw_data_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_raw("fashion-mnist", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_raw("cifar-10")


def test_fashion_mnist_and_mnist_load_from_their_packages():
    fashion = load_raw("fashion-mnist")
    assert len(fashion.train) == 60_000 and len(fashion.test) == 10_000
    assert fashion.class_names[0] == "T-shirt/top" and tuple(fashion.train.images.shape[1:]) == (28, 28)
    mnist = load_raw("mnist")
    assert len(mnist.train) == 60_000 and len(mnist.test) == 10_000
    assert int(mnist.train.images.max()) == 255  # exact bytes recovered from byte/256


def test_public_set_and_client_holdouts_are_disjoint_from_everything_else(tmp_path):
    from dataclasses import replace

    from components.data.layout import read_public

    # Prepare: a public set D, and each client keeping a quarter of its shard apart
    raw = indexed_raw()
    settings = replace(SETTINGS, public_size=100, client_holdout=0.25)
    # Execute
    meta = prepare_data(settings, tmp_path, raw)
    # Assert: clients, their holdouts, the few-shot set, D and the test set never share an image
    fed = FederationData(tmp_path / "federation")
    public = read_public(tmp_path)
    assert public.shape == (100, 8, 8) and meta["federation"]["params"]["public_size"] == 100
    public_ids = set((public[:, 0, 0].int() * 256 + public[:, 0, 1].int()).tolist())
    few = image_ids(read_split(tmp_path / "server" / "few_shot.safetensors"))
    groups = [public_ids, few] + [image_ids(fed.client(c)) for c in fed.client_ids()]
    groups += [image_ids(fed.holdout(c)) for c in fed.client_ids()]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(raw.train)
    for cid in fed.client_ids():  # a holdout follows its client's own classes
        held, kept = fed.holdout(cid), fed.client(cid)
        assert set(held.labels.tolist()) <= set(kept.labels.tolist())
        assert abs(len(held) - 0.25 * (len(held) + len(kept))) <= len(set(kept.labels.tolist()))


def test_a_few_shot_federation_keeps_k_labelled_examples_per_class(tmp_path):
    from dataclasses import replace

    prepare_data(replace(SETTINGS, client_shots=3), tmp_path, indexed_raw())
    fed = FederationData(tmp_path / "federation")
    for cid in fed.client_ids():
        counts = np.bincount(fed.client(cid).labels.numpy(), minlength=10)
        assert counts.max() <= 3  # k shots per class at most (fewer where the client has fewer)
        remainder = fed.holdout(cid)  # the unlabeled remainder, for evaluation on its own distribution
        assert set(remainder.labels.tolist()) <= set(np.flatnonzero(counts).tolist())


def test_data_prepared_without_the_new_settings_keeps_its_bytes(tmp_path):
    # The default profiles' data versions must not change because the settings exist.
    prepare_data(SETTINGS, tmp_path, indexed_raw())
    meta = (tmp_path / "federation" / "meta.json").read_text()
    assert "public_size" not in meta and "client_holdout" not in meta and "client_shots" not in meta
    assert not (tmp_path / "federation" / "holdout").exists()


def test_the_prepare_stage_records_each_clients_model_spec_for_the_protocols_that_use_them(tmp_path):
    # Prepare: params declaring two architectures, round-robin, for a heterogeneous protocol
    import yaml

    from components.data.prepare import client_models, data_config, prepare

    params = {
        "data": {"dataset": "digits", "num_clients": 3, "alpha": 1.0, "shots": 5, "seed": 1},
        "federate": {"protocol": "shared-base"},
        "clients": {"assign": "round-robin", "architectures": {
            "small": {"name": "cnn", "args": {"channels": [4, 8], "hidden": 16}, "local_epochs": 2},
            "mlp": {"name": "mlp", "args": {"hidden": 8}}}},
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    config = data_config(path)
    raw = load_raw("digits")
    # Execute
    models = client_models(path, "default", config, raw)
    meta = prepare(config, tmp_path / "data", raw, models)
    # Assert: sorted client ids alternate the declared architectures, with the data's sizes and the budget
    recorded = meta["federation"]["client_models"]
    assert [recorded[c]["architecture"] for c in ("client_00", "client_01", "client_02")] == ["small", "mlp", "small"]
    assert recorded["client_00"]["model"] == {
        "name": "cnn", "args": {"num_classes": 10, "in_channels": 1, "image_size": 8, "channels": [4, 8], "hidden": 16}
    }  # fmt: skip
    assert recorded["client_00"]["local_epochs"] == 2
    assert FederationData(tmp_path / "data" / "federation").meta["client_models"] == recorded
    # a protocol that trains one global architecture records none, and the data keeps its bytes
    params["federate"]["protocol"] = "weights"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert client_models(path, "default", config, raw) is None
