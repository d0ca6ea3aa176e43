"""One model writer at a time: retraining and unlearning never change the model concurrently.

Every writer (``federate``, ``unlearn``, whether started by the CLI or by
``serve``'s flow runs) takes the same lock, and the lock is strict: a writer
that cannot hold it does not write.

- Always: a file lock beside the project's state (``.fedforget/model-writes.lock``),
  so a CLI command and ``serve`` on one machine take turns, whatever Prefect
  server each talks to (``serve`` runs a private one when none is configured).
- With a Prefect server (``PREFECT_API_URL`` set) as well: a global
  concurrency limit with one slot, named by ``operations.model_write_limit``,
  taken strictly (Prefect raises when the limit does not exist, instead of
  running unlocked), so writers on other machines sharing that server take
  turns too. ``fedforget serve`` creates the limit, and so does the first
  model writer of a process that finds it missing.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from components.config.runtime import Runtime
from components.config.sections import Config

LOCK_FILE = "model-writes.lock"
_ENSURED: set[str] = set()  # limits this process has checked (one API round trip each, not per run)
_ENSURED_LOCK = threading.Lock()


@contextmanager
def model_write_lock(config: Config, runtime: Runtime) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL

    with file_lock(runtime.state_dir / LOCK_FILE):
        if not PREFECT_API_URL.value():
            yield
            return
        with _global_slot(config.operations.model_write_limit):
            yield


@contextmanager
def _global_slot(name: str) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    with _ENSURED_LOCK:
        if name not in _ENSURED:
            ensure_model_write_limit(name)
            _ENSURED.add(name)
    slot = concurrency(name, occupy=1, strict=True)  # no limit, no write
    slot.__enter__()
    try:
        yield
    except BaseException:
        _release(slot, name, sys.exc_info())
        raise
    _release(slot, name, (None, None, None))


def _release(slot: AbstractContextManager[None], name: str, exc_info: Any) -> None:
    """Give the slot back; if the Prefect server cannot be reached now, its lease frees it later.

    The model write is finished (or failed) by then: a release that fails (the
    server restarting) must not turn a completed federation or deletion into an
    error. The lease (Prefect's default, 300 s) expires and the server
    reclaims the slot, so the next writer waits at most that long.
    """
    try:
        slot.__exit__(*exc_info)
    except Exception as exc:
        if exc is exc_info[1]:
            raise
        logging.getLogger(__name__).warning(
            "could not release the model-write slot %s (%s: %s); it is freed when its lease expires",
            name, type(exc).__name__, exc,
        )  # fmt: skip


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), released even if the process dies."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def ensure_model_write_limit(name: str) -> None:
    """Create the one-slot global concurrency limit if the Prefect server lacks it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
                return
            except Exception:  # another writer created it first: fall through and check it
                existing = client.read_global_concurrency_limit_by_name(name)
        if existing.limit != 1 or not existing.active:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
