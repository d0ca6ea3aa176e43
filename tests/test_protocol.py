"""The protocol contract: a second weight-averaging method in this one file, and forgetting under it.

FedAvgM (Hsu et al., 2019) keeps a server momentum buffer v: each round
``v_t = beta * v_{t-1} + sum_i p_i delta_i`` and ``W_{t+1} = W_t + v_t``. A
client's contribution of round t keeps acting in later rounds through v, so
what the server applies in round t is the clients' contributions *plus* the
carry ``beta * v_{t-1}``, which belongs to no client: it is recorded as the
round's residual. Forgetting a client subtracts its running sum; the
residuals stay, so the result is exact up to the recorded residuals:

    W_T - S_c == W_0 + sum_{i != c} S_i + sum_t R_t
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch

from components.core.records import ClientResult
from components.core.state import StateDict, add, scale, subtract, zeros_like
from components.data.datasets import Split
from components.data.staging import stage_splits
from components.federation.protocol import RoundOutcome, protocol_from_record
from components.federation.rounds import Federation, run_round, serial_map
from components.federation.weights.protocol import WeightAveraging, weight_protocol
from components.federation.weights.strategy import Aggregate, FedAvg, register_strategy
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory, verify_manifest
from components.lineage.store import LocalStore
from components.models.students import ModelSpec, init_model
from components.unlearning.forget import forget_client

SPEC = ModelSpec("mlp", {"num_classes": 3, "image_size": 4, "hidden": 8})
TRAIN = TrainSettings(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0)


@register_strategy("fedavgm-test")
class FedAvgM(FedAvg):
    """FedAvg with server momentum ``beta``: the carry is the round's residual."""

    name = "fedavgm-test"

    def __init__(self, beta: float = 0.9, clients_per_round: int | None = None) -> None:
        super().__init__(clients_per_round)
        self.beta = beta

    def aggregate_fit(
        self,
        server_round: int,
        global_state: Mapping[str, torch.Tensor],
        results: Sequence[ClientResult],
        server_state: StateDict | None = None,
    ) -> Aggregate:
        plain = super().aggregate_fit(server_round, global_state, results)
        step = subtract(plain.state, global_state)  # sum_i p_i delta_i
        carry = scale(server_state, self.beta) if server_state is not None else zeros_like(step)
        return Aggregate(add(plain.state, carry), plain.updates, residual=carry, server_state=add(step, carry))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "beta": self.beta}


def shards(n_clients: int = 3, seed: int = 0) -> dict[str, Split]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n_clients):
        n = 16 + 8 * i
        images = torch.randint(0, 256, (n, 4, 4), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 3, (n,), generator=g)
        out[f"c{i}"] = Split(images, labels)
    return out


def federate(protocol: WeightAveraging, store: LocalStore, rounds: int = 4):
    history = UpdateHistory(store)
    data = shards()
    state = init_model(SPEC, seed=1).state_dict()
    head = history.write_initial("fed-m", state, SPEC, 1)
    initial = {k: v.clone() for k, v in state.items()}
    federation = Federation("fed-m", history, store.url, SPEC, TRAIN, 5, "v1", stage_splits(store, data, "v1"))
    server_state, rng, results = None, np.random.default_rng(0), []
    for _ in range(rounds):
        result = run_round(protocol, federation, head, state, server_state, sorted(data), rng, serial_map)
        results.append(result)
        head, state, server_state = result.head, result.state, result.outcome.server_state
    return history, initial, results


def test_fedavgm_forgetting_is_exact_up_to_the_recorded_residual(tmp_path):
    # Prepare: four rounds of FedAvgM through the production round function
    store = LocalStore(tmp_path)
    protocol = WeightAveraging(FedAvgM(beta=0.9))
    history, initial, results = federate(protocol, store)
    final_ref, final = results[-1].manifest_ref, results[-1].manifest
    # the manifest records the protocol, the residual and the carried momentum, all hash-checked
    assert final.protocol == {
        "name": "weights",
        "strategy": {"name": "fedavgm-test", "clients_per_round": None, "beta": 0.9},
    }
    assert all(r.manifest.residual is not None and r.manifest.server_state is not None for r in results)
    assert verify_manifest(store, final) == []
    residuals = [history.read_state(r.manifest.residual) for r in results]
    assert float(sum(v.abs().sum() for v in residuals[-1].values())) > 0  # momentum really carries
    sums = {cid: history.read_state(ref) for cid, ref in final.sums.items()}
    total_residual = residuals[0]
    for r in residuals[1:]:
        total_residual = add(total_residual, r)
    # Assert: the model is the initial one plus every client's sum plus every residual
    rebuilt = initial
    for s in [*sums.values(), total_residual]:
        rebuilt = add(rebuilt, s)
    for key, value in results[-1].state.items():
        torch.testing.assert_close(value, rebuilt[key], rtol=0, atol=1e-5)
    # Execute: forget c1 through the dispatch (the manifest names the protocol)
    forgotten = forget_client(history, final_ref, final, "c1")
    # Assert: exactly what c1 contributed is gone; the residuals (attributed to nobody) stay
    expected = add(add(add(initial, sums["c0"]), sums["c2"]), total_residual)
    for key, value in forgotten.state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5)


