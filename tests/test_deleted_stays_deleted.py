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
