"""Few-shot fine-tuning in production: federate by device profile, convergence in MLflow, export, forget, resume."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from components.config.runtime import Runtime
from components.config.sections import ConfigError, load_config
from components.core.serialize import state_from_bytes
from components.lineage.history import UpdateHistory
from components.lineage.manifests import UnlearningManifest
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]
runner = CliRunner()

DEVICES = {"weak": {"mode": "linear-probe"}, "medium": {"mode": "meta"}, "strong": {"mode": "full"}}
FEWSHOT = {
    "federate.protocol": "few-shot",
    "federate.fewshot": {"steps": 3, "meta_steps": 2, "inner_steps": 1, "adapt_steps": 2},
    "clients.devices": DEVICES,
}


def _sets(overrides):
    import json

    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


def _tools(project):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    return tracker, UpdateHistory(open_store(runtime.store))


def test_a_few_shot_federation_fine_tunes_by_device_logs_convergence_and_forgets(tiny_project, tmp_path):
    from flows.cli import app
    from flows.federate import run_federate

    summary = run_federate(project=str(tiny_project), rounds=2, overrides=FEWSHOT)
    tracker, history = _tools(tiny_project)
    assert [v.version for v in tracker.versions()] == ["1", "2"]
    manifest = history.read_manifest(manifest_ref_from_tags(tracker.version(summary["final_version"]).tags))
    # the pretrained tower's model over images is what is registered; modes come from the device profiles
    assert manifest.model.name == "fewshot-clip-image"
    assert manifest.protocol["modes"] == {"client_00": "linear-probe", "client_01": "meta", "client_02": "full"}
    assert manifest.protocol["devices"] == {"client_00": "weak", "client_01": "medium", "client_02": "strong"}
    # the linear-probe client trained the head only: its applied contribution leaves the adapter alone
    probe = next(c for c in manifest.clients if c.client_id == "client_00")
    update = history.read_state(probe.update)
    assert all(torch.count_nonzero(v) == 0 for k, v in update.items() if not k.startswith("head."))
    # convergence, every round, in MLflow
    history_of = tracker.client.get_metric_history
    for metric in ("convergence.global_loss", "convergence.update_norm", "convergence.drift_mean",
                   "convergence.grad_dissimilarity", "drift.client_01"):  # fmt: skip
        assert [m.step for m in history_of(summary["run_id"], metric)] == [1, 2], metric
    assert summary["rounds"][-1]["test_accuracy"] > 0
    # the registered artifact carries the tower: it loads and predicts without FedForget's code, as the flow does
    import mlflow.pytorch

    from components.data.layout import FederationData
    from components.models.students import build_model

    runtime = Runtime.from_env(tiny_project)
    inputs = FederationData(runtime.data_dir("default") / "federation").test().subset(range(8)).inputs()
    loaded = mlflow.pytorch.load_model(f"models:/tiny/{summary['final_version']}")
    ours = build_model(manifest.model)
    ours.load_state_dict(history.read_state(manifest.global_state))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), ours.eval()(inputs), rtol=1e-4, atol=1e-4)
    # the meta client's own model is its adapted initialisation
    out = runner.invoke(app, ["export", "--client", "client_01", "--out", str(tmp_path / "c1.safetensors")])
    assert out.exit_code == 0, out.output
    exported, meta = state_from_bytes((tmp_path / "c1.safetensors").read_bytes())
    personal = history.read_state(manifest.personal["client_01"])
    assert meta["model"]["name"] == "fewshot-clip-image" and set(personal) <= set(exported)
    assert all(torch.equal(exported[k], personal[k]) for k in personal)
    final = history.read_state(manifest.global_state)
    assert any(not torch.equal(personal[k], final[k]) for k in personal)  # adapted, not the global model
    # the audit lists how each client fine-tuned
    audit = runner.invoke(app, ["audit", "--json"])
    assert audit.exit_code == 0, audit.output
    assert '"mode": "linear-probe"' in audit.output and '"device": "weak"' in audit.output
    # forget the full client: subtraction through the protocol, recovery from the CLIP-Adapter teacher
    out = runner.invoke(app, ["unlearn", "--client", "client_02", *_sets(FEWSHOT)])
    assert out.exit_code == 0, out.output
    deletion_version = tracker.alias()
    deletion = history.read_manifest(manifest_ref_from_tags(deletion_version.tags))
    assert isinstance(deletion, UnlearningManifest) and deletion.forgotten_client == "client_02"
    assert deletion.model == manifest.model
    # a registered version as the starting point: never one whose lineage holds the forgotten client
    from components.unlearning.guard import TaintedLineageError

    with pytest.raises(TaintedLineageError, match="client_02"):
        run_federate(project=str(tiny_project), rounds=1, overrides={**FEWSHOT, "federate.resume_from": 2})
    with pytest.raises(ValueError, match="no version 9"):
        run_federate(project=str(tiny_project), rounds=1, overrides={**FEWSHOT, "federate.resume_from": 9})
    # the deletion's version is clean: the next federation starts there (same tower, same spec), without the client
    start = {**FEWSHOT, "federate.resume_from": int(deletion_version.version)}
    resumed = run_federate(project=str(tiny_project), rounds=1, overrides=start)
    after = history.read_manifest(manifest_ref_from_tags(tracker.version(resumed["final_version"]).tags))
    assert resumed["resumed_from_version"] == deletion_version.version
    assert {c.client_id for c in after.clients} == {"client_00", "client_01"}


def test_device_profiles_are_checked_when_params_load(tiny_project):
    runtime = Runtime.from_env(tiny_project)
    with pytest.raises(ConfigError, match="unknown fine-tuning mode 'gpu'"):
        load_config(runtime.params_path, overrides={"clients.devices": {"big": {"mode": "gpu"}}})
    with pytest.raises(ConfigError, match="names device 'tiny'"):
        load_config(runtime.params_path, overrides={
            "clients.devices": DEVICES, "clients.device_groups": [{"clients": ["client_0*"], "device": "tiny"}]})  # fmt: skip
    with pytest.raises(ConfigError, match="fewshot"):
        load_config(runtime.params_path, overrides={"federate.fewshot": {"stepz": 3}})


def test_a_registered_student_starts_a_few_shot_federation_and_its_clients_stay_in_every_derived_model(tiny_project):
    from components.unlearning.guard import TaintedLineageError, forgotten_in, present_clients
    from flows.cli import app
    from flows.federate import run_federate
    from flows.tracking import Tracker

    run_federate(project=str(tiny_project), rounds=1)  # the student, pre-trained by federation: tiny version 1
    derived = {
        **FEWSHOT,
        "federate.fewshot": {**FEWSHOT["federate.fewshot"], "start": "student", "student_version": 1,
                             "student_model": "tiny"},
        "registry.model_name": "tiny-fewshot", "registry.experiment": "tiny-fewshot",
    }  # fmt: skip
    summary = run_federate(project=str(tiny_project), rounds=1, overrides=derived)
    runtime = Runtime.from_env(tiny_project)
    tracker = Tracker(runtime, load_config(runtime.params_path, overrides=derived).registry)
    student_tracker, history = _tools(tiny_project)
    ref = manifest_ref_from_tags(tracker.version(summary["final_version"]).tags)
    manifest = history.read_manifest(ref)
    assert manifest.model.name == "fewshot-student"
    start = manifest.protocol["start"]
    assert (start["model"], start["version"]) == ("tiny", "1")
    assert start["clients"] == ["client_00", "client_01", "client_02"]
    # round 1 started from the student's own weights: its classifier is the head, the rest the body
    student = history.read_manifest(manifest_ref_from_tags(student_tracker.version("1").tags))
    student_state, initial = history.read_state(student.global_state), history.read_state(manifest.base)
    assert torch.equal(initial["head.weight"], student_state["fc2.weight"])
    assert torch.equal(initial["body.conv1.weight"], student_state["conv1.weight"])
    # the weak client's probe moved the head only
    probe = history.read_state(next(c for c in manifest.clients if c.client_id == "client_00").update)
    assert all(torch.count_nonzero(v) == 0 for k, v in probe.items() if k.startswith("body."))
    # a pretraining client is in the derived model through its start, named by its own model: client ids are
    # scoped, so the derived model's own client_01 and the student's (tiny/client_01) are told apart
    assert {"client_01", "tiny/client_01"} <= present_clients(history, ref)
    # forgotten from the student's model, it taints every derived version: none is trained from again
    out = runner.invoke(app, ["unlearn", "--client", "client_01", "--json"])
    assert out.exit_code == 0, out.output
    assert forgotten_in(history, history.store, ref, "tiny-fewshot") == ["tiny/client_01"]
    assert "tiny-fewshot/1" in out.output  # the derived model's version is flagged and its weights retired
    tags = tracker.version(summary["final_version"]).tags
    assert tags["contains_forgotten_clients"] == "tiny/client_01" and "weights deleted" in tags["retired"]
    with pytest.raises(TaintedLineageError, match="client_01"):
        run_federate(project=str(tiny_project), rounds=1, overrides=derived)
