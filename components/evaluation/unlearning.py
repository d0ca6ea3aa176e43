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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.config.sections import ModelConfig
from components.core.refs import ObjectRef
from components.core.state import StateDict, l2_distance
from components.data.datasets import RawDataset, Split
from components.data.layout import FederationData, PrepareSettings, prepare_data, read_split
from components.data.staging import stage_splits
from components.federation.protocol import Protocol
from components.federation.rounds import Federation, run_round, thread_map
from components.federation.weights.protocol import weight_protocol
from components.learning.distill import DistillSettings, distill, teacher_logits_for
from components.learning.train import TrainSettings, evaluate, torch_threads
from components.lineage.history import UpdateHistory
from components.lineage.manifests import LineageHead
from components.lineage.store import LocalStore
from components.models.clip_backbone import TeacherSpec, build_backbone
from components.models.clip_teacher import FeatureCache, fit_teacher, teacher_logits
from components.models.students import ModelSpec, init_model
from components.unlearning.forget import forget_client
from components.unlearning.verify import (
    attack_success_rate,
    class_matched_sample,
    membership_inference,
    model_from_state,
    poison,
    prediction_agreement,
    predictions,
)

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
    protocol: Protocol | None = None,
) -> FederationRun:
    """Rounds of ``protocol`` (FedAvg weights by default) over ``shards`` minus ``exclude``.

    The production round (:func:`~components.federation.rounds.run_round`) with
    clients in ``max_workers`` threads instead of Prefect tasks, committed to
    ``history`` so that forgetting runs on it exactly as in production.
    """
    started = time.perf_counter()
    clients = sorted(c for c in shards if c not in set(exclude))
    protocol = protocol or weight_protocol("fedavg")
    state = init_model(spec, seed).state_dict()
    head = history.write_initial(federation_id, state, spec, seed)
    federation = Federation(
        federation_id=federation_id, history=history, store_url=history.store.url, model=spec, train=train,
        seed=seed, data_version="evaluation", shards=stage_splits(history.store, {c: shards[c] for c in clients}, federation_id),
        sizes={c: len(shards[c]) for c in clients},
    )  # fmt: skip
    accuracy: list[float] = []
    threads = max(1, (os.cpu_count() or 1) // max_workers)
    rng = np.random.default_rng([seed, 0])
    server_state = None
    manifest_ref = None
    for _ in range(rounds):
        with torch_threads(threads):
            result = run_round(protocol, federation, head, state, server_state, clients, rng, thread_map(max_workers))
        head, state, server_state, manifest_ref = (
            result.head,
            result.state,
            result.outcome.server_state,
            result.manifest_ref,
        )
        accuracy.append(evaluate(model_from_state(spec, state), test)["accuracy"])
        if on_round is not None:
            on_round(result.server_round, accuracy[-1])
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
    shards[target], poisoned_idx = poison(
        clean, settings.backdoor_fraction, settings.backdoor_target_class, settings.trigger_size, rng
    )
    history = UpdateHistory(LocalStore(root / "store"))
    fseed = settings.federate_seed + seed

    log(f"seed {seed}: original federation ({len(shards)} clients, {settings.rounds} rounds)")
    original = simulate_federation(
        spec,
        shards,
        test,
        settings.train,
        settings.rounds,
        fseed,
        history,
        f"original-{seed}",
        max_workers=settings.max_workers,
    )
    log(f"seed {seed}: retraining without {target}")
    retrain = simulate_federation(
        spec,
        shards,
        test,
        settings.train,
        settings.rounds,
        fseed,
        history,
        f"retrain-{seed}",
        exclude=[target],
        max_workers=settings.max_workers,
    )

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

    retrain_predictions = predictions(models["retrain"], test)  # once, not once per method
    metrics: dict[str, dict[str, float]] = {}
    for name in METHODS:
        model = models[name]
        metrics[name] = {
            "test_accuracy": evaluate(model, test)["accuracy"],
            "target_accuracy": evaluate(model, clean)["accuracy"],
            "backdoor_asr": attack_success_rate(model, test, settings.backdoor_target_class, settings.trigger_size),
            **membership_inference(model, members, non_members),
            "l2_to_retrain": l2_distance(states[name], states["retrain"]),
            "agreement_with_retrain": prediction_agreement(model, retrain_predictions, test),
            "seconds": seconds[name],
            "speedup_vs_retrain": seconds["retrain"] / seconds[name],
        }
    return {
        "seed": seed,
        "target_client": target,
        "target_examples": len(clean),
        "poisoned_examples": len(poisoned_idx),
        "mia_members": len(members),
        "clients": len(shards),
        "teacher": {**{k: float(v) for k, v in fitted.metrics.items()}, "fit_total_s": teacher_s},
        "kd_clip_seconds_with_cold_teacher": seconds["kd-clip"] + teacher_s,
        "accuracy_per_round": {"original": original.test_accuracy, "retrain": retrain.test_accuracy},
        "metrics": metrics,
    }
