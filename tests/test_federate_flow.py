"""The federate flow end to end through Prefect, MLflow (sqlite) and the local store."""

from __future__ import annotations

import numpy as np
import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.core.state import add, max_abs_difference
from components.federation.client import NonFiniteUpdateError
from components.lineage.history import UpdateHistory, verify_manifest
from components.lineage.store import open_store
from components.lineage.tags import GLOBAL_TAG_KEYS, manifest_ref_from_tags

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def tracker_for(project):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    return Tracker(runtime, load_config(runtime.params_path).registry), runtime


def test_federate_three_clients_two_rounds(tiny_project):
    from flows.federate import run_federate

    # Execute
    summary = run_federate(project=str(tiny_project))
    # Assert: two registered versions carrying the lineage schema
    tracker, runtime = tracker_for(tiny_project)
    versions = tracker.versions()
    assert [v.version for v in versions] == ["1", "2"]
    for number, version in enumerate(versions, start=1):
        assert set(GLOBAL_TAG_KEYS) <= set(version.tags)
        assert version.tags["kind"] == "global"
        assert version.tags["round"] == str(number)
        assert version.tags["federation_id"] == summary["federation_id"]
        assert version.tags["clients"] == "client_00,client_01,client_02"
        assert version.tags["data_version"].endswith(".dir")
    assert versions[0].tags["parent_version"] == "none"
    assert versions[1].tags["parent_version"] == "1"
    assert tracker.alias().version == "2" == summary["champion_version"]
    # 6 archived updates + 2 manifests (+ running sums, global states, the initial state)
    store = open_store(runtime.store)
    keys = store.list(f"federations/{summary['federation_id']}/")
    assert sum("/updates/" in k for k in keys) == 6
    assert sum(k.endswith("manifest.json") for k in keys) == 2
    # every referenced object matches its recorded hash, and the sums add up
    history = UpdateHistory(store)
    final = history.read_manifest(manifest_ref_from_tags(versions[1].tags))
    assert verify_manifest(store, final) == []
    initial = history.read_state(history.read_manifest(final.parent).base)
    rebuilt = initial
    for cid in final.client_ids:
        rebuilt = add(rebuilt, history.client_sum(final, cid))
    assert max_abs_difference(rebuilt, history.read_state(final.global_state)) < 1e-5
    # the registered model is the archived global state
    import mlflow.pytorch
    import torch

    model = mlflow.pytorch.load_model(f"models:/tiny/{versions[1].version}")
    archived = history.read_state(final.global_state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, archived[key])
    assert np.isfinite([r["test_accuracy"] for r in summary["rounds"]]).all()
    metrics = tracker.run_metrics(summary["run_id"])
    assert {"test_accuracy", "client_compute_s_sum", "archive_s", "register_s"} <= set(metrics)


def test_federate_resumes_from_champion_and_is_reproducible(tiny_project):
    from flows.federate import run_federate

    first = run_federate(project=str(tiny_project), rounds=1)
    second = run_federate(project=str(tiny_project), rounds=1)
    tracker, runtime = tracker_for(tiny_project)
    resumed = tracker.version(second["champion_version"])
    assert second["resumed_from_version"] == first["champion_version"]
    assert resumed.tags["round"] == "2" and resumed.tags["parent_version"] == first["champion_version"]
    history = UpdateHistory(open_store(runtime.store))
    manifest = history.read_manifest(manifest_ref_from_tags(resumed.tags))
    assert manifest.parent == manifest_ref_from_tags(tracker.version(first["champion_version"]).tags)
    # a fresh run with the same seeds reproduces round 1 exactly
    fresh = run_federate(project=str(tiny_project), rounds=1, fresh=True)
    a = history.read_manifest(manifest_ref_from_tags(tracker.version(first["champion_version"]).tags))
    b = history.read_manifest(manifest_ref_from_tags(tracker.version(fresh["champion_version"]).tags))
    assert a.global_state.sha256 == b.global_state.sha256


