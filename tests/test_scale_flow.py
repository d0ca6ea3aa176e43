"""The federate flow at scale: failed and timed-out clients left out, sums retention, fp16 updates."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from components.config.runtime import Runtime
from components.config.sections import load_config
from components.core.state import add, max_abs_difference
from components.lineage.history import UpdateHistory
from components.lineage.store import open_store
from components.lineage.tags import manifest_ref_from_tags

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _history_and_final(project, summary):
    from flows.tracking import Tracker

    runtime = Runtime.from_env(project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    store = open_store(runtime.store)
    history = UpdateHistory(store)
    ref = manifest_ref_from_tags(tracker.version(summary["final_version"]).tags)
    return tracker, store, history, ref, history.read_manifest(ref)


def test_a_crashed_and_a_hung_client_are_left_out_and_recorded(tiny_project, monkeypatch):
    from flows.federate import run_federate

    # Execute: client_01 crashes, client_02 hangs past the per-client timeout; 1 of 3 is enough
    monkeypatch.setenv("FEDFORGET_FAILPOINT", "train-client:client_01=raise;train-client:client_02=sleep:60")
    overrides = {"federate.min_fit_clients": 1, "federate.client_timeout_s": 3}
    summary = run_federate(project=str(tiny_project), rounds=1, overrides=overrides)
    # Assert: the round holds client_00 only; both failures are in the manifest with their reasons
    tracker, store, _, _, final = _history_and_final(tiny_project, summary)
    assert final.client_ids == ["client_00"] and set(final.sums) == {"client_00"}
    failed = final.extra["failed_clients"]
    assert set(failed) == {"client_01", "client_02"}
    assert "FailpointError" in failed["client_01"] and failed["client_02"].startswith("timed out")
    assert summary["rounds"][0]["failed_clients"] == 2
    assert tracker.version(summary["final_version"]).tags["clients"] == "client_00"
    # and nothing of theirs is in the round's objects
    keys = store.list(f"federations/{summary['federation_id']}/rounds/00001/")
    assert not [k for k in keys if "client_01" in k or "client_02" in k]


def test_too_few_clients_finishing_registers_nothing(tiny_project, monkeypatch):
    from components.federation.rounds import RoundFailedError
    from flows.federate import run_federate

    monkeypatch.setenv("FEDFORGET_FAILPOINT", "train-client:client_01=raise;train-client:client_02=raise")
    with pytest.raises(RoundFailedError, match="1 of 3 clients finished, fewer than the 2 required"):
        run_federate(project=str(tiny_project), rounds=1, overrides={"federate.min_fit_clients": 2})
    from flows.tracking import Tracker

    runtime = Runtime.from_env(tiny_project)
    assert Tracker(runtime, load_config(runtime.params_path).registry).versions() == []


def test_sums_retention_through_the_flow_forgets_bit_identically_and_the_audit_passes(tiny_project):
    from flows.cli import app
    from flows.federate import run_federate

    # Execute: the same 3 rounds kept in full and under sums retention (fresh federations, same seeds)
    full = run_federate(project=str(tiny_project), rounds=3, fresh=True)
    sums = run_federate(
        project=str(tiny_project), rounds=3, fresh=True,
        overrides={"history.retention": "sums", "history.keep_rounds": 1},
    )  # fmt: skip
    # Assert: per-round updates of the older rounds are gone from the sums federation only
    _, store, history, ref_full, final_full = _history_and_final(tiny_project, full)
    *_, ref_sums, final_sums = _history_and_final(tiny_project, sums)
    updates = lambda fid: [k for k in store.list(f"federations/{fid}/") if "/updates/" in k]  # noqa: E731
    assert len(updates(full["federation_id"])) == 9 and len(updates(sums["federation_id"])) == 3
    assert sums["rounds"][-1]["retention_s"] >= 0
    # forgetting from the head gives the same bits under both
    from components.unlearning.forget import forget_client

    a = forget_client(history, ref_full, final_full, "client_01").state
    b = forget_client(history, ref_sums, final_sums, "client_01").state
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the audit of the sums version passes and names what retention dropped
    result = CliRunner().invoke(app, ["audit", "--version", sums["final_version"], "--json"])
    assert result.exit_code == 0, result.output
    objects = json.loads(result.output)["objects"]  # dropped: 2 rounds x (3 updates + 3 superseded sums)
    assert objects["dropped"] == 12 and objects["missing"] == objects["mismatch"] == 0
    # renormalise needs the dropped updates: a clear refusal, nothing registered
    before = len(_history_and_final(tiny_project, sums)[0].versions())
    out = CliRunner().invoke(app, ["unlearn", "--client", "client_01", "--set", "unlearn.variant=renormalise"])
    assert out.exit_code == 2 and "history.retention: sums dropped" in out.output
    assert len(_history_and_final(tiny_project, sums)[0].versions()) == before


def test_fp16_updates_halve_the_uploads_and_forgetting_stays_exact(tiny_project):
    from components.unlearning.forget import forget_client
    from flows.federate import run_federate

    summary = run_federate(
        project=str(tiny_project), rounds=2, fresh=True, overrides={"history.update_dtype": "float16"}
    )
    _, _, history, ref, final = _history_and_final(tiny_project, summary)
    assert final.protocol["update_dtype"] == "float16"
    upload = history.read_state(final.clients[0].update)
    assert all(v.dtype == torch.float16 for v in upload.values() if v.is_floating_point())
    assert all(
        v.dtype == torch.float32 for v in history.read_state(final.global_state).values() if v.is_floating_point()
    )
    # the sums are exactly weight x the archived fp16 updates, so subtraction removes exactly what was applied
    forgotten = forget_client(history, ref, final, "client_02").state
    rebuilt = history.read_state(history.read_manifest(final.parent).base)
    for cid in ("client_00", "client_01"):
        rebuilt = add(rebuilt, history.client_sum(final, cid))
    assert max_abs_difference(rebuilt, forgotten) < 1e-5
