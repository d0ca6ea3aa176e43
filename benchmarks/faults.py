"""Fault-injection suite (issue 17, part 3): break the real local stack on purpose, check nothing is lost.

Starts the ``infra/`` stack (SeaweedFS, MLflow server, Prefect server) on free
ports in a temporary folder, gives every fault a tiny digits project of its own
(its own store prefix, registered model, Prefect concurrency limit and
deployments), injects the fault (a failpoint of :mod:`flows.failpoints`, a
stopped server, a killed process, a damaged object, a full disk), and checks
the outcome through the CLI, as a user would drive it:

``survived``
    The faulted command either completed or refused with a clear one-line
    ``error:`` (no traceback anywhere in the CLI's output), and the system did
    what the fault's contract says afterwards (the rerun completed, the
    requests were applied...).
``data_lost``
    Anything committed before the fault vanished or changed (objects compared
    by sha256, except what a tombstone or retirement record explains, i.e. a
    purge or a retirement), a registered version vanished or changed its
    lineage tags, a version is half-registered (its manifest is missing), a
    round or a deletion request is registered twice, a deletion request was
    lost, or the audit (``fedforget audit --json`` on the champion, plus every
    version audited in-process) reports findings other than exactly the
    injected damage.

Leftovers (archived objects no registered version references) are reported
in the detail: garbage, not lost data.

Usage::

    .venv/bin/python benchmarks/faults.py --out /tmp/faults-run
    .venv/bin/python benchmarks/faults.py --out /tmp/f --only corrupted-running-sum,manifest-deleted
    .venv/bin/python benchmarks/faults.py --list

Writes ``<out>/faults.json`` (``{"rows": [{"fault", "survived", "data_lost",
"detail", "seconds"}], ...}``) and ``<out>/logs/<fault>/`` (every command's
output), and prints a table. The disk-full fault mounts a small tmpfs, which
needs root; without it that row says so (``survived``/``data_lost`` null).
Exit status 0 when every fault that ran survived without data loss, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# This process reads the registry and the store to check them: keep its own clients patient but bounded.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("FEDFORGET_S3_MAX_ATTEMPTS", "3")

from tests.conftest import TINY_PARAMS, write_project  # noqa: E402 - after the path and the environment
from tests.stack_fixture import Stack  # noqa: E402

FEDFORGET = str(Path(sys.executable).parent / "fedforget")
TRACEBACK = "Traceback (most recent call last)"
BUCKET = "fedforget"
FAULT_BUDGET_S = 1500.0  # every fault is time-boxed: no command of it may run past this
CALL_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------- records


@dataclass
class Fault:
    """One row of the report.

    Attributes
    ----------
    fault
        The fault's name.
    survived
        Completed, or refused with a clear one-line error, and recovered as its contract says
        (``None``: the fault could not be injected here).
    data_lost
        Something committed before the fault is gone or changed, or half-registered, or a request was
        lost or applied twice (``None``: not checked).
    detail
        What happened, in a few sentences.
    seconds
        Wall time of the fault, setup and checks included.
    """

    fault: str
    survived: bool | None
    data_lost: bool | None
    detail: str
    seconds: float = 0.0


class FaultTimeout(RuntimeError):
    """The fault's time box ran out."""


@dataclass
class Run:
    """A finished CLI command and its output."""

    args: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.output

    @property
    def error_line(self) -> str | None:
        """The CLI's own one-line error (``error: ...``), if it printed one.

        The console may wrap a long error at its width: the lines after it are
        joined back on (up to the next log line, which starts with a time).
        """
        lines = self.stderr.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
        if not starts:
            return None
        text = [lines[starts[-1]].strip()]
        for line in lines[starts[-1] + 1 :]:
            if not line.strip() or re.match(r"\d\d:\d\d:\d\d", line):
                break
            text.append(line.strip())
        return " ".join(text)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def clean_refusal(self) -> bool:
        """Refused with ``error: ...`` and a non-zero status, no traceback (the CLI's contract)."""
        return self.returncode not in (0, None) and not self.timed_out and bool(self.error_line) and not self.traceback

    def json(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.stdout[self.stdout.index("{") :])
        except ValueError:
            return None

    def describe(self) -> str:
        """``rc 0``, ``rc 2: error: ...``, ``killed by signal 9``, ``timed out after N s`` (+ traceback note)."""
        verb = self.args[0] if self.args else "?"
        if self.timed_out:
            text = f"{verb} timed out after {self.seconds:.0f} s"
        elif self.returncode is not None and self.returncode < 0:
            text = f"{verb} killed by signal {-self.returncode}"
        elif self.returncode == 0:
            text = f"{verb} completed ({self.seconds:.0f} s)"
        else:
            line = self.error_line or _last_line(self.stderr) or "no error message"
            text = f"{verb} exited {self.returncode}: {_clip(line, 220)}"
        if self.traceback:
            logged = re.search(r"\| ERROR\s+\| (Flow|Task) run", self.output)
            text += " [a traceback is in its output" + (", logged by Prefect's run logger]" if logged else "]")
        return text


@dataclass
class Spawned:
    """A command started in the background (see :meth:`Project.spawn`)."""

    process: subprocess.Popen[bytes]
    stem: Path  # its output is in <stem>.out and <stem>.err
    args: tuple[str, ...]
    started: float
    gate: Path | None = None  # the pause failpoint's gate, if it has one

    def release(self) -> None:
        """Let a command paused at its failpoint go on."""
        if self.gate is not None:
            self.gate.touch()


@dataclass
class Snapshot:
    """The archive and the registry of one project at one moment."""

    objects: dict[str, str]  # key -> sha256
    versions: dict[str, dict[str, str]]  # version -> tags
    champion: str | None

    def version_keys(self) -> list[str]:
        return sorted(self.versions, key=int)


