"""What a deletion can be checked with, without retraining: backdoor markers, membership inference, agreement."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from components.data.datasets import Split
from components.learning.train import evaluate, predict_logits
from components.models.students import ModelSpec, build_model

# --------------------------------------------------------------------------- backdoor marker


def apply_trigger(images: torch.Tensor, size: int) -> torch.Tensor:
    """A copy of ``images`` (uint8, N x H x W) with a white ``size`` x ``size`` square
    one pixel in from the bottom-right corner."""
    if size < 1 or size + 1 > min(images.shape[1:]):
        raise ValueError(f"trigger size {size} does not fit {tuple(images.shape[1:])} images")
    out = images.clone()
    out[:, -size - 1 : -1, -size - 1 : -1] = 255
    return out


def poison(
    split: Split, fraction: float, target_class: int, trigger_size: int, rng: np.random.Generator
) -> tuple[Split, np.ndarray]:
    """The client's data with ``fraction`` of it triggered and relabelled to ``target_class``.

    Returns the poisoned split and the indices that were poisoned.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"backdoor fraction must be in (0, 1], got {fraction}")
    n = len(split)
    chosen = np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False))
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
        want = round(share * n)
        members = np.flatnonzero(labels == cls)
        if want and len(members):
            picked.extend(rng.choice(members, size=min(want, len(members)), replace=False).tolist())
    return pool.subset(np.sort(np.array(picked, dtype=np.int64)))


def predictions(model: nn.Module, data: Split) -> torch.Tensor:
    """The predicted class of every example."""
    return predict_logits(model, data.inputs()).argmax(1)


def prediction_agreement(model: nn.Module, reference: torch.Tensor, data: Split) -> float:
    """Share of ``data`` on which ``model`` predicts what ``reference`` (predictions) says."""
    return float((predictions(model, data) == reference).float().mean())


def deletion_checks(
    model: nn.Module,
    test: Split,
    client: Split | None,
    backdoor_target_class: int | None = None,
    trigger_size: int = 3,
    mia_examples: int = 500,
) -> dict[str, float]:
    """The checks a deletion reports without retraining: accuracy, the client's data, markers.

    With a backdoor marker configured, the attack success rate on triggered
    test images; with the client's data at hand, its accuracy and a
    membership-inference attack on it (vs class-matched held-out examples; the
    same members and non-members before and after, from a fixed seed).
    """
    out = {"test_accuracy": evaluate(model, test)["accuracy"]}
    if backdoor_target_class is not None:
        out["backdoor_asr"] = attack_success_rate(model, test, backdoor_target_class, trigger_size)
    if client is not None:
        out["forgotten_client_accuracy"] = evaluate(model, client)["accuracy"]
        rng = np.random.default_rng(0)
        members = client.subset(rng.permutation(len(client))[:mia_examples])
        mia = membership_inference(model, members, class_matched_sample(test, members.labels, len(members), rng))
        out |= {"forgotten_client_mia_auc": mia["mia_auc"], "forgotten_client_mia_advantage": mia["mia_advantage"]}
    return out


def model_from_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = build_model(spec)
    model.load_state_dict(dict(state))
    return model.eval()
