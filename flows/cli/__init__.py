"""``fedforget``: the command line, one verb per job (see ``fedforget --help``)."""

from __future__ import annotations

from flows.cli import data, demo, verbs
from flows.cli.app import app

__all__ = ["app", "data", "demo", "main", "verbs"]  # the verb modules register themselves on import


def main() -> None:  # pragma: no cover - console script
    app()