def test_a_non_finite_update_commits_nothing(tiny_project):
    from flows.federate import run_federate

    with pytest.raises(NonFiniteUpdateError, match="NaN or infinity"):
        run_federate(project=str(tiny_project), rounds=1, overrides={"train.lr": 1e38})
    tracker, runtime = tracker_for(tiny_project)
    assert tracker.versions() == []
    assert tracker.alias() is None
    store = open_store(runtime.store)
    assert not [k for k in store.list() if k.endswith("manifest.json")]
    failed = store.list("federations/")  # the failed federation's initial state, never committed
    assert len(failed) == 1 and failed[0].endswith("initial.safetensors")
    # the next run removes what the failed one left, and only that
    ok = run_federate(project=str(tiny_project), rounds=1)
    assert all(k.startswith(f"federations/{ok['federation_id']}/") for k in store.list("federations/"))


def test_a_robust_strategy_from_params_runs_records_its_decisions_and_forgets_exactly(tiny_project):
    from components.unlearning.forget import forget_client
    from flows.federate import run_federate

    # Execute: the credit strategy, chosen by params, two groups re-drawn per round
    overrides = {"federate.strategy": "credit", "federate.strategy_args": {"num_groups": 2, "mad_factor": 3.0}}
    summary = run_federate(project=str(tiny_project), overrides=overrides)
    # Assert: the manifest records the protocol's strategy and its decisions; MLflow has them per round
    tracker, runtime = tracker_for(tiny_project)
    store = open_store(runtime.store)
    history = UpdateHistory(store)
    version = tracker.versions()[-1]
    final = history.read_manifest(manifest_ref_from_tags(version.tags))
    assert final.protocol["strategy"]["name"] == "credit" and final.protocol["strategy"]["num_groups"] == 2
    decision = final.extra
    assert {"groups", "scores", "thresholds", "excluded", "weights"} <= set(decision)
    assert len(decision["groups"]) == 2
    assert tracker.download(summary["run_id"], "rounds/round-0002.json").is_file()
    # the audit shows them per round
    from components.audit.audit import audit
    from flows.reports.audit import render_markdown

    report = audit(store, version.version, version.tags, {})
    rounds = [n for n in report.nodes if n.kind == "round"]
    assert [n.method for n in rounds] == ["weights/credit", "weights/credit"]
    assert rounds[0].decisions["excluded"] == decision["excluded"] and "groups" in rounds[1].decisions
    markdown = render_markdown(report)
    assert "## Round decisions" in markdown
    scores = rounds[1].decisions["scores"]  # each client's suspicion score is in the table
    assert ", ".join(f"{c}: {v:.4g}" for c, v in scores.items()) in markdown
    # forgetting a client subtracts exactly what was applied for it (the rest rebuilds the state)
    forgotten = forget_client(history, manifest_ref_from_tags(version.tags), final, "client_01")
    initial = history.read_state(history.read_manifest(final.parent).base)  # two rounds
    rebuilt = initial
    for cid in final.client_ids:
        if cid != "client_01":
            rebuilt = add(rebuilt, history.client_sum(final, cid))
    assert max_abs_difference(rebuilt, forgotten.state) < 1e-5


def test_server_side_dp_logs_and_tags_epsilon_over_the_whole_lineage(tiny_project):
    from opacus.accountants import RDPAccountant

    from flows.federate import run_federate

    # Execute: two noised rounds, then one more resumed from the champion
    overrides = {"federate.dp_noise_multiplier": 0.8, "federate.dp_clipping_norm": 2.0}
    first = run_federate(project=str(tiny_project), overrides=overrides)
    run_federate(project=str(tiny_project), overrides=overrides, rounds=1)
    # Assert: every version tagged with epsilon at delta; it grows with the lineage, resumes included
    tracker, runtime = tracker_for(tiny_project)
    versions = tracker.versions()
    epsilons = [float(v.tags["dp_epsilon"]) for v in versions]
    assert all(v.tags["dp_delta"] == "1e-05" and v.tags["dp_noise_multiplier"] == "0.8" for v in versions)
    expected = RDPAccountant()  # an independent computation: 3 rounds, every client each round
    for _ in range(3):
        expected.step(noise_multiplier=0.8, sample_rate=1.0)
    assert epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-5)
    assert tracker.run_metrics(first["run_id"])["dp_epsilon"] == pytest.approx(epsilons[1], rel=1e-5)
    # the noise is a recorded residual of no client's: the state is initial + client sums + residuals
    history = UpdateHistory(open_store(runtime.store))
    manifest = history.read_manifest(manifest_ref_from_tags(versions[1].tags))
    assert manifest.protocol["strategy"]["name"] == "dp-server" and manifest.residual is not None
    rebuilt = history.read_state(history.read_manifest(manifest.parent).base)
    for cid in manifest.client_ids:
        rebuilt = add(rebuilt, history.client_sum(manifest, cid))
    for ref in (manifest.residual, history.read_manifest(manifest.parent).residual):
        rebuilt = add(rebuilt, history.read_state(ref))
    assert max_abs_difference(rebuilt, history.read_state(manifest.global_state)) < 1e-5


