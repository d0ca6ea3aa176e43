"""Federations at scale: streaming aggregation, tolerated client failures, archive retention, fp16 updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.records import ClientResult
from components.core.serialize import state_to_bytes
from components.core.state import add, max_abs_difference
from components.federation.protocol import ClientFailure, ClientReply
from components.federation.rounds import Federation, RoundFailedError, run_round
from components.federation.weights.protocol import WeightAveraging, weight_protocol
from components.federation.weights.strategy import FedAvg, build_strategy
from components.learning.train import TrainSettings
from components.lineage.history import UpdateHistory
from components.lineage.retention import RetentionError, apply_retention, dropped_objects
from components.lineage.store import LocalStore
from components.models.students import ModelSpec
from components.unlearning.forget import forget_client

SPEC = ModelSpec("mlp", {"num_classes": 3, "image_size": 2, "hidden": 4})


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": scale * torch.randn(4, 4, generator=g), "fc1.bias": scale * torch.randn(4, generator=g)}


# ---------------------------------------------------------------- streaming aggregation


def test_streamed_fedavg_is_bit_identical_to_fedavg_over_all_updates():
    # Prepare
    base = random_state(0)
    results = [ClientResult(f"c{i}", 1, n, random_state(10 + i)) for i, n in enumerate([7, 1, 30, 12, 5])]
    # Execute
    whole = FedAvg().aggregate_fit(1, base, results)
    consumed = []

    def lazily():  # the stream hands out one delta at a time
        for r in results:
            consumed.append(r.client_id)
            yield r

    streamed = FedAvg().aggregate_stream(1, base, [(r.client_id, r.num_examples) for r in results], lazily())
    # Assert: the same bits, and an independent computation agrees
    for key in base:
        assert torch.equal(whole.state[key], streamed.state[key])
    expected = base["fc1.bias"].double() + np.average(
        np.stack([r.delta["fc1.bias"].double().numpy() for r in results]), axis=0,
        weights=[r.num_examples for r in results],
    )  # fmt: skip
    np.testing.assert_allclose(streamed.state["fc1.bias"].numpy(), expected, rtol=1e-6)
    assert consumed == [r.client_id for r in results]
    assert [u.weight for u in streamed.updates] == [u.weight for u in whole.updates]


def test_rules_that_need_every_update_say_so():
    assert not build_strategy("fedavg").holds_all_updates
    for name in ("median", "trimmed-mean", "krum", "credit"):
        assert build_strategy(name).holds_all_updates, name
    assert WeightAveraging(build_strategy("krum")).holds_all_updates


def test_a_streamed_round_keeps_references_and_the_history_reads_each_delta_back(tmp_path):
    # Prepare: uploads in the store, as clients leave them
    store = LocalStore(tmp_path)
    history = UpdateHistory(store)
    head = history.write_initial("fed-s", random_state(0), SPEC, seed=0)
    replies = []
    for i, (cid, n) in enumerate([("A", 10), ("B", 30), ("C", 20)]):
        ref = store.put(
            f"federations/fed-s/rounds/00001/updates/{cid}.safetensors", state_to_bytes(random_state(i + 1), {})
        )
        replies.append(ClientReply(cid, 1, n, ref))
    protocol = weight_protocol("fedavg")
    # Execute
    outcome = protocol.server_step(1, random_state(0), None, replies, store)
    ref, manifest = history.commit_round(
        "fed-s", 1, head, outcome.updates, outcome.state, SPEC, protocol.describe(), "v1"
    )
    # Assert: no delta was kept in the record; the sums are weight x the archived upload
    assert all(u.delta is None for u in outcome.updates)
    for reply, update in zip(replies, outcome.updates):
        expected = {k: v * update.weight for k, v in history.read_state(reply.upload).items()}
        assert max_abs_difference(history.client_sum(manifest, reply.client_id), expected) < 1e-6


# ---------------------------------------------------------------- client failures


class _FlakyProtocol(WeightAveraging):
    """Clients upload a fixed delta; ``failing`` ones raise."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__(FedAvg())
        self.failing = failing

    def client_step(self, task):
        from components.lineage.store import open_store

        if task.client_id in self.failing:
            open_store(task.store_url).put(task.upload_key, b"half-written")
            raise RuntimeError(f"{task.client_id} crashed")
        ref = open_store(task.store_url).put(task.upload_key, state_to_bytes(random_state(len(task.client_id)), {}))
        return ClientReply(task.client_id, task.server_round, 10, ref)


def _round(tmp_path, failing, min_fit):
    store = LocalStore(tmp_path)
    history = UpdateHistory(store)
    initial = random_state(0)
    head = history.write_initial("fed-f", initial, SPEC, seed=0)
    shard = store.put("shards/x", b"x")
    federation = Federation(
        federation_id="fed-f", history=history, store_url=str(tmp_path), model=SPEC, train=TrainSettings(),
        seed=0, data_version="v1", shards={c: shard for c in ("a", "bb", "ccc", "dddd")}, min_fit_clients=min_fit,
    )  # fmt: skip
    protocol = _FlakyProtocol(failing)

    def tolerant_map(step, tasks):
        out = []
        for t in tasks:
            try:
                out.append(step(t))
            except Exception as exc:
                out.append(ClientFailure(t.client_id, t.server_round, f"RuntimeError: {exc}", exc))
        return out

    rng = np.random.default_rng(0)
    result = lambda: run_round(protocol, federation, head, initial, None, ["a", "bb", "ccc", "dddd"], rng, tolerant_map)  # noqa: E731
    return store, result


