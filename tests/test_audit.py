"""The lineage audit: right clients and deletions, present/absent answers, tampering as findings."""

from __future__ import annotations

import json

import jsonschema
import pytest
from typer.testing import CliRunner

from components.audit.audit import audit
from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore, open_store
from components.lineage.tags import manifest_ref_from_tags
from flows.cli import app
from flows.reports.audit import report_schema
from tests.test_unlearning import SCHEDULE, federate, unlearn

runner = CliRunner()


def test_presence_follows_rounds_and_deletions(tmp_path):
    # Prepare: A, B, C train; A is forgotten; then B and C train one more round
    store = LocalStore(tmp_path)
    history, refs, _ = federate(store, SCHEDULE)
    after_a = unlearn(history, refs[-1], "A", "subtract", "del-a")
    history, more, _ = federate(store, {5: [("B", 10), ("C", 30)]}, head=history.head_of(after_a), fid="fed-v")
    index: dict = {}  # no registry here: the archive alone
    final = {"kind": "global", "manifest_key": more[-1].key, "manifest_sha256": more[-1].sha256}
    # Execute
    report = audit(store, "6", final, index, client="A")
    # Assert
    assert report.client_present is False and report.present_clients == ["B", "C"]
    assert [n.kind for n in report.nodes] == ["round", "unlearning", "round", "round", "round", "round"]
    assert report.deletions[0]["client_id"] == "A" and report.findings == []
    before = audit(
        store,
        "4",
        {"kind": "global", "manifest_key": refs[-1].key, "manifest_sha256": refs[-1].sha256},
        index,
        client="A",
    )
    assert before.client_present is True and before.exit_code() == 1


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_audit_after_federate_and_unlearn(tiny_project, tmp_path):
    from flows.audit import audit_flow
    from flows.federate import run_federate
    from flows.tracking import Tracker
    from flows.unlearn import unlearn as unlearn_flow

    # Prepare: 2 rounds over 3 clients, then client_01 is forgotten
    run_federate(project=str(tiny_project))
    deletion = unlearn_flow(client_id="client_01", project=str(tiny_project), overrides={"unlearn.teacher": "none"})
    runtime = Runtime.from_env(tiny_project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    # Execute: the champion's audit
    result = audit_flow(project=str(tiny_project), out_dir=str(tmp_path / "audit"))
    report = result["report"]
    # Assert: the right clients per round and the deletion
    assert report["version"] == deletion["version"] == "3" and report["verdict"] == "verified"
    rounds = [n for n in report["lineage"] if n["kind"] == "round"]
    assert [n["server_round"] for n in rounds] == [2, 1]
    for node in rounds:
        assert [c["client_id"] for c in node["clients"]] == ["client_00", "client_01", "client_02"]
        assert sum(c["weight"] for c in node["clients"]) == pytest.approx(1.0)
        assert node["contains_forgotten_clients"] == ["client_01"]
    (gone,) = report["deletions"]
    assert gone["client_id"] == "client_01" and gone["request_id"] == deletion["request_id"]
    assert report["present_clients"] == ["client_00", "client_02"]
    assert report["objects"]["purged"] == 4 and report["objects"]["mismatch"] == report["objects"]["missing"] == 0
    jsonschema.validate(report, report_schema())
    # the report and the graph are logged to MLflow, on a run tagged with the version
    run = tracker.client.get_run(result["run_id"])
    assert run.data.tags["kind"] == "audit" and run.data.tags["audited_version"] == "3"
    logged = {f.path for f in tracker.client.list_artifacts(result["run_id"], "audit")}
    assert logged == {"audit/audit.md", "audit/lineage.png", "audit/audit.json"}
    assert "client_01" in (tmp_path / "audit" / "audit.md").read_text()

    # --client: absent from the unlearned version (exit 0), present in its source (exit 1)
    absent = runner.invoke(app, ["audit", "--client", "client_01", "--json"])
    assert absent.exit_code == 0, absent.output
    data = json.loads(absent.stdout[absent.stdout.index("{") :])
    jsonschema.validate(data, report_schema())
    assert data["client"] == {"client_id": "client_01", "present": False}
    present = runner.invoke(app, ["audit", "--version", deletion["source_version"], "--client", "client_01"])
    assert present.exit_code == 1 and "PRESENT" in present.output

    # Tampering with one archived object is a finding and a non-zero exit, not a crash
    store = open_store(runtime.store)
    history = UpdateHistory(store)
    manifest = history.read_manifest(manifest_ref_from_tags(tracker.version("1").tags))
    target = manifest.clients[0].update.key  # client_00's round-1 update
    blob = bytearray(store.get(target))
    blob[-3] ^= 0x10
    store.put(target, bytes(blob))
    tampered = runner.invoke(app, ["audit", "--json"])
    assert tampered.exit_code == 3
    found = json.loads(tampered.stdout[tampered.stdout.index("{") :])["findings"]
    assert [f["kind"] for f in found] == ["object_mismatch"] and found[0]["key"] == target
    # ... so is a deleted (not purged) object, and a tag that points nowhere
    store.delete(manifest.base.key)  # the initial model (the retired global states are explained, not missing)
    tracker.set_version_tag("1", "manifest_key", "federations/nowhere/manifest.json")
    broken = runner.invoke(app, ["audit", "--version", "1", "--json"])
    assert broken.exit_code == 3
    kinds = {f["kind"] for f in json.loads(broken.stdout[broken.stdout.index("{") :])["findings"]}
    assert "manifest_unreadable" in kinds
    missing = runner.invoke(app, ["audit", "--json"])
    assert {"object_missing", "object_mismatch"} <= {
        f["kind"] for f in json.loads(missing.stdout[missing.stdout.index("{") :])["findings"]
    }
    assert runner.invoke(app, ["audit", "--version", "99"]).exit_code == 2


def test_a_second_audit_in_the_same_second_keeps_the_first_report(tmp_path):
    from flows.audit import _fresh_folder

    first = _fresh_folder(tmp_path / "fedforget-v5-20261122T000000")
    (tmp_path / "fedforget-v5-20261122T000000").mkdir()
    second = _fresh_folder(tmp_path / "fedforget-v5-20261122T000000")
    assert first != second and second.endswith("-2")
