"""The CLIP-Adapter teacher: adapter, head, fitting on cached frozen features, and its logits."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from components.data.datasets import Split
from components.models.clip_backbone import ClipBackbone, TeacherError, TeacherSpec

# --------------------------------------------------------------------------- head


class ClipAdapter(nn.Module):
    """CLIP-Adapter's bottleneck: Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> ReLU."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class AdapterHead(nn.Module):
    """The trainable part: optional projection, residual adapter, cosine classifier over prompts."""

    def __init__(
        self,
        text_features: torch.Tensor,
        alpha: float,
        logit_scale: float,
        reduction: int = 4,
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise TeacherError(f"adapter alpha must be in [0, 1], got {alpha}")
        self.projection = copy.deepcopy(projection) if projection is not None else nn.Identity()
        for p in self.projection.parameters():
            p.requires_grad_(True)
        self.adapter = ClipAdapter(text_features.shape[1], reduction)
        self.alpha = float(alpha)
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """``f* = alpha * A(f) + (1 - alpha) * f`` (before normalisation)."""
        f = self.projection(features)
        return self.alpha * self.adapter(f) + (1.0 - self.alpha) * f

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * F.normalize(self.adapt(features), dim=-1) @ self.text_features.t()


class ClipTeacher(nn.Module):
    """Frozen backbone + fitted head, as one module taking the student's inputs.

    The backbone stays in eval mode and receives no gradient even when the
    teacher is put in training mode.
    """

    def __init__(self, backbone: ClipBackbone, head: AdapterHead) -> None:
        super().__init__()
        self.backbone_model = backbone.model
        self._backbone = backbone
        self.head = head

    def train(self, mode: bool = True) -> ClipTeacher:
        super().train(mode)
        self.backbone_model.eval()
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self._backbone._features(self._backbone.preprocess(inputs)).float()
        return self.head(features)


# --------------------------------------------------------------------------- fitting


def split_few_shot(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / validation split of the few-shot set (never the test set)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction))) if len(members) > 1 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    if not val:
        raise TeacherError("the few-shot set is too small for a validation split (need >= 2 shots per class)")
    return np.sort(np.array(train)), np.sort(np.array(val))


