"""The unlearn flow end to end (tiny teacher) through Prefect, MLflow and the store."""

from __future__ import annotations

import json

import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.federation.protocol import UnlearningError
from components.lineage.history import UpdateHistory
from components.lineage.manifests import UnlearningManifest
from components.lineage.store import IntegrityError, open_store
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.purge import stored_client_objects
from components.unlearning.tombstones import read_tombstone

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

UNLEARNED_TAGS = {
    "kind", "forgotten_client", "request_id", "source_version", "forgetting_variant", "teacher",
    "teacher_run_id", "data_version", "manifest_key", "manifest_sha256", "parent_version",
    "test_accuracy_before", "test_accuracy_after", "forgotten_client_accuracy_before",
    "forgotten_client_accuracy_after",
}  # fmt: skip


def context(project):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    store = open_store(runtime.store)
    return tracker, store, UpdateHistory(store)


def left(tracker, history, client_id):
    """The client's objects still in the store, by what the manifests of every registered version name."""
    heads = [manifest_ref_from_tags(v.tags) for v in tracker.versions()]
    return stored_client_objects(history, heads, client_id)


def test_unlearn_registers_a_tagged_version_and_keeps_the_client_deleted(tiny_project):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    # Prepare
    federation = run_federate(project=str(tiny_project))
    tracker, store, history = context(tiny_project)
    prefitted = tracker.client.get_run(federation["run_id"]).data.tags["teacher_run_id"]
    assert len(left(tracker, history, "client_01")) == 5  # 2 updates + 2 running sums + its staged shard
    # Execute
    result = unlearn(client_id="client_01", project=str(tiny_project), request_id="req-001", reason="ticket 42")
    # Assert: a new version with every lineage tag, champion moved to it
    version = tracker.version(result["version"])
    assert result["status"] == "unlearned" and version.version == "3"
    assert set(version.tags) >= UNLEARNED_TAGS
    assert version.tags["kind"] == "unlearned" and version.tags["forgotten_client"] == "client_01"
    assert version.tags["request_id"] == "req-001" and version.tags["source_version"] == "2"
    assert version.tags["teacher"] == "clip" and version.tags["data_version"].endswith(".dir")
    assert version.tags["teacher_run_id"] == prefitted  # fitted when the federation ended, reused here
    assert tracker.alias().version == "3"
    # the teacher run holds the adapter weights (not the backbone) and its metrics
    teacher_run = tracker.client.get_run(version.tags["teacher_run_id"])
    assert {"val_accuracy", "test_accuracy"} <= set(teacher_run.data.metrics)
    assert tracker.download(teacher_run.info.run_id, "teacher/head.safetensors").stat().st_size < 1_000_000
    assert tracker.download(teacher_run.info.run_id, "teacher/few_shot_logits.safetensors").is_file()
    # earlier versions that contain the client are flagged
    for number in ("1", "2"):
        assert tracker.version(number).tags["contains_forgotten_clients"] == "client_01"
    # the store holds nothing of the client, only its tombstone
    assert left(tracker, history, "client_01") == []
    tombstone = read_tombstone(store, "tiny", "client_01")
    assert tombstone["request_id"] == "req-001" and tombstone["resulting_version"] == "3"
    assert tombstone["reason"] == "ticket 42" and len(tombstone["purged"]) == 5
    assert all(len(p["sha256"]) == 64 for p in tombstone["purged"])
    manifest = history.read_manifest(manifest_ref_from_tags(version.tags))
    assert isinstance(manifest, UnlearningManifest) and "client_01" not in manifest.sums

    # A following federate resumes from the unlearned version and excludes the client
    follow = run_federate(project=str(tiny_project), rounds=1)
    assert follow["excluded_clients"] == ["client_01"]
    resumed = tracker.version(follow["champion_version"])
    assert resumed.tags["clients"] == "client_00,client_02" and resumed.tags["parent_version"] == "3"
    assert "client_01" not in history.read_manifest(manifest_ref_from_tags(resumed.tags)).sums

    # A second unlearn of the same client is a no-op reporting the existing version
    again = unlearn(client_id="client_01", project=str(tiny_project))
    assert again["status"] == "already_forgotten" and again["version"] == "3"
    assert len(tracker.versions()) == 4

    # A different client reuses the fitted teacher (same spec, same few-shot data)
    other = unlearn(client_id="client_00", project=str(tiny_project))
    assert other["teacher_run_id"] == result["teacher_run_id"]
    assert tracker.alias().version == other["version"]


