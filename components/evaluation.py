"""Measuring forgetting: backdoor markers, membership inference, agreement with retraining.

The yardstick of the federated-unlearning literature is a model retrained from
scratch without the client. The target client's data carries a backdoor (a
small fixed trigger patch, relabelled to a target class) as a verification
marker: a model that learnt from the client has a high attack success rate,
one that never saw it does not. A loss-threshold membership-inference attack
(Yeom et al., 2018) on the client's data is the second check.

:func:`simulate_federation` runs rounds of the production pieces (FedAvg,
the archived history with running sums) without orchestration or tracking, so
that the evaluation measures the method itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from components.aggregation import ClientResult, FedAvg
from components.config import ModelConfig
from components.data import FederationData, PrepareSettings, RawDataset, Split, prepare_data, read_split
from components.distillation import DistillSettings, distill, teacher_logits_for
from components.federation import check_results, client_seed
from components.history import LineageHead, UpdateHistory
from components.models import ModelSpec, build_model, init_model
from components.state import StateDict, l2_distance, subtract
from components.store import LocalStore, ObjectRef
from components.teacher import FeatureCache, TeacherSpec, build_backbone, fit_teacher, teacher_logits
from components.training import TrainSettings, evaluate, predict_logits, torch_threads, train_client
from components.unlearning import forget_client

# --------------------------------------------------------------------------- backdoor marker


def apply_trigger(images: torch.Tensor, size: int) -> torch.Tensor:
    """A copy of ``images`` (uint8, N x H x W) with a white ``size`` x ``size`` square
    one pixel in from the bottom-right corner."""
    if size < 1 or size + 1 > min(images.shape[1:]):
        raise ValueError(f"trigger size {size} does not fit {tuple(images.shape[1:])} images")
    out = images.clone()
    out[:, -size - 1 : -1, -size - 1 : -1] = 255
    return out


def poison(split: Split, fraction: float, target_class: int, trigger_size: int, rng: np.random.Generator) -> tuple[Split, np.ndarray]:
    """The client's data with ``fraction`` of it triggered and relabelled to ``target_class``.

    Returns the poisoned split and the indices that were poisoned.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"backdoor fraction must be in (0, 1], got {fraction}")
    n = len(split)
    chosen = np.sort(rng.choice(n, size=max(1, int(round(n * fraction))), replace=False))
    images, labels = split.images.clone(), split.labels.clone()
    idx = torch.as_tensor(chosen)
    images[idx] = apply_trigger(images[idx], trigger_size)
    labels[idx] = target_class
    return Split(images, labels), chosen


def attack_success_rate(model: nn.Module, test: Split, target_class: int, trigger_size: int) -> float:
    """Share of triggered test images (true class != target) classified as the target."""
    keep = test.labels != target_class
    triggered = Split(apply_trigger(test.images[keep], trigger_size), test.labels[keep])
    predictions = predict_logits(model, triggered.inputs()).argmax(1)
    return float((predictions == target_class).float().mean())


# --------------------------------------------------------------------------- membership inference


def per_example_loss(model: nn.Module, data: Split) -> np.ndarray:
    logits = predict_logits(model, data.inputs())
    return F.cross_entropy(logits, data.labels, reduction="none").numpy()


