"""Where clients train: the task runner from ``federate.task_runner``, and the round's injections.

Every flow that federates builds its runner here, from config, inside the flow
run: so the CLI, the deployments ``fedforget serve`` runs and any other caller
honour ``federate.task_runner`` alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from components.config.sections import Config
from components.federation.protocol import ClientFailure, ClientReply, ClientTask, Protocol
from components.federation.rounds import Call, ClientMap, ClientStep, failure_of
from flows.failpoints import failpoint


def build_task_runner(config: Config) -> TaskRunner[Any]:
    """The task runner that trains clients in parallel (``federate.task_runner``).

    ``dask`` (prefect-dask) connects to ``federate.dask_address`` or
    ``FEDFORGET_DASK_ADDRESS`` when either is set, else starts a
    ``LocalCluster`` of ``max_workers`` single-threaded worker processes for
    the run. Clients read and write only the object store, so a remote worker
    needs nothing of the flow's filesystem (a local folder store must then be
    a shared mount; use S3).
    """
    workers = config.federate.max_workers
    if config.federate.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if config.federate.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        address = config.federate.dask_address or os.environ.get("FEDFORGET_DASK_ADDRESS") or None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        )
    return ThreadPoolTaskRunner(max_workers=workers)


@task(name="train-client", cache_policy=NO_CACHE, task_run_name="train-{client.client_id}-r{client.server_round}")
def train_client_task(protocol: Protocol, client: ClientTask) -> ClientReply:
    failpoint(f"train-client:{client.client_id}")
    return protocol.client_step(client)


def prefect_client_map(runner: TaskRunner[Any], protocol: Protocol, timeout_s: float | None = None) -> ClientMap:
    """One ``train-client`` task per client, on ``runner`` (entered by the caller).

    A client task that raises, or runs longer than ``timeout_s`` (Prefect's
    task timeout: it counts the client's own run, not its time in the queue),
    comes back as a :class:`ClientFailure`; the round decides whether enough
    clients finished.
    """
    train = train_client_task.with_options(timeout_seconds=timeout_s) if timeout_s else train_client_task

    def run(step: ClientStep, tasks: Sequence[ClientTask]) -> list[ClientReply | ClientFailure]:
        futures = [runner.submit(train, parameters={"protocol": protocol, "client": t}) for t in tasks]
        returned: list[ClientReply | ClientFailure] = []
        for client, future in zip(tasks, futures):
            try:
                returned.append(future.result())
            except Exception as exc:
                returned.append(failure_of(client, exc))
        return returned

    return run


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate_task(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


@task(name="archive-round", cache_policy=NO_CACHE)
def archive_task(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def prefect_call(config: Config) -> Call:
    """The server's steps as Prefect tasks; the archive retried (store I/O)."""
    archive = archive_task.with_options(
        retries=config.federate.archive_retries, retry_delay_seconds=config.federate.archive_retry_delay_s
    )
    tasks = {"aggregate": aggregate_task, "archive": archive}

    def call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return tasks[name](fn, *args)

    return call
