"""The protocol contract: what every federation method states.

A federation method is one :class:`Protocol`. It states

- its **client step** (:meth:`Protocol.client_step`): what a client does with a
  :class:`ClientTask`. Tasks and replies carry references only (store keys with
  their sha256, ids, seeds), so a client runs the same in a thread, a process
  or on a remote worker that shares nothing with the server but the store;
- its **server step** (:meth:`Protocol.server_step`): how one round's replies
  become the next global state, and the **contribution record**
  (:class:`RoundOutcome`): what was applied per client, plus a residual that
  belongs to no client (DP noise, a clipping remainder, server momentum), plus
  the state the server carries into the next round;
- its **forget** (:meth:`Protocol.forget`): how a client is removed from a
  version the protocol produced.

Manifests record the protocol's name and settings (:meth:`Protocol.describe`),
so :func:`components.unlearning.forget.forget_client` can dispatch to the
protocol that produced a lineage (:func:`protocol_from_record`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from components.core.records import ClientUpdate
from components.core.refs import ObjectRef
from components.core.state import StateDict
from components.learning.train import TrainSettings
from components.models.students import ModelSpec

if TYPE_CHECKING:  # the history imports the records this module's users produce
    from components.lineage.history import UpdateHistory
    from components.lineage.manifests import LineageHead, Manifest
    from components.lineage.store import ObjectStore


class UnlearningError(ValueError):
    """A deletion request that cannot be carried out as asked (nothing was changed)."""


# What a deletion removes, strongest first (every deletion records the one it gave):
# replay: equivalent to retraining without the client from its first round (same seeds);
# contributions: every recorded contribution of the client removed exactly, its indirect influence through
#   later rounds that started from models holding it remains (the seed paper's method);
# approximate: part of the client's direct contribution remains (opt-in only).
GUARANTEES = ("replay", "contributions", "approximate")


@dataclass(frozen=True)
class ForgetResult:
    """The state without the client and what changed in the lineage's bookkeeping."""

    state: StateDict = field(repr=False)
    removed: ObjectRef
    new_sums: dict[str, StateDict] = field(repr=False)
    round_scales: dict[str, float]
    objects_read: int


@dataclass(frozen=True)
class ClientTask:
    """Everything one client needs in one round, as references.

    The client reads ``shard`` (its training data) and ``base`` (the global
    state it starts from) from the store at ``store_url``, both checked against
    their sha256, and writes what it uploads to ``upload_key``. Methods whose
    clients keep a state of their own get it back as ``personal`` (the last
    one archived for this client); ``inputs`` are the round's other objects
    from the server (a public set, consensus soft labels) and ``settings`` the
    method's own knobs for this client. Further uploads go to keys under
    ``upload_prefix`` (``<upload_prefix><name>/<client_id>.safetensors``).
    """

    client_id: str
    server_round: int
    store_url: str
    shard: ObjectRef
    base: ObjectRef
    upload_key: str
    model: ModelSpec
    train: TrainSettings
    seed: int
    threads: int | None = None
    personal: ObjectRef | None = None
    inputs: Mapping[str, ObjectRef] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    upload_prefix: str = ""

    def object_key(self, name: str) -> str:
        """Where this client writes its upload called ``name`` (soft labels, personal state, ...)."""
        return f"{self.upload_prefix}{name}/{self.client_id}.safetensors"


@dataclass(frozen=True)
class ClientReply:
    """What a client returns: references to its uploads, never the tensors.

    ``upload`` is its weight delta (weight protocols) or its main upload;
    ``objects`` any others by name (``"personal"`` is its own new state).
    """

    client_id: str
    server_round: int
    num_examples: int
    upload: ObjectRef | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    objects: Mapping[str, ObjectRef] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientFailure:
    """A selected client that did not finish its round: it raised, or ran past the per-client timeout.

    It is recorded in the round's manifest and left out of that round: nothing
    is attributed to it. ``error`` is the exception, when there was one.
    """

    client_id: str
    server_round: int
    reason: str
    error: BaseException | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RoundOutcome:
    """A server step's result and its contribution record.

    ``state = base + sum over updates of weight * delta + residual`` for the
    weight protocols: each update is exactly what a client's data moved the
    model by in this round, and ``residual`` is what moved it for no client's
    sake. ``server_state`` is carried to the next round (and archived, so a
    federation resumes with it); ``record`` holds protocol facts for the
    manifest (groups, scores, exclusions).

    Methods that exchange something other than weight deltas leave
    ``updates`` empty and record instead: ``client_objects`` (per client, the
    archived uploads the manifest must name: soft labels, personal states),
    ``server_objects`` (states the server step produced, archived with the
    round: consensus labels, per-architecture models), ``personal`` (each
    client's latest own state) and ``specs`` (each client's model, when it is
    not the global one). ``participants`` maps every client that took part to
    its ``num_examples`` (the weight protocols' updates imply it).
    """

    state: StateDict = field(repr=False)
    updates: list[ClientUpdate]
    residual: StateDict | None = field(default=None, repr=False)
    server_state: StateDict | None = field(default=None, repr=False)
    record: Mapping[str, Any] = field(default_factory=dict)
    participants: Mapping[str, int] = field(default_factory=dict)
    client_objects: Mapping[str, Mapping[str, ObjectRef]] = field(default_factory=dict)
    server_objects: Mapping[str, StateDict] = field(default_factory=dict, repr=False)
    personal: Mapping[str, ObjectRef] = field(default_factory=dict)
    specs: Mapping[str, ModelSpec] = field(default_factory=dict)


