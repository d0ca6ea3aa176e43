"""Shared fixtures: a tiny project on scikit-learn digits, SeaweedFS, one Prefect harness."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Before Prefect or MLflow is imported by any test module.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from tests.servers import SeaweedFS
from tests.stack_fixture import Stack

# typer's CliRunner swaps sys.stderr for a buffer it closes afterwards; Prefect's console handler, configured
# inside an earlier test's invocation, keeps writing to that closed buffer, and logging prints a "Logging error"
# traceback into a later test's captured output. Not a product error: drop it.
logging.raiseExceptions = False

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS: dict[str, Any] = {
    "data": {
        "dataset": "digits",
        "num_clients": 3,
        "alpha": 1.0,
        "shots": 3,
        "min_client_examples": 20,
        "seed": 7,
    },
    "model": {"name": "cnn", "args": {"channels": [4, 8], "hidden": 16}},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
    "federate": {"rounds": 2, "seed": 3, "max_workers": 2, "archive_retry_delay_s": 0},
    "unlearn": {"variant": "subtract", "teacher": "clip"},
    "teacher": {"preset": "tiny", "epochs": 30, "patience": 10, "test_subset": 100},
    "distill": {"epochs": 3},
    "registry": {"model_name": "tiny", "experiment": "tiny"},
}


def write_project(root: Path, params: dict[str, Any], profile: str = "default") -> Path:
    """A project folder with params.yaml and prepared data (no DVC)."""
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.data.prepare import check, prepare

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runtime = Runtime.from_env(root)
    config = load_config(runtime.params_path, profile)
    prepare(config.data, runtime.data_dir(profile), check(config.data, runtime.raw_dir))
    return root


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prepared digits project whose store and MLflow database live in tmp_path."""
    root = write_project(tmp_path / "project", TINY_PARAMS)
    monkeypatch.setenv("FEDFORGET_PROJECT", str(root))
    monkeypatch.delenv("FEDFORGET_PARAMS", raising=False)
    monkeypatch.setenv("FEDFORGET_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real S3 server (SeaweedFS) for the whole session, stopped by PID."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Point boto3 at the session's SeaweedFS."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return seaweedfs


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for every flow test (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole infra/ stack (SeaweedFS, MLflow server, Prefect server), once per session."""
    stack = Stack.create(tmp_path_factory.mktemp("stack"))
    stack.up()
    try:
        yield stack
    finally:
        stack.run("down", check=False)
