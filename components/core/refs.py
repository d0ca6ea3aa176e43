"""References to stored objects: a key and the sha256 of the bytes behind it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ObjectRef:
    """A stored object: its key, the sha256 of its bytes and (when known) its size."""

    key: str
    sha256: str
    size: int | None = None  # unknown when the reference comes from a tag

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectRef:
        size = data.get("size")
        return cls(str(data["key"]), str(data["sha256"]), None if size is None else int(size))