class Protocol(ABC):
    """One federation method: client step, server step, contribution record, forget."""

    name: str = "protocol"

    def configure_fit(self, server_round: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        """The clients that train in ``server_round`` (default: every available one)."""
        if not available:
            raise ValueError(f"round {server_round}: no client is available to train")
        return list(available)

    def client_model(self, client_id: str, global_model: ModelSpec) -> ModelSpec:
        """The model ``client_id`` trains (default: the global one)."""
        return global_model

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        """Method knobs for one client's task (default: none)."""
        return {}

    def round_inputs(self, server_round: int, head: LineageHead, store: ObjectStore) -> Mapping[str, ObjectRef]:
        """Objects every client of ``server_round`` receives besides the global state (default: none)."""
        return {}

    @abstractmethod
    def client_step(self, task: ClientTask) -> ClientReply:
        """Train one client (runs wherever the client map sends it)."""

    @abstractmethod
    def server_step(
        self,
        server_round: int,
        base: Mapping[str, Any],
        server_state: StateDict | None,
        replies: Sequence[ClientReply],
        store: ObjectStore,
    ) -> RoundOutcome:
        """Combine one round's replies into the next global state and its record."""

    @abstractmethod
    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        """Remove ``client_id`` from the version at ``source`` (produced by this protocol)."""

    def guarantee(self, variant: str) -> str:
        """The level (:data:`GUARANTEES`) :meth:`forget` gives with ``variant``. By default every recorded
        contribution is removed exactly (``contributions``); protocols whose forget keeps part of the
        client's direct contribution say ``approximate``."""
        return "contributions"

    def served_model(self, history: UpdateHistory, manifest: Manifest, client_id: str) -> tuple[ModelSpec, StateDict]:
        """The model ``client_id`` serves at this version (``fedforget export --client``): by default the
        global one; protocols whose clients keep models of their own return those."""
        return manifest.model, history.read_state(manifest.global_state)

    def describe(self) -> dict[str, Any]:
        """Name and settings, recorded in every manifest (:func:`protocol_from_record` inverts it)."""
        return {"name": self.name}


BUILTIN_PROTOCOL_MODULES = (
    "components.federation.weights.protocol",
    "components.federation.logits.protocol",
    "components.federation.hetero.ensemble",
    "components.federation.hetero.shared_base",
    "components.federation.fewshot.protocol",
    "components.federation.split.protocol",
)
ProtocolFactory = Callable[[Mapping[str, Any]], Protocol]
PROTOCOLS: dict[str, ProtocolFactory] = {}


def register_protocol(name: str) -> Callable[[ProtocolFactory], ProtocolFactory]:
    """Register a factory that rebuilds a protocol from its recorded description."""

    def decorator(factory: ProtocolFactory) -> ProtocolFactory:
        PROTOCOLS[name] = factory
        return factory

    return decorator


def protocol_from_record(record: Mapping[str, Any]) -> Protocol:
    """The protocol a manifest's ``protocol`` record describes."""
    _load_builtin_protocols()
    name = str(record.get("name", ""))
    try:
        factory = PROTOCOLS[name]
    except KeyError:
        raise UnlearningError(f"unknown federation protocol {name!r}; known: {sorted(PROTOCOLS)}") from None
    return factory(record)


def _load_builtin_protocols() -> None:
    # Importing registers them; they import this module, so not at import time.
    for module in BUILTIN_PROTOCOL_MODULES:
        importlib.import_module(module)
