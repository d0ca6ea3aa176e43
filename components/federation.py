"""One federation round's work, as plain functions the flow tasks wrap.

A client job carries only small values (ids, paths, object references, seeds),
so it can run in a thread, a process or on a remote worker: the client reads
the global state it starts from out of the store, checks its sha256, trains on
its own shard and returns its delta.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from components.aggregation import ClientResult
from components.data import read_split
from components.history import state_from_bytes
from components.models import ModelSpec, build_model
from components.state import StateDict, non_finite_keys, subtract
from components.store import ObjectRef, open_store
from components.training import TrainSettings, evaluate, train_client

# Lineage tags every registered global version carries (README: "Lineage schema").
GLOBAL_TAG_KEYS = (
    "kind",
    "round",
    "federation_id",
    "clients",
    "manifest_key",
    "manifest_sha256",
    "data_version",
    "parent_version",
)


class NonFiniteUpdateError(ValueError):
    """A client's update holds NaN or infinity; the round must not be committed."""


@dataclass(frozen=True)
class ClientJob:
    """Everything one client needs to train in one round."""

    client_id: str
    server_round: int
    data_path: str
    model: ModelSpec
    train: TrainSettings
    base: ObjectRef
    store_url: str
    seed: int
    threads: int | None = None


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A seed that depends only on (federation seed, round, client)."""
    entropy = [seed, server_round, zlib.crc32(client_id.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class _StateCache:
    """A tiny content-addressed cache: all clients of a round read the same base state."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StateDict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store_url: str, ref: ObjectRef) -> StateDict:
        with self._lock:
            if ref.sha256 in self._items:
                self._items.move_to_end(ref.sha256)
                return self._items[ref.sha256]
        state = state_from_bytes(open_store(store_url).get_verified(ref))[0]
        with self._lock:
            self._items[ref.sha256] = state
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return state


_BASE_STATES = _StateCache()


def run_client(job: ClientJob) -> ClientResult:
    """Train one client from the archived base state; return its delta."""
    if job.threads:
        torch.set_num_threads(job.threads)
    base = _BASE_STATES.get(job.store_url, job.base)
    model = build_model(job.model)
    model.load_state_dict(base)
    data = read_split(job.data_path)
    generator = torch.Generator().manual_seed(job.seed)
    metrics = train_client(model, data, job.train, generator)
    delta = subtract(model.state_dict(), base)
    return ClientResult(
        client_id=job.client_id,
        server_round=job.server_round,
        num_examples=len(data),
        delta=delta,
        metrics={k: v for k, v in metrics.items() if k != "num_examples"},
    )


def check_results(server_round: int, results: Sequence[ClientResult]) -> None:
    """Refuse a round whose results are unusable (server side: never trust a client)."""
    for result in results:
        if result.server_round != server_round:
            raise ValueError(
                f"client {result.client_id} answered for round {result.server_round}, "
                f"not {server_round}"
            )
        if result.num_examples <= 0:
            raise ValueError(f"client {result.client_id} reported {result.num_examples} examples")
        bad = non_finite_keys(result.delta)
        if bad:
            raise NonFiniteUpdateError(
                f"round {server_round}: the update of client {result.client_id} holds NaN or "
                f"infinity in {', '.join(bad[:3])}; the round is not committed "
                "(lower train.lr or check that client's data)"
            )


def evaluate_state(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], data_path: str, batch_size: int = 256
) -> dict[str, float]:
    """Test loss and accuracy of ``state`` on the split at ``data_path``."""
    model = build_model(spec)
    model.load_state_dict(dict(state))
    return evaluate(model, read_split(data_path), batch_size)


def global_version_tags(
    *,
    server_round: int,
    federation_id: str,
    clients: Sequence[str],
    manifest: ObjectRef,
    data_version: str,
    parent_version: str | None,
) -> dict[str, str]:
    """The lineage tags of a registered global model version."""
    tags = {
        "kind": "global",
        "round": str(server_round),
        "federation_id": federation_id,
        "clients": ",".join(sorted(clients)),
        "manifest_key": manifest.key,
        "manifest_sha256": manifest.sha256,
        "data_version": data_version,
        "parent_version": parent_version or "none",
    }
    return tags


def manifest_ref_from_tags(tags: Mapping[str, str]) -> ObjectRef:
    """The manifest a registered version's tags point at."""
    try:
        return ObjectRef(tags["manifest_key"], tags["manifest_sha256"])
    except KeyError as exc:
        raise ValueError(f"model version has no lineage tag {exc}") from None
