"""Every path that brought a forgotten client back, as an adversarial tester found them (issue: complete,
bound, provable deletion). Each test is a reproduction that ended with the client present in the champion."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import StoreError, open_store
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.guard import TaintedLineageError, present_clients
from components.unlearning.tombstones import intent_key, read_intent, read_tombstone, tombstone_key

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

QUIET = {"federate.prefit_teacher": False}
NO_TEACHER = {"unlearn.teacher": "none"}


def context(project, overrides=None):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path, overrides=overrides).registry)
    store = open_store(runtime.store)
    return tracker, store, UpdateHistory(store)


def champion_holds(project, client_id, overrides=None) -> bool:
    tracker, _, history = context(project, overrides)
    return client_id in present_clients(history, manifest_ref_from_tags(tracker.alias().tags))


def audit_exit(project, client_id) -> int:
    from flows.audit import audit_flow

    return audit_flow(client=client_id, project=str(project))["exit_code"]


@pytest.fixture
def federated(tiny_project):
    from flows.federate import run_federate

    run_federate(project=str(tiny_project), overrides=QUIET)  # versions 1, 2
    return tiny_project


def test_a_deletion_that_fails_after_registering_never_lets_a_retraining_bring_the_client_back(federated, monkeypatch):
    import flows.completion as completion
    import flows.unlearn as module
    from flows.federate import run_federate

    # Prepare: the tombstone cannot be written (a store outage, a full disk) after the version is registered
    real = completion.write_tombstone

    def outage(*args, **kwargs):
        raise StoreError("simulated outage: could not write the tombstone")

    monkeypatch.setattr(completion, "write_tombstone", outage)
    with pytest.raises(StoreError, match="simulated outage"):
        module.unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER, request_id="req-fail")
    _, store, _ = context(federated)
    assert read_intent(store, "tiny", "client_01")["request_id"] == "req-fail"  # recorded before anything else
    assert read_tombstone(store, "tiny", "client_01") is None
    # Execute: the scheduled retraining runs before anyone retries the deletion
    again = run_federate(project=str(federated), rounds=1, overrides=QUIET)
    # Assert: the client did not train again, and the champion does not hold it
    assert "client_01" in again["excluded_clients"]
    assert not champion_holds(federated, "client_01")
    # the deletion, run again, completes it and leaves champion on a clean version
    monkeypatch.setattr(completion, "write_tombstone", real)
    done = module.unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    assert done["status"] == "completed" and done["request_id"] == "req-fail"
    assert read_tombstone(store, "tiny", "client_01")["request_id"] == "req-fail"
    assert not champion_holds(federated, "client_01") and audit_exit(federated, "client_01") == 0


def test_a_deletion_that_failed_before_registering_keeps_retraining_off_the_tainted_champion(federated, monkeypatch):
    import flows.unlearn as module
    from flows.federate import run_federate

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the deletion's archive step")

    monkeypatch.setattr(module, "archive_task", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        module.unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    # the champion still holds the client, and the intent is recorded: retraining refuses to continue from it
    with pytest.raises(TaintedLineageError, match=r"client_01 \(being forgotten by request"):
        run_federate(project=str(federated), rounds=1, overrides=QUIET)


def test_removing_the_tombstone_and_the_intent_reopens_nothing(federated):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    _, store, _ = context(federated)
    # Execute: an operator (or an attacker) deletes the store's deletion records
    store.delete(tombstone_key("tiny", "client_01"))
    store.delete(intent_key("tiny", "client_01"))
    again = run_federate(project=str(federated), rounds=1, overrides=QUIET)
    # Assert: the deletion's manifest and the registry still say so: the client is not trained again
    assert "client_01" in again["excluded_clients"] and not champion_holds(federated, "client_01")
    # its prepared shard is gone from the data folder too, and the tombstone listed it first
    assert not (federated / "data" / "default" / "federation" / "clients" / "client_01.safetensors").exists()


def test_client_ids_are_scoped_by_registered_model(federated):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    other = {**QUIET, "registry.model_name": "tiny-b", "registry.experiment": "tiny-b"}
    run_federate(project=str(federated), overrides=other)  # another model of the same project, same ids
    unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    # Execute: the same id under the other model
    result = unlearn(client_id="client_01", project=str(federated), overrides={**NO_TEACHER, **other})
    # Assert: not "already forgotten": it is removed from that model too, and each has its own tombstone
    assert result["status"] == "unlearned"
    _, store, _ = context(federated)
    assert read_tombstone(store, "tiny", "client_01")["model"] == "tiny"
    assert read_tombstone(store, "tiny-b", "client_01")["model"] == "tiny-b"
    assert not champion_holds(federated, "client_01", other)


def test_tags_alone_never_mark_a_deletion_finished(federated):
    from flows.unlearn import unlearn

    tracker, _, history = context(federated)
    # Prepare: a version tagged as if client_01's deletion had completed, pointing at a round manifest
    tracker.set_version_tag("2", "kind", "unlearned")
    tracker.set_version_tag("2", "forgotten_client", "client_01")
    tracker.set_version_tag("2", "request_id", "forged")
    tracker.set_alias("1")
    # Execute
    result = unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    # Assert: the forged version was not taken as finished: the client was really subtracted
    assert result["status"] == "unlearned" and result["version"] == "3"
    assert not champion_holds(federated, "client_01")
    manifest = history.read_manifest(manifest_ref_from_tags(tracker.version("3").tags))
    assert manifest.forgotten_client == "client_01" and manifest.registered_model == "tiny"


def test_every_writer_takes_the_file_lock_and_the_prefect_limit_strictly(tiny_project, monkeypatch):
    from filelock import FileLock

    import flows.locks as locks

    runtime = Runtime.from_env(tiny_project)
    config = load_config(runtime.params_path)
    entered = threading.Event()

    def writer() -> None:
        with locks.model_write_lock(config, runtime):
            entered.set()

    # the file lock is held (a CLI command on this machine): a writer talking to a Prefect server waits for it
    held = FileLock(str(runtime.state_dir / locks.LOCK_FILE))
    runtime.state_dir.mkdir(parents=True, exist_ok=True)
    with held:
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        assert not entered.wait(3)
    assert entered.wait(30)
    thread.join(30)
    # strict: when the limit does not exist, nothing is written (no silent unlocked run)
    name = "limit-that-does-not-exist"
    monkeypatch.setattr(locks, "ensure_model_write_limit", lambda _name: None)
    strict = config.model_copy(update={"operations": config.operations.model_copy(update={"model_write_limit": name})})
    ran = []
    with pytest.raises(Exception, match=r"(?i)concurrency|limit"), locks.model_write_lock(strict, runtime):
        ran.append(True)
    assert ran == []


def test_the_audit_binds_what_the_registry_serves(federated):
    from flows.unlearn import unlearn

    unlearn(client_id="client_01", project=str(federated), overrides={**NO_TEACHER, "unlearn.retire_tainted": "tag"})
    tracker, _, _ = context(federated)
    assert audit_exit(federated, "client_01") == 0
    # Execute: the pre-deletion version's weights copied over the champion's artifact
    source, champion = (Path(model_dir(tracker, v)) for v in ("2", "3"))
    shutil.copy(source / "data" / "model.pt2", champion / "data" / "model.pt2")
    # Assert: the audit compares the served weights with the archived state and reports it
    from flows.audit import audit_flow

    result = audit_flow(client="client_01", project=str(federated))
    kinds = {f["kind"] for f in result["report"]["findings"]}
    assert result["exit_code"] == 3 and "served_weights_mismatch" in kinds


def model_dir(tracker, version: str) -> str:
    found = tracker.version(version)
    logged = tracker.client.get_logged_model(found.source.split("/", 1)[1].lstrip("/"))
    return logged.artifact_location.removeprefix("file://")


def test_a_record_explains_a_missing_object_only_for_its_own_client_and_request(federated):
    from flows.audit import audit_flow
    from flows.unlearn import unlearn

    unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    tracker, store, history = context(federated)
    # Execute: client_00's running sum deleted, and the purge "explained" by editing client_01's tombstone
    manifest = history.read_manifest(manifest_ref_from_tags(tracker.alias().tags))
    victim = manifest.sums["client_00"]
    key = tombstone_key("tiny", "client_01")
    record = json.loads(store.get(key))
    record["purged"].append({"key": victim.key, "sha256": victim.sha256, "size": victim.size})
    store.put(key, json.dumps(record).encode())
    store.delete(victim.key)
    result = audit_flow(project=str(federated))
    kinds = {f["kind"] for f in result["report"]["findings"]}
    # Assert: the record names another client, and the registry's bound tombstone hash no longer matches
    assert {"record_mismatch", "tombstone_mismatch"} <= kinds and result["exit_code"] == 3


def test_an_approximate_forgetting_method_is_opt_in_and_tagged_as_such(tiny_project):
    from components.federation.protocol import UnlearningError
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    ensemble = {
        **QUIET, "federate.protocol": "ensemble-distillation",
        "federate.ensemble": {"epochs": 1, "forget_epochs": 1, "forget_from": "source"},
        "clients.architectures": {"small": {"name": "cnn", "args": {"channels": [2, 4], "hidden": 8}},
                                  "mlp": {"name": "mlp", "args": {"hidden": 16}}},
    }  # fmt: skip
    run_federate(project=str(tiny_project), rounds=1, overrides=ensemble)
    tracker, store, _ = context(tiny_project)
    before = ([v.version for v in tracker.versions()], store.list())
    # Execute: the student re-distilled from the version's own student keeps part of the client
    with pytest.raises(UnlearningError, match=r"guarantee approximate.*allow_approximate.*nothing changed"):
        unlearn(client_id="client_01", project=str(tiny_project), overrides={**ensemble, **NO_TEACHER})
    assert ([v.version for v in tracker.versions()], store.list()) == before
    # opted in, it runs, and says so everywhere
    done = unlearn(
        client_id="client_01", project=str(tiny_project),
        overrides={**ensemble, **NO_TEACHER, "unlearn.allow_approximate": True},
    )  # fmt: skip
    assert done["guarantee"] == "approximate" and tracker.version(done["version"]).tags["forgetting"] == "approximate"
    assert done["receipt"]["guarantee"] == "approximate"


def test_a_deletion_from_before_scoping_and_levels_is_completed_with_its_level_and_a_receipt(federated):
    from flows.receipts import verify_receipt_file
    from flows.unlearn import unlearn

    unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    tracker, store, _ = context(federated)
    # Prepare: what an older store holds: an unscoped tombstone, no level tag, no intent, no receipt
    scoped = tombstone_key("tiny", "client_01")
    store.put("tombstones/client_01.json", store.get(scoped))
    for key in (scoped, intent_key("tiny", "client_01"), *store.list("receipts/")):
        store.delete(key)
    tracker.client.delete_model_version_tag("tiny", "3", "forgetting")
    # Execute: the same deletion again
    result = unlearn(client_id="client_01", project=str(federated), overrides=NO_TEACHER)
    # Assert: completed with the level its protocol gives, recorded again, and a receipt that verifies
    assert result["status"] == "already_forgotten" and result["guarantee"] == "contributions"
    assert tracker.version("3").tags["forgetting"] == "contributions"
    path = federated.parent / "receipt.json"
    path.write_text(json.dumps(result["receipt"]))
    assert verify_receipt_file(path, project=str(federated))["valid"]
