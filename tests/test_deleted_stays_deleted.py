"""No path brings a forgotten client back: unlearn from an older version, rollback then federate.

(Rollback then a scheduled run under ``serve`` is in tests/test_operations.py.)
"""

from __future__ import annotations

import pytest

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags
from components.unlearning.guard import TaintedLineageError, present_clients

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def context(project):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    store = open_store(runtime.store)
    return tracker, store, UpdateHistory(store)


def snapshot(tracker, store):
    """What a refused request must leave unchanged: versions, tags, champion, every stored object."""
    versions = [(v.version, dict(v.tags)) for v in tracker.versions()]
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=1000)
    return versions, tracker.alias().version, store.list(), len(runs)


@pytest.fixture
def forgotten(tiny_project):
    """A federation of two rounds (versions 1, 2), then client_01 forgotten (version 3)."""
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    run_federate(project=str(tiny_project), overrides={"federate.prefit_teacher": False})
    unlearn(client_id="client_01", project=str(tiny_project), overrides={"unlearn.teacher": "none"})
    return tiny_project


def test_lineage_replay_finds_the_clients_of_every_version(forgotten):
    tracker, _, history = context(forgotten)
    found = {v.version: present_clients(history, manifest_ref_from_tags(v.tags)) for v in tracker.versions()}
    assert found == {
        "1": {"client_00", "client_01", "client_02"},
        "2": {"client_00", "client_01", "client_02"},
        "3": {"client_00", "client_02"},
    }


def test_unlearn_from_a_version_older_than_a_deletion_is_refused(forgotten):
    from flows.unlearn import unlearn

    tracker, store, _ = context(forgotten)
    before = snapshot(tracker, store)
    # Execute: forget another client, starting from version 2 (which still holds client_01)
    with pytest.raises(TaintedLineageError) as refused:
        unlearn(client_id="client_02", version="2", project=str(forgotten), overrides={"unlearn.teacher": "none"})
    # Assert: a clear refusal naming client, request and versions; nothing changed
    message = str(refused.value)
    assert "version 2" in message and "client_01" in message and "deletion version 3" in message
    assert "nothing changed" in message and "champion (version 3)" in message
    assert snapshot(tracker, store) == before
    # from the champion it works
    done = unlearn(client_id="client_02", project=str(forgotten), overrides={"unlearn.teacher": "none"})
    assert done["status"] == "unlearned" and done["source_version"] == "3"


def test_rollback_then_federate_is_refused(forgotten):
    from flows.federate import run_federate

    tracker, store, _ = context(forgotten)
    tracker.set_alias("2")  # an operator's rollback in the MLflow UI
    before = snapshot(tracker, store)
    with pytest.raises(TaintedLineageError, match=r"resume training from version 2.*client_01.*--fresh"):
        run_federate(project=str(forgotten), rounds=1)
    assert snapshot(tracker, store) == before  # no version, no run, no object
    # the way out the message names: point champion at the deletion's version
    tracker.set_alias("3")
    resumed = run_federate(project=str(forgotten), rounds=1, overrides={"federate.prefit_teacher": False})
    assert resumed["resumed_from_version"] == "3" and resumed["excluded_clients"] == ["client_01"]


def test_the_gate_never_promotes_a_tainted_candidate_and_replaces_a_tainted_champion(forgotten):
    from flows.federate import run_federate

    tracker, _, _ = context(forgotten)
    tracker.set_alias("2")
    # --fresh trains without client_01; the gate would normally compare with champion,
    # but a champion that still holds a forgotten client is no yardstick
    result = run_federate(
        project=str(forgotten), rounds=1, fresh=True, promote="gate",
        overrides={"operations.gate_tolerance": -1.0, "federate.prefit_teacher": False},
    )  # fmt: skip
    assert result["promotion"]["promoted"] and result["promotion"]["champion_tainted"]
    assert tracker.alias().version == result["final_version"]


def test_delete_weights_retires_every_tainted_version_and_the_audit_says_so(forgotten):
    from components.audit.audit import audit
    from components.unlearning.retire import read_retirements
    from flows.unlearn import unlearn

    tracker, store, history = context(forgotten)
    # Assert: versions 1 and 2 (which hold client_01) lost their weights, not their entries or tags
    assert [v.version for v in tracker.versions()] == ["1", "2", "3"]
    for number in ("1", "2"):
        version = tracker.version(number)
        assert "client_01" in version.tags["retired"] and version.tags["contains_forgotten_clients"] == "client_01"
        assert tracker.model_artifacts(number) == []  # the registry's copy of the weights is gone
        manifest = history.read_manifest(manifest_ref_from_tags(version.tags))
        assert not store.exists(manifest.global_state.key)  # the archived state that embeds the client
    assert "MLmodel" in tracker.model_artifacts("3")  # the unlearned version keeps its weights
    (record,) = read_retirements(store)
    assert record["versions"] == ["1", "2"] and all(len(s["sha256"]) == 64 for s in record["states"])
    # the audit of the source reports its states as retired, not missing; the client as present
    index = {v.tags["manifest_key"]: {**v.tags, "_version": v.version} for v in tracker.versions()}
    report = audit(store, "2", tracker.version("2").tags, index, client="client_01")
    assert report.findings == [] and report.client_present and report.retired_versions == ["1", "2"]
    assert {c.status for c in report.objects} == {"ok", "purged", "retired"}
    # a rerun is a no-op that finds nothing left to retire
    again = unlearn(client_id="client_01", project=str(forgotten), overrides={"unlearn.teacher": "none"})
    assert again["status"] == "already_forgotten" and again["retired_versions"] == ["1", "2"]


def test_the_global_model_teacher_is_refused_unless_forced_and_then_flagged(forgotten):
    from components.audit.audit import audit
    from flows.unlearn import unlearn

    tracker, store, _ = context(forgotten)
    before = snapshot(tracker, store)
    with pytest.raises(ValueError, match="global-model distils from the version that still contains client_02"):
        unlearn(client_id="client_02", project=str(forgotten), overrides={"unlearn.teacher": "global-model"})
    assert snapshot(tracker, store) == before
    forced = unlearn(
        client_id="client_02", project=str(forgotten),
        overrides={"unlearn.teacher": "global-model", "unlearn.force_teacher": True, "distill.epochs": 1},
    )  # fmt: skip
    version = tracker.version(forced["version"])
    assert version.tags["teacher_contains_forgotten_client"] == "true"
    index = {v.tags["manifest_key"]: {**v.tags, "_version": v.version} for v in tracker.versions()}
    report = audit(store, version.version, version.tags, index)
    assert [f.kind for f in report.findings] == ["tainted_teacher"]


def test_tag_mode_keeps_the_weights(tiny_project):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    run_federate(project=str(tiny_project), rounds=1, overrides={"federate.prefit_teacher": False})
    unlearn(client_id="client_00", project=str(tiny_project),
            overrides={"unlearn.teacher": "none", "unlearn.retire_tainted": "tag"})  # fmt: skip
    tracker, store, history = context(tiny_project)
    first = tracker.version("1")
    assert "retired" not in first.tags and first.tags["contains_forgotten_clients"] == "client_00"
    assert store.exists(history.read_manifest(manifest_ref_from_tags(first.tags)).global_state.key)
