"""The ``distillation`` suite: soft-label federated distillation against FedAvg, and forgetting under it.

Per seed and Dirichlet alpha, on the same prepared data and initial model:

``fedavg``
    the weight protocol with FedAvg;
``soft-labels``
    plain federated distillation (FD / FedMD-style): the example-weighted mean
    of every client's soft labels on the public set D;
``soft-labels-grouped``
    clients grouped by soft-label similarity, one reliable label per group.

Measured: the global model's test accuracy, each client's own model on its own
held-out split (FedAvg's clients hold the global model), and the bytes clients
upload per round (the objects' actual sizes). At ``forget_alpha`` the grouped
method's federation forgets its largest client (re-group, re-pick, re-distil;
no teacher recovery) and is measured against retraining the protocol without
that client, in accuracy and wall time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from components.config.sections import ModelConfig
from components.core.state import StateDict
from components.data.datasets import RawDataset, Split
from components.data.layout import FederationData, PrepareSettings, prepare_data, read_public
from components.data.staging import stage_splits
from components.evaluation.unlearning import mean_std
from components.federation.logits.client import stage_public
from components.federation.logits.protocol import SoftLabels
from components.federation.logits.server import REDISTIL, SoftLabelSettings
from components.federation.protocol import Protocol
from components.federation.rounds import Federation, run_round, thread_map
from components.federation.weights.protocol import weight_protocol
from components.learning.train import TrainSettings, evaluate, torch_threads
from components.lineage.history import UpdateHistory
from components.lineage.store import LocalStore
from components.models.students import ModelSpec, init_model
from components.unlearning.verify import model_from_state

METHODS = ("fedavg", "soft-labels", "soft-labels-grouped")
# Soft-label methods as protocol settings; "soft-labels-calibrated" (not run by default) is the grouped
# method's aggregation rule without the grouping: an ablation that tells what the grouping itself adds.
SOFT_LABEL_METHODS = {
    "soft-labels": {"grouping": "none"},
    "soft-labels-grouped": {"grouping": "similarity"},
    "soft-labels-calibrated": {"grouping": "none", "group_weight": "confidence", "calibrate": True},
}
ROW_FIELDS = (
    "method",
    "alpha",
    "test_accuracy",
    "test_accuracy_sd",
    "client_accuracy_mean",
    "bytes_per_round",
    "seeds",
)


@dataclass(frozen=True)
class DistillationSettings:
    """One profile of the suite. Defaults are the full profile; :meth:`quick` is the CI smoke test."""

    data: PrepareSettings = field(default_factory=lambda: PrepareSettings(
        dataset="fashion-mnist", num_clients=10, alpha=0.1, shots=10, seed=42, min_client_examples=50,
        max_train_examples=12000, test_size=2000, public_size=1000, client_holdout=0.2,
    ))  # fmt: skip
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="cnn", args={"channels": [16, 32], "hidden": 128})
    )
    train: TrainSettings = field(default_factory=lambda: TrainSettings(local_epochs=1, batch_size=32, lr=0.05))
    soft_labels: SoftLabelSettings = field(default_factory=SoftLabelSettings)
    rounds: int = 10
    alphas: tuple[float, ...] = (0.1, 0.5)
    methods: tuple[str, ...] = METHODS
    forget_alpha: float | None = 0.1  # None: no forgetting measurement
    target_client: str | None = None  # None: the client with the most training data
    max_workers: int = 2
    federate_seed: int = 0

    @classmethod
    def quick(cls) -> DistillationSettings:
        """Digits, 6 clients, 6 rounds, one seed: about a minute on 2 cores."""
        return cls(
            data=PrepareSettings(
                dataset="digits",
                num_clients=6,
                alpha=0.1,
                shots=2,
                seed=42,
                min_client_examples=20,
                public_size=400,
                client_holdout=0.2,
            ),
            model=ModelConfig(name="mlp", args={"hidden": 64}),
            train=TrainSettings(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9),
            soft_labels=SoftLabelSettings(client_epochs=2, server_epochs=3, forget_epochs=10, batch_size=32),
            rounds=6,
        )

    def profile(self) -> dict[str, Any]:
        """What the report states next to the results."""
        return {
            "dataset": self.data.dataset, "clients": self.data.num_clients, "rounds": self.rounds,
            "alphas": list(self.alphas), "public_size": self.data.public_size,
            "max_train_examples": self.data.max_train_examples, "model": self.model.model_dump(),
            "train": asdict(self.train), "soft_labels": asdict(self.soft_labels), "forget_alpha": self.forget_alpha,
        }  # fmt: skip


@dataclass
class Run:
    """One federation of the suite."""

    state: StateDict = field(repr=False)
    manifest: Any
    personal: Mapping[str, Any]
    test_accuracy: list[float]
    upload_bytes: list[int]  # all clients, per round
    download_bytes: list[int]
    seconds: float


def protocol_for(method: str, settings: DistillationSettings, public: Any, spec: ModelSpec) -> Protocol:
    """The protocol a method of the suite runs."""
    if method == "fedavg":
        return weight_protocol("fedavg")
    if method not in SOFT_LABEL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from fedavg, {', '.join(SOFT_LABEL_METHODS)}")
    return SoftLabels(public, spec, replace(settings.soft_labels, **SOFT_LABEL_METHODS[method]))


def federate(
    protocol: Protocol, spec: ModelSpec, shards: Mapping[str, Split], test: Split, settings: DistillationSettings,
    seed: int, history: UpdateHistory, federation_id: str, exclude: Sequence[str] = (),
) -> Run:  # fmt: skip
    """Rounds of ``protocol`` through the production round function, clients in threads."""
    started = time.perf_counter()
    clients = sorted(c for c in shards if c not in set(exclude))
    state = init_model(spec, seed).state_dict()
    head = history.write_initial(federation_id, state, spec, seed)
    staged = stage_splits(history.store, {c: shards[c] for c in clients}, federation_id)
    federation = Federation(federation_id, history, history.store.url, spec, settings.train, seed, "evaluation",
                            staged, {c: len(shards[c]) for c in clients})  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // settings.max_workers)
    rng, server_state, result = np.random.default_rng([seed, 0]), None, None
    accuracy, up, down = [], [], []
    for _ in range(settings.rounds):
        with torch_threads(threads):
            result = run_round(protocol, federation, head, state, server_state, clients, rng,
                               thread_map(settings.max_workers))  # fmt: skip
        head, state, server_state = result.head, result.state, result.outcome.server_state
        comm = result.outcome.record.get("communication")
        up.append(sum(int(r.upload.size or 0) for r in result.replies))
        down.append(sum(comm["download_bytes"].values()) if comm else up[-1])  # FedAvg: the model, both ways
        accuracy.append(evaluate(model_from_state(spec, state), test)["accuracy"])
    return Run(state, result.manifest_ref, dict(head.personal), accuracy, up, down, time.perf_counter() - started)


def client_accuracy(run: Run, spec: ModelSpec, holdouts: Mapping[str, Split], history: UpdateHistory) -> float:
    """Mean over clients of its own model (the global one without personal states) on its held-out split."""
    scores = []
    for cid, holdout in holdouts.items():
        ref = run.personal.get(cid)
        state = history.read_state(ref) if ref is not None else run.state
        scores.append(evaluate(model_from_state(spec, state), holdout)["accuracy"])
    return float(np.mean(scores))


def run_seed(
    settings: DistillationSettings, raw: RawDataset, seed: int, workdir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every method at every alpha for one seed, and forgetting at ``forget_alpha``; raw numbers."""
    out: dict[str, Any] = {"seed": seed, "runs": [], "forgetting": None}
    for alpha in settings.alphas:
        root = Path(workdir) / f"seed-{seed}" / f"alpha-{alpha}"
        prepare_data(replace(settings.data, alpha=alpha, seed=settings.data.seed + seed), root / "data", raw)
        fed = FederationData(root / "data" / "federation")
        spec = settings.model.spec(len(fed.meta["class_names"]), tuple(fed.meta["image_shape"]))
        shards = {cid: fed.client(cid) for cid in fed.client_ids()}
        holdouts = {cid: fed.holdout(cid) for cid in fed.client_ids()}
        test = fed.test()
        history = UpdateHistory(LocalStore(root / "store"))
        public = stage_public(history.store, read_public(root / "data"), f"public-{seed}")
        fseed = settings.federate_seed + seed
        runs: dict[str, Run] = {}
        for method in settings.methods:
            log(f"seed {seed}, alpha {alpha}: {method} ({len(shards)} clients, {settings.rounds} rounds)")
            protocol = protocol_for(method, settings, public, spec)
            runs[method] = run = federate(protocol, spec, shards, test, settings, fseed, history, f"{method}-{seed}")
            out["runs"].append({
                "method": method, "alpha": alpha, "test_accuracy": run.test_accuracy[-1],
                "client_accuracy_mean": client_accuracy(run, spec, holdouts, history),
                "bytes_per_round": float(np.mean(run.upload_bytes)), "download_bytes_per_round": float(np.mean(run.download_bytes)),
                "accuracy_per_round": run.test_accuracy, "seconds": run.seconds,
            })  # fmt: skip
        if alpha == settings.forget_alpha and "soft-labels-grouped" in runs:
            target = settings.target_client or max(fed.client_ids(), key=fed.num_examples)
            log(f"seed {seed}, alpha {alpha}: forgetting {target} vs retraining without it")
            original = runs["soft-labels-grouped"]
            protocol = SoftLabels(
                public, spec, replace(settings.soft_labels, **SOFT_LABEL_METHODS["soft-labels-grouped"])
            )
            out["forgetting"] = measure_forgetting(
                protocol, original, spec, shards, test, settings, fseed, history, target, f"retrain-{seed}"
            ) | {"alpha": alpha, "seed": seed}
    return out


