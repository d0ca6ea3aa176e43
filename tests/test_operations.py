"""Operations: `fedforget serve` with scheduled retraining and event-triggered deletions.

`serve` runs in a subprocess, as a user runs it; requests are filed with the
CLI from other processes. One test uses the temporary Prefect server that
processes start on their own (sharing PREFECT_HOME), the others the Prefect
server of infra/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.requests import RequestBook
from tests.conftest import TINY_PARAMS, write_project

pytestmark = pytest.mark.integration

FEDFORGET = str(Path(sys.executable).parent / "fedforget")


def ops_params(name: str) -> dict[str, Any]:
    return {
        **TINY_PARAMS,
        "data": {**TINY_PARAMS["data"], "num_clients": 5},
        "federate": {**TINY_PARAMS["federate"], "prefit_teacher": False},
        "unlearn": {"variant": "subtract", "teacher": "none"},
        "operations": {
            "retrain_cron": "15 3 * * 1",
            "sweep_interval_s": 1,
            "sweep_grace_s": 20,  # longer than a flow run takes to start here
            "deployment_prefix": name,
            "model_write_limit": f"{name}-writes",
        },
        "registry": {"model_name": name, "experiment": name},
    }


def base_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FEDFORGET_"))}
    return {**keep, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


@pytest.fixture
def ops(tmp_path) -> dict[str, Any]:
    name = f"ops{uuid.uuid4().hex[:6]}"
    root = write_project(tmp_path / "project", ops_params(name))
    env = base_env() | {
        "FEDFORGET_PROJECT": str(root),
        "FEDFORGET_STORE": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    return {"root": root, "name": name, "env": env, "tmp": tmp_path}


def cli(
    ops: dict[str, Any], *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDFORGET, *args], env=env or ops["env"], capture_output=True, text=True, timeout=timeout)


def json_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout[result.stdout.index("{") :])


@contextmanager
def serving(ops: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[Path]:
    """`fedforget serve` in a subprocess of its own session; stopped by signal at the end."""
    log = ops["tmp"] / f"serve-{uuid.uuid4().hex[:4]}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([FEDFORGET, "serve", "--verbose"], env=env or ops["env"], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while "being served" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not start:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        yield log
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def book_of(ops: dict[str, Any], env: dict[str, str] | None = None) -> RequestBook:
    store = (env or ops["env"])["FEDFORGET_STORE"]
    return RequestBook(open_store(store))


def wait_until_done(ops: dict[str, Any], request_ids: list[str], log: Path, timeout: float = 300, env=None) -> None:
    book = book_of(ops, env)
    deadline = time.monotonic() + timeout
    while True:
        statuses = {rid: book.get(rid).status for rid in request_ids}
        if all(s in ("done", "failed") for s in statuses.values()):
            return
        assert time.monotonic() < deadline, f"requests not finished: {statuses}\n{log.read_text()[-4000:]}"
        time.sleep(1)


def registry(ops: dict[str, Any], env: dict[str, str] | None = None):
    from flows.tracking import Tracker

    env = env or ops["env"]
    runtime = Runtime(
        root=ops["root"], params_path=ops["root"] / "params.yaml", store=env["FEDFORGET_STORE"],
        tracking_uri=env["MLFLOW_TRACKING_URI"],
    )  # fmt: skip
    return Tracker(runtime, load_config(runtime.params_path).registry), UpdateHistory(
        open_store(env["FEDFORGET_STORE"])
    )


def test_serve_applies_a_requested_deletion_on_the_temporary_server(ops):
    # Prepare: a champion, then serve (both processes use their own temporary Prefect server)
    json_of(cli(ops, "federate", "--rounds", "1", "--json"))
    with serving(ops) as log:
        # Execute: a request filed from another process
        filed = json_of(cli(ops, "request-deletion", "--client", "client_01", "--reason", "GDPR art. 17", "--json"))
        assert filed["status"] == "pending" and filed["new"] is True
        wait_until_done(ops, [filed["request_id"]], log)
    # Assert: the unlearned version carries the request id; the request is done
    request = book_of(ops).get(filed["request_id"])
    assert request.status == "done", request
    tracker, _ = registry(ops)
    version = tracker.version(request.version)
    assert version.tags["request_id"] == filed["request_id"] and version.tags["forgotten_client"] == "client_01"
    assert tracker.alias().version == request.version
    listed = json_of(cli(ops, "requests", "--json"))["requests"]
    assert [(r["request_id"], r["status"]) for r in listed] == [(filed["request_id"], "done")]


@pytest.fixture
def stack_ops(ops, stack, monkeypatch):
    env = {**ops["env"], **stack.client_env(), "FEDFORGET_STORE": f"s3://fedforget/{ops['name']}"}
    env.pop("PREFECT_HOME")
    for key, value in env.items():
        if key.startswith("AWS_"):  # this process reads the store too
            monkeypatch.setenv(key, value)
    return {**ops, "env": env}


def test_three_requests_at_once_are_applied_one_after_another(stack_ops):
    ops = stack_ops
    json_of(cli(ops, "federate", "--rounds", "1", "--json"))
    with serving(ops) as log:
        filers = [
            subprocess.Popen(
                [FEDFORGET, "request-deletion", "--client", c, "--json"],
                env=ops["env"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for c in ("client_00", "client_02", "client_04")
        ]
        filed = []
        for process in filers:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stdout + stderr
            filed.append(json.loads(stdout[stdout.index("{") :]))
        ids = [f["request_id"] for f in filed]
        wait_until_done(ops, ids, log)
    book = book_of(ops)
    requests = [book.get(rid) for rid in ids]
    assert [r.status for r in requests] == ["done"] * 3, [r.error for r in requests]
    tracker, history = registry(ops)
    unlearned = tracker.find_versions(kind="unlearned")
    assert sorted(v.tags["request_id"] for v in unlearned) == sorted(ids)  # none lost, none twice
    assert len({r.version for r in requests}) == 3
    champion = tracker.alias()
    remaining = history.read_manifest(manifest_ref_from_tags(champion.tags)).sums
    assert not {"client_00", "client_02", "client_04"} & set(remaining)
    # applied one after another: each deletion started from the previous one's result
    sources = sorted((int(v.version), v.tags["source_version"]) for v in unlearned)
    assert [s for _, s in sources[1:]] == [str(v) for v, _ in sources[:-1]]


def test_a_request_filed_while_events_cannot_be_delivered_is_picked_up_by_serve(stack_ops):
    ops = stack_ops
    json_of(cli(ops, "federate", "--rounds", "1", "--json"))
    offline = {**ops["env"], "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens there
    filed = cli(ops, "request-deletion", "--client", "client_03", env=offline)
    assert filed.returncode == 0, filed.stderr
    request_id = filed.stdout.strip().splitlines()[0]
    assert book_of(ops).get(request_id).status == "pending"
    with serving(ops) as log:  # the sweep starts it once it is older than the grace
        wait_until_done(ops, [request_id], log)
        assert "sweep: started pending request" in log.read_text()
    request = book_of(ops).get(request_id)
    assert request.status == "done" and request.dispatches >= 1


def test_retraining_deployment_schedule_and_gate(stack_ops):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    ops = stack_ops
    json_of(cli(ops, "federate", "--rounds", "1", "--json"))
    json_of(cli(ops, "unlearn", "--client", "client_02", "--json"))  # tombstoned from now on
    tracker, _history = registry(ops)
    champion = tracker.alias().version
    api = {"PREFECT_API_URL": ops["env"]["PREFECT_API_URL"]}
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with serving(ops) as log, temporary_settings({PREFECT_API_URL: api["PREFECT_API_URL"]}):
        name = f"federate/{ops['name']}-retrain"
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(name)
        assert [s.schedule.cron for s in deployment.schedules] == ["15 3 * * 1"]
        assert deployment.parameters["promote"] == "gate"
        # a manual run the gate rejects: it would have to beat the champion by 100 points
        # (its clients train in worker processes: the deployment honours federate.task_runner)
        overrides = {"operations.gate_tolerance": -1.0, "federate.task_runner": "processes"}
        rejected = run_deployment(name, parameters={"rounds": 1, "overrides": overrides}, timeout=300)
        assert rejected.state.is_completed(), log.read_text()[-3000:]
        assert "(processes runner)" in log.read_text()
        # and one it promotes
        promoted = run_deployment(
            name, parameters={"rounds": 1, "overrides": {"operations.gate_tolerance": 1.0}}, timeout=300
        )
        assert promoted.state.is_completed(), log.read_text()[-3000:]
        # a rollback to the version the deletion started from (it still holds client_02):
        # the scheduled run refuses to train from it, registers nothing and sends an error event
        source = tracker.version(champion).tags["source_version"]
        tracker.set_alias(source)
        before = [(v.version, dict(v.tags)) for v in tracker.versions()]
        refused = run_deployment(name, parameters={"rounds": 1}, timeout=300)
        assert refused.state.is_failed(), log.read_text()[-3000:]
        assert [(v.version, dict(v.tags)) for v in tracker.versions()] == before
        assert tracker.alias().version == source
        assert tainted_events(f"fedforget.model.{ops['name']}.{source}") == [["client_02"]]
        tracker.set_alias(before[-1][0])
    globals_ = [v for v in tracker.versions() if v.tags.get("kind") == "global"]
    first, second = globals_[-2], globals_[-1]
    assert "refusing to resume training from version" in log.read_text()
    assert "rejected" in first.tags and "tolerance -1.0" in first.tags["rejected"]
    assert "rejected" not in second.tags and tracker.alias().version == second.version != champion
    for version in (first, second):  # the tombstoned client took no part
        assert "client_02" not in version.tags["clients"].split(",")


def tainted_events(resource_id: str, timeout: float = 30) -> list[list[str]]:
    """The forgotten clients named by ``fedforget.model.tainted`` events about one version."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    query = EventFilter(
        event=EventNameFilter(name=["fedforget.model.tainted"]), resource=EventResourceFilter(id=[resource_id])
    )
    deadline = time.monotonic() + timeout
    while True:  # events are stored asynchronously
        with get_client(sync_client=True) as client:
            found = [e.payload["forgotten_clients"] for e in client.read_events(filter=query, limit=50).events]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