def membership_inference(model: nn.Module, members: Split, non_members: Split) -> dict[str, float]:
    """Loss-threshold attack: members tend to have lower loss.

    Returns the ROC AUC of ``-loss`` as a membership score and the attack's
    advantage (best TPR - FPR over thresholds); 0.5 and 0.0 mean no signal.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.concatenate([-per_example_loss(model, members), -per_example_loss(model, non_members)])
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {"mia_auc": float(roc_auc_score(truth, scores)), "mia_advantage": float(np.max(tpr - fpr))}


def class_matched_sample(pool: Split, like: torch.Tensor, n: int, rng: np.random.Generator) -> Split:
    """``n`` examples of ``pool`` whose label mix follows ``like``'s (held-out non-members
    for an attack on a label-skewed client; a plain sample would confound class with membership)."""
    labels = pool.labels.numpy()
    mix = np.bincount(like.numpy(), minlength=int(labels.max()) + 1) / len(like)
    picked: list[int] = []
    for cls, share in enumerate(mix):
        want = int(round(share * n))
        members = np.flatnonzero(labels == cls)
        if want and len(members):
            picked.extend(rng.choice(members, size=min(want, len(members)), replace=False).tolist())
    return pool.subset(np.sort(np.array(picked, dtype=np.int64)))


def prediction_agreement(a: nn.Module, b: nn.Module, data: Split) -> float:
    inputs = data.inputs()
    return float((predict_logits(a, inputs).argmax(1) == predict_logits(b, inputs).argmax(1)).float().mean())


def model_from_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = build_model(spec)
    model.load_state_dict(dict(state))
    return model.eval()


# --------------------------------------------------------------------------- federation without orchestration


@dataclass
class FederationRun:
    """The outcome of :func:`simulate_federation`."""

    state: StateDict = field(repr=False)
    head: LineageHead
    manifest: ObjectRef | None
    test_accuracy: list[float]
    seconds: float
    clients: list[str]


def simulate_federation(
    spec: ModelSpec,
    shards: Mapping[str, Split],
    test: Split,
    train: TrainSettings,
    rounds: int,
    seed: int,
    history: UpdateHistory,
    federation_id: str,
    exclude: Sequence[str] = (),
    max_workers: int = 2,
    on_round: Callable[[int, float], None] | None = None,
) -> FederationRun:
    """FedAvg over ``shards`` (minus ``exclude``) from the seeded initial model.

    The same steps as the ``federate`` flow: clients train in parallel threads
    with their own generators, the server checks and aggregates their results
    and commits each round to the archived history (so forgetting can run on
    it exactly as in production).
    """
    started = time.perf_counter()
    clients = sorted(c for c in shards if c not in set(exclude))
    strategy = FedAvg()
    state = init_model(spec, seed).state_dict()
    head = history.write_initial(federation_id, state, spec, seed)
    accuracy: list[float] = []
    threads = max(1, (os.cpu_count() or 1) // max_workers)

    def train_one(cid: str, server_round: int, base: StateDict) -> ClientResult:
        model = build_model(spec)
        model.load_state_dict(base)
        generator = torch.Generator().manual_seed(client_seed(seed, server_round, cid))
        metrics = train_client(model, shards[cid], train, generator)
        return ClientResult(cid, server_round, len(shards[cid]), subtract(model.state_dict(), base), {"train_loss": metrics["train_loss"]})

    manifest_ref = None
    for server_round in range(1, rounds + 1):
        order = sorted(clients, key=lambda c: -len(shards[c]))  # largest first: no idle tail
        with torch_threads(threads), ThreadPoolExecutor(max_workers) as pool:
            results = sorted(pool.map(lambda c: train_one(c, server_round, state), order), key=lambda r: r.client_id)
        check_results(server_round, results)
        new_state, updates = strategy.aggregate_fit(server_round, state, results)
        manifest_ref, manifest = history.commit_round(
            federation_id, server_round, head, updates, new_state, spec, strategy.describe(), "evaluation"
        )
        head = LineageHead.of(manifest_ref, manifest)
        state = new_state
        accuracy.append(evaluate(model_from_state(spec, state), test)["accuracy"])
        if on_round is not None:
            on_round(server_round, accuracy[-1])
    return FederationRun(state, head, manifest_ref, accuracy, time.perf_counter() - started, clients)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


# --------------------------------------------------------------------------- one seed of the benchmark

METHODS = ("original", "retrain", "subtract", "kd-global", "kd-clip")
METHOD_LABELS = {
    "original": "Original (all clients)",
    "retrain": "Retrain without target",
    "subtract": "Subtract only",
    "kd-global": "Subtract + KD (global model)",
    "kd-clip": "Subtract + KD (CLIP-Adapter)",
}


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything one seed of the benchmark needs (assembled from params by the flow)."""

    data: PrepareSettings  # its seed is offset by the benchmark seed
    model: ModelConfig
    train: TrainSettings
    distill: DistillSettings
    teacher: TeacherSpec
    teacher_test_subset: int
    rounds: int
    target_client: str | None
    backdoor_fraction: float
    backdoor_target_class: int
    trigger_size: int
    mia_examples: int
    max_workers: int
    federate_seed: int


