"""The `fedforget` command line: verbs, clear errors, and DVC reproduction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO, TINY_PARAMS

runner = CliRunner()


def test_help_lists_the_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("prepare", "federate", "demo"):
        assert verb in result.output


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "fedforget"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "federate" in result.stdout


def test_invalid_params_exit_2_and_write_nothing(tmp_path, monkeypatch):
    bad = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "alpha": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("FEDFORGET_PROJECT", str(tmp_path))
    result = runner.invoke(app, ["prepare", "--no-dvc"])
    assert result.exit_code == 2
    assert "data.alpha" in result.output
    assert not (tmp_path / "data").exists()
    result = runner.invoke(app, ["prepare", "--profile", "huge", "--no-dvc"])
    assert result.exit_code == 2 and "unknown profile" in result.output


def test_too_many_shots_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    greedy = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "shots": 500}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(greedy))
    monkeypatch.setenv("FEDFORGET_PROJECT", str(tmp_path))
    result = runner.invoke(app, ["prepare", "--no-dvc"])
    assert result.exit_code == 2 and "shots=500" in result.output
    assert not (tmp_path / "data").exists()


def test_missing_raw_data_names_the_fix(tmp_path, monkeypatch):
    params = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "dataset": "fashion-mnist"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("FEDFORGET_PROJECT", str(tmp_path))
    monkeypatch.setenv("FEDFORGET_RAW_DIR", str(tmp_path / "nowhere"))
    result = runner.invoke(app, ["prepare", "--no-dvc"])
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in result.output


def dvc_copy(tmp_path: Path) -> Path:
    """The project's DVC pipeline in a fresh git repository."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.mark.integration
def test_prepare_through_dvc_reproduces_the_committed_data_version(tmp_path, monkeypatch):
    # Prepare
    root = dvc_copy(tmp_path)
    lock_before = (root / "dvc.lock").read_text()
    recorded = {out["path"]: out["md5"] for out in yaml.safe_load(lock_before)["stages"]["prepare_quick"]["outs"]}
    monkeypatch.chdir(root)
    monkeypatch.delenv("FEDFORGET_PROJECT", raising=False)
    # Execute
    result = runner.invoke(app, ["prepare", "--profile", "quick"])
    # Assert: the same bytes as the committed lock file, pushed to the local remote
    assert result.exit_code == 0, result.output
    assert recorded["data/quick/federation"] in result.output
    assert (root / "dvc.lock").read_text() == lock_before, (
        "dvc.lock is stale (a stage dependency or param changed): run `dvc repro` and commit dvc.lock"
    )
    assert any((root / ".dvc-remote").rglob("*"))
    # and a pull from the remote restores it after the workspace and cache are gone
    shutil.rmtree(root / "data" / "quick")
    shutil.rmtree(root / ".dvc" / "cache")
    pulled = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "prepare_quick"], cwd=root, capture_output=True, text=True
    )
    assert pulled.returncode == 0, pulled.stderr
    from components.data.layout import dvc_dir_hash

    assert dvc_dir_hash(root / "data" / "quick" / "federation") == recorded["data/quick/federation"]
    assert dvc_dir_hash(root / "data" / "quick" / "server") == recorded["data/quick/server"]


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_federate_verb_honours_the_environment(tiny_project, tmp_path, monkeypatch):
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("FEDFORGET_STORE", str(store))
    result = runner.invoke(app, ["federate", "--rounds", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert len(summary["rounds"]) == 1 and summary["store"] == str(store)
    assert any(store.rglob("manifest.json"))
