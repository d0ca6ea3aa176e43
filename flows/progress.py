"""Progress reporting from flows to whoever called them (the CLI's progress bar).

Flows stay free of UI code: they call :func:`report_progress`, and a caller that
wants updates sets a callback with :func:`progress_callback` around the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

ProgressCallback = Callable[[int, int, Mapping[str, Any], str], None]
_CALLBACK: ContextVar[ProgressCallback | None] = ContextVar("fedforget_progress", default=None)


@contextmanager
def progress_callback(callback: ProgressCallback) -> Iterator[None]:
    """Send ``(done, total, metrics, version)`` to ``callback`` while the block runs."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)


def report_progress(done: int, total: int, metrics: Mapping[str, Any], version: str) -> None:
    callback = _CALLBACK.get()
    if callback is not None:
        callback(done, total, metrics, version)