def measure_forgetting(
    protocol: SoftLabels, original: Run, spec: ModelSpec, shards: Mapping[str, Split], test: Split,
    settings: DistillationSettings, seed: int, history: UpdateHistory, target: str, federation_id: str,
) -> dict[str, Any]:  # fmt: skip
    """Forget ``target`` from ``original`` with every re-distillation variant (no teacher recovery),
    and retrain without it: test accuracy, accuracy on the target's data, wall time."""
    manifest = history.read_manifest(original.manifest)

    def accuracy(state: StateDict, split: Split) -> float:
        return evaluate(model_from_state(spec, state), split)["accuracy"]

    out: dict[str, Any] = {"target_client": target, "default": protocol.settings.redistil}
    for mode in REDISTIL:
        variant = SoftLabels(protocol.public, spec, replace(protocol.settings, redistil=mode), protocol.architectures)
        # As many torch threads as one federation worker: more would oversubscribe a shared machine's cores.
        with torch_threads(max(1, (os.cpu_count() or 1) // settings.max_workers)):
            started = time.perf_counter()
            state = variant.forget(history, original.manifest, manifest, target, "recompute").state
            out[f"{mode}_s"] = time.perf_counter() - started
        out[f"{mode}_test_accuracy"], out[f"{mode}_target_accuracy"] = (
            accuracy(state, test),
            accuracy(state, shards[target]),
        )
    retrain = federate(protocol, spec, shards, test, settings, seed, history, federation_id, exclude=[target])
    for name, state in (("original", original.state), ("retrain", retrain.state)):
        out[f"{name}_test_accuracy"], out[f"{name}_target_accuracy"] = (
            accuracy(state, test),
            accuracy(state, shards[target]),
        )
    return out | {"original_s": original.seconds, "retrain_s": retrain.seconds}


# --------------------------------------------------------------------------- summary over seeds


def summarise(seed_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows (mean and sd over seeds), mean accuracy curves, forgetting and the issue's targets."""
    keys = list(dict.fromkeys((r["method"], r["alpha"]) for s in seed_results for r in s["runs"]))
    rows, curves, extra = [], {}, {}
    for method, alpha in keys:
        runs = [r for s in seed_results for r in s["runs"] if (r["method"], r["alpha"]) == (method, alpha)]
        mean, sd = mean_std([r["test_accuracy"] for r in runs])
        rows.append({
            "method": method, "alpha": alpha, "test_accuracy": mean, "test_accuracy_sd": sd,
            "client_accuracy_mean": float(np.mean([r["client_accuracy_mean"] for r in runs])),
            "bytes_per_round": float(np.mean([r["bytes_per_round"] for r in runs])), "seeds": len(runs),
        })  # fmt: skip
        curves[f"{method}@{alpha}"] = np.mean([r["accuracy_per_round"] for r in runs], axis=0).tolist()
        extra[f"{method}@{alpha}"] = {
            "download_bytes_per_round": float(np.mean([r["download_bytes_per_round"] for r in runs])),
            "seconds": float(np.mean([r["seconds"] for r in runs])),
        }
    forgetting = [s["forgetting"] for s in seed_results if s.get("forgetting")]
    summary = {k: float(np.mean([f[k] for f in forgetting])) for k in forgetting[0] if k.endswith(("_accuracy", "_s"))} if forgetting else None  # fmt: skip
    return {
        "rows": rows,
        "accuracy_per_round": curves,
        "runs": extra,
        "forgetting": summary,
        "targets": targets(rows, summary),
    }


def targets(rows: Sequence[Mapping[str, Any]], forgetting: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """The issue's targets, as measured (points are percentage points)."""
    by = {(r["method"], r["alpha"]): r for r in rows}
    out = []
    plain, grouped = by.get(("soft-labels", 0.1)), by.get(("soft-labels-grouped", 0.1))
    if plain and grouped:
        gap = 100 * (grouped["test_accuracy"] - plain["test_accuracy"])
        out.append(("grouped >= plain soft labels + 1 pt at alpha 0.1", f"{gap:+.2f} pt", gap >= 1.0))
    for alpha in sorted({r["alpha"] for r in rows}):
        fedavg, grouped = by.get(("fedavg", alpha)), by.get(("soft-labels-grouped", alpha))
        if fedavg and grouped:
            ratio = fedavg["bytes_per_round"] / grouped["bytes_per_round"]
            out.append((f"upload bytes per round <= 1/10 of FedAvg's (alpha {alpha})", f"1/{ratio:.1f}", ratio >= 10))
    for mode in REDISTIL if forgetting else ():
        gap = 100 * (forgetting[f"{mode}_test_accuracy"] - forgetting["retrain_test_accuracy"])
        ratio = forgetting["retrain_s"] / max(forgetting[f"{mode}_s"], 1e-9)
        out.append((f"forgetting ({mode}): test accuracy >= retrain - 1.5 pt", f"{gap:+.2f} pt", gap >= -1.5))
        out.append((f"forgetting ({mode}): time <= 1/20 of retrain", f"1/{ratio:.0f}", ratio >= 20))
    return [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in out]
