"""Choosing the recovery settings without the test set.

One federation (all clients) on a tuning seed that the evaluation does not
report (default 100), the largest client forgotten, then the obvious levers of
the CLIP-Adapter recovery swept: shots per class, adapter alpha, KD beta,
temperature and epochs. Every configuration is scored on a validation split
held out from the training data (disjoint from the clients, the few-shot set
and the test set); the test set is not read.

Usage::

    .venv/bin/python benchmarks/tune_recovery.py --profile default --rounds 10
    .venv/bin/python benchmarks/tune_recovery.py --grid speed --shots 64

``--grid teacher`` keeps the distillation settings of params and sweeps the
teacher's levers: the tower's input size (``--image-sizes``), an ensemble of
those sizes, and augmentation (``--augment``: shifted and flipped copies of the
head's training images, never of its validation split); it also retrains, and writes ``tune_recovery-<profile>-teacher.json``.

``--grid levers`` (default) sweeps shots, adapter alpha, beta, T and epochs and
writes ``benchmarks/results/tune_recovery-<profile>.json``. ``--grid speed``
keeps the teacher from params and sweeps what sets the distillation's wall time
(epochs, batch size, learning rate, T); it also retrains without the forgotten
client, so every configuration is compared with Retrain's validation accuracy,
and writes ``tune_recovery-<profile>-speed.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", type=int, default=None, help="default: evaluate.rounds")
    parser.add_argument("--seed", type=int, default=100, help="a seed the evaluation does not report")
    parser.add_argument("--validation-size", type=int, default=2000)
    parser.add_argument("--shots", default="16,32,64")
    parser.add_argument("--grid", choices=("levers", "speed", "teacher"), default="levers")
    parser.add_argument("--image-sizes", default="112,160,224", help="--grid teacher: the tower's input sizes")
    parser.add_argument("--augment", default="", help="--grid teacher: augmented copies per training image, e.g. 2,4")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    os.environ.setdefault("FEDFORGET_PROJECT", str(REPO))

    import numpy as np
    import torch

    from components.config.runtime import Runtime
    from components.config.sections import load_config
    from components.data.datasets import load_raw
    from components.data.layout import FederationData, prepare_data, read_split
    from components.evaluation.unlearning import simulate_federation
    from components.learning.distill import DistillSettings, distill, teacher_logits_for
    from components.learning.train import evaluate
    from components.lineage.history import UpdateHistory
    from components.lineage.store import LocalStore
    from components.models.clip_backbone import build_backbone
    from components.models.clip_teacher import FeatureCache, fit_teacher, teacher_logits
    from components.unlearning.forget import forget_client
    from components.unlearning.verify import model_from_state

    runtime = Runtime.from_env()
    config = load_config(runtime.params_path, args.profile)
    data_cfg = config.evaluation_data()
    rounds = args.rounds or config.evaluate.rounds
    raw = load_raw(data_cfg.dataset, runtime.raw_dir or data_cfg.raw_dir)
    work = Path(tempfile.mkdtemp(prefix="tune-"))
    cache = FeatureCache(work / "features")
    shots_grid = [int(s) for s in args.shots.split(",")]
    largest_shots = max(shots_grid)

    # One federation for every setting: data prepared with the largest few-shot set; smaller
    # sets are per-class subsets of it, so the clients' data is the same for every point.
    settings = replace(data_cfg.prepare_settings(), shots=largest_shots, seed=data_cfg.seed + args.seed,
                       validation_size=args.validation_size)  # fmt: skip
    prepare_data(settings, work / "data", raw)
    fed = FederationData(work / "data" / "federation")
    spec = config.model.spec(len(fed.meta["class_names"]), tuple(fed.meta["image_shape"]))
    validation = fed.validation()
    few_all = read_split(work / "data" / "server" / "few_shot.safetensors")
    shards = {c: fed.client(c) for c in fed.client_ids()}
    target = max(shards, key=lambda c: len(shards[c]))
    history = UpdateHistory(LocalStore(work / "store"))
    started = time.perf_counter()
    original = simulate_federation(spec, shards, validation, config.train.settings(), rounds,
                                   config.federate.seed + args.seed, history, "tune")  # fmt: skip
    print(
        f"federation: {rounds} rounds in {time.perf_counter() - started:.0f} s; "
        f"validation accuracy {original.test_accuracy[-1]:.4f}; forgetting {target}",
        flush=True,
    )
    forgotten = forget_client(history, original.manifest, history.read_manifest(original.manifest), target).state
    val_forgotten = evaluate(model_from_state(spec, forgotten), validation)["accuracy"]

    def few_shot(shots: int):
        labels = few_all.labels.numpy()
        idx = np.concatenate([np.flatnonzero(labels == c)[:shots] for c in range(len(fed.meta["class_names"]))])
        return few_all.subset(np.sort(idx))

    def recover(logits, data, d: DistillSettings) -> float:
        student = model_from_state(spec, forgotten)
        distill(student, data, logits, d, torch.Generator().manual_seed(0))
        return evaluate(student, validation)["accuracy"]

    base_teacher = config.teacher.spec()
    backbone = build_backbone(base_teacher)
    if args.grid == "teacher":
        return teacher_sweep(Setup(args, config, spec, shards, validation, rounds, target, original, val_forgotten,
                                   few_shot, forgotten, base_teacher, backbone, fed, cache))  # fmt: skip
    if args.grid == "speed":
        return speed_sweep(Setup(args, config, spec, shards, validation, rounds, target, original, val_forgotten,
                                 few_shot, forgotten, base_teacher, backbone, fed, cache))  # fmt: skip
    rows = []
    for shots in shots_grid:
        data = few_shot(shots)
        global_logits = teacher_logits_for(model_from_state(spec, original.state), data.inputs())
        for alpha in (0.2, 0.5):
            spec_t = replace(base_teacher, adapter_alpha=alpha)
            fitted = fit_teacher(spec_t, backbone, data, fed.meta["class_names"], validation, cache)
            logits = teacher_logits(fitted, backbone, data, cache)
            for beta, temperature, epochs in itertools.product((0.3, 0.5, 0.7, 0.9), (2.0, 4.0, 8.0), (10, 20, 40)):
                d = replace(config.distill.settings(), beta=beta, temperature=temperature, epochs=epochs)
                rows.append({
                    "teacher": "clip", "shots": shots, "adapter_alpha": alpha, "beta": beta, "temperature": temperature,
                    "epochs": epochs, "teacher_validation_accuracy": fitted.metrics["test_accuracy"],
                    "validation_accuracy": recover(logits, data, d),
                })  # fmt: skip
        for beta, temperature, epochs in itertools.product((0.5, 0.9), (2.0, 4.0), (20,)):
            d = replace(config.distill.settings(), beta=beta, temperature=temperature, epochs=epochs)
            rows.append({"teacher": "global-model", "shots": shots, "beta": beta, "temperature": temperature,
                         "epochs": epochs, "validation_accuracy": recover(global_logits, data, d)})  # fmt: skip
        print(
            f"shots {shots}: best clip so far {max(r['validation_accuracy'] for r in rows if r['teacher'] == 'clip'):.4f}",
            flush=True,
        )

    clip = sorted((r for r in rows if r["teacher"] == "clip"), key=lambda r: -r["validation_accuracy"])
    default = next(
        (r for r in clip if r["shots"] == data_cfg.shots and r["adapter_alpha"] == base_teacher.adapter_alpha
         and r["beta"] == config.distill.beta and r["temperature"] == config.distill.temperature
         and r["epochs"] == config.distill.epochs), None,
    )  # fmt: skip
    result = {
        "profile": args.profile, "seed": args.seed, "rounds": rounds, "target": target,
        "validation_original": original.test_accuracy[-1], "validation_after_subtraction": val_forgotten,
        "default": default, "best_clip": clip[:10],
        "best_global_model": max((r for r in rows if r["teacher"] == "global-model"), key=lambda r: r["validation_accuracy"]),
        "all": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_recovery-{args.profile}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"validation accuracy: original {result['validation_original']:.4f}, after subtraction {val_forgotten:.4f}")
    if default:
        print(f"current params: {default['validation_accuracy']:.4f}")
    for r in clip[:5]:
        print({k: r[k] for k in ("shots", "adapter_alpha", "beta", "temperature", "epochs", "validation_accuracy")})
    print(f"best with the global model as teacher: {result['best_global_model']}")
    print(f"wrote {path}")
    return 0


@dataclass
class Setup:
    """The federation, the forgotten model and the teacher's pieces every sweep starts from."""

    args: argparse.Namespace
    config: Any
    spec: Any
    shards: dict
    validation: Any
    rounds: int
    target: str
    original: Any
    val_forgotten: float
    few_shot: Any  # shots -> the few-shot subset
    forgotten: dict
    base_teacher: Any
    backbone: Any
    fed: Any
    cache: Any


