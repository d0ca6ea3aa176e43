"""FedForget against the real servers of infra/: SeaweedFS (S3), MLflow server, Prefect server.

The stack is started once per test session by ``infra/stack.sh up`` on free
ports in a temporary folder and stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.lineage.history import UpdateHistory, verify_manifest
from components.lineage.manifests import manifest_from_bytes
from components.lineage.store import S3Store, StoreUnavailable
from tests.conftest import TINY_PARAMS, write_project
from tests.stack_fixture import Stack

pytestmark = pytest.mark.integration

FEDFORGET = str(Path(sys.executable).parent / "fedforget")


@pytest.fixture
def project(stack: Stack, tmp_path: Path) -> dict[str, Any]:
    """A tiny project whose store prefix and registered model are its own on the shared stack."""
    name = f"t{uuid.uuid4().hex[:8]}"
    params = {**TINY_PARAMS, "registry": {"model_name": name, "experiment": name}}
    root = write_project(tmp_path / "project", params)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FEDFORGET_"))}
    env |= stack.client_env()
    env |= {
        "FEDFORGET_PROJECT": str(root),
        "FEDFORGET_STORE": f"s3://fedforget/{name}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "FEDFORGET_S3_MAX_ATTEMPTS": "2",
    }
    return {"root": root, "name": name, "env": env, "stack": stack}


def fedforget(project: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDFORGET, *args], env=project["env"], capture_output=True, text=True, timeout=600)


def json_out(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout[result.stdout.index("{") :])


def get_json(url: str, payload: dict[str, Any] | None = None) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def s3_env(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """This process talks to the stack's S3 too (for checks made with boto3)."""
    for key, value in project["env"].items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


def s3_store(project: dict[str, Any]) -> S3Store:
    return S3Store("fedforget", project["name"], max_attempts=2)


