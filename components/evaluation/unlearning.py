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
from components.evaluation.membership import lira
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
    client_train: Mapping[str, TrainSettings] | None = None,
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
        client_train={c: t for c, t in (client_train or {}).items() if c in clients},
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


def stat(values: Sequence[float | None]) -> dict[str, float] | None:
    """``{"mean", "sd"}`` over the values present (None where none is): a suite's row cell."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    mean, sd = mean_std(present)
    return {"mean": mean, "sd": sd}


def stat_fields(name: str, values: Sequence[float | None]) -> dict[str, float | None]:
    """``{name: mean, name_sd: sd}`` over the values present (both None where none is): a suite's row cells."""
    found = stat(values)
    if found is None:
        return {name: None, f"{name}_sd": None}
    return {name: found["mean"], f"{name}_sd": found["sd"]}


# --------------------------------------------------------------------------- one seed of the benchmark

METHODS = ("original", "retrain", "subtract", "finetune", "kd-global", "kd-clip", "renormalise")
METHOD_LABELS = {
    "original": "Original (all clients)",
    "retrain": "Retrain without target",
    "subtract": "Subtract only",
    "finetune": "Subtract + fine-tune on few-shot labels (no teacher)",
    "kd-global": "Subtract + KD (global model; saw the client: baseline only)",
    "kd-clip": "Subtract + KD (CLIP-Adapter)",
    "renormalise": "Renormalise + KD (CLIP-Adapter)",
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
    clients_per_round: int | None = None  # partial participation (None: every client every round)
    deletions: int = 1  # forget this many clients one after the other (the largest first)
    mia_shadows: int = 0  # shadow federations for the calibrated attack (LiRA offline); 0 = off
    target_max_examples: int | None = None  # the detectable setting: a small target client ...
    target_local_epochs: int | None = None  # ... that trains for more local epochs


def evaluate_seed(
    settings: EvaluationSettings, raw: RawDataset, seed: int, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Original, Retrain and every unlearning method for one seed, with all metrics."""
    root = Path(workdir) / f"seed-{seed}"
    data_settings = replace(settings.data, seed=settings.data.seed + seed)
    prepare_data(data_settings, root / "data", raw)
    fed = FederationData(root / "data" / "federation")
    meta = fed.meta
    spec = settings.model.spec(len(meta["class_names"]), tuple(meta["image_shape"]))
    test = fed.test()
    few_shot = read_split(root / "data" / "server" / "few_shot.safetensors")
    rng = np.random.default_rng([seed, 7])

    by_size = sorted(fed.client_ids(), key=fed.num_examples, reverse=True)
    target = settings.target_client or by_size[0]
    if target not in fed.client_ids():
        raise ValueError(f"target client {target!r} is not one of {fed.client_ids()}")
    targets = [target, *[c for c in by_size if c != target][: settings.deletions - 1]]
    clean = fed.client(target)
    if settings.target_max_examples is not None and settings.target_max_examples < len(clean):
        clean = clean.subset(np.sort(rng.choice(len(clean), size=settings.target_max_examples, replace=False)))
    shards = {cid: fed.client(cid) for cid in fed.client_ids()}
    shards[target], poisoned_idx = poison(
        clean, settings.backdoor_fraction, settings.backdoor_target_class, settings.trigger_size, rng
    )
    history = UpdateHistory(LocalStore(root / "store"))
    fseed = settings.federate_seed + seed
    client_train = {}
    if settings.target_local_epochs is not None:
        client_train[target] = replace(settings.train, local_epochs=settings.target_local_epochs)

    def federation(name: str, exclude: Sequence[str], fed_seed: int) -> FederationRun:
        protocol = weight_protocol("fedavg", clients_per_round=settings.clients_per_round)
        return simulate_federation(
            spec, shards, test, settings.train, settings.rounds, fed_seed, history, name, exclude=exclude,
            max_workers=settings.max_workers, protocol=protocol, client_train=client_train,
        )  # fmt: skip

    log(f"seed {seed}: original federation ({len(shards)} clients, {settings.rounds} rounds)")
    original = federation(f"original-{seed}", (), fseed)
    log(f"seed {seed}: retraining without {', '.join(targets)}")
    retrain = federation(f"retrain-{seed}", targets, fseed)

    states: dict[str, StateDict] = {"original": original.state, "retrain": retrain.state}
    seconds: dict[str, float] = {"original": original.seconds, "retrain": retrain.seconds}

    def recover(state: StateDict, logits: torch.Tensor | None, beta: float | None = None) -> StateDict:
        student = model_from_state(spec, state)
        d = settings.distill if beta is None else replace(settings.distill, beta=beta)
        if logits is None:  # no teacher: cross-entropy on the few-shot labels only
            logits = torch.zeros(len(few_shot), len(meta["class_names"]))
        distill(student, few_shot, logits, d, torch.Generator().manual_seed(seed))
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

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
    clip_logits = teacher_logits(fitted, backbone, few_shot, cache)

    # Each method forgets the targets one after another, as production would: every
    # deletion starts from the previous one's result (its manifest chains the lineage).
    def chain(
        method: str, variant: str, recovery: Callable[[StateDict, StateDict], StateDict] | None
    ) -> tuple[StateDict, float]:
        ref, manifest = original.manifest, history.read_manifest(original.manifest)
        source_state, elapsed = original.state, 0.0
        for n, client in enumerate(targets):
            t0 = time.perf_counter()
            forgotten = forget_client(history, ref, manifest, client, variant)
            final = forgotten.state if recovery is None else recovery(forgotten.state, source_state)
            elapsed += time.perf_counter() - t0
            if n + 1 < len(targets):
                ref, manifest = history.commit_unlearning(
                    request_id=f"eval-{method}-{seed}-{n}", client_id=client, variant=variant,
                    source=ref, source_version=str(n), source_manifest=manifest, removed=forgotten.removed,
                    forgotten_state=forgotten.state, final_state=final, new_sums=forgotten.new_sums,
                    round_scales=forgotten.round_scales, recovery={}, data_version="evaluation", metrics={},
                )  # fmt: skip
            source_state = final
        return final, elapsed

    def global_teacher(state: StateDict, source: StateDict) -> StateDict:
        return recover(state, teacher_logits_for(model_from_state(spec, source), few_shot.inputs()))

    recoveries = {
        "subtract": ("subtract", None),
        "finetune": ("subtract", lambda state, _: recover(state, None, beta=0.0)),
        "kd-global": ("subtract", global_teacher),
        "kd-clip": ("subtract", lambda state, _: recover(state, clip_logits)),
        "renormalise": ("renormalise", lambda state, _: recover(state, clip_logits)),
    }
    for method, (variant, recovery) in recoveries.items():
        states[method], seconds[method] = chain(method, variant, recovery)

    members_idx = np.setdiff1d(np.arange(len(clean)), poisoned_idx)
    members = clean.subset(members_idx[rng.permutation(len(members_idx))[: settings.mia_examples]])
    non_members = class_matched_sample(test, members.labels, len(members), rng)
    models = {name: model_from_state(spec, state) for name, state in states.items()}
    shadows = []
    for k in range(settings.mia_shadows):  # OUT models: the same federation without the targets, other seeds
        log(f"seed {seed}: shadow federation {k + 1}/{settings.mia_shadows} for the calibrated attack")
        shadows.append(model_from_state(spec, federation(f"shadow-{seed}-{k}", targets, fseed + 1000 * (k + 1)).state))

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
            "speedup_vs_retrain": seconds["retrain"] / max(seconds[name], 1e-9),
        }
        if shadows:
            attack = lira(model, shadows, members, non_members)
            metrics[name] |= {"lira_auc": attack["auc"], "lira_tpr_at_1fpr": attack["tpr_at_1fpr"]}
    return {
        "seed": seed,
        "target_client": target,
        "targets": targets,
        "target_examples": len(clean),
        "poisoned_examples": len(poisoned_idx),
        "mia_members": len(members),
        "clients": len(shards),
        "teacher": {**{k: float(v) for k, v in fitted.metrics.items()}, "fit_total_s": teacher_s},
        "kd_clip_seconds_with_cold_teacher": seconds["kd-clip"] + teacher_s,
        "accuracy_per_round": {"original": original.test_accuracy, "retrain": retrain.test_accuracy},
        "metrics": metrics,
    }
