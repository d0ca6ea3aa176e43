"""Secrets never appear in logs (issue 17): a federation and a deletion on the stack with distinctive
S3 credentials, then every output, log, MLflow record, Prefect record, report and file scanned for them.

The stack is this module's own (its credentials are chosen here, and everything its
services hold or logged comes from this test). A credential counts as leaked wherever
its random part appears, in any letter case, in text or in the bytes of a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_PARAMS, write_project
from tests.stack_fixture import Stack

FEDFORGET = str(Path(sys.executable).parent / "fedforget")
# What the stack keeps on purpose: the credentials it hands to SeaweedFS and to clients.
CREDENTIAL_FILES = {"credentials.json", "s3-identities.json", "stack.env"}


@dataclass
class Scan:
    """Looks for secrets (label -> value) in texts and files; records where, never what."""

    secrets: dict[str, str]
    found: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        # The random part of each secret, lower case: a leak with its prefix cut off or its case changed counts.
        self._needles = {label: value.rpartition("-")[2].lower().encode() for label, value in self.secrets.items()}

    def text(self, kind: str, place: str, content: str | bytes) -> None:
        data = (content.encode(errors="replace") if isinstance(content, str) else content).lower()
        self.counts[kind] += 1
        self.found += [f"{label} in {place}" for label, needle in self._needles.items() if needle in data]

    def record(self, kind: str, place: str, value: Any) -> None:
        self.text(kind, place, json.dumps(value, default=str, sort_keys=True))

    def tree(self, kind: str, root: Path, relative_to: Path | None = None, skip: set[str] = frozenset()) -> None:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            if path.name not in skip:
                self.text(kind, f"{kind} {path.relative_to(relative_to or root)}", path.read_bytes())


@pytest.fixture(scope="module")
def secret_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    """A stack of its own whose SeaweedFS accepts only these distinctive credentials."""
    credentials = {"access_key": f"FFKEY-{uuid.uuid4().hex}", "secret_key": f"FFSECRET-{uuid.uuid4().hex}"}
    stack = Stack.create(tmp_path_factory.mktemp("secret-stack"), credentials=credentials)
    stack.up()
    try:
        yield stack, credentials
    finally:
        stack.run("down", check=False)


def fedforget(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDFORGET, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def json_out(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{") :])


def post_json(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def scan_mlflow(scan: Scan, tracking_uri: str, downloads: Path) -> None:
    """Every experiment, run (params, tags, metrics, artifacts), logged model and registered version."""
    from mlflow.artifacts import download_artifacts
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for experiment in experiments:
        scan.record("mlflow experiment", f"MLflow experiment {experiment.name}", dict(experiment))
        runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
        for run in runs:
            name = f"MLflow run {run.info.run_name} ({run.info.run_id})"
            scan.record("mlflow run", f"{name}: params, tags, metrics", run.to_dictionary())
            folder = download_artifacts(run_id=run.info.run_id, dst_path=str(downloads / run.info.run_id),
                                        tracking_uri=tracking_uri)  # fmt: skip
            scan.tree("mlflow artifact", Path(folder), relative_to=downloads)
        models = client.search_logged_models([experiment.experiment_id], max_results=1000)
        for model in models:
            scan.record("mlflow logged model", f"MLflow logged model {model.name}", model.to_dictionary())
            folder = download_artifacts(artifact_uri=model.artifact_location,
                                        dst_path=str(downloads / model.model_id), tracking_uri=tracking_uri)  # fmt: skip
            scan.tree("mlflow artifact", Path(folder), relative_to=downloads)
    for registered in client.search_registered_models():
        scan.record("mlflow registered model", f"MLflow registered model {registered.name}", {
            "description": registered.description, "tags": registered.tags, "aliases": registered.aliases,
        })  # fmt: skip
        for version in client.search_model_versions(f"name = '{registered.name}'"):
            scan.record("mlflow model version", f"MLflow model version {registered.name}/{version.version}", {
                "description": version.description, "tags": version.tags, "source": version.source,
                "run_link": version.run_link, "status_message": version.status_message,
            })  # fmt: skip


def scan_prefect(scan: Scan, api_url: str) -> None:
    """Every flow run, task run, log, artifact and event the Prefect server holds (read through its API)."""
    from prefect.client.orchestration import SyncPrefectClient

    def pages(read: Any) -> Iterator[Any]:
        offset = 0
        while batch := read(limit=200, offset=offset):
            yield from batch
            offset += len(batch)

    with SyncPrefectClient(api_url) as client:
        runs = list(pages(client.read_flow_runs))
        flow_runs = {run.id: run.name for run in runs}
        for run in runs:
            scan.record("prefect flow run", f"Prefect flow run {run.name}", run.model_dump(mode="json"))
        for task in pages(client.read_task_runs):
            scan.record("prefect task run", f"Prefect task run {task.name}", task.model_dump(mode="json"))
        for log in pages(client.read_logs):
            where = f"task run {log.task_run_id}" if log.task_run_id else f"flow run {flow_runs.get(log.flow_run_id)}"
            kind = "prefect task-run log" if log.task_run_id else "prefect flow-run log"
            scan.record(kind, f"Prefect log of {where} ({log.name})", log.model_dump(mode="json"))
        for artifact in pages(client.read_artifacts):
            scan.record("prefect artifact", f"Prefect artifact {artifact.key}", artifact.model_dump(mode="json"))
    page = post_json(f"{api_url}/events/filter", {"limit": 50})
    while True:
        for event in page["events"]:
            scan.record("prefect event", f"Prefect event {event['event']} ({event['id']})", event)
        if not page.get("next_page"):
            break
        with urllib.request.urlopen(page["next_page"], timeout=30) as response:
            page = json.loads(response.read())


def scan_bucket(scan: Scan, env: dict[str, str], bucket: str) -> None:
    """Every object in the stack's bucket: the archive, the requests and tombstones, MLflow's artifacts."""
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    )  # fmt: skip
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            scan.text("s3 object", f"S3 object {bucket}/{item['Key']}", body)


def test_negative_control_the_scan_finds_a_planted_secret(tmp_path):
    # Prepare: a secret planted in a nested file, once upper-cased and without its prefix
    secret = f"FFSECRET-{uuid.uuid4().hex}"
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "log.txt").write_bytes(b"\x00binary\xff " + secret.encode() + b" tail")
    (tmp_path / "a" / "clean.json").write_text('{"store": "s3://fedforget/x"}')
    scan = Scan({"secret key": secret})
    # Execute
    scan.tree("file", tmp_path)
    scan.text("output", "CLI output", f"error: {secret.rpartition('-')[2].upper()}")
    scan.record("record", "a record", {"tags": {"clean": "value"}})
    # Assert: found where planted, named by place only
    assert scan.found == ["secret key in file a/b/log.txt", "secret key in CLI output"]
    assert not any(secret.rpartition("-")[2] in place.lower() for place in scan.found)
    assert scan.counts == {"file": 2, "output": 1, "record": 1}


@pytest.mark.integration
def test_credentials_appear_in_no_output_log_record_report_or_file(secret_stack, tmp_path):
    # Prepare: a tiny project on the stack, configured by its environment file only
    stack, credentials = secret_stack
    name = f"s{uuid.uuid4().hex[:8]}"
    root = write_project(tmp_path / "project", {**TINY_PARAMS, "registry": {"model_name": name, "experiment": name}})
    home, cwd, report, downloads = (tmp_path / d for d in ("home", "cwd", "report", "downloads"))
    for folder in (home, cwd):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FEDFORGET_"))}
    env |= stack.client_env() | {
        "HOME": str(home),  # whatever the CLI, Prefect or MLflow keep in the user's home is scanned too
        "FEDFORGET_PROJECT": str(root),
        "FEDFORGET_STORE": f"s3://fedforget/{name}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "FEDFORGET_S3_MAX_ATTEMPTS": "2",
    }
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        credentials["access_key"], credentials["secret_key"],
    )  # fmt: skip
    wrong_secret = f"FFSECRET-{uuid.uuid4().hex}"
    secrets_ = {"secret key": credentials["secret_key"], "access key": credentials["access_key"]}
    # Execute: a federation, a filed deletion request, the deletion and an audit, as a user runs them
    # (verbose: Prefect's and MLflow's logs too), and one command refused for a wrong secret
    outputs = {
        "federate": fedforget(env, cwd, "federate", "--rounds", "1", "--verbose", "--json"),
        "request-deletion": fedforget(env, cwd, "request-deletion", "--client", "client_00", "--reason", "T-1", "--json"),
    }  # fmt: skip
    json_out(outputs["federate"])
    request_id = json_out(outputs["request-deletion"])["request_id"]
    outputs["unlearn"] = fedforget(env, cwd, "unlearn", "--client", "client_00", "--request-id", request_id,
                                   "--teacher", "none", "--verbose", "--json")  # fmt: skip
    assert json_out(outputs["unlearn"])["status"] == "unlearned"
    outputs["audit"] = fedforget(env, cwd, "audit", "--client", "client_00", "--out", str(report), "--verbose")
    assert outputs["audit"].returncode == 0, outputs["audit"].stdout + outputs["audit"].stderr
    outputs["requests (wrong secret)"] = fedforget({**env, "AWS_SECRET_ACCESS_KEY": wrong_secret}, cwd, "requests")
    assert outputs["requests (wrong secret)"].returncode == 2, outputs["requests (wrong secret)"].stderr
    # Assert: the scan finds the credentials where the stack keeps them on purpose ...
    control = Scan(secrets_)
    for file in sorted(CREDENTIAL_FILES):
        control.text("control", file, (stack.directory / file).read_bytes())
    assert control.found == [f"{label} in {file}" for file in sorted(CREDENTIAL_FILES) for label in secrets_]
    # ... and in no output ...
    scan = Scan({**secrets_, "wrong secret key": wrong_secret})
    for verb, result in outputs.items():
        scan.text("cli output", f"stdout of `fedforget {verb}`", result.stdout)
        scan.text("cli output", f"stderr of `fedforget {verb}`", result.stderr)
    # ... MLflow record or artifact, Prefect record or log, stored object ...
    scan_mlflow(scan, env["MLFLOW_TRACKING_URI"], downloads)
    scan_prefect(scan, env["PREFECT_API_URL"])
    scan_bucket(scan, env, "fedforget")
    # ... report, project or home file, service log or database (all but the stack's own credential files)
    scan.tree("audit report", report, relative_to=tmp_path)
    for folder in (root, home, cwd):
        scan.tree("project, home or cwd file", folder, relative_to=tmp_path)
    scan.tree("service log", stack.directory / "logs", relative_to=stack.directory)
    for service in ("mlflow", "prefect"):
        scan.tree("service database", stack.directory / "data" / service, relative_to=stack.directory)
    top = {p.name for p in stack.directory.iterdir() if p.is_file()}
    assert top <= CREDENTIAL_FILES | {"stack.json"}, top
    scan.text("stack file", "stack.json", (stack.directory / "stack.json").read_bytes())
    assert scan.found == [], f"credentials leaked: {scan.found}"
    # the scan was not vacuous: every kind of place was there to look at
    counts = scan.counts
    assert counts["mlflow run"] >= 3 and counts["mlflow model version"] >= 2 and counts["mlflow artifact"] >= 3
    assert counts["prefect flow run"] >= 3 and counts["prefect task run"] >= 3
    assert counts["prefect flow-run log"] >= 1 and counts["prefect task-run log"] >= 1
    assert counts["s3 object"] >= 3 and counts["audit report"] == 3 and counts["service log"] >= 3
    assert counts["service database"] >= 2 and counts["cli output"] == 2 * len(outputs)
    print(dict(sorted(counts.items())))
