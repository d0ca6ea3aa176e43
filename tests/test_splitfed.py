"""Federated split learning: the cut, the link's bytes, FedAvg equivalence, exact forgetting."""

from __future__ import annotations

import pytest
import torch

from components.federation.split.model import SplitModel, client_prefixes
from components.models.students import ModelSpec, init_model


@pytest.mark.parametrize(("name", "cuts"), [("cnn", [1, 2, 3]), ("mlp", [1])])
def test_the_two_parts_compose_to_the_model(name, cuts):
    spec = ModelSpec(
        name, {"num_classes": 4, "image_size": 8, "hidden": 6, **({"channels": [2, 3]} if name == "cnn" else {})}
    )
    model = init_model(spec, seed=0)
    x = torch.randn(5, 1, 8, 8)
    for cut in cuts:
        split = SplitModel(model, name, cut)
        torch.testing.assert_close(split.server_forward(split.client_forward(x)), model(x))
    assert client_prefixes("cnn", 2) == ("conv1", "conv2")
    with pytest.raises(ValueError, match="cut must be between 1 and"):
        SplitModel(model, name, len(cuts) + 1)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_splitfed_through_the_flow_matches_fedavg_counts_the_link_and_forgets_exactly(tiny_project):
    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.core.state import add, max_abs_difference
    from components.lineage.history import UpdateHistory
    from components.lineage.store import open_store
    from components.lineage.tags import manifest_ref_from_tags
    from components.unlearning.forget import forget_client
    from flows.federate import run_federate
    from flows.tracking import Tracker

    # Execute: one round of FedAvg and one of splitfed (cut after conv2), same seeds; then splitfed + credit
    fedavg = run_federate(project=str(tiny_project), rounds=1, fresh=True)
    split = run_federate(project=str(tiny_project), rounds=1, fresh=True, overrides={"federate.protocol": "splitfed"})
    credit = run_federate(
        project=str(tiny_project), rounds=2, fresh=True,
        overrides={"federate.protocol": "splitfed", "federate.split_cut": 3, "federate.strategy": "credit",
                   "federate.strategy_args": {"num_groups": 2}},
    )  # fmt: skip
    runtime = Runtime.from_env(tiny_project)
    tracker = Tracker(runtime, load_config(runtime.params_path).registry)
    history = UpdateHistory(open_store(runtime.store))

    def final(summary):
        ref = manifest_ref_from_tags(tracker.version(summary["final_version"]).tags)
        return ref, history.read_manifest(ref)

    # Assert: per-client server copies + FedAvg of both parts = FedAvg of the whole model
    states = [history.read_state(final(s)[1].global_state) for s in (fedavg, split)]
    assert max_abs_difference(*states) < 1e-5
    ref, manifest = final(split)
    assert manifest.protocol == {"name": "splitfed", "strategy": {"name": "fedavg", "clients_per_round": None},
                                 "cut": 2, "model": "cnn"}  # fmt: skip
    # the link: activations + labels up and gradients down per batch, the client part once each way
    row = split["rounds"][0]
    comm = manifest.extra["communication"]
    assert row["upload_bytes"] == sum(comm["upload_bytes"].values()) > 0
    assert row["upload_bytes"] != fedavg["rounds"][0]["upload_bytes"]
    # forgetting subtracts exactly what was applied (both parts), under credit too
    for summary in (split, credit):
        ref, manifest = final(summary)
        forgotten = forget_client(history, ref, manifest, "client_01").state
        rebuilt = history.read_state(history.read_manifest(ref).base if manifest.parent is None else
                                     next(m for _, m in history.iter_lineage(ref) if m.parent is None).base)  # fmt: skip
        for cid in ("client_00", "client_02"):
            rebuilt = add(rebuilt, history.client_sum(manifest, cid))
        residuals = [m.residual for _, m in history.iter_lineage(ref) if m.residual is not None]
        for r in residuals:
            rebuilt = add(rebuilt, history.read_state(r))
        assert max_abs_difference(rebuilt, forgotten) < 1e-5
    assert {"groups", "excluded", "split"} <= set(final(credit)[1].extra)
    from components.federation.protocol import UnlearningError

    with pytest.raises(UnlearningError, match="subtraction only"):
        forget_client(history, *final(split), "client_01", "renormalise")
