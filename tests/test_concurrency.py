"""Model writes are serialised on embedded defaults too (a file lock beside the project's state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags

pytestmark = pytest.mark.integration

FEDFORGET = str(Path(sys.executable).parent / "fedforget")


def test_two_concurrent_unlearns_are_applied_one_after_the_other(tiny_project, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "FEDFORGET_PROJECT": str(tiny_project),
        "FEDFORGET_STORE": os.environ["FEDFORGET_STORE"],
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # each process its own temporary server
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    first = subprocess.run([FEDFORGET, "federate", "--json", "--set", "federate.prefit_teacher=false"], env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr
    # Execute: two deletions at once, from two processes
    procs = [
        subprocess.Popen([FEDFORGET, "unlearn", "--client", c, "--teacher", "none", "--json"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in ("client_00", "client_02")
    ]  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out[out.index("{") :]))
    # Assert: one deletion each, the second started from the first's result, champion on the last
    runtime = Runtime.from_env(tiny_project)
    from flows.tracking import Tracker

    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    unlearned = sorted(tracker.find_versions(kind="unlearned"), key=lambda v: v.number)
    assert sorted(v.tags["forgotten_client"] for v in unlearned) == ["client_00", "client_02"]
    assert unlearned[1].tags["source_version"] == unlearned[0].version  # no lost alias move
    assert tracker.alias().version == unlearned[1].version
    history = UpdateHistory(open_store(runtime.store))
    final = history.read_manifest(manifest_ref_from_tags(unlearned[1].tags))
    assert set(final.sums) == {"client_01"}
    assert {r["version"] for r in results} == {v.version for v in unlearned}
