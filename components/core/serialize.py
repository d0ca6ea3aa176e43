"""Safetensors serialisation of state dicts, byte for byte reproducible."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from components.core.state import StateDict

# --------------------------------------------------------------------------- serialisation


_META_KEY = "fedforget"


def state_to_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """Serialise a state dict as safetensors, byte-for-byte reproducibly.

    safetensors writes its metadata map in hash order, so several metadata keys
    would give different bytes for the same content; all metadata therefore
    travels as one sorted JSON document under a single key.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return st_save(tensors, metadata={_META_KEY: json.dumps(dict(metadata), sort_keys=True)})


def state_from_bytes(data: bytes) -> tuple[StateDict, dict[str, Any]]:
    """Inverse of :func:`state_to_bytes`: the tensors and the decoded metadata."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    raw_meta = (header.get("__metadata__") or {}).get(_META_KEY, "{}")
    return dict(st_load(data)), json.loads(raw_meta)