@pytest.mark.usefixtures("s3_env")
def test_federation_end_to_end_against_the_stack(project):
    # Execute: the CLI, configured only by the stack's environment file
    result = fedforget(project, "federate", "--json", "--rounds", "2")
    summary = json_out(result)
    env = project["env"]
    # Assert: archived objects are in the bucket (listed with boto3)
    store = s3_store(project)
    keys = store.list("federations/")
    assert sum("/updates/" in k for k in keys) == 6
    assert sum(k.endswith("manifest.json") for k in keys) == 2
    # registered versions are visible through the MLflow server's REST API
    mlflow = env["MLFLOW_TRACKING_URI"]
    query = urllib.parse.urlencode({"filter": f"name='{project['name']}'"})
    versions = get_json(f"{mlflow}/api/2.0/mlflow/model-versions/search?{query}")["model_versions"]
    assert sorted(v["version"] for v in versions) == ["1", "2"]
    tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
    assert tags["kind"] == "global" and tags["federation_id"] == summary["federation_id"]
    alias = get_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name={project['name']}&alias=champion")
    assert alias["model_version"]["version"] == summary["champion_version"] == "2"
    # the flow run is in the Prefect server's API, Completed
    prefect = env["PREFECT_API_URL"]
    flow_run = get_json(f"{prefect}/flow_runs/{summary['prefect_flow_run_id']}")
    assert flow_run["state"]["type"] == "COMPLETED" and flow_run["state"]["name"] == "Completed"
    # credentials appear nowhere: output, MLflow params and tags, Prefect parameters
    secrets_ = [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]]
    run = get_json(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={summary['run_id']}")["run"]
    recorded = json.dumps(run["data"]) + json.dumps(versions) + json.dumps(flow_run["parameters"])
    for secret in secrets_:
        assert secret not in result.stdout + result.stderr
        assert secret not in recorded
    assert "store" in {t["key"] for t in run["data"]["tags"]}  # the store is recorded, without secrets


@pytest.mark.usefixtures("s3_env")
def test_data_persists_across_restarts_and_the_next_run_resumes(project):
    first = json_out(fedforget(project, "federate", "--json", "--rounds", "1"))
    store = s3_store(project)
    first_keys = store.list(f"federations/{first['federation_id']}/")
    stack: Stack = project["stack"]
    stack.run("down", "seaweedfs", "mlflow")
    assert stack.run("status", check=False).returncode == 3  # not all healthy
    stack.run("up", "seaweedfs", "mlflow")
    second = json_out(fedforget(project, "federate", "--json", "--rounds", "1"))
    assert second["resumed_from_version"] == first["champion_version"]
    # every object of the first run is still there and matches its recorded hash
    assert set(first_keys) <= set(store.list("federations/"))
    for key in first_keys:
        if key.endswith("manifest.json"):
            data = store.get(key)
            assert verify_manifest(store, manifest_from_bytes(data)) == []


def referenced_keys(store: S3Store) -> set[str]:
    """Every key some committed manifest references (plus the manifests themselves)."""
    referenced: set[str] = set()
    for key in store.list("federations/"):
        if not key.endswith("manifest.json"):
            continue
        manifest = manifest_from_bytes(store.get(key))
        referenced |= {key, manifest.base.key, manifest.global_state.key}
        referenced |= {c.update.key for c in manifest.clients} | {r.key for r in manifest.sums.values()}
    return referenced


@pytest.mark.usefixtures("prefect_harness")
def test_store_outage_while_archiving(project, monkeypatch):
    from flows.federate import run_federate
    from flows.tracking import Tracker

    for key, value in project["env"].items():
        if key.startswith(("AWS_", "FEDFORGET_", "MLFLOW_")):
            monkeypatch.setenv(key, value)
    root = str(project["root"])
    first = run_federate(project=root, rounds=1)
    # SeaweedFS goes down in the middle of the next round's archive step (after two writes)
    attempts, written = [], []
    lock = threading.Lock()
    original = UpdateHistory.write_state
    stack: Stack = project["stack"]

    def flaky_write(self, key, state, metadata):
        if "/rounds/00002/" not in key:
            return original(self, key, state, metadata)
        with lock:
            attempts.append(key)
        ref = original(self, key, state, metadata)
        with lock:
            written.append(key)
            stop_now = len(written) == 2
        if stop_now:
            stack.run("down", "seaweedfs")
        return ref

    monkeypatch.setattr(UpdateHistory, "write_state", flaky_write)
    try:
        with pytest.raises(StoreUnavailable, match="failed after 2 attempts"):
            run_federate(project=root, rounds=1, overrides={"federate.archive_retries": 2})
    finally:
        stack.run("up", "seaweedfs")
    monkeypatch.setattr(UpdateHistory, "write_state", original)
    assert len(attempts) > len(set(attempts))  # the archive task was retried against the stopped store
    from components.config.runtime import Runtime
    from components.config.sections import load_config

    runtime = Runtime.from_env(root)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    assert [v.version for v in tracker.versions()] == [first["champion_version"]]  # nothing registered
    assert tracker.alias().version == first["champion_version"]
    store = s3_store(project)
    assert any("/rounds/00002/" in k for k in store.list("federations/"))  # the failed round's writes
    # Execute: with the store back, the same job again
    again = run_federate(project=root, rounds=1)
    # Assert: completed, one version per committed round, no leftover or duplicated object
    versions = tracker.versions()
    assert [v.tags["round"] for v in versions] == ["1", "2"]
    assert again["resumed_from_version"] == first["champion_version"]
    assert set(store.list("federations/")) == referenced_keys(store)


@pytest.mark.usefixtures("s3_env")
def test_dvc_push_and_pull_against_the_stack(project, tmp_path):
    from tests.test_cli import dvc_copy

    repo = dvc_copy(tmp_path)
    env = {**project["env"], "FEDFORGET_DVC_REMOTE": "stack"}
    env.pop("FEDFORGET_PROJECT")
    prepared = subprocess.run(
        [FEDFORGET, "prepare", "--profile", "quick"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare_quick"]["outs"]
    assert S3Store("fedforget", "dvc").list()  # DVC's content-addressed files are in the bucket
    shutil.rmtree(repo / "data" / "quick")
    shutil.rmtree(repo / ".dvc" / "cache")
    pulled = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "-r", "stack", "prepare_quick"], cwd=repo, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    from components.data.layout import dvc_dir_hash

    for out in lock:
        assert dvc_dir_hash(repo / out["path"]) == out["md5"]


@pytest.mark.usefixtures("s3_env")
def test_unlearn_and_audit_against_the_stack(project):
    json_out(fedforget(project, "federate", "--json", "--rounds", "1"))
    deletion = json_out(fedforget(project, "unlearn", "--client", "client_00", "--teacher", "none", "--json"))
    assert deletion["status"] == "unlearned"
    result = fedforget(project, "audit", "--client", "client_00", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["verdict"] == "client_absent" and report["objects"]["purged"] == 2
    source = fedforget(project, "audit", "--version", deletion["source_version"], "--client", "client_00")
    assert source.returncode == 1
    # the audit run and its artifacts are on the MLflow server
    mlflow = project["env"]["MLFLOW_TRACKING_URI"]
    experiment = get_json(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={project['name']}")
    runs = get_json(f"{mlflow}/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment"]["experiment_id"]], "filter": "tags.kind = 'audit'",
    })["runs"]  # fmt: skip
    assert runs and any(t["key"] == "audited_version" for t in runs[0]["data"]["tags"])
    listed = get_json(f"{mlflow}/api/2.0/mlflow/artifacts/list?run_id={runs[0]['info']['run_id']}&path=audit")
    assert {f["path"] for f in listed["files"]} == {"audit/audit.md", "audit/lineage.png", "audit/audit.json"}
