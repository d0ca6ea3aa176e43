"""The one round function every federation runs: the Prefect flow, the evaluation and benchmarks.

One round: the protocol picks its clients, the injected client map runs their
client steps (Prefect tasks in the flow, a plain or thread map in a benchmark),
the protocol's server step combines the replies, and the history commits the
round (every object, then the manifest). Evaluation and registration belong
to the caller: they are tracking, not federation.

The two points of injection:

``client_map(step, tasks) -> replies``
    Runs ``step`` on every task, anywhere (threads, processes, Dask workers).
``call(name, fn, *args) -> result``
    Runs the server's steps (``"aggregate"``, ``"archive"``); the flow makes
    each a Prefect task (the archive with retries), benchmarks call directly.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.core.refs import ObjectRef
from components.core.state import StateDict
from components.federation.protocol import ClientReply, ClientTask, Protocol, RoundOutcome
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory
from components.lineage.manifests import LineageHead, RoundManifest
from components.models.students import ModelSpec

ClientStep = Callable[[ClientTask], ClientReply]
ClientMap = Callable[[ClientStep, Sequence[ClientTask]], list[ClientReply]]
Call = Callable[..., Any]


def direct_call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a server step in place (benchmarks, tests)."""
    return fn(*args, **kwargs)


def serial_map(step: ClientStep, tasks: Sequence[ClientTask]) -> list[ClientReply]:
    return [step(task) for task in tasks]


def thread_map(max_workers: int) -> ClientMap:
    """Clients in ``max_workers`` threads of this process."""

    def run(step: ClientStep, tasks: Sequence[ClientTask]) -> list[ClientReply]:
        with ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(step, tasks))

    return run


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A seed that depends only on (federation seed, round, client)."""
    entropy = [seed, server_round, zlib.crc32(client_id.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Federation:
    """What stays fixed across a federation's rounds."""

    federation_id: str
    history: UpdateHistory
    store_url: str
    model: ModelSpec
    train: TrainSettings
    seed: int
    data_version: str
    shards: Mapping[str, ObjectRef]  # client id -> its shard in the store
    sizes: Mapping[str, int] = field(default_factory=dict)  # examples per client (scheduling only)
    client_train: Mapping[str, TrainSettings] = field(default_factory=dict)  # per-client overrides of ``train``
    threads: int | None = None  # torch threads per client in a separate process


@dataclass
class RoundResult:
    """A committed round."""

    server_round: int
    manifest_ref: ObjectRef
    manifest: RoundManifest
    outcome: RoundOutcome
    replies: list[ClientReply]
    timings: dict[str, float]

    @property
    def head(self) -> LineageHead:
        return LineageHead.of(self.manifest_ref, self.manifest)

    @property
    def state(self) -> StateDict:
        return self.outcome.state


def run_round(
    protocol: Protocol,
    federation: Federation,
    head: LineageHead,
    base_state: StateDict,
    server_state: StateDict | None,
    available: Sequence[str],
    rng: np.random.Generator,
    client_map: ClientMap = serial_map,
    call: Call = direct_call,
) -> RoundResult:
    """Train, combine and commit round ``head.server_round + 1``; return what was committed."""
    started = time.perf_counter()
    server_round = head.server_round + 1
    selected = protocol.configure_fit(server_round, available, rng)
    prefix = federation.history.round_prefix(federation.federation_id, server_round)
    store = federation.history.store
    inputs = protocol.round_inputs(server_round, head, store)
    tasks = [
        ClientTask(
            client_id=cid,
            server_round=server_round,
            store_url=federation.store_url,
            shard=federation.shards[cid],
            base=head.state,
            upload_key=f"{prefix}updates/{cid}.safetensors",
            model=protocol.client_model(cid, federation.model),
            train=federation.client_train.get(cid, federation.train),
            seed=client_seed(federation.seed, server_round, cid),
            threads=federation.threads,
            personal=head.personal.get(cid),
            inputs=inputs,
            settings=protocol.client_settings(cid),
            upload_prefix=prefix,
        )
        for cid in selected
    ]
    # Largest shards first: with uneven (Dirichlet) shards this keeps every
    # worker busy until the end of the round instead of one tail client alone.
    tasks.sort(key=lambda t: -federation.sizes.get(t.client_id, 0))
    replies = sorted(client_map(protocol.client_step, tasks), key=lambda r: r.client_id)
    trained = time.perf_counter()
    try:
        outcome = call("aggregate", protocol.server_step, server_round, base_state, server_state, replies, store)
    except Exception:  # whatever refused the round, its uploads must not stay
        # A refused round (e.g. a non-finite update) is never committed: its uploads go now.
        for reply in replies:
            for ref in [reply.upload, *reply.objects.values()]:
                if ref is not None:
                    store.delete(ref.key)
        raise
    aggregated = time.perf_counter()
    manifest_ref, manifest = call(
        "archive", federation.history.commit_round,
        federation.federation_id, server_round, head, outcome.updates, outcome.state, federation.model,
        protocol.describe(), federation.data_version, {r.client_id: dict(r.metrics) for r in replies},
        dict(outcome.record), outcome.residual, outcome.server_state, dict(outcome.participants),
        dict(outcome.client_objects), dict(outcome.server_objects), dict(outcome.personal), dict(outcome.specs),
    )  # fmt: skip
    archived = time.perf_counter()
    timings = {
        "train_phase_s": trained - started,
        "aggregate_s": aggregated - trained,
        "archive_s": archived - aggregated,
    }
    return RoundResult(server_round, manifest_ref, manifest, outcome, replies, timings)
