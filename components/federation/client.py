"""The weight protocol's client step, and the server's checks of what clients send.

A client takes a :class:`~components.federation.protocol.ClientTask` (references
only), reads its shard and the global state it starts from out of the store,
each checked against its sha256, trains, writes its delta to the task's upload
key and returns a :class:`~components.federation.protocol.ClientReply` holding
that object's reference. It can run in a thread, a process or on a remote
worker: nothing but the store is shared.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from components.core.records import ClientResult
from components.core.refs import ObjectRef
from components.core.serialize import state_from_bytes, state_to_bytes
from components.core.state import narrow, non_finite_keys, subtract, widen
from components.data.datasets import Split
from components.data.layout import read_split
from components.data.staging import split_from_bytes
from components.federation.protocol import ClientReply, ClientTask
from components.learning.train import evaluate, train_client
from components.lineage.store import ObjectStore, open_store
from components.models.students import ModelSpec, build_model


class NonFiniteUpdateError(ValueError):
    """A client's update holds NaN or infinity; the round must not be committed."""


class _ContentCache:
    """A small cache of decoded objects keyed by sha256: a round's clients share one base state.

    Content-addressed, so entries never go stale; bounded, so memory stays flat.
    """

    def __init__(self, decode: Callable[[bytes], Any], capacity: int) -> None:
        self.decode = decode
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store_url: str, ref: ObjectRef) -> Any:
        with self._lock:
            if ref.sha256 in self._items:
                self._items.move_to_end(ref.sha256)
                return self._items[ref.sha256]
        value = self.decode(open_store(store_url).get_verified(ref))
        with self._lock:
            self._items[ref.sha256] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


_BASE_STATES = _ContentCache(lambda data: state_from_bytes(data)[0], capacity=2)
_SHARDS = _ContentCache(split_from_bytes, capacity=8)


def load_base(task: ClientTask) -> dict[str, torch.Tensor]:
    """The global state the client starts from, from the store (hash-checked, shared by a round's clients)."""
    return _BASE_STATES.get(task.store_url, task.base)


def load_shard(task: ClientTask) -> Split:
    """The client's training data, from the store (hash-checked)."""
    return _SHARDS.get(task.store_url, task.shard)


def train_weights_client(task: ClientTask) -> ClientReply:
    """Train one client from the archived base state; upload its delta; return the reference."""
    if task.threads:
        torch.set_num_threads(task.threads)
    base = _BASE_STATES.get(task.store_url, task.base)
    model = build_model(task.model)
    model.load_state_dict(base)
    data = load_shard(task)
    generator = torch.Generator().manual_seed(task.seed)
    metrics = train_client(model, data, task.train, generator)
    delta = subtract(model.state_dict(), base)
    local_dp = task.settings.get("local_dp")
    if local_dp:  # clip and noise before anything leaves the client; OS randomness: the server knows the seeds
        from components.federation.weights.privacy import perturb_locally

        noise = torch.Generator().manual_seed(secrets.randbits(63))
        delta = perturb_locally(delta, local_dp["clipping_norm"], local_dp["noise_multiplier"], noise)
    if task.settings.get("update_dtype") == "float16":  # half the bytes; the server applies exactly these
        delta = narrow(delta)
    metrics = {k: v for k, v in metrics.items() if k != "num_examples"}
    return upload_delta(task, delta, len(data), metrics)


def upload_delta(task: ClientTask, delta: Mapping[str, torch.Tensor], num_examples: int,
                 metrics: Mapping[str, float]) -> ClientReply:  # fmt: skip
    """Write a client's delta to its upload key (write-once) and reply with its reference."""
    meta = {"kind": "update", "client_id": task.client_id, "server_round": task.server_round,
            "num_examples": num_examples}  # fmt: skip
    upload = open_store(task.store_url).put(task.upload_key, state_to_bytes(delta, meta), overwrite=False)
    return ClientReply(task.client_id, task.server_round, num_examples, upload, dict(metrics))


def read_result(reply: ClientReply, store: ObjectStore) -> ClientResult:
    """The uploaded delta behind ``reply``, checked against its sha256 (half precision widened, exactly)."""
    if reply.upload is None:
        raise ValueError(f"client {reply.client_id} uploaded no update")
    delta = widen(state_from_bytes(store.get_verified(reply.upload))[0])
    return ClientResult(reply.client_id, reply.server_round, reply.num_examples, delta, dict(reply.metrics),
                        upload=reply.upload)  # fmt: skip


def read_results(replies: Sequence[ClientReply], store: ObjectStore) -> list[ClientResult]:
    """The uploaded deltas behind ``replies``, each checked against its sha256."""
    return [read_result(r, store) for r in replies]


def stream_results(server_round: int, replies: Sequence[ClientReply], store: ObjectStore) -> Iterator[ClientResult]:
    """Each reply's delta, read and checked only when the consumer asks for it (one in memory at a time)."""
    for reply in replies:
        result = read_result(reply, store)
        check_result(server_round, result)
        yield result


def check_result(server_round: int, result: ClientResult) -> None:
    """Refuse a result that is unusable (server side: never trust a client)."""
    if result.server_round != server_round:
        raise ValueError(f"client {result.client_id} answered for round {result.server_round}, not {server_round}")
    if result.num_examples <= 0:
        raise ValueError(f"client {result.client_id} reported {result.num_examples} examples")
    bad = non_finite_keys(result.delta)
    if bad:
        raise NonFiniteUpdateError(
            f"round {server_round}: the update of client {result.client_id} holds NaN or "
            f"infinity in {', '.join(bad[:3])}; the round is not committed "
            "(lower train.lr or check that client's data)"
        )


def check_results(server_round: int, results: Sequence[ClientResult]) -> None:
    """Refuse a round whose results are unusable."""
    for result in results:
        check_result(server_round, result)


def evaluate_state(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], data_path: str, batch_size: int = 256
) -> dict[str, float]:
    """Test loss and accuracy of ``state`` on the split at ``data_path``."""
    model = build_model(spec)
    model.load_state_dict(dict(state))
    return evaluate(model, read_split(data_path), batch_size)
