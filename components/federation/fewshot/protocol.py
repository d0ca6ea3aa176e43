"""The few-shot protocol: each client fine-tunes the pretrained model in its device's mode.

Client step (references in, references out): read the shard and the global
state from the store, take the frozen trunk features of the shard from the
feature source (computed once per image, then cached), measure the received
model on the shard, fine-tune in the client's mode
(:mod:`~components.federation.fewshot.modes`) and upload

- ``updates/<client>``: the delta of the keys its mode trained (nothing else);
- ``gradient/<client>``: its full-batch gradient at the received model, for
  the dissimilarity estimate (``track_gradients``);
- ``personal/<client>`` (``meta`` only): its personal model, the received
  initialisation adapted in ``adapt_steps`` steps to its own examples.

Server step: the mixed-mode rule of
:mod:`~components.federation.fewshot.aggregation` (each group averaged over
the clients that trained it), each client's applied contribution recorded
as an update of weight 1, and the round's convergence facts in its record.

Forget: ``theta_T - S_c`` (the client's running sum of applied
contributions): exact in every mode, since the server applies nothing that
belongs to no client. The client's personal state leaves the lineage's
personal index with the deletion, and its objects are purged (both generic).
Other meta clients' personal states were adapted from models that still
held the client; each is replaced at that client's next round.

The global model is ``fewshot-clip`` (over features: the benchmark) or
``fewshot-clip-image`` (over images: production, where versions are
registered, served and evaluated); clients train the feature model either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from components.core.records import ClientUpdate
from components.core.refs import ObjectRef
from components.core.serialize import state_from_bytes, state_to_bytes
from components.core.state import StateDict, non_finite_keys
from components.federation.client import NonFiniteUpdateError, load_shard
from components.federation.fewshot.aggregation import aggregate_groups
from components.federation.fewshot.convergence import convergence_record
from components.federation.fewshot.features import FeatureSource, default_features
from components.federation.fewshot.model import STUDENT_MODEL_NAME, feature_spec, shared_backbone
from components.federation.fewshot.modes import (
    LocalSettings,
    adapt,
    check_mode,
    full_gradient,
    local_train,
    loss_and_accuracy,
)
from components.federation.protocol import (
    ClientReply,
    ClientTask,
    ForgetResult,
    Protocol,
    RoundOutcome,
    UnlearningError,
    register_protocol,
)
from components.federation.weights.forget import forget_by_running_sums
from components.lineage.history import UpdateHistory
from components.lineage.manifests import Manifest
from components.lineage.store import ObjectStore, open_store
from components.models.clip_backbone import TeacherSpec
from components.models.students import ModelSpec, build_model

PROTOCOL_NAME = "few-shot"
OWN_KNOBS = ("default_mode", "head_init", "track_gradients", "start", "student_model", "student_version")


@dataclass(frozen=True)
class FewShotSettings:
    """The ``federate.fewshot`` params: the clients' local fine-tuning and the protocol's own knobs.

    ``default_mode``: the mode of a client no device profile names; ``head_init``: the starting
    head (``text``: the zero-shot text classifier, ``zeros``); ``track_gradients``: clients upload
    their full-batch gradient for the dissimilarity estimate.
    """

    local: LocalSettings = field(default_factory=LocalSettings)
    default_mode: str = "full"
    head_init: str = "text"
    track_gradients: bool = True
    start: str = "tower"  # tower: the teacher's frozen tower + adapter + head | student: a registered student
    student_model: str | None = None  # start student: its registered model (null: the profile's registry model)
    student_version: int | None = None  # start student: its version

    def __post_init__(self) -> None:
        check_mode(self.default_mode)
        if self.head_init not in ("text", "zeros"):
            raise ValueError(f"head_init must be text or zeros, got {self.head_init!r}")
        if self.start not in ("tower", "student"):
            raise ValueError(f"start must be tower or student, got {self.start!r}")
        if self.start == "student" and (not isinstance(self.student_version, int) or self.student_version < 1):
            raise ValueError("start: student needs student_version, the registered version to fine-tune")

    @classmethod
    def from_params(cls, knobs: Mapping[str, Any]) -> FewShotSettings:
        """From the section's flat keys (``LocalSettings``' fields and the protocol's own)."""
        own = {k: knobs[k] for k in OWN_KNOBS if k in knobs}
        return cls(LocalSettings(**{k: v for k, v in knobs.items() if k not in OWN_KNOBS}), **own)