def test_clients_train_on_dask_with_the_same_result_as_threads(tiny_project):
    from flows.federate import run_federate

    # Execute: the same federation on threads and on a LocalCluster (clients read and write only the store)
    threads = run_federate(project=str(tiny_project), rounds=1, fresh=True)
    dask = run_federate(project=str(tiny_project), rounds=1, fresh=True, overrides={"federate.task_runner": "dask"})
    # Assert: the runner is recorded and the model is the same (every client has its own seeded generator)
    assert dask["task_runner"] == "dask"
    tracker, runtime = tracker_for(tiny_project)
    history = UpdateHistory(open_store(runtime.store))
    states = [
        history.read_state(history.read_manifest(manifest_ref_from_tags(tracker.version(s["final_version"]).tags)).global_state)
        for s in (threads, dask)
    ]  # fmt: skip
    assert max_abs_difference(*states) < 1e-5


def test_fltrust_in_production_uses_the_server_few_shot_set_and_forgets_exactly(tiny_project):
    from components.unlearning.forget import forget_client
    from flows.federate import run_federate

    summary = run_federate(project=str(tiny_project), rounds=2, overrides={"federate.strategy": "fltrust"})
    tracker, runtime = tracker_for(tiny_project)
    history = UpdateHistory(open_store(runtime.store))
    ref = manifest_ref_from_tags(tracker.version(summary["final_version"]).tags)
    final = history.read_manifest(ref)
    assert final.protocol["strategy"]["name"] == "fltrust"
    assert {"trust", "excluded", "server_update_norm"} <= set(final.extra) and final.extra["server_update_norm"] > 0
    forgotten = forget_client(history, ref, final, "client_00").state  # rebuilt without the server update
    rebuilt = history.read_state(history.read_manifest(final.parent).base)
    for cid in ("client_01", "client_02"):
        rebuilt = add(rebuilt, history.client_sum(final, cid))
    assert max_abs_difference(rebuilt, forgotten) < 1e-5


def test_local_dp_noises_each_upload_on_the_client_and_forgetting_stays_exact(tiny_project):
    from components.core.state import l2_norm
    from components.unlearning.forget import forget_client
    from flows.federate import run_federate

    overrides = {"federate.dp_mode": "local", "federate.dp_noise_multiplier": 0.5, "federate.dp_clipping_norm": 0.5}
    summary = run_federate(project=str(tiny_project), rounds=2, overrides=overrides)
    tracker, runtime = tracker_for(tiny_project)
    history = UpdateHistory(open_store(runtime.store))
    version = tracker.version(summary["final_version"])
    ref = manifest_ref_from_tags(version.tags)
    final = history.read_manifest(ref)
    assert final.protocol["local_dp"] == {"clipping_norm": 0.5, "noise_multiplier": 0.5}
    assert final.protocol["strategy"]["name"] == "fedavg"  # no server-side noise: no residual
    assert final.residual is None and float(version.tags["dp_epsilon"]) > 0
    # the uploads carry the noise: far above the clipping norm (sigma C per coordinate)
    upload = history.read_state(final.clients[0].update)
    assert float(l2_norm(upload)) > 0.5
    forgotten = forget_client(history, ref, final, "client_00").state
    rebuilt = history.read_state(history.read_manifest(final.parent).base)
    for cid in ("client_01", "client_02"):
        rebuilt = add(rebuilt, history.client_sum(final, cid))
    assert max_abs_difference(rebuilt, forgotten) < 1e-5
