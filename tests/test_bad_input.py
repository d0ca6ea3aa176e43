"""Bad input never crashes with a traceback and changes nothing (issue 17, part 4).

Validators are fuzzed with Hypothesis; the verbs are driven with hostile ids,
bad params, malformed events, truncated files, a broken hash chain and
non-finite updates, and each must end in one line on stderr and a non-zero
exit code, with the registry and the archive as they were.
"""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from components.config.params import ConfigError, parse_override
from components.config.sections import build_config
from components.core.ids import validate_id
from components.lineage.store import validate_key
from flows.cli import app
from tests.conftest import REPO

runner = CliRunner()
SAFE = set(string.ascii_letters + string.digits + "_.-")
HOSTILE_IDS = [
    "../client_00",
    "client_00/../../etc",
    "клиент",
    "a" * 500,
    "",
    " ",
    "client\n",
    "..",
    ".hidden",
    "x;rm -rf /",
]


# --------------------------------------------------------------------------- validators, fuzzed


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=20), st.integers(), st.none()))
def test_validate_id_accepts_only_safe_ids_and_refuses_the_rest_cleanly(value):
    try:
        accepted = validate_id(value, "client id")  # type: ignore[arg-type]
    except ValueError as exc:
        assert "invalid client id" in str(exc)
        return
    assert accepted == value and 1 <= len(value) <= 64 and set(value) <= SAFE
    assert value[0] not in "_.-" and ".." not in value and "/" not in value


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_object_keys_never_escape_the_store(key):
    try:
        validate_key(key)
    except ValueError:
        return
    parts = key.split("/")
    assert ".." not in parts and "" not in parts[:-1] and not key.startswith("/") and "\n" not in key


PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
SECTIONS = ["data", "model", "train", "federate", "unlearn", "teacher", "distill", "evaluate", "operations", "registry"]
YAML_VALUES = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "[1, 2]", "{a: 1}", ".nan", "-.inf", "'x'", "[", "{", ": :", "\t"]),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10)),
    st.one_of(
        st.sampled_from(["rounds", "lr", "num_clients", "alpha", "strategy", "teacher", "x"]), st.text(max_size=8)
    ),
    YAML_VALUES,
)
def test_any_override_either_validates_or_raises_a_config_error(section, key, value):
    raw = PARAMS
    try:
        dotted, parsed = parse_override(f"{section}.{key}={value}")
        build_config(raw, overrides={dotted: parsed})
    except ConfigError:
        pass  # the one error type a user sees as `error: ...`, exit 2


# --------------------------------------------------------------------------- the verbs


def one_line_error(result) -> str:
    """The verb failed with exactly one line of explanation and no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.output
    return errors[0]


@pytest.fixture
def federated(tiny_project, prefect_harness):
    from flows.federate import run_federate

    run_federate(project=str(tiny_project), rounds=1, overrides={"federate.prefit_teacher": False})
    return tiny_project


def state_of(project):
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.lineage.store import open_store
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    store = open_store(runtime.store)
    return [(v.version, dict(v.tags)) for v in tracker.versions()], {k: store.get(k) for k in store.list()}


@pytest.mark.integration
@pytest.mark.parametrize("client", HOSTILE_IDS)
def test_hostile_client_ids_are_refused_by_every_verb(federated, client):
    before = state_of(federated)
    for verb in (["unlearn", "--client", client, "--teacher", "none"], ["request-deletion", "--client", client]):
        line = one_line_error(runner.invoke(app, verb))
        assert "client id" in line or "never contributed" in line
    assert one_line_error(runner.invoke(app, ["audit", "--client", client])).startswith("error:")
    assert state_of(federated) == before


@pytest.mark.integration
@pytest.mark.parametrize(
    "override",
    ["train.lr=-1", "federate.rounds=abc", "federate.strategy=telepathy", "nosection.key=1", "train=3", "train.lr",
     "data.alpha=.nan", "federate.rounds=1e400", "unlearn.retire_tainted=shred"],
)  # fmt: skip
def test_bad_params_values_are_refused_before_anything_runs(federated, override):
    before = state_of(federated)
    one_line_error(runner.invoke(app, ["federate", "--set", override]))
    assert state_of(federated) == before


@pytest.mark.integration
def test_a_truncated_shard_is_refused_before_the_round(federated):
    from components.data.layout import FederationData

    before = state_of(federated)
    shard = FederationData(federated / "data" / "default" / "federation").client_path("client_01")
    shard.write_bytes(shard.read_bytes()[:100])
    line = one_line_error(runner.invoke(app, ["federate", "--rounds", "1"]))
    assert "client_01.safetensors is unreadable" in line and "fedforget prepare" in line
    assert state_of(federated)[0] == before[0]  # no version


@pytest.mark.integration
def test_a_truncated_archived_object_and_a_broken_chain_refuse_the_deletion(federated):
    from components.config.runtime import Runtime
    from components.lineage.store import open_store

    store = open_store(Runtime.from_env(federated).store)
    [sum_key] = [k for k in store.list("federations/") if k.endswith("sums/client_00.safetensors")]
    store.put(sum_key, store.get(sum_key)[:-10])  # truncated
    before = state_of(federated)
    assert "was changed or corrupted" in one_line_error(runner.invoke(app, ["unlearn", "--client", "client_00"]))
    assert state_of(federated) == before
    [manifest] = [k for k in store.list("federations/") if k.endswith("manifest.json")]
    store.put(manifest, store.get(manifest).replace(b'"server_round": 1', b'"server_round": 7'))  # the chain breaks
    before = state_of(federated)
    assert "was changed or corrupted" in one_line_error(runner.invoke(app, ["unlearn", "--client", "client_02"]))
    assert state_of(federated) == before
    audit = runner.invoke(app, ["audit", "--json"])
    assert audit.exit_code == 3 and "Traceback" not in audit.output


@pytest.mark.integration
def test_non_finite_updates_leave_the_round_unregistered_with_a_clear_reason(federated):
    before = state_of(federated)
    line = one_line_error(runner.invoke(app, ["federate", "--rounds", "1", "--set", "train.lr=1e38"]))
    assert "NaN or infinity" in line and "not committed" in line
    assert state_of(federated)[0] == before[0]


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("request_id", "resource_id"),
    [("", "fedforget.client.client_01"), ("../../x", ""), ("del-nope", ""), ("x" * 300, "fedforget.client.y")],
)
def test_malformed_deletion_events_fail_clearly_and_file_nothing(federated, request_id, resource_id):
    from flows.operations import MalformedRequest, process_deletion_request

    before = state_of(federated)
    with pytest.raises(MalformedRequest, match=r"malformed deletion event|no request_id|no deletion request"):
        process_deletion_request(request_id=request_id, resource_id=resource_id, project=str(federated))
    assert state_of(federated)[0] == before[0]
