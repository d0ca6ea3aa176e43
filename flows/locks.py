"""One model writer at a time: retraining and unlearning never change the model concurrently.

A Prefect global concurrency limit with one slot, named by
``operations.model_write_limit``, held for the whole of a federation or a
deletion. ``fedforget serve`` creates it, and so does every model writer that
runs against a shared Prefect server (``PREFECT_API_URL`` set), so two
``fedforget`` commands started by hand against one server also take turns.
Without a shared server (the temporary per-process one) there is nothing to
share and no limit is taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from components.config import Config


@contextmanager
def model_write_lock(config: Config) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # a temporary per-process server: no other writer can reach it
        yield
        return
    ensure_model_write_limit(config.operations.model_write_limit)
    with concurrency(config.operations.model_write_limit, occupy=1, strict=False):
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