def evaluate_seed(
    settings: EvaluationSettings, raw: RawDataset, seed: int, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Original, Retrain and the three unlearning methods for one seed, with all metrics."""
    root = Path(workdir) / f"seed-{seed}"
    data_settings = replace(settings.data, seed=settings.data.seed + seed)
    prepare_data(data_settings, root / "data", raw)
    fed = FederationData(root / "data" / "federation")
    meta = fed.meta
    spec = settings.model.spec(len(meta["class_names"]), tuple(meta["image_shape"]))
    test = fed.test()
    few_shot = read_split(root / "data" / "server" / "few_shot.safetensors")
    rng = np.random.default_rng([seed, 7])

    target = settings.target_client or max(fed.client_ids(), key=fed.num_examples)
    if target not in fed.client_ids():
        raise ValueError(f"target client {target!r} is not one of {fed.client_ids()}")
    clean = fed.client(target)
    shards = {cid: fed.client(cid) for cid in fed.client_ids()}
    shards[target], poisoned_idx = poison(clean, settings.backdoor_fraction, settings.backdoor_target_class, settings.trigger_size, rng)
    history = UpdateHistory(LocalStore(root / "store"))
    fseed = settings.federate_seed + seed

    log(f"seed {seed}: original federation ({len(shards)} clients, {settings.rounds} rounds)")
    original = simulate_federation(spec, shards, test, settings.train, settings.rounds, fseed, history, f"original-{seed}", max_workers=settings.max_workers)
    log(f"seed {seed}: retraining without {target}")
    retrain = simulate_federation(spec, shards, test, settings.train, settings.rounds, fseed, history, f"retrain-{seed}", exclude=[target], max_workers=settings.max_workers)

    states: dict[str, StateDict] = {"original": original.state, "retrain": retrain.state}
    seconds: dict[str, float] = {"original": original.seconds, "retrain": retrain.seconds}
    t0 = time.perf_counter()
    manifest = history.read_manifest(original.manifest)
    forgotten = forget_client(history, original.manifest, manifest, target).state
    seconds["subtract"] = time.perf_counter() - t0
    states["subtract"] = forgotten

    def recover(logits: torch.Tensor) -> StateDict:
        student = model_from_state(spec, forgotten)
        distill(student, few_shot, logits, settings.distill, torch.Generator().manual_seed(seed))
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    t0 = time.perf_counter()
    states["kd-global"] = recover(teacher_logits_for(model_from_state(spec, original.state), few_shot.inputs()))
    seconds["kd-global"] = seconds["subtract"] + time.perf_counter() - t0

    # The teacher depends on the few-shot data only: production fits it ahead (when a
    # federation ends) and keeps its few-shot logits with the teacher run, so a
    # deletion's time is forget + teacher logits (the head on the cached frozen
    # features) + distil; the cold fit (backbone build, features, fit) is reported on its own.
    log(f"seed {seed}: CLIP-Adapter teacher ({settings.teacher.preset})")
    t0 = time.perf_counter()
    backbone = build_backbone(settings.teacher)
    cache = FeatureCache(root / "features")
    teacher_test = test.subset(range(min(settings.teacher_test_subset, len(test))))
    fitted = fit_teacher(settings.teacher, backbone, few_shot, meta["class_names"], teacher_test, cache)
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    states["kd-clip"] = recover(teacher_logits(fitted, backbone, few_shot, cache))
    seconds["kd-clip"] = seconds["subtract"] + time.perf_counter() - t0

    members_idx = np.setdiff1d(np.arange(len(clean)), poisoned_idx)
    members = clean.subset(members_idx[rng.permutation(len(members_idx))[: settings.mia_examples]])
    non_members = class_matched_sample(test, members.labels, len(members), rng)
    models = {name: model_from_state(spec, state) for name, state in states.items()}

    metrics: dict[str, dict[str, float]] = {}
    for name in METHODS:
        model = models[name]
        metrics[name] = {
            "test_accuracy": evaluate(model, test)["accuracy"],
            "target_accuracy": evaluate(model, clean)["accuracy"],
            "backdoor_asr": attack_success_rate(model, test, settings.backdoor_target_class, settings.trigger_size),
            **membership_inference(model, members, non_members),
            "l2_to_retrain": l2_distance(states[name], states["retrain"]),
            "agreement_with_retrain": prediction_agreement(model, models["retrain"], test),
            "seconds": seconds[name],
            "speedup_vs_retrain": seconds["retrain"] / seconds[name],
        }
    return {
        "seed": seed,
        "target_client": target,
        "target_examples": len(clean),
        "poisoned_examples": int(len(poisoned_idx)),
        "mia_members": len(members),
        "clients": len(shards),
        "teacher": {**{k: float(v) for k, v in fitted.metrics.items()}, "fit_total_s": teacher_s},
        "kd_clip_seconds_with_cold_teacher": seconds["kd-clip"] + teacher_s,
        "accuracy_per_round": {"original": original.test_accuracy, "retrain": retrain.test_accuracy},
        "metrics": metrics,
    }
