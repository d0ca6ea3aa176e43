"""The one round function every federation runs: the Prefect flow, the evaluation and benchmarks.

One round: the protocol picks its clients, the injected client map runs their
client steps (Prefect tasks in the flow, a plain or thread map in a benchmark),
the protocol's server step combines the replies, and the history commits the
round (every object, then the manifest). Evaluation and registration belong
to the caller: they are tracking, not federation.

The two points of injection:

``client_map(step, tasks) -> replies``
    Runs ``step`` on every task, anywhere (threads, processes, Dask workers).
    A client that fails or times out comes back as a :class:`ClientFailure`:
    the round goes on without it if at least ``min_fit_clients`` finished.
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
from components.federation.protocol import ClientFailure, ClientReply, ClientTask, Protocol, RoundOutcome
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory
from components.lineage.manifests import LineageHead, RoundManifest
from components.models.students import ModelSpec

ClientStep = Callable[[ClientTask], ClientReply]
ClientMap = Callable[[ClientStep, Sequence[ClientTask]], list[ClientReply | ClientFailure]]
Call = Callable[..., Any]


class RoundFailedError(RuntimeError):
    """Fewer clients finished a round than ``min_fit_clients``: the round is not committed."""


def failure_of(task: ClientTask, error: BaseException) -> ClientFailure:
    """``task``'s client as failed because of ``error`` (a timeout says so)."""
    timed_out = isinstance(error, TimeoutError) or type(error).__name__ == "TaskRunTimeoutError"
    reason = f"timed out: {error}" if timed_out else f"{type(error).__name__}: {error}"
    return ClientFailure(task.client_id, task.server_round, reason, error)


def direct_call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a server step in place (benchmarks, tests)."""
    return fn(*args, **kwargs)


def serial_map(step: ClientStep, tasks: Sequence[ClientTask]) -> list[ClientReply | ClientFailure]:
    return [step(task) for task in tasks]


def tolerant(step: ClientStep) -> Callable[[ClientTask], ClientReply | ClientFailure]:
    """``step`` with an exception turned into the client's :class:`ClientFailure`."""

    def run(task: ClientTask) -> ClientReply | ClientFailure:
        try:
            return step(task)
        except Exception as exc:
            return failure_of(task, exc)

    return run


def thread_map(max_workers: int, tolerate: bool = False) -> ClientMap:
    """Clients in ``max_workers`` threads of this process (``tolerate``: failures come back as such)."""

    def run(step: ClientStep, tasks: Sequence[ClientTask]) -> list[ClientReply | ClientFailure]:
        with ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(tolerant(step) if tolerate else step, tasks))

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
    min_fit_clients: int | None = None  # a round needs this many finished clients (None: every selected one)


@dataclass
class RoundResult:
    """A committed round."""

    server_round: int
    manifest_ref: ObjectRef
    manifest: RoundManifest
    outcome: RoundOutcome
    replies: list[ClientReply]
    timings: dict[str, float]
    failures: list[ClientFailure] = field(default_factory=list)

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
    returned = client_map(protocol.client_step, tasks)
    replies = sorted((r for r in returned if isinstance(r, ClientReply)), key=lambda r: r.client_id)
    failures = sorted((r for r in returned if isinstance(r, ClientFailure)), key=lambda r: r.client_id)
    _discard_uploads(store, [t for t in tasks if t.client_id in {f.client_id for f in failures}])
    needed = len(tasks) if federation.min_fit_clients is None else min(federation.min_fit_clients, len(tasks))
    if len(replies) < needed:
        _discard_replies(store, replies)
        first = next((f.error for f in failures if f.error is not None), None)
        if federation.min_fit_clients is None and first is not None and len(failures) == 1:
            raise first  # every client must finish: the one that did not, as it failed
        summary = "; ".join(f"{f.client_id}: {f.reason}" for f in failures)
        raise RoundFailedError(
            f"round {server_round}: {len(replies)} of {len(tasks)} clients finished, fewer than the "
            f"{needed} required (federate.min_fit_clients); not committed. Failed: {summary}"
        ) from first
    trained = time.perf_counter()
    try:
        outcome = call("aggregate", protocol.server_step, server_round, base_state, server_state, replies, store)
    except Exception:  # whatever refused the round, its uploads must not stay
        # A refused round (e.g. a non-finite update) is never committed: its uploads go now.
        _discard_replies(store, replies)
        raise
    aggregated = time.perf_counter()
    record = dict(outcome.record)
    if failures:  # recorded in the manifest; nothing of theirs is in the round
        record["failed_clients"] = {f.client_id: f.reason for f in failures}
    manifest_ref, manifest = call(
        "archive", federation.history.commit_round,
        federation.federation_id, server_round, head, outcome.updates, outcome.state, federation.model,
        protocol.describe(), federation.data_version, {r.client_id: dict(r.metrics) for r in replies},
        record, outcome.residual, outcome.server_state, dict(outcome.participants),
        dict(outcome.client_objects), dict(outcome.server_objects), dict(outcome.personal), dict(outcome.specs),
    )  # fmt: skip
    archived = time.perf_counter()
    timings = {
        "train_phase_s": trained - started,
        "aggregate_s": aggregated - trained,
        "archive_s": archived - aggregated,
    }
    return RoundResult(server_round, manifest_ref, manifest, outcome, replies, timings, failures)


def _discard_replies(store: Any, replies: Sequence[ClientReply]) -> None:
    for reply in replies:
        for ref in [reply.upload, *reply.objects.values()]:
            if ref is not None:
                store.delete(ref.key)


def _discard_uploads(store: Any, tasks: Sequence[ClientTask]) -> None:
    """Whatever failed clients wrote before they failed. (A timed-out client may still be running: a
    late write lands under the round's prefix, but no manifest names it, so nothing is attributed to it.)"""
    if not tasks:
        return
    names = {f"/{task.client_id}.safetensors" for task in tasks}
    for key in store.list(tasks[0].upload_prefix):
        if any(key.endswith(name) for name in names):
            store.delete(key)
