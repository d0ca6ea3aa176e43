"""The ``heterogeneous`` suite: clients with different architectures, four ways to train them.

Methods, on the same prepared data (per Dirichlet ``alpha``, three
architectures mixed round-robin over the clients):

``local-only``
    every client trains its own architecture on its own shard, as many epochs
    as it would in the federation; nothing is exchanged. Its test accuracy
    is the mean of the clients' models' test accuracies.
``fedavg-single``
    FedAvg with every client forced to the smallest architecture.
``ensemble-distillation``
    :mod:`components.federation.hetero.ensemble`: the global student's test
    accuracy; each client is evaluated with its architecture's fused model.
``shared-base``
    :mod:`components.federation.hetero.shared_base` over one CNN base with
    three head architectures: the global model (base + server head) on the
    test set, each client's base + own head on its held-out split.

Personalised accuracy is measured on each client's own held-out split
(``data.client_holdout``). ``bytes_per_round`` counts the tensor bytes the
round's clients download and upload (their model, their base or nothing).
Forgetting (both heterogeneous protocols): the client with the most data is
forgotten through :func:`~components.unlearning.forget.forget_client`, then
quality is recovered on the server's few-shot set (``recovery``: ``clip``, the
default and production's recovery, distils from the CLIP-Adapter teacher
fitted on that set; ``finetune`` trains on its labels alone; ``global-model``,
distillation from the pre-deletion model, is a baseline that re-teaches the
client). None but ``global-model`` uses anything that saw the client. As in
production, the teacher is fitted ahead (it depends on the few-shot set only),
so a deletion's time is forget + teacher logits + distillation; the cold fit is
reported apart (``teacher_fit_seconds``). Both are compared with a federation
retrained without the client from the same seeds: test accuracy, accuracy on
the client's own data, wall time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import components.models.heads  # noqa: F401  (registers cnn-mlp-head)
from components.data.datasets import RawDataset, Split
from components.data.layout import FederationData, PrepareSettings, prepare_data, read_public, read_split
from components.data.staging import stage_splits
from components.evaluation.unlearning import stat as _stat
from components.evaluation.unlearning import stat_fields
from components.federation.hetero.common import model_with, stage_images, stage_split, state_nbytes, unpack
from components.federation.hetero.ensemble import EnsembleDistillation, EnsembleSettings
from components.federation.hetero.profiles import ClientProfiles
from components.federation.hetero.shared_base import SharedBase, SharedBaseSettings, personalised_model
from components.federation.protocol import Protocol
from components.federation.rounds import Federation, RoundResult, client_seed, run_round, thread_map
from components.federation.weights.protocol import weight_protocol
from components.learning.distill import DistillSettings, distill, teacher_logits_for
from components.learning.train import TrainSettings, evaluate, torch_threads, train_client
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore
from components.models.clip_backbone import TeacherSpec, build_backbone
from components.models.clip_teacher import FeatureCache, fit_teacher, teacher_logits
from components.models.students import ModelSpec, data_derived_args, init_model
from components.unlearning.forget import forget_client

METHODS = ("local-only", "fedavg-single", "ensemble-distillation", "shared-base")
FORGETTING = ("ensemble-distillation", "shared-base")
RECOVERIES = ("clip", "finetune", "global-model", "none")
ROW_FIELDS = ("test_accuracy", "personalized_accuracy_mean", "personalized_accuracy_min", "bytes_per_round")
FORGET_FIELDS = (
    "forget_test_accuracy", "recovered_test_accuracy", "retrain_test_accuracy",
    "forget_target_accuracy", "recovered_target_accuracy", "retrain_target_accuracy",
    "forget_seconds", "recovered_seconds", "retrain_seconds",
)  # fmt: skip
EXTRA_FIELDS = ("teacher_fit_seconds",)  # recovery clip: the teacher's cold fit, not in the deletion's time


def _arch(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args}


@dataclass(frozen=True)
class HeterogeneousSettings:
    """One profile of the suite; the defaults are the full one (Fashion-MNIST, about an hour on 2 cores)."""

    data: PrepareSettings = field(
        default_factory=lambda: PrepareSettings(
            "fashion-mnist", num_clients=9, alpha=0.1, shots=20, seed=42, max_train_examples=9000,
            test_size=2000, public_size=2000, client_holdout=0.2,
        )
    )  # fmt: skip
    alphas: tuple[float, ...] = (0.1, 0.5)
    rounds: int = 8
    train: TrainSettings = field(default_factory=lambda: TrainSettings(local_epochs=1, batch_size=32, lr=0.05))
    architectures: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {
        "small-cnn": _arch("cnn", channels=[8, 16], hidden=64), "wide-cnn": _arch("cnn", channels=[32, 64], hidden=256),
        "mlp": _arch("mlp", hidden=200)})  # fmt: skip
    student: str = "wide-cnn"  # the ensemble's global student: one of ``architectures``
    shared_base: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {
        "linear-head": _arch("cnn", channels=[16, 32], hidden=128),
        "mlp-head": _arch("cnn-mlp-head", channels=[16, 32], hidden=128, head_hidden=32),
        "wide-head": _arch("cnn-mlp-head", channels=[16, 32], hidden=128, head_hidden=256)})  # fmt: skip
    ensemble: EnsembleSettings = field(default_factory=lambda: EnsembleSettings(epochs=2))
    shared: SharedBaseSettings = field(default_factory=SharedBaseSettings)
    forget: bool = True
    recovery: str = "clip"  # after forgetting: clip (teacher) | finetune (few-shot labels) | global-model | none
    distill: DistillSettings = field(default_factory=DistillSettings)  # the recovery's
    teacher: TeacherSpec = field(default_factory=TeacherSpec)  # recovery clip: production's default teacher
    max_workers: int = 2
    federate_seed: int = 0

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERIES:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERIES)}, not {self.recovery!r}")

    def record(self) -> dict[str, Any]:
        """The profile as the report states it (``config`` of the result, besides ``profile`` and ``seeds``)."""
        return {
            "dataset": self.data.dataset, "clients": self.data.num_clients, "rounds": self.rounds,
            "alphas": list(self.alphas), "architectures": list(self.architectures), "student": self.student,
            "shared_base": list(self.shared_base), "local_epochs": self.train.local_epochs, "recovery": self.recovery,
            "public_size": self.data.public_size, "client_holdout": self.data.client_holdout,
        }  # fmt: skip

    @classmethod
    def quick(cls) -> HeterogeneousSettings:
        """The CI smoke profile: scikit-learn digits, 6 clients, 10 rounds, one seed (2-3 minutes)."""
        return cls(
            data=PrepareSettings("digits", num_clients=6, alpha=0.1, shots=5, seed=42, public_size=300,
                                 client_holdout=0.2, min_client_examples=20),
            rounds=10, train=TrainSettings(local_epochs=2, batch_size=16, lr=0.05),
            architectures={"small-cnn": _arch("cnn", channels=[8, 16], hidden=32),
                           "wide-cnn": _arch("cnn", channels=[32, 64], hidden=128), "mlp": _arch("mlp", hidden=64)},
            shared_base={"linear-head": _arch("cnn", channels=[16, 32], hidden=64),
                         "mlp-head": _arch("cnn-mlp-head", channels=[16, 32], hidden=64, head_hidden=32),
                         "wide-head": _arch("cnn-mlp-head", channels=[16, 32], hidden=64, head_hidden=128)},
            ensemble=EnsembleSettings(epochs=5),
        )  # fmt: skip


@dataclass
class _Point:
    """One prepared data set (a seed and an alpha) and what every method reads from it."""

    settings: HeterogeneousSettings
    root: Path
    seed: int
    shards: dict[str, Split]
    holdouts: dict[str, Split]
    test: Split
    derived: ModelSpec  # carries the data-derived sizes only
    history: UpdateHistory
    teacher: dict[str, Any] = field(default_factory=dict)  # recovery clip: logits on the few-shot set, fit record

    @property
    def clients(self) -> list[str]:
        return sorted(self.shards)

    def profiles(self, architectures: Mapping[str, Mapping[str, Any]]) -> ClientProfiles:
        section = {"architectures": dict(architectures), "assign": "round-robin"}
        return ClientProfiles.from_params(section, self.clients).resolved(self.derived)

    def personalised(self, model_for: Callable[[str], Any]) -> dict[str, float]:
        return {cid: evaluate(model_for(cid), self.holdouts[cid])["accuracy"] for cid in self.clients}

    def few_shot(self) -> Split:
        return read_split(self.root / "data" / "server" / "few_shot.safetensors")

    def clip_logits(self) -> torch.Tensor:
        """The CLIP-Adapter teacher's logits on the few-shot set; the teacher is fitted once per
        point (on the few-shot set only, as production fits it when a federation ends)."""
        if "logits" not in self.teacher:
            started = time.perf_counter()
            few_shot, spec = self.few_shot(), self.settings.teacher
            meta = FederationData(self.root / "data" / "federation").meta
            backbone, cache = build_backbone(spec), FeatureCache(self.root / "features")
            test = self.test.subset(range(min(1000, len(self.test))))  # evaluated only, as production's test_subset
            fitted = fit_teacher(spec, backbone, few_shot, meta["class_names"], test, cache)
            self.teacher["fit_seconds"] = time.perf_counter() - started
            self.teacher["metrics"] = {k: float(v) for k, v in fitted.metrics.items()}
            self.teacher["logits"] = teacher_logits(fitted, backbone, few_shot, cache)
        return self.teacher["logits"]


def _federate(
    point: _Point, protocol: Protocol, spec: ModelSpec, fid: str, exclude: Sequence[str] = ()
) -> tuple[RoundResult, float]:
    """``rounds`` rounds of ``protocol`` through the production round function; the last round and the wall time."""
    started = time.perf_counter()
    s = point.settings
    clients = [c for c in point.clients if c not in set(exclude)]
    state = init_model(spec, s.federate_seed + point.seed).state_dict()
    head = point.history.write_initial(fid, state, spec, s.federate_seed + point.seed)
    staged = stage_splits(point.history.store, {c: point.shards[c] for c in clients}, "shards")
    federation = Federation(fid, point.history, point.history.store.url, spec, s.train, s.federate_seed + point.seed,
                            "shards", staged, {c: len(point.shards[c]) for c in clients})  # fmt: skip
    rng, server_state, result = np.random.default_rng([point.seed, 0]), None, None
    for _ in range(s.rounds):
        result = run_round(protocol, federation, head, state, server_state, clients, rng, thread_map(s.max_workers))
        head, state, server_state = result.head, result.state, result.outcome.server_state
    assert result is not None
    return result, time.perf_counter() - started


def _local_only(point: _Point) -> dict[str, Any]:
    s, profiles = point.settings, point.profiles(point.settings.architectures)
    models = {}
    for cid in point.clients:
        model = init_model(profiles.spec_for(cid), s.federate_seed + point.seed)
        epochs = s.rounds * (profiles.profile(cid).budget.local_epochs or s.train.local_epochs)
        train_client(
            model,
            point.shards[cid],
            replace(s.train, local_epochs=epochs),
            torch.Generator().manual_seed(client_seed(s.federate_seed + point.seed, 0, cid)),
        )
        models[cid] = model
    test = float(np.mean([evaluate(m, point.test)["accuracy"] for m in models.values()]))
    return {"test_accuracy": test, "personalized": point.personalised(models.__getitem__), "bytes_per_round": 0.0}


def _fedavg_single(point: _Point) -> dict[str, Any]:
    profiles = point.profiles(point.settings.architectures)
    spec = profiles.spec_of(profiles.smallest())
    result, seconds = _federate(point, weight_protocol("fedavg"), spec, f"fedavg-{point.seed}")
    model = model_with(spec, result.state)
    return {
        "test_accuracy": evaluate(model, point.test)["accuracy"], "personalized": point.personalised(lambda _: model),
        "bytes_per_round": 2.0 * state_nbytes(result.state) * len(result.replies), "seconds": seconds,
    }  # fmt: skip


def _ensemble(point: _Point, fid: str, exclude: Sequence[str] = ()) -> tuple[EnsembleDistillation, RoundResult, float]:
    s = point.settings
    profiles = point.profiles(s.architectures)
    public = stage_images(point.history.store, read_public(point.root / "data"), "server-data", "public")
    protocol = EnsembleDistillation(
        profiles, profiles.spec_of(s.student), public, s.ensemble, s.federate_seed + point.seed
    )
    result, seconds = _federate(point, protocol, protocol.student, fid, exclude)
    return protocol, result, seconds


def _shared(point: _Point, fid: str, exclude: Sequence[str] = ()) -> tuple[SharedBase, RoundResult, float]:
    s = point.settings
    profiles = point.profiles(s.shared_base)
    server = stage_split(point.history.store, point.few_shot(), "server-data", "few-shot")
    spec = profiles.spec_of(next(iter(s.shared_base)))
    protocol = SharedBase(profiles, spec, server, settings=s.shared, seed=s.federate_seed + point.seed, train=s.train)
    result, seconds = _federate(point, protocol, spec, fid, exclude)
    return protocol, result, seconds


def _ensemble_row(point: _Point, protocol: EnsembleDistillation, result: RoundResult) -> dict[str, Any]:
    fused = unpack(result.outcome.server_state)
    models = {a: model_with(protocol.profiles.spec_of(a), state) for a, state in fused.items()}
    per_client = {c: 2 * state_nbytes(fused[protocol.profiles.architecture_of(c)]) for c in point.clients}
    return {
        "test_accuracy": evaluate(model_with(protocol.student, result.state), point.test)["accuracy"],
        "personalized": point.personalised(lambda cid: models[protocol.profiles.architecture_of(cid)]),
        "bytes_per_round": float(sum(per_client[r.client_id] for r in result.replies)),
    }


def _shared_row(point: _Point, protocol: SharedBase, result: RoundResult) -> dict[str, Any]:
    history, manifest = point.history, result.manifest
    base, _ = protocol.settings.split(result.state)
    return {
        "test_accuracy": evaluate(model_with(protocol.model, result.state), point.test)["accuracy"],
        "personalized": point.personalised(lambda cid: model_with(*personalised_model(history, manifest, cid))),
        "bytes_per_round": 2.0 * state_nbytes(base) * len(result.replies),
    }


def _forgetting(point: _Point, method: str, spec: ModelSpec, result: RoundResult, retrain: Callable) -> dict[str, Any]:
    """Forget the client with the most data (then recover); retrain without it; accuracy and time of each."""
    s = point.settings
    target = max(point.clients, key=lambda c: len(point.shards[c]))
    if s.recovery == "clip":
        point.clip_logits()  # fitted ahead, as in production: not part of the deletion's time
    started = time.perf_counter()
    forgotten = forget_client(point.history, result.manifest_ref, result.manifest, target).state
    forget_s = time.perf_counter() - started
    recovered = forgotten
    if s.recovery != "none":
        few_shot = point.few_shot()
        student = model_with(spec, forgotten)
        generator = torch.Generator().manual_seed(point.seed)
        if s.recovery == "clip":  # production's recovery: the teacher saw the few-shot set only
            distill(student, few_shot, point.clip_logits(), s.distill, generator)
        elif s.recovery == "global-model":  # a baseline only: the pre-deletion model saw the client
            logits = teacher_logits_for(model_with(spec, result.state), few_shot.inputs())
            distill(student, few_shot, logits, s.distill, generator)
        else:  # finetune: the server's labelled few-shot set alone, nothing that saw the client
            tune = TrainSettings(s.distill.epochs, s.distill.batch_size, s.distill.lr, s.distill.momentum)
            train_client(student, few_shot, tune, generator)
        recovered = {k: v.detach().clone() for k, v in student.state_dict().items()}
    recover_s = time.perf_counter() - started
    _, retrained, retrain_s = retrain(point, f"{method}-retrain-{point.seed}", exclude=[target])
    states = {"forget": forgotten, "recovered": recovered, "retrain": retrained.state}
    out: dict[str, Any] = {"target": target, "forget_seconds": forget_s, "recovered_seconds": recover_s,
                           "retrain_seconds": retrain_s, "recovery": s.recovery}  # fmt: skip
    if s.recovery == "clip":
        out["teacher_fit_seconds"] = point.teacher["fit_seconds"]
        out["teacher"] = point.teacher["metrics"]
    for name, state in states.items():
        model = model_with(spec, state)
        out[f"{name}_test_accuracy"] = evaluate(model, point.test)["accuracy"]
        out[f"{name}_target_accuracy"] = evaluate(model, point.shards[target])["accuracy"]
    return out


def run_seed(
    settings: HeterogeneousSettings, raw: RawDataset, seed: int, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every method (and forgetting in both heterogeneous protocols) at every alpha, for one seed."""
    if not settings.data.public_size or not settings.data.client_holdout:
        raise ValueError("the heterogeneous suite needs data.public_size and data.client_holdout")
    points = []
    threads = max(1, (os.cpu_count() or 1) // settings.max_workers)
    for alpha in settings.alphas:
        root = Path(workdir) / f"seed-{seed}" / f"alpha-{alpha}"
        prepare_data(replace(settings.data, alpha=alpha, seed=settings.data.seed + seed), root / "data", raw)
        fed = FederationData(root / "data" / "federation")
        derived = ModelSpec("derived", data_derived_args(len(fed.meta["class_names"]), fed.meta["image_shape"][0]))
        point = _Point(settings, root, seed, {c: fed.client(c) for c in fed.client_ids()},
                       {c: fed.holdout(c) for c in fed.client_ids()}, fed.test(), derived,
                       UpdateHistory(LocalStore(root / "store")))  # fmt: skip
        methods: dict[str, dict[str, Any]] = {}
        forgetting: dict[str, dict[str, Any]] = {}
        with torch_threads(threads):
            log(f"seed {seed}, alpha {alpha}: local-only")
            methods["local-only"] = _local_only(point)
            log(f"seed {seed}, alpha {alpha}: fedavg-single")
            methods["fedavg-single"] = _fedavg_single(point)
            log(f"seed {seed}, alpha {alpha}: ensemble-distillation")
            protocol, result, seconds = _ensemble(point, f"ensemble-{seed}")
            methods["ensemble-distillation"] = {**_ensemble_row(point, protocol, result), "seconds": seconds}
            if settings.forget:
                log(f"seed {seed}, alpha {alpha}: ensemble-distillation forgetting vs retraining")
                forgetting["ensemble-distillation"] = _forgetting(
                    point, "ensemble", protocol.student, result, _ensemble
                )
            log(f"seed {seed}, alpha {alpha}: shared-base")
            shared, result, seconds = _shared(point, f"shared-{seed}")
            methods["shared-base"] = {**_shared_row(point, shared, result), "seconds": seconds}
            if settings.forget:
                log(f"seed {seed}, alpha {alpha}: shared-base forgetting vs retraining")
                forgetting["shared-base"] = _forgetting(point, "shared", shared.model, result, _shared)
        for values in methods.values():
            accuracies = list(values["personalized"].values())
            values["personalized_accuracy_mean"] = float(np.mean(accuracies))
            values["personalized_accuracy_min"] = float(np.min(accuracies))
        points.append({"alpha": alpha, "clients": len(point.clients), "methods": methods, "forgetting": forgetting})
    return {"seed": seed, "points": points}


def summarise(seed_results: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per (method, alpha), means over seeds with ``<field>_sd``; forgetting rows per (protocol, alpha)."""
    points = [(p["alpha"], p) for s in seed_results for p in s["points"]]
    alphas = sorted({a for a, _ in points})
    rows, forgetting = [], []
    for method in METHODS:
        for alpha in alphas:
            found = [p["methods"][method] for a, p in points if a == alpha and method in p["methods"]]
            if found:
                row: dict[str, Any] = {"method": method, "alpha": alpha}
                for f in ROW_FIELDS:
                    row |= stat_fields(f, [m.get(f) for m in found])
                rows.append(row | {"seeds": len(found)})
    for method in FORGETTING:
        for alpha in alphas:
            found = [p["forgetting"][method] for a, p in points if a == alpha and method in p["forgetting"]]
            if found:
                gap = [100 * (f["recovered_test_accuracy"] - f["retrain_test_accuracy"]) for f in found]
                fraction = [f["recovered_seconds"] / f["retrain_seconds"] for f in found]
                extra = {f: _stat([m[f] for m in found]) for f in EXTRA_FIELDS if all(f in m for m in found)}
                forgetting.append({"method": method, "alpha": alpha, **{f: _stat([m[f] for m in found]) for f in FORGET_FIELDS},
                                   **extra, "recovery": found[0].get("recovery", "finetune"),
                                   "accuracy_gap_points": _stat(gap), "time_fraction": _stat(fraction), "seeds": len(found)})  # fmt: skip
    return {"rows": rows, "forgetting": forgetting}
