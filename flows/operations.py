"""Operations: scheduled retraining and event-triggered deletions, served by Prefect.

``fedforget serve`` keeps two deployments running in one process:

- ``federate/<prefix>-retrain``: the federation on a cron schedule, continuing
  from ``champion``, promoting only through the evaluation gate;
- ``process-deletion-request/<prefix>-unlearn``: triggered by the event
  ``fedforget.deletion.requested`` on resource ``fedforget.client.<id>``, with
  the request id in the payload.

``fedforget request-deletion`` files a request in the store (the outbox) and
then emits the event. ``serve`` also sweeps the store, at start and every
``operations.sweep_interval_s``, for requests still pending after
``operations.sweep_grace_s`` (their event was lost) and for failed ones due
for another attempt (``operations.retry_base_s``, doubling, at most
``operations.retry_max_attempts``), and starts them itself. A failure emits
``fedforget.deletion.failed``. A request names its registered model and runs
under the params profile that registers it.
Both flows hold the one-slot model-write limit, so a deletion that arrives
during a retraining is applied after it, to the model it produced.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger

from components.config.runtime import Runtime
from components.config.sections import Config, load_config, registered_model_profiles
from components.core.ids import validate_id
from components.federation.protocol import UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.guard import present_clients
from components.unlearning.requests import (
    EVENT_NAME,
    RESOURCE_PREFIX,
    DeletionRequest,
    RequestBook,
    RequestError,
)
from components.unlearning.tombstones import read_tombstone, validate_client_id
from flows.ledger import forgotten_for
from flows.tracking import Tracker
from flows.unlearn import unlearn

FAILED_EVENT = "fedforget.deletion.failed"  # a deletion run failed; the sweep retries it with backoff


class MalformedRequest(ValueError):
    """A deletion event that does not name a valid request (nothing can be done with it)."""


def deployment_names(config: Config) -> dict[str, str]:
    prefix = config.operations.deployment_prefix
    return {"retrain": f"federate/{prefix}-retrain", "unlearn": f"process-deletion-request/{prefix}-unlearn"}


def _mark_crashed(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` hook: a run killed mid-way leaves its request failed, not running forever."""
    params = flow_run.parameters or {}
    try:
        runtime = Runtime.from_env(params.get("project"))
        book = RequestBook(open_store(runtime.store))
        book.move(params["request_id"], "failed", error=f"the flow run crashed: {state.message or state.name}")
    except Exception:  # a hook must never raise
        pass


@flow(name="process-deletion-request", on_crashed=[_mark_crashed])
def process_deletion_request(
    request_id: str = "",
    resource_id: str = "",
    profile: str = "default",
    project: str | None = None,
) -> dict[str, Any]:
    """Apply one filed deletion request (what the event trigger and the sweep start).

    The request record in the store is the source of truth; the event only
    says which record. A record that is already done is reported, not redone.
    """
    logger = get_run_logger()
    if not request_id:
        raise MalformedRequest("the deletion event carries no request_id in its payload; nothing was done")
    try:
        validate_id(request_id, "request id")
    except ValueError as exc:
        raise MalformedRequest(f"malformed deletion event: {exc}") from None
    runtime = Runtime.from_env(project)
    book = RequestBook(open_store(runtime.store))
    try:
        request = book.get(request_id)
    except RequestError as exc:
        raise MalformedRequest(f"malformed deletion event: {exc}") from None
    if request.model is not None:  # the profile that registers the request's model, whatever serve's own
        profiles = registered_model_profiles(runtime.params_path)
        if request.model not in profiles:
            reason = f"no params profile registers model {request.model!r}; known: {sorted(profiles)}"
            if request.status != "done":
                book.move(request_id, "failed", error=reason)
            raise MalformedRequest(reason)
        profile = profiles[request.model]
    if resource_id and resource_id != request.resource_id:
        reason = f"the event's resource {resource_id!r} does not match the request's {request.resource_id!r}"
        if request.status != "done":
            book.move(request_id, "failed", error=reason)
        raise MalformedRequest(reason)
    if request.status == "done":
        logger.info("request %s is already done (version %s)", request_id, request.version)
        return {"request_id": request_id, "status": "done", "version": request.version, "repeated": True}
    book.move(request_id, "running", error=None)
    logger.info("applying deletion request %s: forget %s", request_id, request.client_id)
    try:
        result = unlearn(
            client_id=request.client_id, request_id=request_id, profile=profile, project=project, reason=request.reason
        )
    except Exception as exc:
        failed = book.move(request_id, "failed", error=f"{type(exc).__name__}: {exc}")
        logger.error("deletion request %s failed (attempt %d): %s", request_id, failed.failures, failed.error)
        emit_failure(failed)
        raise
    book.move(request_id, "done", version=result["version"])
    return {"request_id": request_id, "status": "done", "version": result["version"], "result": result["status"]}