def test_a_failed_client_is_recorded_and_left_out_when_enough_finished(tmp_path):
    store, run = _round(tmp_path, {"bb"}, min_fit=3)
    result = run()
    assert [r.client_id for r in result.replies] == ["a", "ccc", "dddd"]
    assert result.manifest.client_ids == ["a", "ccc", "dddd"] and "bb" not in result.manifest.sums
    assert result.manifest.extra["failed_clients"] == {"bb": "RuntimeError: bb crashed"}
    assert not [k for k in store.list("federations/") if k.endswith("/bb.safetensors")]  # its half-written upload
    assert [u.weight for u in result.outcome.updates] == pytest.approx([1 / 3] * 3)


def test_too_few_finished_clients_commit_nothing(tmp_path):
    store, run = _round(tmp_path, {"bb", "ccc"}, min_fit=3)
    with pytest.raises(RoundFailedError, match=r"2 of 4 clients finished.*bb: RuntimeError"):
        run()
    assert [k for k in store.list("federations/")] == ["federations/fed-f/initial.safetensors"]


def test_by_default_every_selected_client_must_finish_and_its_error_is_raised(tmp_path):
    _, run = _round(tmp_path, {"ccc"}, min_fit=None)
    with pytest.raises(RuntimeError, match="ccc crashed"):
        run()


# ---------------------------------------------------------------- retention


def _federation(store, rounds=5, schedule=None):
    """A weight-protocol lineage; ``schedule[r]`` = the clients of round r (default: all three)."""
    history = UpdateHistory(store)
    state = random_state(0)
    head = history.write_initial("fed-r", state, SPEC, seed=0)
    refs = []
    for rnd in range(1, rounds + 1):
        clients = (schedule or {}).get(rnd, ["A", "B", "C"])
        results = [ClientResult(c, rnd, 10 + i, random_state(100 * rnd + i, 0.1)) for i, c in enumerate(clients)]
        applied = FedAvg().aggregate_fit(rnd, state, results)
        ref, _ = history.commit_round(
            "fed-r", rnd, head, applied.updates, applied.state, SPEC, weight_protocol("fedavg").describe(), "v1"
        )
        yield history, ref
        state, head = applied.state, history.head_of(ref)
        refs.append(ref)


def test_sums_retention_bounds_the_archive_keeps_forgetting_exact_and_audits_clean(tmp_path):
    # Prepare: the same lineage twice, one kept in full, one under sums retention (keep 1 round).
    # D trains only in round 1: its sum from round 1 stays live however old it gets.
    schedule = {1: ["A", "B", "C", "D"]}
    full, sums = LocalStore(tmp_path / "full"), LocalStore(tmp_path / "sums")
    for _, ref in _federation(full, 6, schedule):
        last_full = ref
    for history, ref in _federation(sums, 6, schedule):
        apply_retention(history, ref, keep_rounds=1)
        last_sums = ref
    # Assert: the objects: full grows with rounds x clients, sums keeps one live sum per client
    count = lambda store, part: sum(part in k for k in store.list("federations/"))  # noqa: E731
    assert count(full, "/updates/") == 3 * 6 + 1 and count(full, "/sums/") == 3 * 6 + 1
    assert count(sums, "/updates/") == 3 and count(sums, "/sums/") == 4  # the newest round's, + D's
    # forgetting from the head: bit-identical under both
    for client in ("A", "D"):
        a = forget_client(UpdateHistory(full), last_full, UpdateHistory(full).read_manifest(last_full), client)
        b = forget_client(UpdateHistory(sums), last_sums, UpdateHistory(sums).read_manifest(last_sums), client)
        for key in a.state:
            assert torch.equal(a.state[key], b.state[key])
    # renormalise needs the per-round updates: it says so
    with pytest.raises(RetentionError, match=r"renormalise variant needs .* history.retention: sums dropped"):
        h = UpdateHistory(sums)
        forget_client(h, last_sums, h.read_manifest(last_sums), "A", "renormalise")
    # the audit explains every dropped object against the hash its manifest recorded
    from components.audit.audit import audit
    from components.lineage.tags import expected_version_tags

    head = UpdateHistory(sums).read_manifest(last_sums)
    tags = {"manifest_key": last_sums.key, **expected_version_tags(last_sums, head, None)}
    report = audit(sums, "6", tags, {})
    statuses = {c.status for c in report.objects}
    assert statuses == {"ok", "dropped"}, [f.message for f in report.findings]
    assert not [f for f in report.findings if f.kind.startswith("object_")]
    dropped = dropped_objects(sums)
    assert all(dropped[c.key]["sha256"] == c.sha256 for c in report.objects if c.status == "dropped")


def test_retention_never_drops_the_protected_champions_sums(tmp_path):
    store = LocalStore(tmp_path)
    refs = []
    for _, ref in _federation(store, 4):
        refs.append(ref)
    history = UpdateHistory(store)
    champion = history.read_manifest(refs[1])  # round 2 stays champion (the later rounds were rejected)
    for ref in refs[2:]:
        apply_retention(history, ref, keep_rounds=1, protect=[champion])
    forgotten = forget_client(history, refs[1], champion, "B")  # its sums are all there
    rebuilt = history.read_state(history.read_manifest(refs[0]).base)
    for cid in ("A", "C"):
        rebuilt = add(rebuilt, history.client_sum(champion, cid))
    assert max_abs_difference(rebuilt, forgotten.state) < 1e-5
