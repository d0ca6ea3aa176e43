"""The deletion-request outbox: durable records and their allowed transitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from components.federation.protocol import UnlearningError
from components.lineage.store import LocalStore
from components.unlearning.requests import RequestBook, RequestError


@pytest.fixture
def book(tmp_path) -> RequestBook:
    return RequestBook(LocalStore(tmp_path))


def test_a_request_moves_pending_running_done_and_keeps_its_history(book):
    filed = book.file("client_03", reason="ticket 7")
    assert filed.status == "pending" and filed.resource_id == "fedforget.client.client_03"
    assert book.open_for("client_03") == filed
    book.move(filed.request_id, "running")
    done = book.move(filed.request_id, "done", version="9")
    assert done.status == "done" and done.version == "9" and done.reason == "ticket 7"
    assert [h["status"] for h in done.history] == ["pending", "running", "done"]
    assert book.open_for("client_03") is None
    assert book.get(filed.request_id) == done  # durable: read back from the store


def test_transitions_are_checked(book):
    request = book.file("client_01")
    with pytest.raises(RequestError, match="cannot become done"):
        book.move(request.request_id, "done")
    failed = book.move(request.request_id, "failed", error="boom")
    assert failed.error == "boom"
    book.move(request.request_id, "running")  # a failed request can be retried
    book.move(request.request_id, "done", version="3")
    other = book.file("client_02")
    book.move(other.request_id, "running")
    book.move(other.request_id, "failed", error="a duplicate run crashed")
    assert book.move(other.request_id, "done", version="4").status == "done"  # while another succeeded
    with pytest.raises(RequestError, match="cannot become running"):
        book.move(request.request_id, "running")  # never applied twice
    with pytest.raises(RequestError, match="no deletion request"):
        book.get("del-missing")
    with pytest.raises(UnlearningError, match="invalid client id"):
        book.file("../x")


def test_stale_pending_requests_are_found_once_their_grace_is_over(book):
    old = book.file("client_01")
    book.file("client_02")
    later = datetime.now(UTC) + timedelta(seconds=90)
    assert [r.client_id for r in book.stale_pending(60, now=later)] == ["client_01", "client_02"]
    assert list(book.stale_pending(60)) == []
    book.note_dispatch(old.request_id)
    assert book.get(old.request_id).dispatches == 1
    # after a dispatch the sweep waits twice as long before starting it again
    assert [r.client_id for r in book.stale_pending(60, now=later)] == ["client_02"]
    much_later = later + timedelta(seconds=120)
    assert "client_01" in [r.client_id for r in book.stale_pending(60, now=much_later)]
    assert [r.client_id for r in book.all()] == ["client_01", "client_02"]  # filing order, even within one second


def test_open_requests_are_found_without_reading_the_closed_ones(book, monkeypatch):
    # Prepare: many closed requests, two open ones
    for i in range(30):
        closed = book.file(f"client_{i:02d}")
        book.move(closed.request_id, "failed", error="gone")
    running = book.move(book.file("client_40").request_id, "running")
    pending = book.file("client_41")
    reads: list[str] = []
    original = book.store.get
    monkeypatch.setattr(book.store, "get", lambda key: reads.append(key) or original(key))
    # Execute
    found = book.open_requests()
    # Assert: the two open ones, and only their records were read
    assert [r.request_id for r in found] == [running.request_id, pending.request_id]
    assert sorted(reads) == sorted(book.key(r.request_id) for r in found)


def test_a_store_from_before_the_open_markers_gets_them_once(book):
    filed = book.file("client_05")
    for key in book.store.list(book.OPEN_PREFIX):  # as a store written by an older FedForget
        book.store.delete(key)
    assert book.open_for("client_05") == filed
    assert book.store.exists(book.OPEN_INDEX)


def test_a_request_names_its_model_and_one_of_another_model_is_another_request(book):
    mine = book.file("client_03", model="fedforget-quick")
    assert mine.model == "fedforget-quick" and mine.resource_id == "fedforget.client.fedforget-quick.client_03"
    assert book.open_for("client_03", "fedforget-quick") == mine
    assert book.open_for("client_03", "fedforget-fewshot") is None  # same id, other partition
    with pytest.raises(ValueError, match="invalid registered model name"):
        book.file("client_03", model="../x")


def test_a_failed_request_is_retried_with_backoff_up_to_a_limit(book):
    request = book.file("client_04", model="m")
    book.move(request.request_id, "running")
    book.move(request.request_id, "failed", error="store outage")
    now = datetime.now(UTC)
    # Assert: due after the base wait, then after twice it, and never once it failed max_attempts times
    assert book.retryable(60, 3, now + timedelta(seconds=30)) == []
    assert [r.request_id for r in book.retryable(60, 3, now + timedelta(seconds=61))] == [request.request_id]
    book.move(request.request_id, "running")
    book.move(request.request_id, "failed", error="store outage again")
    now = datetime.now(UTC)
    assert book.retryable(60, 3, now + timedelta(seconds=61)) == []
    assert len(book.retryable(60, 3, now + timedelta(seconds=121))) == 1
    book.move(request.request_id, "running")
    book.move(request.request_id, "failed", error="third time")
    assert book.retryable(60, 3, datetime.now(UTC) + timedelta(days=1)) == []  # left failed, for a person
    assert book.get(request.request_id).failures == 3


def test_the_sweep_restarts_due_failed_requests(tmp_path, monkeypatch):
    from components.config.runtime import Runtime
    from components.config.sections import Config
    from flows.operations import sweep_pending

    store = LocalStore(tmp_path / "store")
    book = RequestBook(store)
    request = book.file("client_01", model="m")
    book.move(request.request_id, "failed", error="boom")
    config = Config.model_validate({"operations": {"retry_base_s": 0, "sweep_grace_s": 3600}})
    runtime = Runtime(root=tmp_path, params_path=tmp_path / "params.yaml", store=str(tmp_path / "store"),
                      tracking_uri="sqlite:///x.db")  # fmt: skip
    dispatched = []
    assert sweep_pending(config, runtime, dispatched.append) == [request.request_id]
    assert [r.request_id for r in dispatched] == [request.request_id]
