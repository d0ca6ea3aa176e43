"""Frozen trunk features, computed once per image.

:class:`FeatureBank` keeps one row per distinct image (keyed by the image's
bytes) for each frozen tower. A split's features are looked up row by row;
only images never seen are run through the tower, through a
:class:`~components.models.clip_teacher.FeatureCache` on disk when one is
given. So the shards, held-out splits and test set of every shot count and
every method share one pass of the tower over the raw data (``prime``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Protocol

import torch

from components.data.datasets import Split
from components.models.clip_backbone import ClipBackbone
from components.models.clip_teacher import FeatureCache


class FeatureSource(Protocol):
    """Anything that returns the frozen trunk features of a split (``FeatureCache``, :class:`FeatureBank`)."""

    def get(self, backbone: ClipBackbone, split: Split, batch_size: int = 32) -> torch.Tensor: ...


def _image_keys(split: Split) -> list[bytes]:
    flat = split.images.reshape(len(split), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _tower_key(backbone: ClipBackbone) -> str:
    spec = backbone.spec
    return json.dumps([spec.backbone_identity(), spec.trains_projection, backbone.image_size], sort_keys=True)


class FeatureBank:
    """Frozen features by image, for any number of towers (thread-safe).

    Parameters
    ----------
    cache
        Where whole splits' features are cached on disk (``FeatureCache(None)``: nowhere).
    """

    def __init__(self, cache: FeatureCache | None = None) -> None:
        self.cache = cache or FeatureCache(None)
        self._rows: dict[str, dict[bytes, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        # Sent to a worker process (Prefect, Dask): the disk cache travels, the rows and the lock do not.
        return {"cache": self.cache}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["cache"])  # type: ignore[misc, arg-type]

    def prime(self, backbone: ClipBackbone, splits: Sequence[Split], batch_size: int = 32) -> None:
        """Run the tower once over whole ``splits`` (e.g. a raw dataset's train and test)."""
        for split in splits:
            features = self.cache.get(backbone, split, batch_size)
            self._add(backbone, _image_keys(split), features)

    def _add(self, backbone: ClipBackbone, keys: Sequence[bytes], features: torch.Tensor) -> None:
        with self._lock:
            rows = self._rows.setdefault(_tower_key(backbone), {})
            for key, row in zip(keys, features):
                rows.setdefault(key, row)

    def get(self, backbone: ClipBackbone, split: Split, batch_size: int = 32) -> torch.Tensor:
        """The features of ``split``, one row per image, in order."""
        keys = _image_keys(split)
        with self._lock:
            rows = self._rows.get(_tower_key(backbone), {})
            missing = [i for i, key in enumerate(keys) if key not in rows]
        if missing:
            self._add(backbone, [keys[i] for i in missing], self.cache.get(backbone, split.subset(missing), batch_size))
        with self._lock:
            rows = self._rows[_tower_key(backbone)]
            return torch.stack([rows[key] for key in keys]) if keys else torch.zeros(0)


def default_features(cache_dir: str | None) -> FeatureBank:
    """A bank in memory, its tower passes cached on disk under ``cache_dir`` when given."""
    return FeatureBank(FeatureCache(cache_dir))
