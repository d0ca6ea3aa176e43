"""Failpoints stay inert unless named, and do what they say when they are."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from flows.failpoints import ENV, failpoint


def test_an_unnamed_failpoint_does_nothing(monkeypatch):
    monkeypatch.setenv(ENV, "somewhere:else=kill")
    failpoint("unlearn:after-distill")  # still alive


def test_kill_ends_the_process_abruptly():
    code = "from flows.failpoints import failpoint; failpoint('p'); print('survived')"
    result = subprocess.run(
        [sys.executable, "-c", code], env={ENV: "p=kill"}, capture_output=True, text=True, check=False
    )
    assert result.returncode == -9 and "survived" not in result.stdout


def test_pause_waits_for_the_harness(tmp_path, monkeypatch):
    gate = tmp_path / "go"
    monkeypatch.setenv(ENV, f"p=pause:{gate}")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (failpoint("p"), done.set()))
    worker.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "go.reached").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not done.is_set()
    gate.touch()
    worker.join(10)
    assert done.is_set()