@pytest.mark.usefixtures("prefect_harness")
def test_bad_requests_and_malformed_events_fail_clearly(ops, monkeypatch):
    from components.federation.protocol import UnlearningError
    from flows.federate import run_federate
    from flows.operations import MalformedRequest, process_deletion_request

    for key, value in ops["env"].items():
        if key.startswith(("FEDFORGET_", "MLFLOW_")):
            monkeypatch.setenv(key, value)
    run_federate(project=str(ops["root"]), rounds=1)
    unknown = cli(ops, "request-deletion", "--client", "client_99")
    assert unknown.returncode == 2 and "unknown client client_99" in unknown.stderr
    assert book_of(ops).all() == []  # nothing filed
    # malformed events: no request id, an unknown one, a resource that does not match
    with pytest.raises(MalformedRequest, match="no request_id"):
        process_deletion_request(request_id="", resource_id="fedforget.client.client_01", project=str(ops["root"]))
    with pytest.raises(MalformedRequest, match="no deletion request"):
        process_deletion_request(request_id="del-nope", project=str(ops["root"]))
    request = book_of(ops).file("client_01")
    with pytest.raises(MalformedRequest, match="does not match"):
        process_deletion_request(
            request_id=request.request_id, resource_id="fedforget.client.client_04", project=str(ops["root"])
        )
    failed = book_of(ops).get(request.request_id)
    assert failed.status == "failed" and "does not match" in failed.error
    # a request for a client whose data does not exist any more fails with the reason
    other = book_of(ops).file("client_77")
    with pytest.raises(UnlearningError, match="never contributed"):
        process_deletion_request(request_id=other.request_id, project=str(ops["root"]))
    assert "never contributed" in book_of(ops).get(other.request_id).error
    tracker, _ = registry(ops)
    assert tracker.find_versions(kind="unlearned") == []  # nothing registered