class FewShotProtocol(Protocol):
    """Few-shot fine-tuning with a mode per client (see the module docstring).

    Parameters
    ----------
    teacher
        The frozen tower (``TeacherSpec``; preset ``offline`` by default, ``tiny`` in tests).
    local
        Local fine-tuning settings, shared by all modes.
    modes
        Client id -> ``linear-probe``, ``full`` or ``meta`` (from its device profile).
    default_mode
        The mode of a client that ``modes`` does not name.
    track_gradients
        Upload each client's full-batch gradient for the dissimilarity estimate.
    cache_dir
        Where the frozen features are cached (in memory only when ``None``).
    features
        A feature source to use instead (e.g. a benchmark's bank); not recorded.
    devices
        Client id -> its device profile's name (recorded for the audit; ``modes`` decides).
    start
        Where a federation started from a registered student: ``{"model", "version", "manifest",
        "clients"}``, recorded in every manifest so that the pretraining clients count as present in
        every model derived from it (``None``: the teacher's tower, which holds no client).
    """

    name = PROTOCOL_NAME

    def __init__(
        self,
        teacher: TeacherSpec | None = None,
        local: LocalSettings | None = None,
        modes: Mapping[str, str] | None = None,
        default_mode: str = "full",
        track_gradients: bool = True,
        cache_dir: str | None = None,
        features: FeatureSource | None = None,
        devices: Mapping[str, str] | None = None,
        start: Mapping[str, Any] | None = None,
    ) -> None:
        self.teacher = teacher or TeacherSpec()
        self.local = local or LocalSettings()
        self.modes = {cid: check_mode(m) for cid, m in sorted((modes or {}).items())}
        self.default_mode = check_mode(default_mode)
        self.track_gradients = track_gradients
        self.cache_dir = cache_dir
        self.features = features or default_features(cache_dir)
        self.devices = dict(sorted((devices or {}).items()))
        self.start = dict(start) if start else None

    def mode_of(self, client_id: str) -> str:
        return self.modes.get(client_id, self.default_mode)

    def client_settings(self, client_id: str) -> Mapping[str, Any]:
        return {"mode": self.mode_of(client_id)}

    def client_step(self, task: ClientTask) -> ClientReply:
        if task.threads:
            torch.set_num_threads(task.threads)
        mode = check_mode(str(task.settings.get("mode", self.mode_of(task.client_id))))
        store = open_store(task.store_url)
        base = state_from_bytes(store.get_verified(task.base))[0]
        shard = load_shard(task)
        if task.model.name == STUDENT_MODEL_NAME:  # a registered student fine-tunes on the images themselves
            features = shard.inputs()
        else:
            features = self.features.get(shared_backbone(self.teacher), shard)
        labels = shard.labels
        model = build_model(feature_spec(task.model))  # production's image model trains on cached features
        global_loss, global_accuracy = loss_and_accuracy(model, base, features, labels)
        result = local_train(mode, model, base, features, labels, self.local, torch.Generator().manual_seed(task.seed))
        train_loss, train_accuracy = loss_and_accuracy(model, base | result.params, features, labels)
        delta = {k: (v.double() - base[k].double()).to(v.dtype) for k, v in result.params.items()}
        meta = {
            "client_id": task.client_id,
            "server_round": task.server_round,
            "mode": mode,
            "num_examples": len(shard),
        }

        def put(key: str, state: StateDict, kind: str) -> ObjectRef:
            return store.put(key, state_to_bytes(state, meta | {"kind": kind}), overwrite=False)

        upload = put(task.upload_key, delta, "update")
        objects: dict[str, ObjectRef] = {}
        if self.track_gradients:
            gradient = full_gradient(mode, model, base, features, labels, self.local.weight_decay)
            objects["gradient"] = put(task.object_key("gradient"), gradient, "gradient")
        if mode == "meta":
            objects["personal"] = put(
                task.object_key("personal"), adapt(mode, model, base, features, labels, self.local), "personal"
            )
        metrics = {"global_loss": global_loss, "global_accuracy": global_accuracy, "train_loss": train_loss,
                   "train_accuracy": train_accuracy, **result.metrics}  # fmt: skip
        return ClientReply(task.client_id, task.server_round, len(shard), upload, metrics, objects)

    def server_step(
        self,
        server_round: int,
        base: Mapping[str, Any],
        server_state: StateDict | None,
        replies: Sequence[ClientReply],
        store: ObjectStore,
    ) -> RoundOutcome:
        if not replies:
            raise ValueError(f"round {server_round}: no client replies to aggregate")
        deltas: dict[str, StateDict] = {}
        gradients: dict[str, StateDict] = {}
        for reply in replies:
            if reply.server_round != server_round or reply.num_examples <= 0 or reply.upload is None:
                raise ValueError(f"round {server_round}: unusable reply from {reply.client_id}")
            if reply.client_id in deltas:
                raise ValueError(f"round {server_round}: client {reply.client_id} replied twice")
            deltas[reply.client_id] = state_from_bytes(store.get_verified(reply.upload))[0]
            bad = non_finite_keys(deltas[reply.client_id])
            if bad:
                raise NonFiniteUpdateError(f"round {server_round}: the update of {reply.client_id} holds NaN or "
                                           f"infinity in {', '.join(bad[:3])}; the round is not committed")  # fmt: skip
            if self.track_gradients and "gradient" in reply.objects:
                gradients[reply.client_id] = state_from_bytes(store.get_verified(reply.objects["gradient"]))[0]
        modes = {r.client_id: self.mode_of(r.client_id) for r in replies}
        examples = {r.client_id: r.num_examples for r in replies}
        applied = aggregate_groups(base, deltas, modes, examples)
        updates = [
            ClientUpdate(r.client_id, server_round, r.num_examples, 1.0, applied.contributions[r.client_id],
                         upload=r.upload, modified=True)
            for r in replies
        ]  # fmt: skip
        tracked = gradients if len(gradients) == len(replies) else None
        record = {
            "rule": "per-group-average",
            "modes": dict(sorted(modes.items())),
            "group_weights": {cid: dict(sorted(w.items())) for cid, w in sorted(applied.weights.items())},
            "convergence": convergence_record(
                base, applied, deltas, tracked, examples, {r.client_id: r.metrics for r in replies}
            ),
        }
        return RoundOutcome(
            applied.state,
            updates,
            record=record,
            client_objects={r.client_id: dict(r.objects) for r in replies if r.objects},
            personal={r.client_id: r.objects["personal"] for r in replies if "personal" in r.objects},
        )

    def forget(
        self, history: UpdateHistory, source: ObjectRef, manifest: Manifest, client_id: str, variant: str
    ) -> ForgetResult:
        if variant != "subtract":
            # Renormalising would need one scale per group and round; the manifest's weights are 1.
            raise UnlearningError(f"the few-shot protocol forgets by subtraction only, not {variant!r}")
        return forget_by_running_sums(history, source, manifest, client_id, "subtract")

    def served_model(self, history: UpdateHistory, manifest: Manifest, client_id: str) -> tuple[ModelSpec, StateDict]:
        """A ``meta`` client serves its personal model (the initialisation adapted to its examples); the others
        serve the global model."""
        state = history.read_state(manifest.global_state)
        ref = manifest.personal.get(client_id)
        if ref is not None:
            state = state | state_from_bytes(history.store.get_verified(ref))[0]
        return manifest.model, state

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "teacher": asdict(self.teacher),
            "local": asdict(self.local),
            "modes": dict(self.modes),
            "default_mode": self.default_mode,
            "track_gradients": self.track_gradients,
            "cache_dir": self.cache_dir,
            "devices": dict(self.devices),
            **({"start": dict(self.start)} if self.start else {}),
        }


@register_protocol(PROTOCOL_NAME)
def _from_record(record: Mapping[str, Any]) -> Protocol:
    return FewShotProtocol(
        teacher=TeacherSpec(**(record.get("teacher") or {})),
        local=LocalSettings(**(record.get("local") or {})),
        modes=record.get("modes") or {},
        default_mode=str(record.get("default_mode", "full")),
        track_gradients=bool(record.get("track_gradients", True)),
        cache_dir=record.get("cache_dir"),
        devices=record.get("devices") or {},
        start=record.get("start"),
    )