# --------------------------------------------------------------------------- filing requests


def request_deletion(
    client_id: str, reason: str | None = None, profile: str = "default", project: str | None = None
) -> tuple[DeletionRequest, bool, bool]:
    """Validate, file (pending) and announce a deletion request.

    Returns the request, whether it is new (an open request for the same
    client is returned instead of filing a second one) and whether the event
    was handed to Prefect. Unknown or already forgotten clients raise
    :class:`UnlearningError` and nothing is filed.
    """
    validate_client_id(client_id)
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile)
    store = open_store(runtime.store)
    model = config.registry.model_name
    tombstone = read_tombstone(store, model, client_id)
    if tombstone is not None:
        raise UnlearningError(
            f"{client_id} was already forgotten from {model} by request {tombstone['request_id']} "
            f"(version {tombstone['resulting_version']}); nothing filed"
        )
    book = RequestBook(store)
    existing = book.open_for(client_id, model)
    if existing is not None:
        return existing, False, False
    tracker = Tracker(runtime, config.registry)
    champion = tracker.alias()
    if champion is None:
        hint = tracker.missing(
            f"alias {config.registry.champion_alias!r}", registered_model_profiles(runtime.params_path)
        )
        raise UnlearningError(f"nothing to forget from: {hint}; nothing filed")
    # any protocol's record of who trained (not only running sums): the champion's replayed lineage
    if client_id not in present_clients(UpdateHistory(store), manifest_ref_from_tags(champion.tags)):
        raise UnlearningError(
            f"unknown client {client_id}: champion version {champion.version} of {model} holds no contribution "
            "of it; nothing filed"
        )
    request = book.file(client_id, reason, model=model)  # durable first ...
    return request, True, emit_request(request)  # ... then announced


