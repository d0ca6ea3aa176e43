"""Client shards in the object store, so a client needs nothing but the store.

The prepared shard files are written byte for byte under a key derived from
the data version (``datasets/<version>/clients/<client_id>.safetensors``):
write-once, so staging the same data again writes nothing, and the sha256 in
the reference is the file's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from safetensors.torch import load, save

from components.core.ids import validate_id
from components.core.refs import ObjectRef
from components.data.datasets import Split
from components.data.layout import FederationData
from components.lineage.store import ObjectStore


def shard_key(data_version: str, client_id: str) -> str:
    return f"datasets/{validate_id(data_version.removesuffix('.dir'), 'data version')}/clients/{validate_id(client_id, 'client id')}.safetensors"


def split_to_bytes(split: Split) -> bytes:
    return save({"images": split.images.contiguous(), "labels": split.labels.contiguous()})


def split_from_bytes(data: bytes) -> Split:
    tensors = load(data)
    return Split(tensors["images"], tensors["labels"])


def stage_shards(
    store: ObjectStore, data: FederationData, data_version: str, clients: Sequence[str]
) -> dict[str, ObjectRef]:
    """Put the prepared shards of ``clients`` into the store; return their references.

    Each shard is decoded first, so a truncated or corrupt file is refused
    (``DataError``) before any of it reaches the store.
    """
    refs = {}
    for cid in clients:
        data.client(cid)  # raises DataError naming the file if it does not decode
        refs[cid] = store.put(shard_key(data_version, cid), data.client_path(cid).read_bytes(), overwrite=False)
    return refs


def stage_splits(store: ObjectStore, splits: Mapping[str, Split], data_version: str) -> dict[str, ObjectRef]:
    """Put in-memory shards (e.g. a benchmark's poisoned client) into the store."""
    return {
        cid: store.put(shard_key(data_version, cid), split_to_bytes(split), overwrite=False)
        for cid, split in splits.items()
    }
