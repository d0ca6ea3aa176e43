"""infra/: the production compose file (validated, not started) and the stack script's CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "infra" / "compose.prod.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_follows_the_compose_specification(compose):
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose)
    assert {"postgres", "s3", "mlflow", "prefect-server", "prefect-worker"} <= set(compose["services"])


def test_compose_images_are_pinned_and_dependencies_wait_for_health(compose):
    services = compose["services"]
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert rule["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} needs a healthcheck"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on loopback only"


def test_compose_holds_no_secret_and_the_example_env_names_every_required_variable(compose):
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = (REPO / "infra" / "prod.env.example").read_text()
    declared = set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    assert required <= declared, f"missing in prod.env.example: {required - declared}"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"{name}.{key} must come from the environment"
    assert "POSTGRES_PASSWORD=\n" in example and "AWS_SECRET_ACCESS_KEY=\n" in example  # left blank


def test_the_image_installs_the_project():
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    for needed in ("COPY components", "COPY flows", "pip install", "dataset-fashion-mnist"):
        assert needed in dockerfile


def stack_sh(*args: str, tmp_path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDFORGET_STACK_DIR": str(tmp_path / "stack"), "FEDFORGET_STACK_ENV": str(tmp_path / "env")}
    return subprocess.run(
        [str(REPO / "infra" / "stack.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_stack_script_reports_a_stopped_stack_and_refuses_bad_input(tmp_path):
    status = stack_sh("status", tmp_path=tmp_path)
    assert status.returncode == 3 and status.stdout.count("stopped") == 5  # seaweedfs ... dask-workers
    assert stack_sh("down", tmp_path=tmp_path).returncode == 0  # nothing running: nothing to do
    assert stack_sh("restart", tmp_path=tmp_path).returncode == 2
    bad = stack_sh("up", "redis", tmp_path=tmp_path)
    assert bad.returncode == 1 and "unknown service" in bad.stderr


def test_prefect_yaml_declares_the_served_deployments():
    import importlib

    from prefect import Flow

    from components.config.sections import load_config
    from components.unlearning.requests import EVENT_NAME, RESOURCE_PREFIX

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in doc["deployments"]}
    ops = load_config(REPO / "params.yaml").operations
    retrain = deployments[f"{ops.deployment_prefix}-retrain"]
    assert retrain["schedules"] == [{"cron": ops.retrain_cron, "timezone": ops.timezone}]
    assert retrain["parameters"]["promote"] == ops.promote
    (trigger,) = deployments[f"{ops.deployment_prefix}-unlearn"]["triggers"]
    assert trigger["expect"] == [EVENT_NAME]
    assert trigger["match"] == {"prefect.resource.id": f"{RESOURCE_PREFIX}*"}
    assert set(trigger["parameters"]) == {"request_id", "resource_id"}
    for deployment in deployments.values():
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, name), Flow)
        assert deployment["work_pool"]["name"] == "fedforget"