@dataclass
class Verdict:
    """What the checks of one fault found: problems (data loss), failures (not survived), notes."""

    lost: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, name: str, seconds: float) -> Fault:
        parts = []
        if self.failed:
            parts.append("NOT SURVIVED: " + "; ".join(self.failed))
        if self.lost:
            parts.append("DATA LOST: " + "; ".join(self.lost))
        parts += self.notes
        return Fault(name, not self.failed, bool(self.lost), " | ".join(parts) or "ok", round(seconds, 1))


# --------------------------------------------------------------------------- helpers


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _kill_tree(pid: int) -> None:
    """SIGKILL a process group and any descendant that left it (a crash of the whole host process)."""
    descendants = _descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 1.0) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


# --------------------------------------------------------------------------- projects


class Project:
    """A tiny digits project with its own store, registered model and Prefect names on the shared stack.

    Parameters
    ----------
    suite
        The running suite (the stack, the scratch folder, the log folder).
    fault
        The fault's name (logs go to ``<out>/logs/<fault>/``).
    clients
        Number of clients.
    store
        ``None`` for ``s3://fedforget/<name>`` on the stack, or a local folder.
    operations
        Add the ``operations`` section ``fedforget serve`` needs (fast sweep).
    """

    def __init__(
        self, suite: Suite, fault: str, clients: int = 3, store: Path | None = None, operations: bool = False
    ) -> None:
        self.suite = suite
        self.fault = fault
        self.name = f"f{uuid.uuid4().hex[:8]}"
        self.tmp = suite.scratch / self.name
        self.logs = suite.out / "logs" / fault
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + FAULT_BUDGET_S
        self._calls = 0
        params = {
            **TINY_PARAMS,
            "data": {**TINY_PARAMS["data"], "num_clients": clients},
            "federate": {**TINY_PARAMS["federate"], "prefit_teacher": False},
            "unlearn": {"variant": "subtract", "teacher": "none"},
            "registry": {"model_name": self.name, "experiment": self.name},
            "operations": {"model_write_limit": f"{self.name}-writes", "deployment_prefix": self.name},
        }
        if operations:
            params["operations"] |= {"retrain_cron": "15 3 * * 1", "sweep_interval_s": 1, "sweep_grace_s": 20}
        self.root = write_project(self.tmp / "project", params)
        self.store_url = str(store) if store is not None else f"s3://{BUCKET}/{self.name}"
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FEDFORGET_"))}
        self.env = keep | suite.stack.client_env()
        self.env |= {
            "FEDFORGET_PROJECT": str(self.root),
            "FEDFORGET_STORE": self.store_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }

    # ---- commands
    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FaultTimeout(f"the fault's time box ({FAULT_BUDGET_S:.0f} s) ran out")
        return left

    def spawn(self, *args: str, env: dict[str, str] | None = None, tag: str = "") -> Spawned:
        """Start ``fedforget <args>`` in a session of its own; its output goes to the fault's log folder."""
        self._calls += 1
        stem = self.logs / f"{self._calls:02d}-{args[0]}{'-' + tag if tag else ''}"
        with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
            process = subprocess.Popen(
                [FEDFORGET, *args], env={**self.env, **(env or {})}, stdout=out, stderr=err, start_new_session=True
            )
        return Spawned(process, stem, args, time.monotonic())

    def finish(self, spawned: Spawned, timeout: float = CALL_TIMEOUT_S) -> Run:
        """Wait for a spawned command (killing its process tree if it runs past ``timeout``)."""
        process = spawned.process
        timed_out = False
        try:
            process.wait(min(timeout, max(1.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(process.pid)
            process.wait()
        return Run(
            spawned.args,
            process.returncode,
            Path(f"{spawned.stem}.out").read_text(errors="replace"),
            Path(f"{spawned.stem}.err").read_text(errors="replace"),
            time.monotonic() - spawned.started,
            timed_out,
        )

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = CALL_TIMEOUT_S) -> Run:
        """Run ``fedforget <args>`` to the end (time-boxed)."""
        self.remaining()
        return self.finish(self.spawn(*args, env=env), timeout)

    def federate(self, rounds: int, env: dict[str, str] | None = None) -> Run:
        return self.cli("federate", "--json", "--rounds", str(rounds), env=env)

    def setup(self, rounds: int = 1) -> Run:
        """Federate the project's first rounds; a failure here is the harness's, not the fault's."""
        run = self.federate(rounds)
        if not run.ok:
            raise RuntimeError(f"setup federation failed: {run.describe()}\n{run.stderr[-2000:]}")
        return run

    # ---- paused commands
    @contextlib.contextmanager
    def paused(self, point: str, *args: str, env: dict[str, str] | None = None) -> Iterator[Spawned]:
        """Start ``fedforget <args>`` with the failpoint ``point`` pausing it; the block runs while it waits.

        ``spawned.release()`` lets it go on; leaving the block releases it too
        (without waiting for it: ``finish(spawned)`` does).
        """
        gate = self.tmp / f"gate-{uuid.uuid4().hex[:6]}"
        spawned = self.spawn(*args, env={**(env or {}), "FEDFORGET_FAILPOINT": f"{point}=pause:{gate}"}, tag="paused")
        spawned.gate = gate
        reached = gate.with_name(gate.name + ".reached")
        if not wait_for(
            lambda: reached.exists() or spawned.process.poll() is not None, min(480, self.remaining()), 0.5
        ):
            _kill_tree(spawned.process.pid)
        if not reached.exists():
            run = self.finish(spawned, 30)
            raise RuntimeError(f"the command never reached failpoint {point}: {run.describe()}\n{run.stderr[-2000:]}")
        try:
            yield spawned
        finally:
            spawned.release()

    # ---- state
    def store(self) -> Any:
        from components.lineage.store import open_store

        return open_store(self.store_url)

    def tracker(self) -> Any:
        from components.config.runtime import Runtime
        from components.config.sections import load_config
        from flows.tracking import Tracker

        runtime = Runtime(
            root=self.root, params_path=self.root / "params.yaml", store=self.store_url,
            tracking_uri=self.env["MLFLOW_TRACKING_URI"],
        )  # fmt: skip
        return Tracker(runtime, load_config(runtime.params_path).registry)

    def snapshot(self) -> Snapshot:
        """Every object with its sha256, every registered version with its tags, and the champion."""
        from components.core.refs import sha256_bytes

        store = self.store()
        objects = {key: sha256_bytes(store.get(key)) for key in store.list("")}
        tracker = self.tracker()
        versions = {v.version: dict(v.tags) for v in tracker.versions()}
        champion = tracker.alias()
        return Snapshot(objects, versions, champion.version if champion else None)

    def audit(self) -> tuple[Run, list[dict[str, Any]]]:
        """``fedforget audit --json`` of the champion: the run and its findings."""
        run = self.cli("audit", "--json")
        report = run.json() or {}
        return run, list(report.get("findings", []))


# --------------------------------------------------------------------------- checks


def explained_removals(store: Any) -> dict[str, str]:
    """Objects a deletion removed on purpose (key -> the sha256 its record kept): purges and retirements."""
    from components.audit.audit import read_tombstones
    from components.unlearning.retire import read_retirements

    explained = {p["key"]: p["sha256"] for t in read_tombstones(store, None).values() for p in t.get("purged", [])}
    for record in read_retirements(store):
        explained.update({s["key"]: s["sha256"] for s in record.get("states", [])})
    return explained


def compare(
    project: Project, before: Snapshot, after: Snapshot, verdict: Verdict, injected: frozenset[str] = frozenset()
) -> None:
    """Add to ``verdict.lost`` whatever was committed in ``before`` and is gone or changed in ``after``.

    Objects a tombstone (purge) or a retirement record explains may go; request
    records may change status but not vanish; ``injected`` keys are the fault's own damage.
    """
    explained = explained_removals(project.store())
    for key, sha in sorted(before.objects.items()):
        if key in injected or key.startswith("requests/open/"):
            continue
        now = after.objects.get(key)
        if key.startswith("requests/"):
            if now is None:
                verdict.lost.append(f"deletion request record {key} vanished")
            continue
        if now == sha or (now is None and explained.get(key) == sha):
            continue
        verdict.lost.append(f"{key} {'vanished' if now is None else 'changed'}")
    lineage_tags = ("manifest_key", "manifest_sha256", "kind", "federation_id", "round", "request_id")
    for version, tags in sorted(before.versions.items()):
        now_tags = after.versions.get(version)
        if now_tags is None:
            verdict.lost.append(f"registered version {version} vanished")
            continue
        changed = [k for k in lineage_tags if k in tags and now_tags.get(k) != tags[k]]
        if changed:
            verdict.lost.append(f"version {version} changed its lineage tags {changed}")
    if before.champion and after.champion is None:
        verdict.lost.append("the champion alias vanished")
    registration_problems(after, verdict, injected)


def registration_problems(after: Snapshot, verdict: Verdict, injected: frozenset[str] = frozenset()) -> None:
    """Half-registered versions (manifest missing or different) and rounds or deletions registered twice."""
    for version, tags in sorted(after.versions.items(), key=lambda item: int(item[0])):
        key = tags.get("manifest_key")
        if key in injected:
            continue
        if not key or after.objects.get(key) != tags.get("manifest_sha256"):
            state = "missing" if key not in after.objects else "different"
            verdict.lost.append(f"version {version} is half-registered: its manifest {key} is {state}")
    rounds = Counter(
        (t.get("federation_id"), t.get("round")) for t in after.versions.values() if t.get("kind") == "global"
    )
    requests = Counter(t.get("request_id") for t in after.versions.values() if t.get("kind") == "unlearned")
    clients = Counter(t.get("forgotten_client") for t in after.versions.values() if t.get("kind") == "unlearned")
    verdict.lost += [f"round {r} of {f} registered {n} times" for (f, r), n in rounds.items() if n > 1]
    verdict.lost += [f"deletion request {r} registered {n} times" for r, n in requests.items() if n > 1]
    verdict.lost += [f"{c} forgotten {n} times (applied twice)" for c, n in clients.items() if n > 1]


def leftovers(project: Project, snapshot: Snapshot) -> list[str]:
    """Archived round and deletion objects that no registered version's lineage references (garbage)."""
    from components.lineage.history import manifest_objects
    from components.lineage.manifests import manifest_from_bytes

    store = project.store()
    referenced: set[str] = set()
    todo = [t["manifest_key"] for t in snapshot.versions.values() if "manifest_key" in t]
    while todo:
        key = todo.pop()
        if key in referenced:
            continue
        referenced.add(key)
        try:
            manifest = manifest_from_bytes(store.get(key))
        except Exception:
            continue
        referenced |= {ref.key for _, ref in manifest_objects(manifest)}
        if manifest.parent is not None:
            todo.append(manifest.parent.key)
    archived = {k for k in snapshot.objects if k.startswith(("federations/", "unlearning/"))}
    return sorted(archived - referenced)


def describe_leftovers(keys: list[str]) -> str:
    """``3 objects (federations/fed-x/rounds/00002/: 3)``: leftovers counted by round or deletion folder."""

    def folder(key: str) -> str:
        parts = key.split("/")
        depth = 4 if parts[0] == "federations" and len(parts) > 4 else 2
        return "/".join(parts[:depth]) + "/"

    groups = Counter(folder(k) for k in keys)
    return f"{len(keys)} objects (" + ", ".join(f"{g}: {n}" for g, n in sorted(groups.items())) + ")"


def audit_checks(
    project: Project, after: Snapshot, verdict: Verdict, expected: set[tuple[str, str]] | None = None
) -> list[dict[str, Any]]:
    """Audit the champion with the CLI and every version in-process; findings other than ``expected`` are loss.

    Parameters
    ----------
    expected
        ``(kind, key)`` of the findings the injected damage must produce (``None``: none expected).

    Returns
    -------
    The champion's findings, as the CLI reported them.
    """
    from components.audit.audit import audit

    expected = expected or set()
    run, findings = project.audit()
    found = {(f["kind"], f.get("key")) for f in findings}
    if run.returncode not in (0, 1, 3) or run.json() is None:
        verdict.failed.append(f"audit: {run.describe()}")
    elif run.traceback:
        verdict.failed.append("audit: a traceback is in its output")
    if found - expected:
        verdict.lost.append("audit findings: " + "; ".join(_clip(f["message"], 160) for f in findings))
    if expected and found != expected:
        verdict.failed.append(f"audit did not report exactly the injected damage: expected {sorted(expected)}")
    if expected and run.returncode != 3:
        verdict.failed.append(f"audit exited {run.returncode}, not 3 (findings)")
    if not expected and run.returncode not in (0, 1):
        verdict.failed.append(f"audit exited {run.returncode}")
    # Every version, not only the champion (cheap in-process: the archive and the tags only).
    store = project.store()
    index = {t["manifest_key"]: {**t, "_version": v} for v, t in after.versions.items() if "manifest_key" in t}
    extra = []
    for version, tags in sorted(after.versions.items(), key=lambda item: int(item[0])):
        report = audit(store, version, tags, index)
        for finding in report.findings:
            if (finding.kind, finding.key) not in expected and finding.key not in {k for _, k in expected}:
                extra.append(f"v{version}: {finding.kind} {finding.key}")
    if extra:
        verdict.lost.append("in-process audit of every version: " + "; ".join(sorted(set(extra))[:6]))
    verdict.notes.append(
        f"audit of champion: exit {run.returncode}, "
        + (", ".join(f"{k} {key}" for k, key in sorted(found, key=str)) if found else "no findings")
    )
    return findings


def refusal_or_completion(run: Run, verdict: Verdict, what: str) -> bool:
    """Record how the faulted command ended; True if it completed."""
    if run.ok and not run.traceback:
        verdict.notes.append(f"{what}: {run.describe()}")
        return True
    if run.clean_refusal:
        verdict.notes.append(f"{what}: refused cleanly: {run.describe()}")
    elif run.ok:
        verdict.failed.append(f"{what}: {run.describe()}")
        return True
    else:
        verdict.failed.append(f"{what}: {run.describe()}")
    return False


# --------------------------------------------------------------------------- the suite


@dataclass
class Suite:
    """The stack, the scratch folder and the output folder shared by every fault."""

    stack: Stack
    scratch: Path
    out: Path

    def restore(self) -> str | None:
        """``stack.sh up``: every service healthy again; the error if it cannot be."""
        result = self.stack.run("up", check=False)
        return None if result.returncode == 0 else _clip(result.stdout + result.stderr, 300)


# ---- 1. SeaweedFS killed mid-round


def seaweedfs_killed(suite: Suite, restart_after_s: float | None) -> Verdict:
    """Stop SeaweedFS while a federation waits before round 2; restart it after a while, or only at the end.

    Contract: the round retries and completes, or the run fails with nothing
    registered for it; a rerun with the store back completes and collects the garbage.
    """
    verdict = Verdict()
    p = Project(suite, "seaweedfs-killed-mid-round" + ("" if restart_after_s is None else "-restarted"))
    # The product's retry budget (8 attempts) rides out a short restart; an outage that lasts
    # is made to fail fast (2 attempts) so the run ends within the time box.
    env = {} if restart_after_s is not None else {"FEDFORGET_S3_MAX_ATTEMPTS": "2"}
    with p.paused("federate:before-round:2", "federate", "--json", "--rounds", "3", env=env) as spawned:
        before = p.snapshot()
        suite.stack.run("down", "seaweedfs")
        spawned.release()
        if restart_after_s is not None:
            time.sleep(restart_after_s)
            suite.stack.run("up", "seaweedfs")
    run = p.finish(spawned)
    if restart_after_s is None:
        suite.stack.run("up", "seaweedfs")
    completed = refusal_or_completion(run, verdict, "federate (store stopped before round 2)")
    mid = p.snapshot()
    new = [v for v in mid.version_keys() if v not in before.versions]
    verdict.notes.append(f"versions registered by the faulted run after the outage: {new or 'none'}")
    if completed and len(new) != 2:
        verdict.failed.append(f"completed but registered {len(new)} new versions, not 2")
    rerun = p.federate(1)
    if not rerun.ok or rerun.traceback:
        verdict.failed.append(f"rerun with the store back: {rerun.describe()}")
    else:
        verdict.notes.append(f"rerun: {rerun.describe()}")
    after = p.snapshot()
    compare(p, before, after, verdict)
    garbage = leftovers(p, after)
    if garbage:
        verdict.notes.append("LEFTOVER after the rerun: " + describe_leftovers(garbage))
    audit_checks(p, after, verdict)
    return verdict


# ---- 2. MLflow killed during registration


def mlflow_killed(suite: Suite, restart_after_s: float | None) -> Verdict:
    """Stop the MLflow server when round 2 is archived and about to be registered.

    ``restart_after_s=None``: it stays down until the run gives up (the run's
    MLflow client is told to retry once); else it is back after that many seconds
    while the client retries with its defaults. Then federate again: one version
    per committed round, no half-registered version, the failed run's garbage collected.
    """
    verdict = Verdict()
    p = Project(suite, "mlflow-killed-before-register" + ("" if restart_after_s is None else "-restarted"))
    env = (
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"} if restart_after_s is None else {}
    )
    with p.paused("federate:before-register:2", "federate", "--json", "--rounds", "3", env=env) as spawned:
        before = p.snapshot()
        suite.stack.run("down", "mlflow")
        spawned.release()
        if restart_after_s is not None:
            time.sleep(restart_after_s)
            suite.stack.run("up", "mlflow")
    run = p.finish(spawned)
    if restart_after_s is None:
        suite.stack.run("up", "mlflow")
    completed = refusal_or_completion(run, verdict, "federate (MLflow stopped before registering round 2)")
    mid = p.snapshot()
    new = [v for v in mid.version_keys() if v not in before.versions]
    verdict.notes.append(f"versions registered by the faulted run: {new or 'none'}")
    if completed and len(new) != 2:
        verdict.failed.append(f"completed but registered {len(new)} new versions, not 2")
    failed_runs = _mlflow_runs(p, "federation")
    verdict.notes.append(f"MLflow federation runs: {dict(Counter(failed_runs))}")
    rerun = p.federate(1)
    if not rerun.ok or rerun.traceback:
        verdict.failed.append(f"rerun with MLflow back: {rerun.describe()}")
    else:
        verdict.notes.append(f"rerun: {rerun.describe()}")
    after = p.snapshot()
    compare(p, before, after, verdict)
    garbage = leftovers(p, after)
    if garbage:
        committed = [k for k in garbage if k.endswith("manifest.json")]
        verdict.notes.append(
            "LEFTOVER after the rerun (the failed run's garbage was not collected): "
            + describe_leftovers(garbage)
            + (f"; committed but never registered: {committed}" if committed else "")
        )
    audit_checks(p, after, verdict)
    return verdict


def _mlflow_runs(project: Project, kind: str) -> list[str]:
    """Statuses of the project's MLflow runs of one kind."""
    tracker = project.tracker()
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.kind = '{kind}'", max_results=100)
    return [r.info.status for r in runs]


# ---- 3. Prefect server restarted mid-flow


def prefect_restarted(suite: Suite) -> Verdict:
    """Restart the Prefect server while a three-round federation runs (stopped at round 2, back a bit later).

    Contract: the flow completes or fails clearly with nothing half-registered,
    and the next federation runs (the model-write concurrency slot is not stuck).
    """
    verdict = Verdict()
    p = Project(suite, "prefect-restarted-mid-flow")
    with p.paused("federate:before-round:2", "federate", "--json", "--rounds", "3") as spawned:
        before = p.snapshot()
        suite.stack.run("down", "prefect")
        spawned.release()
        time.sleep(3)
        suite.stack.run("up", "prefect")
    run = p.finish(spawned)
    completed = refusal_or_completion(run, verdict, "federate (Prefect restarted during round 2)")
    mid = p.snapshot()
    new = [v for v in mid.version_keys() if v not in before.versions]
    verdict.notes.append(f"versions registered by it after the restart: {new or 'none'}")
    if not completed and new:
        verdict.notes.append(f"NOTE: it reported a failure although it registered versions {new}")
    if completed and len(new) != 2:
        verdict.failed.append(f"completed but registered {len(new)} new versions, not 2")
    rerun = p.cli("federate", "--json", "--rounds", "1", timeout=420)
    if not rerun.ok or rerun.traceback:
        verdict.failed.append(f"next federation after the restart: {rerun.describe()}")
    else:
        verdict.notes.append(f"next federation: {rerun.describe()}")
    after = p.snapshot()
    compare(p, before, after, verdict)
    garbage = leftovers(p, after)
    if garbage:
        verdict.notes.append("LEFTOVER: " + describe_leftovers(garbage))
    audit_checks(p, after, verdict)
    return verdict


# ---- 4. unlearn SIGKILLed


def unlearn_killed(suite: Suite, point: str) -> Verdict:
    """SIGKILL ``unlearn`` at a failpoint, then run it again.

    Contract: exactly one unlearned version for the client, one tombstone naming
    it, and a complete purge (no archived object of the client left).
    """
    from components.unlearning.tombstones import read_tombstone

    verdict = Verdict()
    client = "client_01"
    p = Project(suite, f"unlearn-killed-{point.split(':')[1]}")
    p.setup(1)
    before = p.snapshot()
    killed = p.cli("unlearn", "--client", client, "--json", env={"FEDFORGET_FAILPOINT": f"{point}=kill"})
    if killed.returncode != -signal.SIGKILL:
        verdict.failed.append(f"the failpoint did not kill unlearn: {killed.describe()}")
    mid = p.snapshot()
    verdict.notes.append(
        f"after the kill: {len(mid.versions) - len(before.versions)} new versions, "
        f"{len(set(mid.objects) - set(before.objects))} new objects"
    )
    rerun = p.cli("unlearn", "--client", client, "--json")
    result = rerun.json() or {}
    if not rerun.ok or rerun.traceback:
        verdict.failed.append(f"rerun: {rerun.describe()}")
    else:
        verdict.notes.append(
            f"rerun: {rerun.describe()}, status {result.get('status')}, version {result.get('version')}"
        )
    after = p.snapshot()
    store = p.store()
    unlearned = [v for v, t in after.versions.items() if t.get("forgotten_client") == client]
    if len(unlearned) != 1:
        (verdict.lost if len(unlearned) > 1 else verdict.failed).append(
            f"{len(unlearned)} unlearned versions for {client}: {unlearned}"
        )
    tombstone = read_tombstone(store, p.name, client)
    if tombstone is None:
        verdict.failed.append(f"no tombstone for {client}")
    elif unlearned and tombstone["resulting_version"] != unlearned[-1]:
        verdict.lost.append(f"the tombstone names version {tombstone['resulting_version']}, not {unlearned[-1]}")
    left = client_objects_left(store, after, client)
    if left:
        verdict.failed.append(f"purge incomplete: {[r.key for r in left]}")
    compare(p, before, after, verdict)
    garbage = leftovers(p, after)
    if garbage:
        verdict.notes.append("LEFTOVER (the killed run's archive, never collected): " + describe_leftovers(garbage))
    audit_checks(p, after, verdict)
    client_audit = p.cli("audit", "--client", client, "--json")
    if client_audit.returncode != 0:
        verdict.failed.append(f"audit --client {client}: {client_audit.describe()}")
    return verdict


# ---- 5, 6. fedforget serve and deletion requests


@contextlib.contextmanager
def serving(project: Project, tag: str) -> Iterator[subprocess.Popen]:
    """``fedforget serve`` in a session of its own until the block ends (then SIGINT, SIGKILL if it lingers)."""
    spawned = project.spawn("serve", "--verbose", tag=tag)
    process, stem = spawned.process, spawned.stem
    log = Path(f"{stem}.out")
    try:
        ready = wait_for(lambda: "being served" in log.read_text() or process.poll() is not None, 240)
        if not ready or process.poll() is not None:
            raise RuntimeError(
                f"serve did not start:\n{log.read_text()[-2000:]}\n{Path(f'{stem}.err').read_text()[-2000:]}"
            )
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                _kill_tree(process.pid)
                process.wait()


def file_request(project: Project, client: str) -> tuple[str | None, Run]:
    run = project.cli("request-deletion", "--client", client, "--json", timeout=300)
    return (run.json() or {}).get("request_id"), run


def request_statuses(project: Project, request_ids: list[str]) -> dict[str, str]:
    from components.unlearning.requests import RequestBook

    book = RequestBook(project.store())
    return {rid: book.get(rid).status for rid in request_ids}


def wait_for_requests(project: Project, request_ids: list[str], timeout: float) -> dict[str, str]:
    """Poll the request book until every request is done or failed (or ``timeout``); the last statuses."""
    last: dict[str, str] = {}

    def finished() -> bool:
        nonlocal last
        last = request_statuses(project, request_ids)
        return all(s in ("done", "failed") for s in last.values())

    wait_for(finished, min(timeout, project.remaining()), 3)
    return last


def client_objects_left(store: Any, snapshot: Snapshot, client: str) -> list[Any]:
    """The client's objects still in the store, by what the manifests of the snapshot's versions name."""
    from components.lineage.history import UpdateHistory
    from components.lineage.tags import manifest_ref_from_tags
    from components.unlearning.purge import stored_client_objects

    heads = [manifest_ref_from_tags(t) for t in snapshot.versions.values() if "manifest_key" in t]
    return stored_client_objects(UpdateHistory(store), heads, client)


def check_requests(project: Project, after: Snapshot, filed: dict[str, str], verdict: Verdict) -> None:
    """Every request done once: one unlearned version each, its tombstone, a complete purge."""
    from components.unlearning.requests import RequestBook
    from components.unlearning.tombstones import read_tombstone

    store = project.store()
    book = RequestBook(store)
    for rid, client in filed.items():
        request = book.get(rid)
        versions = [v for v, t in after.versions.items() if t.get("request_id") == rid and t.get("kind") == "unlearned"]
        if request.status != "done":
            why = f" ({_clip(request.error, 160)})" if request.error else ""
            stuck = request.status in ("pending", "running")
            (verdict.lost if stuck and not versions else verdict.failed).append(
                f"request {rid} ({client}) is {request.status}{why}" + (", never applied" if not versions else "")
            )
        if len(versions) != 1 and request.status == "done":
            verdict.lost.append(f"request {rid} ({client}) has {len(versions)} unlearned versions")
        tombstone = read_tombstone(store, project.name, client)
        if request.status == "done" and (tombstone is None or tombstone["request_id"] != rid):
            verdict.failed.append(f"tombstone of {client} missing or names another request")
        if request.status == "done" and client_objects_left(store, after, client):
            verdict.failed.append(f"purge of {client} incomplete")


def serve_killed(suite: Suite) -> Verdict:
    """SIGKILL ``fedforget serve`` (its whole process tree) with deletion requests open; serve again.

    Contract: after the restart every request is applied, none twice.
    """
    verdict = Verdict()
    p = Project(suite, "serve-killed-with-pending-requests", clients=5, operations=True)
    p.setup(1)
    before = p.snapshot()
    filed: dict[str, str] = {}  # request id -> client
    with serving(p, "first") as server:
        for client in ("client_01", "client_02"):
            rid, run = file_request(p, client)
            if rid is None:
                verdict.failed.append(f"request-deletion {client}: {run.describe()}")
            else:
                filed[rid] = client
        # Kill while the first request is being applied (or at the latest after 60 s).
        wait_for(lambda: "running" in request_statuses(p, list(filed)).values(), 60, 1)
        at_kill = request_statuses(p, list(filed))
        _kill_tree(server.pid)
        server.wait()
    verdict.notes.append(f"statuses at the kill: {at_kill}")
    # The killed run's model-write slot is freed when its lease (300 s) expires: wait longer than that.
    with serving(p, "second"):
        final = wait_for_requests(p, list(filed), 660)
    verdict.notes.append(f"statuses after serving again: {final}")
    after = p.snapshot()
    check_requests(p, after, filed, verdict)
    compare(p, before, after, verdict)
    audit_checks(p, after, verdict)
    return verdict


def concurrent_requests(suite: Suite) -> Verdict:
    """Five deletion requests filed at once through ``serve``.

    Contract: all applied, one after another (each unlearned version's
    ``source_version`` is the previous one), none lost, none twice.
    """
    from components.lineage.history import UpdateHistory
    from components.lineage.tags import manifest_ref_from_tags

    verdict = Verdict()
    p = Project(suite, "five-concurrent-deletion-requests", clients=7, operations=True)
    p.setup(1)
    before = p.snapshot()
    clients = [f"client_0{i}" for i in range(5)]
    with serving(p, "five"):
        filers = [p.spawn("request-deletion", "--client", c, "--json", tag=c) for c in clients]
        runs = [p.finish(f, 300) for f in filers]
        filed: dict[str, str] = {}
        for client, run in zip(clients, runs):
            rid = (run.json() or {}).get("request_id")
            if rid is None:
                verdict.failed.append(f"request-deletion {client}: {run.describe()}")
            else:
                filed[rid] = client
        final = wait_for_requests(p, list(filed), 900)
    verdict.notes.append(f"statuses: {dict(Counter(final.values()))}")
    after = p.snapshot()
    check_requests(p, after, filed, verdict)
    unlearned = sorted(
        ((int(v), t["source_version"]) for v, t in after.versions.items() if t.get("kind") == "unlearned"),
    )
    sources = [s for _, s in unlearned]
    serial = [str(v) for v, _ in unlearned[:-1]] == sources[1:]
    verdict.notes.append(f"unlearned versions (version <- source): {[f'{v}<-{s}' for v, s in unlearned]}")
    if not serial:
        verdict.lost.append("deletions not serialised: a source_version is not the previous unlearned version")
    if after.champion:
        sums = UpdateHistory(p.store()).read_manifest(manifest_ref_from_tags(after.versions[after.champion])).sums
        still = sorted(set(clients) & set(sums))
        if still:
            verdict.lost.append(f"the champion still holds {still}")
    compare(p, before, after, verdict)
    audit_checks(p, after, verdict)
    return verdict


# ---- 7. a corrupted archived object


def corrupted_object(suite: Suite) -> Verdict:
    """Flip one byte of the champion's running sum of client_01 in the bucket.

    Contract: the audit reports ``object_mismatch`` for exactly that key,
    ``unlearn`` of the client refuses with an IntegrityError message, the next
    federation (which adds to that sum) refuses too, and nothing is built on it.
    """
    from components.lineage.history import UpdateHistory
    from components.lineage.tags import manifest_ref_from_tags

    verdict = Verdict()
    client = "client_01"
    p = Project(suite, "corrupted-running-sum")
    p.setup(1)
    before = p.snapshot()
    store = p.store()
    manifest = UpdateHistory(store).read_manifest(manifest_ref_from_tags(before.versions[before.champion]))
    key = manifest.sums[client].key
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x01
    store.put(key, bytes(data))
    injected = frozenset({key})
    verdict.notes.append(f"flipped a byte of {key}")
    audit_checks(p, p.snapshot(), verdict, expected={("object_mismatch", key)})
    unlearn = p.cli("unlearn", "--client", client, "--json")
    refusal_or_completion(unlearn, verdict, "unlearn of the client")
    if unlearn.ok:
        verdict.lost.append("unlearn completed on a corrupted running sum")
    elif "changed or corrupted" not in (unlearn.error_line or "") or key not in (unlearn.error_line or ""):
        verdict.failed.append("unlearn's error does not name the corrupted object")
    federate = p.federate(1)
    refusal_or_completion(federate, verdict, "federate from the champion")
    if federate.ok:
        verdict.lost.append("a federation round was built on the corrupted running sum")
    after = p.snapshot()
    new_versions = [v for v in after.versions if v not in before.versions]
    if new_versions:
        verdict.lost.append(f"new versions built on the corrupted object: {new_versions}")
    new_manifests = [k for k in set(after.objects) - set(before.objects) if k.endswith("manifest.json")]
    if new_manifests:
        verdict.lost.append(f"new manifests committed on it: {new_manifests}")
    compare(p, before, after, verdict, injected)
    if after.objects.get(key) == before.objects[key]:
        verdict.notes.append("(the object was repaired?)")
    return verdict


# ---- 8. a manifest deleted


def manifest_deleted(suite: Suite) -> Verdict:
    """Delete the champion's manifest from the store.

    Contract: the audit reports ``manifest_unreadable`` for it; federate (from
    the champion) and unlearn (from that version) refuse clearly; nothing else changes.
    """
    verdict = Verdict()
    p = Project(suite, "manifest-deleted")
    p.setup(2)
    before = p.snapshot()
    key = before.versions[before.champion]["manifest_key"]
    p.store().delete(key)
    injected = frozenset({key})
    verdict.notes.append(f"deleted {key} (version {before.champion})")
    audit_checks(p, p.snapshot(), verdict, expected={("manifest_unreadable", key)})
    for what, args in (
        ("federate from the champion", ("federate", "--json", "--rounds", "1")),
        (f"unlearn from version {before.champion}", ("unlearn", "--client", "client_01", "--json")),
    ):
        run = p.cli(*args)
        refusal_or_completion(run, verdict, what)
        if run.ok:
            verdict.lost.append(f"{what} completed without the manifest")
    after = p.snapshot()
    new_versions = [v for v in after.versions if v not in before.versions]
    if new_versions:
        verdict.lost.append(f"new versions: {new_versions}")
    changed = sorted(set(after.objects) ^ (set(before.objects) - injected))
    if changed:
        verdict.notes.append(f"objects added or removed besides the manifest: {changed[:5]}")
    compare(p, before, after, verdict, injected)
    return verdict


# ---- 9. the disk filling up under a local store


def disk_full(suite: Suite) -> Verdict | Fault:
    """Federate into a LocalStore on a small tmpfs filled up to half a round's worth of free space.

    Contract: the round fails with a clear error, nothing half-committed is
    registered, and the next run after space is freed completes.
    """
    name = "disk-full-local-store"
    mount = suite.scratch / "small-disk"
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return Fault(name, None, None, "not run: mounting a small tmpfs needs root (run the suite as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        return Fault(name, None, None, f"not run: mount -t tmpfs failed: {_clip(mounted.stderr, 200)}")
    try:
        verdict = Verdict()
        p = Project(suite, name, store=mount / "store")
        p.setup(1)
        before = p.snapshot()
        round_bytes = sum(
            (mount / "store" / k).stat().st_size for k in before.objects if "/rounds/00001/" in k or "initial" in k
        )
        ballast = mount / "ballast"
        stat = os.statvfs(mount)
        free = stat.f_bavail * stat.f_frsize
        keep = max(4096, (round_bytes // 2) // 4096 * 4096)
        with open(ballast, "wb") as fh:
            fh.write(b"\0" * max(0, free - keep))
        verdict.notes.append(f"one round is ~{round_bytes // 1024} KiB; left {keep // 1024} KiB free")
        run = p.federate(3)
        completed = refusal_or_completion(run, verdict, "federate on the full disk")
        if completed:
            verdict.failed.append("the federation did not run out of space (the ballast was too small)")
        mid = p.snapshot()
        new = [v for v in mid.version_keys() if v not in before.versions]
        verdict.notes.append(f"versions registered by it: {new or 'none'}")
        registration_problems(mid, verdict)
        ballast.unlink()
        rerun = p.federate(1)
        if not rerun.ok or rerun.traceback:
            verdict.failed.append(f"rerun after freeing space: {rerun.describe()}")
        else:
            verdict.notes.append(f"rerun after freeing space: {rerun.describe()}")
        after = p.snapshot()
        compare(p, before, after, verdict)
        garbage = leftovers(p, after)
        if garbage:
            verdict.notes.append("LEFTOVER: " + describe_leftovers(garbage))
        temp_files = [str(f.relative_to(mount)) for f in (mount / "store").rglob(".tmp-*")]
        if temp_files:
            verdict.notes.append(f"LEFTOVER temporary files: {temp_files[:5]}")
        audit_checks(p, after, verdict)
        return verdict
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


# --------------------------------------------------------------------------- running


FAULTS: dict[str, Callable[[Suite], Verdict | Fault]] = {
    "seaweedfs-killed-mid-round-restarted": lambda s: seaweedfs_killed(s, restart_after_s=5),
    "seaweedfs-killed-mid-round": lambda s: seaweedfs_killed(s, restart_after_s=None),
    "mlflow-killed-before-register": lambda s: mlflow_killed(s, restart_after_s=None),
    "mlflow-killed-before-register-restarted": lambda s: mlflow_killed(s, restart_after_s=10),
    "prefect-restarted-mid-flow": prefect_restarted,
    "unlearn-killed-after-distill": lambda s: unlearn_killed(s, "unlearn:after-distill"),
    "unlearn-killed-before-register": lambda s: unlearn_killed(s, "unlearn:before-register"),
    "serve-killed-with-pending-requests": serve_killed,
    "five-concurrent-deletion-requests": concurrent_requests,
    "corrupted-running-sum": corrupted_object,
    "manifest-deleted": manifest_deleted,
    "disk-full-local-store": disk_full,
}


def run_fault(suite: Suite, name: str) -> Fault:
    """Run one fault; whatever goes wrong becomes its row. The stack is made healthy again afterwards."""
    started = time.monotonic()
    print(f"--- {name}", flush=True)
    try:
        outcome = FAULTS[name](suite)
        row = outcome if isinstance(outcome, Fault) else outcome.row(name, time.monotonic() - started)
    except Exception as exc:
        (suite.out / "logs" / name).mkdir(parents=True, exist_ok=True)
        (suite.out / "logs" / name / "harness-error.txt").write_text(traceback.format_exc())
        kind = "time box" if isinstance(exc, FaultTimeout) else "harness"
        row = Fault(name, False, None, f"{kind} error: {type(exc).__name__}: {_clip(str(exc), 400)}")
    finally:
        problem = suite.restore()
    if problem:
        row.detail += f" | the stack could not be restored: {problem}"
    row.seconds = round(time.monotonic() - started, 1)
    print(f"    survived={row.survived} data_lost={row.data_lost} ({row.seconds:.0f} s): {_clip(row.detail, 300)}")
    return row


def print_table(rows: list[Fault]) -> None:
    width = max(len(r.fault) for r in rows)
    print(f"\n{'fault':<{width}}  survived  data_lost  detail")
    for r in rows:
        lines = textwrap.wrap(r.detail, 100) or [""]
        print(f"{r.fault:<{width}}  {r.survived!s:<8}  {r.data_lost!s:<9}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}  {'':<8}  {'':<9}  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for faults.json and the logs")
    parser.add_argument("--only", help="comma-separated fault names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--stack-dir", type=Path, help="use the stack already running in this folder (kept running)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (projects, stack data)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(FAULTS))
        return 0
    if args.out is None:
        parser.error("--out is required")
    names = [n.strip() for n in args.only.split(",")] if args.only else list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; see --list")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fedforget-faults-"))
    started = time.monotonic()
    if args.stack_dir:
        directory = args.stack_dir.resolve()
        settings = {"FEDFORGET_STACK_DIR": str(directory), "FEDFORGET_STACK_ENV": str(directory / "stack.env")}
        stack = Stack(directory, directory / "stack.env", settings)
    else:
        stack = Stack.create(scratch / "stack")
    rows: list[Fault] = []
    try:
        print(f"starting the stack in {stack.directory}", flush=True)
        stack.run("up")
        for key, value in stack.client_env().items():  # this process reads the bucket and the registry too
            if key.startswith("AWS_"):
                os.environ[key] = value
        suite = Suite(stack, scratch, args.out.resolve())
        for name in names:
            rows.append(run_fault(suite, name))
            write_report(args.out, rows, time.monotonic() - started)
    finally:
        if not args.stack_dir:
            stack.run("down", check=False)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    wall = time.monotonic() - started
    write_report(args.out, rows, wall)
    print_table(rows)
    print(f"\nwall time {wall / 60:.1f} min; report {args.out / 'faults.json'}")
    return 0 if all(r.survived is not False and r.data_lost is not True for r in rows) else 1


def write_report(out: Path, rows: list[Fault], wall: float) -> None:
    report = {"rows": [asdict(r) for r in rows], "wall_s": round(wall, 1), "python": sys.version.split()[0]}
    (out / "faults.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
