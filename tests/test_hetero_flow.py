"""Heterogeneous client models in production: federate, export a client's model, forget, resume, audit."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.core.serialize import state_from_bytes
from components.lineage.history import UpdateHistory
from components.lineage.manifests import UnlearningManifest
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from components.models.students import ModelSpec, build_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]
runner = CliRunner()

ENSEMBLE = {
    "federate.protocol": "ensemble-distillation",
    "federate.ensemble": {"epochs": 1, "forget_epochs": 1},
    "clients.architectures": {"small": {"name": "cnn", "args": {"channels": [2, 4], "hidden": 8}},
                              "mlp": {"name": "mlp", "args": {"hidden": 16}}},
}  # fmt: skip
SHARED = {
    "federate.protocol": "shared-base",
    "federate.shared_base": {"server_epochs": 1, "refit_epochs": 1},
    "clients.architectures": {"linear": {"name": "cnn", "args": {"channels": [4, 8], "hidden": 16}},
                              "mlp-head": {"name": "cnn-mlp-head", "args": {"channels": [4, 8], "hidden": 16,
                                                                           "head_hidden": 8}}},
}  # fmt: skip


def _sets(overrides):
    import json

    return [
        arg for k, v in overrides.items() for arg in ("--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")
    ]


def _tools(project):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    return tracker, UpdateHistory(open_store(runtime.store))


def _loads(path):
    state, meta = state_from_bytes(path.read_bytes())
    model = build_model(ModelSpec.from_dict(meta["model"]))
    model.load_state_dict(state)
    return meta, state


def test_ensemble_distillation_registers_every_round_exports_and_forgets_into_the_next_rounds(tiny_project, tmp_path):
    from flows.cli import app
    from flows.federate import run_federate

    summary = run_federate(project=str(tiny_project), rounds=2, overrides=ENSEMBLE)
    tracker, history = _tools(tiny_project)
    assert [v.version for v in tracker.versions()] == ["1", "2"]  # the student, every round
    manifest = history.read_manifest(manifest_ref_from_tags(tracker.version(summary["final_version"]).tags))
    assert manifest.protocol["name"] == "ensemble-distillation"
    specs = {c.client_id: c.spec.name for c in manifest.clients}
    assert specs == {"client_00": "cnn", "client_01": "mlp", "client_02": "cnn"}  # round-robin, in declared order
    # a client's served model is its architecture's
    out = runner.invoke(app, ["export", "--client", "client_01", "--out", str(tmp_path / "c1.safetensors")])
    assert out.exit_code == 0, out.output
    meta, _ = _loads(tmp_path / "c1.safetensors")
    assert meta["model"]["name"] == "mlp" and meta["protocol"] == "ensemble-distillation"
    # forget client_02: the deletion carries the architectures' models without it; the next round starts there
    out = runner.invoke(app, ["unlearn", "--client", "client_02", *_sets(ENSEMBLE)])
    assert out.exit_code == 0, out.output
    deletion_version = tracker.alias()
    deletion = history.read_manifest(manifest_ref_from_tags(deletion_version.tags))
    assert isinstance(deletion, UnlearningManifest) and deletion.server_state != manifest.server_state
    assert deletion.objects  # the per-architecture averages without client_02
    resumed = run_federate(project=str(tiny_project), rounds=1, overrides=ENSEMBLE)
    after = history.read_manifest(manifest_ref_from_tags(tracker.version(resumed["final_version"]).tags))
    assert after.parent == manifest_ref_from_tags(deletion_version.tags)
    assert "client_02" not in {c.client_id for c in after.clients}
    refused = runner.invoke(app, ["export", "--client", "client_02", "--out", str(tmp_path / "c2.safetensors")])
    assert refused.exit_code == 2 and "forgotten" in refused.output and not (tmp_path / "c2.safetensors").exists()


def test_shared_base_exports_personal_models_and_forgetting_drops_the_head(tiny_project, tmp_path):
    from components.federation.hetero.shared_base import personalised_model
    from flows.cli import app
    from flows.federate import run_federate

    summary = run_federate(project=str(tiny_project), rounds=2, overrides=SHARED)
    tracker, history = _tools(tiny_project)
    ref = manifest_ref_from_tags(tracker.version(summary["final_version"]).tags)
    manifest = history.read_manifest(ref)
    assert set(manifest.personal) == {"client_00", "client_01", "client_02"}
    out = runner.invoke(app, ["export", "--client", "client_01", "--out", str(tmp_path / "c1.safetensors")])
    assert out.exit_code == 0, out.output
    meta, state = _loads(tmp_path / "c1.safetensors")
    spec, expected = personalised_model(history, manifest, "client_01")
    assert meta["model"]["name"] == spec.name == "cnn-mlp-head"
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # the audit lists each client's model
    audit = runner.invoke(app, ["audit", "--json"])
    assert audit.exit_code == 0, audit.output
    assert '"cnn-mlp-head"' in audit.output
    # forgetting client_00 drops its head, and the heads the others trained on a base that held it
    out = runner.invoke(app, ["unlearn", "--client", "client_00", *_sets(SHARED)])
    assert out.exit_code == 0, out.output
    deletion = history.read_manifest(manifest_ref_from_tags(tracker.alias().tags))
    assert set(deletion.personal) == set()
    refused = runner.invoke(app, ["export", "--client", "client_01", "--out", str(tmp_path / "again.safetensors")])
    assert refused.exit_code == 2 and "no personal head" in refused.output, refused.output


def test_shared_base_refuses_architectures_with_another_base(tiny_project):
    from components.config.sections import ConfigError
    from flows.federate import run_federate

    bad = {**SHARED, "clients.architectures": {"mlp": {"name": "mlp", "args": {"hidden": 16}}}}
    with pytest.raises(ConfigError, match="has another base than the global model"):
        run_federate(project=str(tiny_project), rounds=1, overrides=bad)
