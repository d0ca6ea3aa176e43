"""``fedforget``: the command line, one verb per job (see ``fedforget --help``)."""

from __future__ import annotations

import logging
import os

from flows.cli import data, demo, verbs
from flows.cli.app import app

__all__ = ["app", "data", "demo", "main", "verbs"]  # the verb modules register themselves on import


class _NoRunTracebacks(logging.Filter):
    """Without ``--verbose``, Prefect's flow and task run loggers keep their one-line message, not the traceback.

    A failed run logs its exception with the traceback at ERROR, which the
    ``WARNING`` level of quiet mode lets through; the verb prints the error as
    its one ``error:`` line itself. ``--verbose`` (``FEDFORGET_VERBOSE=1``)
    keeps the tracebacks, here and in the Prefect UI.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("FEDFORGET_VERBOSE") != "1":
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


def main() -> None:  # pragma: no cover - console script
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoRunTracebacks())
    app()
