"""Durable deletion requests (an outbox in the object store).

A request is written (``pending``) before anything announces it, so it is
never lost: if the event that should start its processing goes missing, the
server's sweep finds it still pending and dispatches it. Processing is
idempotent (a forgotten client stays forgotten), so a request dispatched twice
is applied once.

Status: pending -> running -> done (with the resulting version) | failed (with the reason).
A failed request is started again by the sweep, with exponential backoff, up to
a number of attempts (:meth:`RequestBook.retryable`): a deletion that failed
half-way (a store outage after its version was registered) is completed, never
left for a retraining to undo.

A client id means something only inside one data partition, so a request names
the registered model it is for (``model``); ``serve`` runs it under that
model's params profile.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from components.core.ids import validate_id
from components.lineage.store import ObjectNotFound, ObjectStore
from components.unlearning.forget import new_request_id
from components.unlearning.tombstones import validate_client_id

STATUSES = ("pending", "running", "done", "failed")
OPEN_STATUSES = ("pending", "running")
_NEXT = {
    "pending": {"running", "failed"},
    "running": {"running", "done", "failed"},  # running again: a crashed run picked up
    "failed": {"running", "done"},  # retried; or a duplicate run failed while another one succeeded
    "done": set(),
}
EVENT_NAME = "fedforget.deletion.requested"
RESOURCE_PREFIX = "fedforget.client."


def _now() -> str:
    # Microseconds: requests filed within one second still list in filing order.
    return datetime.now(UTC).isoformat(timespec="microseconds")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


@dataclass(frozen=True)
class DeletionRequest:
    request_id: str
    client_id: str
    status: str
    created_at: str
    updated_at: str
    reason: str | None = None
    version: str | None = None  # the unlearned version, once done
    error: str | None = None  # why it failed
    dispatches: int = 0  # how often the sweep had to start it (lost events, retries after a failure)
    history: tuple[dict[str, str], ...] = field(default_factory=tuple)
    model: str | None = None  # the registered model the client belongs to (None: filed before scoping)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = list(self.history)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeletionRequest:
        return cls(**{**data, "history": tuple(data.get("history", ()))})

    @property
    def resource_id(self) -> str:
        return f"{RESOURCE_PREFIX}{self.model}.{self.client_id}" if self.model else f"{RESOURCE_PREFIX}{self.client_id}"

    @property
    def failures(self) -> int:
        """How often a run of this request failed."""
        return sum(1 for entry in self.history if entry.get("status") == "failed")


class RequestError(ValueError):
    """A request that does not exist or cannot move to the asked status."""


class RequestBook:
    """Deletion requests in ``requests/<request_id>.json``.

    Open (pending or running) requests also have a marker under
    ``requests/open/``, so the sweep and the open-request check read only those,
    however many requests are done. A store written before the markers existed
    gets them once, on first use (``requests/open/.index``).
    """

    PREFIX = "requests/"
    OPEN_PREFIX = "requests/open/"
    OPEN_INDEX = "requests/open/.index"

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def key(self, request_id: str) -> str:
        return f"{self.PREFIX}{validate_id(request_id, 'request id')}.json"

    def _write(self, request: DeletionRequest) -> DeletionRequest:
        payload = json.dumps(request.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
        self.store.put(self.key(request.request_id), payload)
        marker = f"{self.OPEN_PREFIX}{request.request_id}.open"
        if request.status in OPEN_STATUSES:
            self.store.put(marker, request.client_id.encode())
        else:
            self.store.delete(marker)
        return request

    def _ensure_index(self) -> None:
        if not self.store.exists(self.OPEN_INDEX):  # a store from before the markers: build them once
            for request in self.all():
                self._write(request)
            self.store.put(self.OPEN_INDEX, b"open-request markers are complete\n")

    def open_requests(self) -> list[DeletionRequest]:
        """Pending and running requests, read through their markers (oldest first)."""
        self._ensure_index()
        found = []
        for key in self.store.list(self.OPEN_PREFIX):
            if key.endswith(".open"):
                request_id = key[len(self.OPEN_PREFIX) : -len(".open")]
                try:
                    found.append(self.get(request_id))
                except RequestError:  # a marker left by a crash between two writes
                    self.store.delete(key)
        open_ = [r for r in found if r.status in OPEN_STATUSES]
        return sorted(open_, key=lambda r: (parse_time(r.created_at), r.request_id))

    def file(
        self, client_id: str, reason: str | None = None, request_id: str | None = None, model: str | None = None
    ) -> DeletionRequest:
        """Record a new pending request for ``client_id`` of registered ``model`` (before any event announces it)."""
        validate_client_id(client_id)
        if model is not None:
            validate_id(model, "registered model name")
        self._ensure_index()
        request_id = request_id or new_request_id()
        if self.store.exists(self.key(request_id)):
            raise RequestError(f"request {request_id} already exists")
        now = _now()
        request = DeletionRequest(
            request_id, client_id, "pending", now, now, reason=reason,
            history=({"status": "pending", "at": now},), model=model,
        )  # fmt: skip
        return self._write(request)

    def get(self, request_id: str) -> DeletionRequest:
        try:
            return DeletionRequest.from_dict(json.loads(self.store.get(self.key(request_id))))
        except ObjectNotFound:
            raise RequestError(f"no deletion request {request_id}") from None

    def all(self) -> list[DeletionRequest]:
        requests = []
        for key in self.store.list(self.PREFIX):
            if key.endswith(".json") and "/" not in key[len(self.PREFIX) :]:
                requests.append(DeletionRequest.from_dict(json.loads(self.store.get(key))))
        return sorted(requests, key=lambda r: (parse_time(r.created_at), r.request_id))

    def open_for(self, client_id: str, model: str | None = None) -> DeletionRequest | None:
        """A pending or running request for the client of ``model``, if there is one."""
        return next((r for r in self.open_requests() if r.client_id == client_id and r.model == model), None)

    def move(self, request_id: str, status: str, **fields: Any) -> DeletionRequest:
        """Move a request to ``status`` (checked against the allowed transitions)."""
        if status not in STATUSES:
            raise RequestError(f"unknown status {status!r}")
        request = self.get(request_id)
        if status not in _NEXT[request.status]:
            raise RequestError(f"request {request_id} is {request.status}; it cannot become {status}")
        now = _now()
        entry = {"status": status, "at": now, **{k: str(v) for k, v in fields.items() if v is not None}}
        updated = replace(request, status=status, updated_at=now, history=(*request.history, entry), **fields)
        return self._write(updated)

    def note_dispatch(self, request_id: str) -> DeletionRequest:
        request = self.get(request_id)
        now = _now()
        entry = {"status": request.status, "at": now, "dispatched": "sweep"}
        return self._write(
            replace(request, dispatches=request.dispatches + 1, updated_at=now, history=(*request.history, entry))
        )

    def stale_pending(self, older_than_s: float, now: datetime | None = None) -> Iterable[DeletionRequest]:
        """Pending requests not touched for ``older_than_s`` seconds: their event was likely lost.

        After each dispatch the wait grows (``older_than_s`` times the dispatches
        so far plus one), so a run that is slow to start is not started again and again.
        """
        now = now or datetime.now(UTC)
        for request in self.open_requests():
            waited = (now - parse_time(request.updated_at)).total_seconds()
            if request.status == "pending" and waited >= older_than_s * (1 + request.dispatches):
                yield request

    def retryable(self, base_s: float, max_attempts: int, now: datetime | None = None) -> list[DeletionRequest]:
        """Failed requests due for another run: ``base_s * 2**(failures - 1)`` after their last failure, while
        they have failed fewer than ``max_attempts`` times (then they stay failed, for a person to look at)."""
        now = now or datetime.now(UTC)
        due = []
        for request in self.all():
            if request.status != "failed" or request.failures >= max_attempts:
                continue
            waited = (now - parse_time(request.updated_at)).total_seconds()
            if waited >= base_s * 2 ** max(0, request.failures - 1):
                due.append(request)
        return due