def test_the_protocol_record_rebuilds_the_protocol_and_old_records_mean_fedavg():
    protocol = weight_protocol("fedavg", clients_per_round=2)
    rebuilt = protocol_from_record(protocol.describe())
    assert isinstance(rebuilt, WeightAveraging) and rebuilt.strategy.clients_per_round == 2
    assert protocol_from_record({"name": "weights"}).strategy.name == "fedavg"  # what @1 manifests carry
    with pytest.raises(ValueError, match="unknown federation protocol"):
        protocol_from_record({"name": "telepathy"})


def test_a_round_commits_client_uploads_by_reference(tmp_path):
    store = LocalStore(tmp_path)
    _, _, results = federate(weight_protocol("fedavg"), store, rounds=1)
    manifest = results[0].manifest
    for entry, reply in zip(manifest.clients, results[0].replies):
        assert entry.update == reply.upload  # the client's own upload is the archived update
        assert entry.upload is None  # FedAvg applied it unmodified
    assert manifest.residual is None and manifest.server_state is None


def test_schema_1_manifests_stay_readable_and_forgettable(tmp_path):
    # Prepare: a round committed today, rewritten as an @1 manifest (what stores written before hold)
    store = LocalStore(tmp_path)
    history, _, results = federate(weight_protocol("fedavg"), store, rounds=1)
    current = results[0].manifest.to_dict()
    old = {k: v for k, v in current.items() if k not in ("protocol", "index", "residual", "server_state")}
    old |= {"schema": "fedforget/round-manifest@1", "strategy": {"name": "fedavg", "clients_per_round": None},
            "sums": current["index"]["entries"]}  # fmt: skip
    for client in old["clients"]:
        del client["upload"], client["spec"]
    ref = store.put("federations/fed-m/rounds/00001/manifest-v1.json", json.dumps(old).encode())
    # Execute
    manifest = history.read_manifest(ref)
    forgotten = forget_client(history, ref, manifest, "c0")
    # Assert: read as FedAvg weight averaging, and forgetting dispatches to it
    assert manifest.protocol == {"name": "weights", "strategy": {"name": "fedavg", "clients_per_round": None}}
    assert manifest.sums == results[0].manifest.sums and manifest.residual is None
    expected = subtract(results[0].state, history.read_state(manifest.sums["c0"]))
    for key, value in forgotten.state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


class EchoProtocol(WeightAveraging):
    """A toy method that also exchanges per-client records and keeps a personal state per client."""

    def client_step(self, task):
        from components.core.serialize import state_to_bytes
        from components.lineage.store import open_store

        reply = super().client_step(task)
        store = open_store(task.store_url)
        seen = 0.0 if task.personal is None else 1.0
        personal = store.put(task.object_key("personal"), state_to_bytes({"seen": torch.tensor([seen])}, {}))
        labels = store.put(task.object_key("soft_labels"), state_to_bytes({"p": torch.ones(2, 3) / 3}, {}))
        return ClientReplyWith(reply, {"personal": personal, "soft_labels": labels})

    def server_step(self, server_round, base, server_state, replies, store):
        outcome = super().server_step(server_round, base, server_state, replies, store)
        return RoundOutcome(
            outcome.state, outcome.updates,
            client_objects={r.client_id: dict(r.objects) for r in replies},
            server_objects={"consensus": {"p": torch.ones(2, 3) / 3}},
            personal={r.client_id: r.objects["personal"] for r in replies},
        )  # fmt: skip


def ClientReplyWith(reply, objects):
    from dataclasses import replace

    return replace(reply, objects=objects)


def test_a_method_records_client_objects_a_personal_state_and_its_own_objects(tmp_path):
    from components.unlearning.purge import stored_client_objects

    store = LocalStore(tmp_path)
    history, _, results = federate(EchoProtocol(FedAvg()), store, rounds=2)
    first, second = results[0].manifest, results[1].manifest
    # every client's records are named in its entry; the server's own object in the manifest
    assert all(set(c.objects) == {"personal", "soft_labels"} for c in second.clients)
    assert set(second.objects) == {"consensus"} and verify_manifest(store, second) == []
    # the personal state is carried: in round 2 each client got its round-1 state back
    assert first.personal == {c.client_id: c.objects["personal"] for c in first.clients}
    assert history.read_state(second.personal["c1"])["seen"].item() == 1.0
    # and every per-client record is found for purging
    kinds = {key.key.split("/")[-2] for key in stored_client_objects(history, [results[-1].manifest_ref], "c1")}
    assert kinds == {"updates", "sums", "personal", "soft_labels", "clients"}


def test_every_builtin_protocol_is_known_to_a_fresh_process_so_forgetting_can_dispatch_to_it():
    import subprocess
    import sys

    code = (
        "from components.federation.protocol import PROTOCOLS, _load_builtin_protocols; "
        "_load_builtin_protocols(); print(','.join(sorted(PROTOCOLS)))"
    )
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert names.split(",") == [
        "ensemble-distillation",
        "few-shot",
        "shared-base",
        "soft-labels",
        "splitfed",
        "weights",
    ]