def emit_request(request: DeletionRequest, timeout_s: float = 10.0) -> bool:
    """Emit the deletion event and wait for it to be sent; False if it could not be."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    try:
        event = emit_event(
            event=EVENT_NAME,
            resource={"prefect.resource.id": request.resource_id, "prefect.resource.name": request.client_id},
            payload={"request_id": request.request_id},
        )
        if event is None:
            return False
        _done, not_done = EventsWorker.drain_all(timeout=timeout_s)
        return not not_done
    except Exception:  # the request is filed; serve's sweep covers a lost event
        return False


# --------------------------------------------------------------------------- serving


def sweep_pending(config: Config, runtime: Runtime, dispatch: Any) -> list[str]:
    """Start every request pending for longer than the grace period (its event was lost), and every failed
    one due for another attempt (backoff doubling from ``operations.retry_base_s``)."""
    book = RequestBook(open_store(runtime.store))
    ops = config.operations
    started = []
    due = [*book.stale_pending(ops.sweep_grace_s), *book.retryable(ops.retry_base_s, ops.retry_max_attempts)]
    for request in due:
        dispatch(request)
        book.note_dispatch(request.request_id)
        started.append(request.request_id)
    return started


def emit_failure(request: DeletionRequest) -> None:
    """Tell Prefect (and whoever automates on its events) that a deletion failed; best effort."""
    try:
        from prefect.events import emit_event

        emit_event(
            event=FAILED_EVENT,
            resource={"prefect.resource.id": request.resource_id, "prefect.resource.name": request.client_id},
            payload={"request_id": request.request_id, "error": request.error, "failures": request.failures},
        )
    except Exception:  # the failure is recorded in the request either way
        pass


def _dispatcher(config: Config, runtime: Runtime, profile: str) -> Any:
    from prefect.deployments import run_deployment

    name = deployment_names(config)["unlearn"]
    common = {"profile": profile, "project": str(runtime.root)}

    def dispatch(request: DeletionRequest) -> None:
        run_deployment(
            name, parameters={"request_id": request.request_id, "resource_id": request.resource_id, **common}, timeout=0
        )

    return dispatch


@flow(name="sweep-deletion-requests")
def sweep_deletion_requests(profile: str = "default", project: str | None = None) -> list[str]:
    """Start requests whose event was lost (the interval deployment of prefect.yaml runs this)."""
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile)
    return sweep_pending(config, runtime, _dispatcher(config, runtime, profile))


def serve(
    profile: str = "default",
    project: str | None = None,
    sweep: bool = True,
    on_start: Callable[[Config], None] | None = None,
) -> None:
    """Serve the retraining and unlearning deployments until interrupted (``on_start`` sees the config)."""
    from prefect import serve as prefect_serve
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.federate import federate
    from flows.locks import ensure_model_write_limit

    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile)
    if on_start is not None:
        on_start(config)
    ops = config.operations
    names = deployment_names(config)
    ensure_model_write_limit(ops.model_write_limit)
    common = {"profile": profile, "project": str(runtime.root)}
    retrain = federate.to_deployment(
        name=names["retrain"].split("/", 1)[1],
        schedules=[Cron(ops.retrain_cron, timezone=ops.timezone)],
        parameters={**common, "promote": ops.promote},
        description="Scheduled retraining: continues from champion, promotes through the gate.",
    )
    deletions = process_deletion_request.to_deployment(
        name=names["unlearn"].split("/", 1)[1],
        triggers=[
            DeploymentEventTrigger(
                expect={EVENT_NAME},
                match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
                parameters={
                    "request_id": "{{ event.payload.request_id }}",
                    "resource_id": "{{ event.resource.id }}",
                    **common,
                },
            )
        ],
        parameters=common,
        description="Applies a filed deletion request (fedforget request-deletion).",
    )

    _report_tainted_champion(config, runtime)
    dispatch = _dispatcher(config, runtime, profile)
    interrupted = _interrupted_requests(runtime)
    if sweep or interrupted:

        def sweeper() -> None:
            while True:
                try:
                    while interrupted:  # started again once, before any sweep
                        dispatch(interrupted[0])
                        print(f"resumed request {interrupted.pop(0).request_id} (its run was interrupted)", flush=True)
                    for request_id in sweep_pending(config, runtime, dispatch) if sweep else ():
                        print(f"sweep: started pending request {request_id} (its event was lost)", flush=True)
                except Exception as exc:  # keep sweeping; the next pass retries
                    print(f"sweep failed: {type(exc).__name__}: {exc}", flush=True)
                time.sleep(ops.sweep_interval_s)

        threading.Thread(target=sweeper, name="fedforget-sweep", daemon=True).start()
    with _shared_api():
        prefect_serve(retrain, deletions)


def _interrupted_requests(runtime: Runtime) -> list[DeletionRequest]:
    """At start: requests still ``running``, whose run died with the serve that ran it (SIGKILL, power loss).

    No hook marks such a run crashed, and the sweep starts only ``pending``
    requests, so these would stay ``running`` for ever: serve starts them again.
    Harmless if one is in fact still running elsewhere: the second run waits
    for the model-write slot, then finds the client forgotten and reports it.
    """
    try:
        return [r for r in RequestBook(open_store(runtime.store)).open_requests() if r.status == "running"]
    except Exception as exc:  # serving must start; a later serve retries
        print(f"could not read the running requests: {type(exc).__name__}: {exc}", flush=True)
        return []


def _report_tainted_champion(config: Config, runtime: Runtime) -> None:
    """At start: say loudly if champion still holds a forgotten client (retraining will refuse it)."""
    from components.unlearning.guard import forgotten_in

    try:
        champion = Tracker(runtime, config.registry).alias()
        if champion is None:
            return
        store = open_store(runtime.store)
        tracker = Tracker(runtime, config.registry)
        tainted = forgotten_in(
            UpdateHistory(store),
            store,
            manifest_ref_from_tags(champion.tags),
            config.registry.model_name,
            forgotten_for(tracker, store),
        )
    except Exception as exc:  # serving must start; the flows check again
        print(f"could not check {config.registry.champion_alias}'s lineage: {type(exc).__name__}: {exc}", flush=True)
        return
    if tainted:
        print(
            f"ERROR: {config.registry.champion_alias} (version {champion.version}) still contains forgotten "
            f"client(s) {', '.join(tainted)}: scheduled retraining will refuse to train from it until "
            f"{config.registry.champion_alias} points at a clean version",
            flush=True,
        )


@contextmanager
def _shared_api() -> Iterator[None]:
    """Without ``PREFECT_API_URL``, one temporary server for this process and the runs it spawns.

    Each flow run is a subprocess; without a URL to inherit every one of them
    would start a temporary server of its own.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the flow-run subprocesses
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        server.stop()
