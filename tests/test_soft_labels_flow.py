"""``federate.protocol=soft-labels`` through the production flows: federate, register, account bytes, forget."""

from __future__ import annotations

import copy

import pytest
import torch

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from tests.conftest import TINY_PARAMS, write_project

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def soft_label_project(tmp_path, monkeypatch):
    params = copy.deepcopy(TINY_PARAMS)
    params["data"]["public_size"] = 120
    params["federate"].update({"protocol": "soft-labels", "grouping": "similarity",
                               "soft_labels": {"server_epochs": 1, "forget_epochs": 1, "client_epochs": 1}})  # fmt: skip
    # clients of two architectures (round-robin): client_00 and client_02 an MLP, client_01 the global CNN
    params["clients"] = {"assign": "round-robin", "architectures": {
        "mlp": {"name": "mlp", "args": {"hidden": 8}},
        "global": {"name": TINY_PARAMS["model"]["name"], "args": TINY_PARAMS["model"]["args"]}}}  # fmt: skip
    root = write_project(tmp_path / "project", params)
    monkeypatch.setenv("FEDFORGET_PROJECT", str(root))
    monkeypatch.delenv("FEDFORGET_PARAMS", raising=False)
    monkeypatch.setenv("FEDFORGET_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root


def test_soft_labels_federate_register_account_bytes_and_forget(soft_label_project):
    from components.core.serialize import state_from_bytes
    from components.federation.protocol import UnlearningError
    from flows.export import export_client_model
    from flows.federate import run_federate
    from flows.operations import request_deletion
    from flows.tracking import Tracker
    from flows.unlearn import unlearn

    runtime = Runtime.from_env(soft_label_project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    history = UpdateHistory(open_store(runtime.store))
    # Execute: two rounds, then the deletion of one client (no teacher, to keep it small)
    summary = run_federate(project=str(soft_label_project))
    # a soft-labels champion has no running sums: a request is checked against who trained, not against sums
    filed, new, _ = request_deletion("client_02", "ticket", project=str(soft_label_project))
    assert new and filed.model == "tiny" and filed.status == "pending"
    with pytest.raises(UnlearningError, match="unknown client client_99"):
        request_deletion("client_99", project=str(soft_label_project))
    # each client's own model is archived and served per client (before the deletion)
    exported = export_client_model("client_00", soft_label_project / "c0.safetensors", project=str(soft_label_project))
    champion = history.read_manifest(manifest_ref_from_tags(tracker.alias().tags))
    personal, _ = state_from_bytes(history.store.get_verified(champion.personal["client_00"]))
    result = unlearn(client_id="client_01", project=str(soft_label_project), overrides={"unlearn.teacher": "none"})
    # Assert: every round registered a servable global student tagged with the protocol
    versions = tracker.versions()
    assert summary["protocol"]["name"] == "soft-labels" and summary["protocol"]["settings"]["grouping"] == "similarity"
    assert [v.tags["protocol"] for v in versions[:2]] == ["soft-labels", "soft-labels"]
    # soft labels up, far fewer bytes than the model FedAvg would send
    final = history.read_manifest(manifest_ref_from_tags(versions[1].tags))
    comm = final.extra["communication"]
    assert 0 < comm["upload_bytes_total"] < comm["fedavg_upload_bytes_total"]
    metrics = tracker.run_metrics(summary["run_id"])
    assert metrics["upload_bytes"] == comm["upload_bytes_total"] and metrics["download_bytes"] > 0
    # per client both ways, next to FedAvg's on the same model
    assert metrics["fedavg_upload_bytes"] == comm["fedavg_upload_bytes_total"]
    assert metrics["download_bytes.client_00"] == comm["download_bytes"]["client_00"] > 0
    # the audit shows each round's groups and picks
    from components.audit.audit import audit
    from flows.reports.audit import render_markdown

    report = audit(history.store, versions[1].version, versions[1].tags, {})
    rounds = [n for n in report.nodes if n.kind == "round"]
    assert [n.method for n in rounds] == ["soft-labels", "soft-labels"]
    assert rounds[1].decisions["groups"] == final.extra["groups"]
    markdown = render_markdown(report)
    picks = final.extra["picks"]
    assert "## Round decisions" in markdown and ", ".join(f"{c}: {n}" for c, n in picks.items()) in markdown
    # the deletion dispatched to the protocol: a new version without the client
    assert result["status"] == "unlearned" and tracker.alias().version == result["version"]
    assert tracker.version(result["version"]).tags["forgotten_client"] == "client_01"
    state, _ = state_from_bytes((soft_label_project / "c0.safetensors").read_bytes())
    assert exported["protocol"] == "soft-labels" and all(torch.equal(state[k], personal[k]) for k in personal)
    # after the deletion client_00's own model, fitted on consensus labels client_01 shaped, went with it
    after = history.read_manifest(manifest_ref_from_tags(tracker.alias().tags))
    assert "client_00" not in after.personal
    with pytest.raises(UnlearningError, match="no model of its own"):
        export_client_model("client_00", soft_label_project / "again.safetensors", project=str(soft_label_project))
    # a client with its own architecture keeps it (client_00's is an MLP), and the manifests record its spec
    first = history.read_manifest(manifest_ref_from_tags(versions[0].tags))
    assert first.protocol["architectures"]["client_00"]["name"] == "mlp"
    assert (
        "client_01" not in first.protocol["architectures"]
        or first.protocol["architectures"]["client_01"]["name"] == "cnn"
    )
    assert state and not any("conv" in k for k in state)  # the exported model is client_00's MLP
    # a second deletion recovers with the CLIP-Adapter teacher, as for weights
    second = unlearn(client_id="client_02", project=str(soft_label_project))
    deletion = history.read_manifest(manifest_ref_from_tags(tracker.version(second["version"]).tags))
    assert second["status"] == "unlearned" and deletion.recovery["teacher"] == "clip"
    assert deletion.recovery["teacher_run_id"] not in (None, "none")
