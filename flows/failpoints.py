"""Failpoints: named places where the fault-injection suite can stop a process on purpose.

Inactive unless ``FEDFORGET_FAILPOINT`` names the point (``<point>=<action>``,
several separated by ``;``). Actions:

``kill``
    SIGKILL this process at that point (a crash: no cleanup, no ``finally``).
``pause:<path>``
    Create ``<path>.reached``, then wait (up to 10 minutes) until ``<path>``
    exists, so a harness can break something (stop a server) at exactly that
    moment and then let the process go on.
``raise``
    Raise :class:`FailpointError` there (a client that crashes).
``sleep:<seconds>``
    Sleep there, in short steps (a client that hangs past its timeout).

Production never sets the variable; each call costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "FEDFORGET_FAILPOINT"


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def failpoint(name: str) -> None:
    """Act if ``FEDFORGET_FAILPOINT`` names ``name``; otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(";"):
        point, _, action = item.partition("=")
        if point.strip() != name:
            continue
        action = action.strip()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise FailpointError(f"failpoint {name}")
        elif action.startswith("sleep:"):
            deadline = time.monotonic() + float(action[len("sleep:") :])
            while time.monotonic() < deadline:  # short steps: a task timeout can interrupt it
                time.sleep(0.05)
        elif action.startswith("pause:"):
            gate = Path(action[len("pause:") :])
            gate.with_name(gate.name + ".reached").touch()
            deadline = time.monotonic() + 600
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