def speed_sweep(setup: Setup) -> int:
    """Distillation settings by validation accuracy and wall time, next to Retrain's accuracy."""
    import torch

    args, config, spec, shards, validation = setup.args, setup.config, setup.spec, setup.shards, setup.validation
    rounds, target, original, val_forgotten = setup.rounds, setup.target, setup.original, setup.val_forgotten
    few_shot, forgotten, base_teacher, backbone = setup.few_shot, setup.forgotten, setup.base_teacher, setup.backbone
    fed, cache = setup.fed, setup.cache

    from components.evaluation.unlearning import simulate_federation
    from components.learning.distill import distill
    from components.learning.train import evaluate
    from components.lineage.history import UpdateHistory
    from components.lineage.store import LocalStore
    from components.models.clip_teacher import fit_teacher, teacher_logits
    from components.unlearning.verify import model_from_state

    started = time.perf_counter()
    remaining = {c: s for c, s in shards.items() if c != target}
    retrain = simulate_federation(spec, remaining, validation, config.train.settings(), rounds,
                                  config.federate.seed + args.seed, UpdateHistory(LocalStore(Path(tempfile.mkdtemp()))),
                                  "tune-retrain")  # fmt: skip
    retrain_s = time.perf_counter() - started
    print(f"retrain: {retrain_s:.0f} s; validation accuracy {retrain.test_accuracy[-1]:.4f}", flush=True)
    rows = []
    for shots in [int(s) for s in args.shots.split(",")]:
        data = few_shot(shots)
        fitted = fit_teacher(base_teacher, backbone, data, fed.meta["class_names"], validation, cache)
        logits = teacher_logits(fitted, backbone, data, cache)
        grid = itertools.product((5, 10, 20), (32, 64, 128), (0.01, 0.02, 0.05), (2.0, 4.0, 8.0))
        for epochs, batch_size, lr, temperature in grid:
            d = replace(config.distill.settings(), epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature)
            student = model_from_state(spec, forgotten)
            timing = distill(student, data, logits, d, torch.Generator().manual_seed(0))
            rows.append({
                "shots": shots, "epochs": epochs, "batch_size": batch_size, "lr": lr, "temperature": temperature,
                "beta": d.beta, "teacher_validation_accuracy": fitted.metrics["test_accuracy"],
                "validation_accuracy": evaluate(student, validation)["accuracy"], "distill_s": timing["distill_s"],
            })  # fmt: skip
    retrain_val = retrain.test_accuracy[-1]
    for r in rows:
        r["vs_retrain_pt"] = 100 * (r["validation_accuracy"] - retrain_val)
        r["fraction_of_retrain"] = r["distill_s"] / retrain_s
    result = {
        "profile": args.profile, "seed": args.seed, "rounds": rounds, "target": target,
        "validation_original": original.test_accuracy[-1], "validation_retrain": retrain_val,
        "validation_after_subtraction": val_forgotten, "retrain_s": retrain_s,
        "all": sorted(rows, key=lambda r: -r["validation_accuracy"]),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_recovery-{args.profile}-speed.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"validation accuracy: original {result['validation_original']:.4f}, retrain {retrain_val:.4f}, "
          f"after subtraction {val_forgotten:.4f}")  # fmt: skip
    for r in result["all"][:15]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {path}")
    return 0