def _accuracy_and_loss(head: AdapterHead, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = head(x)
        return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def fit_head(
    head: AdapterHead,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    spec: TeacherSpec,
) -> dict[str, float]:
    """Train the head with cross-entropy over the class prompts; keep the best validation epoch.

    Early stopping: training ends when validation accuracy (ties: lower
    validation loss) has not improved for ``spec.patience`` epochs.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    best = (-1.0, -math.inf)
    best_state = copy.deepcopy(head.state_dict())
    best_epoch, since_best, epoch = 0, 0, 0
    initial_val_accuracy, _ = _accuracy_and_loss(head.eval(), val_x, val_y)
    for epoch in range(1, spec.epochs + 1):
        head.train()
        for idx in torch.randperm(len(train_y), generator=generator).split(spec.batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(train_x[idx]), train_y[idx]).backward()
            optimizer.step()
        head.eval()
        accuracy, loss = _accuracy_and_loss(head, val_x, val_y)
        if (accuracy, -loss) > best:
            best, best_epoch, since_best = (accuracy, -loss), epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            since_best += 1
            if since_best >= spec.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    train_accuracy, _ = _accuracy_and_loss(head, train_x, train_y)
    return {
        "val_accuracy": best[0],
        "val_loss": -best[1],
        "initial_val_accuracy": initial_val_accuracy,
        "train_accuracy": train_accuracy,
        "best_epoch": float(best_epoch),
        "epochs_run": float(epoch),
        "fit_s": time.perf_counter() - start,
    }


class FeatureCache:
    """Frozen backbone features on disk, keyed by backbone identity and data bytes."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None

    def get(self, backbone: ClipBackbone, split: Split, batch_size: int = 32) -> torch.Tensor:
        if self.root is None:
            return backbone.image_features(split.inputs(), batch_size)
        digest = hashlib.sha256()
        digest.update(json.dumps(backbone.spec.backbone_identity(), sort_keys=True).encode())
        digest.update(json.dumps([backbone.spec.trains_projection, backbone.image_size]).encode())
        digest.update(split.images.numpy().tobytes())
        path = self.root / f"{digest.hexdigest()[:40]}.safetensors"
        if path.is_file():
            return load_file(path)["features"]
        features = backbone.image_features(split.inputs(), batch_size)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": features.contiguous()}, tmp)
        os.replace(tmp, path)
        return features


@dataclass
class FittedTeacher:
    """A fitted head plus the metrics of its fit."""

    spec: TeacherSpec
    class_names: tuple[str, ...]
    head: AdapterHead
    metrics: dict[str, float]

    def to_bytes(self) -> bytes:
        """The head only (adapter, projection, text features): never the frozen backbone."""
        from components.core.serialize import state_to_bytes

        meta = {
            "kind": "teacher_head",
            "spec": asdict(self.spec),
            "class_names": list(self.class_names),
            "metrics": self.metrics,
        }
        return state_to_bytes(self.head.state_dict(), meta)

    @classmethod
    def from_bytes(cls, data: bytes, backbone: ClipBackbone) -> FittedTeacher:
        from components.core.serialize import state_from_bytes

        state, meta = state_from_bytes(data)
        spec = TeacherSpec(**meta["spec"])
        head = AdapterHead(
            state["text_features"],
            spec.adapter_alpha,
            float(state["logit_scale"]),
            spec.adapter_reduction,
            backbone.projection,
        )
        head.load_state_dict(state)
        head.eval()
        return cls(spec, tuple(meta["class_names"]), head, dict(meta["metrics"]))

    def teacher(self, backbone: ClipBackbone) -> ClipTeacher:
        return ClipTeacher(backbone, self.head).eval()


def fit_teacher(
    spec: TeacherSpec,
    backbone: ClipBackbone,
    few_shot: Split,
    class_names: Sequence[str],
    test: Split | None = None,
    cache: FeatureCache | None = None,
) -> FittedTeacher:
    """Fit the head on the few-shot set (validation split for model selection).

    ``test`` (a fixed subset of the test set) is only evaluated, after the fit.
    """
    cache = cache or FeatureCache(None)
    if int(few_shot.labels.max()) >= len(class_names):
        raise TeacherError(
            f"few-shot labels go up to {int(few_shot.labels.max())} but there are {len(class_names)} class names"
        )
    start = time.perf_counter()
    features = cache.get(backbone, few_shot)
    features_s = time.perf_counter() - start
    train_idx, val_idx = split_few_shot(few_shot.labels.numpy(), spec.val_fraction, spec.seed)
    text_features = backbone.text_features(class_names)
    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights depend on the seed only
        torch.manual_seed(spec.seed)
        head = AdapterHead(
            text_features, spec.adapter_alpha, backbone.logit_scale, spec.adapter_reduction, backbone.projection
        )
    labels = few_shot.labels
    metrics = fit_head(head, features[train_idx], labels[train_idx], features[val_idx], labels[val_idx], spec)
    metrics["features_s"] = features_s
    metrics["train_examples"] = float(len(train_idx))
    metrics["val_examples"] = float(len(val_idx))
    if test is not None:
        test_features = cache.get(backbone, test)
        metrics["test_accuracy"], metrics["test_loss"] = _accuracy_and_loss(head, test_features, test.labels)
        metrics["test_examples"] = float(len(test))
    return FittedTeacher(spec, tuple(class_names), head, metrics)


def teacher_logits(
    fitted: FittedTeacher, backbone: ClipBackbone, data: Split, cache: FeatureCache | None = None
) -> torch.Tensor:
    """The frozen teacher's logits on ``data`` (head on cached backbone features, no gradients)."""
    features = (cache or FeatureCache(None)).get(backbone, data)
    fitted.head.eval()
    with torch.no_grad():
        return fitted.head(features).float()