def test_unknown_client_and_tampered_archive_are_refused(tiny_project):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    run_federate(project=str(tiny_project), rounds=1)
    tracker, store, history = context(tiny_project)
    before = [v.version for v in tracker.versions()]
    with pytest.raises(UnlearningError, match="never contributed"):
        unlearn(client_id="client_99", project=str(tiny_project))
    with pytest.raises(UnlearningError, match="invalid client id"):
        unlearn(client_id="../client_00", project=str(tiny_project))
    # tamper with client_00's archived running sum
    manifest = history.read_manifest(manifest_ref_from_tags(tracker.alias().tags))
    path = tiny_project.parent / "store" / manifest.sums["client_00"].key
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        unlearn(client_id="client_00", project=str(tiny_project))
    # nothing registered, nothing purged, no tombstone
    assert [v.version for v in tracker.versions()] == before and tracker.alias().version == before[-1]
    assert read_tombstone(store, "tiny", "client_00") is None
    assert len(left(tracker, history, "client_00")) == 3  # its update, running sum and staged shard


@pytest.mark.parametrize("teacher", ["none", "global-model"])
def test_the_other_recovery_options(tiny_project, teacher):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    run_federate(project=str(tiny_project), rounds=1)
    result = unlearn(client_id="client_02", project=str(tiny_project), overrides={
        "unlearn.teacher": teacher, "unlearn.variant": "renormalise", "verification.backdoor_target_class": 0,
        "verification.trigger_size": 2, "unlearn.force_teacher": teacher == "global-model",
    })  # fmt: skip
    # the deletion's verification report: needs no retraining
    for key in ("test_accuracy", "forgotten_client_accuracy", "backdoor_asr", "forgotten_client_mia_auc"):
        assert {f"{key}_before", f"{key}_after"} <= set(result["metrics"])
    tracker_, _, _ = context(tiny_project)
    report = json.loads(tracker_.download(result["run_id"], "verification.json").read_text())
    assert report["before"]["backdoor_asr"] == result["metrics"]["backdoor_asr_before"]
    tracker, _, _ = context(tiny_project)
    tags = tracker.version(result["version"]).tags
    assert tags["teacher"] == teacher and tags["forgetting_variant"] == "renormalise"
    assert tags["teacher_run_id"] == "none"
    if teacher == "none":
        assert (
            tags["data_version"] == "none"
            and result["metrics"]["test_accuracy_after"] == result["metrics"]["test_accuracy_forgotten"]
        )
    else:
        assert tags["data_version"].endswith(".dir")


def test_a_crash_after_registration_is_finished_by_the_next_run(tiny_project, monkeypatch):
    import flows.completion as completion
    import flows.unlearn as module
    from flows.federate import run_federate

    run_federate(project=str(tiny_project), rounds=1)
    real = completion.tombstone_task

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the tombstone")

    monkeypatch.setattr(completion, "tombstone_task", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        module.unlearn(client_id="client_02", project=str(tiny_project), overrides={"unlearn.teacher": "none"})
    tracker, store, history = context(tiny_project)
    registered = tracker.find_versions(kind="unlearned", forgotten_client="client_02")
    assert len(registered) == 1 and read_tombstone(store, "tiny", "client_02") is None
    monkeypatch.setattr(completion, "tombstone_task", real)
    # Execute: the same request again
    result = module.unlearn(client_id="client_02", project=str(tiny_project), overrides={"unlearn.teacher": "none"})
    # Assert: finished, not redone
    assert result["status"] == "completed" and result["version"] == registered[0].version
    assert read_tombstone(store, "tiny", "client_02") is not None and left(tracker, history, "client_02") == []
    assert len(tracker.find_versions(kind="unlearned", forgotten_client="client_02")) == 1