def retrain_without_target(setup: Setup) -> tuple[Any, float]:
    """Retrain (no target client) on the tuning seed: its validation accuracy and wall time."""
    from components.evaluation.unlearning import simulate_federation
    from components.lineage.history import UpdateHistory
    from components.lineage.store import LocalStore

    started = time.perf_counter()
    remaining = {c: s for c, s in setup.shards.items() if c != setup.target}
    retrain = simulate_federation(setup.spec, remaining, setup.validation, setup.config.train.settings(), setup.rounds,
                                  setup.config.federate.seed + setup.args.seed,
                                  UpdateHistory(LocalStore(Path(tempfile.mkdtemp()))), "tune-retrain")  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"retrain: {elapsed:.0f} s; validation accuracy {retrain.test_accuracy[-1]:.4f}", flush=True)
    return retrain, elapsed


def augmented(data: Any, copies: int, seed: int) -> Any:
    """``copies`` randomly shifted (up to 2 px) and horizontally flipped versions of every image."""
    import torch

    from components.data.datasets import Split

    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for _ in range(copies):
        batch = data.images.clone()
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        shifts = torch.randint(-2, 3, (len(batch), 2), generator=generator)
        batch = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(0, 1)) for img, (dy, dx) in zip(batch, shifts)])
        images.append(batch)
        labels.append(data.labels)
    return Split(torch.cat(images).contiguous(), torch.cat(labels).contiguous())


