"""The ``fedforget`` Typer app and what every verb shares: consoles, options, error handling.

Heavy libraries (torch, prefect, mlflow, dvc) are imported inside the verbs, so
``fedforget --help`` is instant and logging is configured before they load.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    name="fedforget",
    help="Federated learning with on-demand unlearning, tracked in MLflow and orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="params profile: default or one under profiles:")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a param, e.g. --set train.lr=0.01 (repeatable)"),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect and MLflow logs")]

QUICK_PROFILE = "quick"


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


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


def quiet(verbose: bool) -> None:
    """Configure logging of the libraries before they are imported."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoRunTracebacks) for f in logger.filters):
            logger.addFilter(_NoRunTracebacks())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The temporary Prefect server migrates a fresh database on its first start: more
    # than Prefect's default 20 s on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if verbose:
        os.environ["FEDFORGET_VERBOSE"] = "1"
    else:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        import warnings

        warnings.filterwarnings("ignore", module="mlflow")
        warnings.filterwarnings("ignore", message=".*Dim.AUTO.*")


def run_verb(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; errors become one line on stderr, never a traceback (unless ``--verbose``).

    Errors a user can fix (bad params or input, missing data, an unreachable
    store, a refused deletion) exit with status 2; anything unexpected with 1.
    """
    from components.config.sections import ConfigError
    from components.data.datasets import DataError
    from components.lineage.store import StoreError

    try:
        return fn(*args, **kwargs)
    except (
        UsageError,
        ConfigError,
        DataError,
        StoreError,
        ValueError,
        KeyError,
    ) as exc:  # incl. UnlearningError, RequestError
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # the last line of defence against a traceback
        if os.environ.get("FEDFORGET_VERBOSE") == "1":
            console.print_exception()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(
            f"[red]error:[/red] {type(exc).__name__}: {first} (rerun with --verbose for details)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def overrides_from(items: list[str] | None, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--set key=value`` items, then the verb's own flags (those given) on top."""
    from components.config.sections import parse_override

    overrides = run_verb(lambda: dict(parse_override(item) for item in items or []))
    overrides.update({key: value for key, value in (flags or {}).items() if value is not None})
    return overrides
