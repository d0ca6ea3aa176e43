"""A real deletion's signed receipt: `fedforget receipt verify` passes, and fails when anything it names changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.lineage.store import open_store

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]
runner = CliRunner()


def verify(path: Path) -> tuple[int, str]:
    from flows.cli import app

    result = runner.invoke(app, ["receipt", "verify", str(path), "--json"])
    output = result.output
    return result.exit_code, output[output.index("{") :] if "{" in output else output  # after any library warning


@pytest.fixture
def receipt(tiny_project, tmp_path):
    from flows.federate import run_federate
    from flows.unlearn import unlearn

    run_federate(project=str(tiny_project), overrides={"federate.prefit_teacher": False})
    result = unlearn(client_id="client_01", project=str(tiny_project), overrides={"unlearn.teacher": "none"})
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(result["receipt"]))
    return path, result


def test_a_real_deletion_yields_a_receipt_that_verifies_and_says_what_was_done(receipt, tiny_project):
    path, result = receipt
    body = json.loads(path.read_text())
    assert body["client_id"] == "client_01" and body["model"] == "tiny" and body["guarantee"] == "contributions"
    assert body["new_version"] == result["version"] == "3" and body["retired_versions"] == ["1", "2"]
    assert body["signature"]["algorithm"] == "Ed25519" and "test_accuracy_after" in body["verification"]
    code, output = verify(path)
    assert code == 0 and json.loads(output)["valid"], output
    # the key was made on first use, readable only by its owner; the receipt is kept in the store too
    key = tiny_project / ".fedforget" / "keys" / "receipt-ed25519.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    store = open_store(Runtime.from_env(tiny_project).store)
    assert store.exists(f"receipts/tiny/{body['request_id']}.json")


def test_the_receipt_fails_when_anything_it_names_is_altered(receipt, tiny_project):
    from flows.tracking import Tracker

    path, _ = receipt
    body = json.loads(path.read_text())
    runtime = Runtime.from_env(tiny_project)
    store = open_store(runtime.store)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)

    def fails(what: str) -> None:
        code, output = verify(path)
        assert code == 3 and not json.loads(output)["valid"], f"{what}: {output}"

    # the receipt itself (its signature)
    path.write_text(json.dumps({**body, "new_version": "2"}))
    fails("receipt field")
    path.write_text(json.dumps(body))
    # each object it names, in the store
    for field in ("unlearning_manifest", "tombstone"):
        key = body[field]["key"]
        original = store.get(key)
        store.put(key, original.replace(b"client_01", b"client_00", 1))
        fails(field)
        store.put(key, original)
    # each tag of the new version, in the registry
    for tag in ("forgetting", "tombstone_sha256", "manifest_sha256"):
        original = tracker.version("3").tags[tag]
        tracker.set_version_tag("3", tag, "tampered")
        fails(f"tag {tag}")
        tracker.set_version_tag("3", tag, original)
    # a retired version's record in the registry
    tracker.client.delete_model_version_tag("tiny", "1", "retired")
    fails("retired tag")
    tracker.set_version_tag("1", "retired", "restored")
    # the served artifact of the new version
    logged = tracker.client.get_logged_model(tracker.version("3").source.split("/", 1)[1].lstrip("/"))
    artifact = Path(logged.artifact_location.removeprefix("file://")) / "data" / "model.pt2"
    original = artifact.read_bytes()
    artifact.write_bytes(original[: len(original) // 2])
    fails("artifact")
    artifact.write_bytes(original)
    code, output = verify(path)
    assert code == 0, output  # everything restored: valid again