def fit_augmented_teacher(spec: Any, backbone: Any, few_shot: Any, class_names: Any, test: Any, cache: Any,
                          copies: int) -> Any:  # fmt: skip
    """``fit_teacher`` with augmented copies of the head's training images (never of its validation split)."""
    import torch

    from components.models.clip_teacher import (
        AdapterHead,
        FittedTeacher,
        _accuracy_and_loss,
        fit_head,
        split_few_shot,
    )

    features = cache.get(backbone, few_shot)
    train_idx, val_idx = split_few_shot(few_shot.labels.numpy(), spec.val_fraction, spec.seed)
    extra = augmented(few_shot.subset(train_idx), copies, spec.seed)
    train_x = torch.cat([features[train_idx], cache.get(backbone, extra)])
    train_y = torch.cat([few_shot.labels[train_idx], extra.labels])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        head = AdapterHead(backbone.text_features(class_names), spec.adapter_alpha, backbone.logit_scale,
                           spec.adapter_reduction, backbone.projection)  # fmt: skip
    metrics = fit_head(head, train_x, train_y, features[val_idx], few_shot.labels[val_idx], spec)
    metrics["test_accuracy"], metrics["test_loss"] = _accuracy_and_loss(head, cache.get(backbone, test), test.labels)
    return FittedTeacher(spec, tuple(class_names), head, metrics)


def teacher_sweep(setup: Setup) -> int:
    """The teacher's levers: the tower's input size, and an ensemble of the sizes (mean of probabilities).

    Distillation settings stay those of params; every row is scored on validation next to Retrain's.
    """
    import torch

    from components.learning.distill import distill
    from components.learning.train import evaluate
    from components.models.clip_backbone import build_backbone
    from components.models.clip_teacher import fit_teacher, teacher_logits
    from components.unlearning.verify import model_from_state

    args, config = setup.args, setup.config
    retrain, _ = retrain_without_target(setup)
    retrain_val = retrain.test_accuracy[-1]
    d = config.distill.settings()

    def recover(logits, data) -> float:
        student = model_from_state(setup.spec, setup.forgotten)
        distill(student, data, logits, d, torch.Generator().manual_seed(0))
        return evaluate(student, setup.validation)["accuracy"]

    rows = []
    for shots in [int(s) for s in args.shots.split(",")]:
        data = setup.few_shot(shots)
        probabilities = []
        for size in [int(s) for s in args.image_sizes.split(",")]:
            spec_t = replace(setup.base_teacher, image_size=size)
            started = time.perf_counter()
            backbone = build_backbone(spec_t)
            fitted = fit_teacher(spec_t, backbone, data, setup.fed.meta["class_names"], setup.validation, setup.cache)
            logits = teacher_logits(fitted, backbone, data, setup.cache)
            probabilities.append(torch.softmax(logits.double(), dim=1))
            rows.append({"shots": shots, "teacher": f"tower@{size}",
                         "teacher_validation_accuracy": fitted.metrics["test_accuracy"],
                         "validation_accuracy": recover(logits, data),
                         "teacher_s": time.perf_counter() - started})  # fmt: skip
            print(rows[-1], flush=True)
        for copies in [int(c) for c in args.augment.split(",") if c]:
            started = time.perf_counter()
            fitted = fit_augmented_teacher(setup.base_teacher, setup.backbone, data, setup.fed.meta["class_names"],
                                           setup.validation, setup.cache, copies)  # fmt: skip
            logits = teacher_logits(fitted, setup.backbone, data, setup.cache)
            rows.append({"shots": shots, "teacher": f"tower@default+augment{copies}",
                         "teacher_validation_accuracy": fitted.metrics["test_accuracy"],
                         "validation_accuracy": recover(logits, data), "teacher_s": time.perf_counter() - started})  # fmt: skip
            print(rows[-1], flush=True)
        if len(probabilities) > 1:
            # log of the mean probability: distil() softens logits by T, and log-probabilities are logits
            ensemble = torch.log(torch.stack(probabilities).mean(dim=0).clamp_min(1e-12)).float()
            name = "ensemble@" + "+".join(args.image_sizes.split(","))
            rows.append({"shots": shots, "teacher": name, "teacher_validation_accuracy": None,
                         "validation_accuracy": recover(ensemble, data)})  # fmt: skip
            print(rows[-1], flush=True)
    for r in rows:
        r["vs_retrain_pt"] = 100 * (r["validation_accuracy"] - retrain_val)
    result = {
        "profile": args.profile, "seed": args.seed, "rounds": setup.rounds, "target": setup.target,
        "distill": {"epochs": d.epochs, "lr": d.lr, "temperature": d.temperature, "beta": d.beta},
        "validation_original": setup.original.test_accuracy[-1], "validation_retrain": retrain_val,
        "validation_after_subtraction": setup.val_forgotten,
        "all": sorted(rows, key=lambda r: -r["validation_accuracy"]),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_recovery-{args.profile}-teacher.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"validation accuracy: original {result['validation_original']:.4f}, retrain {retrain_val:.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
