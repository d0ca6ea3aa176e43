"""The stack runs Dask: ``infra/stack.sh up`` starts a scheduler and two worker processes on
127.0.0.1, the env file names the scheduler, a federation with ``federate.task_runner=dask``
trains its clients on those workers, and ``down`` stops them (workers first).

The stack is the session's (``tests/conftest.py``); this test stops only its Dask services and
starts them again afterwards. The production compose file's Dask services are checked too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, write_project
from tests.stack_fixture import Stack

FEDFORGET = str(Path(sys.executable).parent / "fedforget")
DASK_SERVICES = ("dask-scheduler", "dask-workers")


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by init counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(") ", 1)[1].split()[1])


def _executed(dask_worker) -> int:  # run on each worker by Client.run
    return dask_worker.state.executed_count


@pytest.mark.integration
def test_the_stack_runs_dask_and_a_federation_trains_its_clients_on_its_workers(stack: Stack, tmp_path):
    from distributed import Client

    # Arrange: the env file names the scheduler, status reports both Dask services healthy
    address = stack.client_env()["FEDFORGET_DASK_ADDRESS"]
    assert address == f"tcp://127.0.0.1:{stack.settings['FEDFORGET_STACK_DASK_PORT']}"
    status = stack.run("status").stdout  # exit 0: every service healthy
    assert re.search(r"^dask-scheduler +healthy .*" + re.escape(address), status, re.M), status
    assert re.search(r"^dask-workers +healthy .*2 workers", status, re.M), status
    pids = {name: int((stack.directory / "pids" / f"{name}.pid").read_text()) for name in DASK_SERVICES}
    # a tiny project of its own on the stack, configured by the env file
    name = f"d{uuid.uuid4().hex[:8]}"
    root = write_project(tmp_path / "project", {**TINY_PARAMS, "registry": {"model_name": name, "experiment": name}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FEDFORGET_"))}
    env |= stack.client_env() | {
        "FEDFORGET_PROJECT": str(root),
        "FEDFORGET_STORE": f"s3://fedforget/{name}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "FEDFORGET_S3_MAX_ATTEMPTS": "2",
    }
    with Client(address, timeout=30) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
        worker_pids = client.run(os.getpid)
        assert all(_parent(pid) == pids["dask-workers"] for pid in worker_pids.values())  # the stack's processes
        before = sum(client.run(_executed).values())
        # Execute: a federation with its clients on Dask (the flow finds the scheduler in FEDFORGET_DASK_ADDRESS)
        result = subprocess.run(
            [FEDFORGET, "federate", "--json", "--rounds", "1", "--set", "federate.task_runner=dask"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        # Assert: it completed, and the stack's workers ran its clients' training (3 clients, 1 round)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads(result.stdout[result.stdout.index("{") :])
        (row,) = summary["rounds"]
        assert summary["task_runner"] == "dask" and row["clients"] == TINY_PARAMS["data"]["num_clients"]
        assert not row.get("failed_clients")  # every client's training on a worker reached the store
        assert sum(client.run(_executed).values()) - before >= TINY_PARAMS["data"]["num_clients"]
    # Execute: stop the Dask services
    try:
        down = stack.run("down", *DASK_SERVICES).stdout
        # Assert: workers stopped before the scheduler, every Dask process is gone, status says stopped
        assert down.index("dask-workers: stopped") < down.index("dask-scheduler: stopped"), down
        assert all(_gone(pid) for pid in [*pids.values(), *worker_pids.values()])
        status = stack.run("status", check=False)
        assert status.returncode == 3
        assert re.search(r"^dask-scheduler +stopped", status.stdout, re.M), status.stdout
        assert re.search(r"^dask-workers +stopped", status.stdout, re.M), status.stdout
    finally:  # the session's stack stays whole for the tests after this one
        stack.run("up", *DASK_SERVICES)


def test_the_production_compose_file_runs_a_dask_scheduler_and_scalable_workers():
    services = yaml.safe_load((REPO / "infra" / "compose.prod.yaml").read_text())["services"]
    scheduler, worker = services["dask-scheduler"], services["dask-worker"]
    image = services["prefect-worker"]["image"]
    assert scheduler["image"] == worker["image"] == image  # one image: matching Dask versions
    assert scheduler["entrypoint"] == worker["entrypoint"] == ["dask"]
    assert "8786" in scheduler["command"] and "healthcheck" in scheduler
    # scalable: no fixed container name, no published port
    assert "container_name" not in worker and "ports" not in worker
    assert "tcp://dask-scheduler:8786" in worker["command"]
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    env = worker["environment"]  # clients train there and use the store
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= set(env)
    prefect_worker = services["prefect-worker"]
    assert prefect_worker["environment"]["FEDFORGET_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
    assert prefect_worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
