"""The soft-label client step, the public set D in the store, and distillation towards soft labels.

A client keeps its own model across rounds (its personal state; the first
round starts from the global initial state, or from its own architecture's
initialisation). Each round, in the order of the method's stages:

1. **fit** the previous round's consensus on D (that round's stage 5; it runs
   here because the client step is the client's only turn);
2. **train** locally on its shard;
3. **predict** soft labels on D at temperature T and upload them, with its new
   personal state.

Fitting before training keeps the uploaded labels the client's own knowledge:
fitted last, the model would mostly echo the consensus back, and the grouping
would have nothing to tell apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from components.core.ids import validate_id
from components.core.refs import ObjectRef
from components.core.serialize import state_from_bytes, state_to_bytes
from components.data.datasets import Split
from components.federation.client import load_shard
from components.federation.protocol import ClientReply, ClientTask
from components.learning.distill import DistillSettings, distill
from components.learning.train import predict_logits, train_client
from components.lineage.store import ObjectStore, open_store
from components.models.students import build_model, init_model

PRECISIONS = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FitSettings:
    """How a model distils soft labels on D (clients and server alike)."""

    temperature: float = 1.0
    beta: float = 0.9  # weight of the soft (KL) term; the rest is CE on the consensus' argmax
    epochs: int = 2
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64

    def distill_settings(self, epochs: int | None = None) -> DistillSettings:
        return DistillSettings(epochs if epochs is not None else self.epochs, self.lr, self.momentum,
                               self.batch_size, self.temperature, self.beta)  # fmt: skip


# --------------------------------------------------------------------------- the public set D


def public_key(data_version: str) -> str:
    return f"datasets/{validate_id(data_version.removesuffix('.dir'), 'data version')}/public.safetensors"


def stage_public(store: ObjectStore, images: torch.Tensor, data_version: str) -> ObjectRef:
    """Put the unlabeled public set D (uint8, N x H x W) into the store (write-once)."""
    if images.dtype != torch.uint8 or images.dim() != 3 or len(images) == 0:
        raise ValueError("the public set must be a non-empty uint8 tensor of shape N x H x W")
    return store.put(public_key(data_version), save({"images": images.contiguous()}), overwrite=False)


@lru_cache(maxsize=4)
def _public_images(store_url: str, key: str, sha256: str, size: int | None) -> torch.Tensor:
    return load(open_store(store_url).get_verified(ObjectRef(key, sha256, size)))["images"]


def load_public(store_url: str, ref: ObjectRef) -> torch.Tensor:
    """D's images, hash-checked (cached: every client of a process reads the same D)."""
    return _public_images(store_url, ref.key, ref.sha256, ref.size)


# --------------------------------------------------------------------------- soft labels


def soft_labels(model: nn.Module, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities at ``temperature`` on uint8 ``images`` (float32, N x C)."""
    inputs = images.float().div_(255.0).unsqueeze(1)
    return torch.softmax(predict_logits(model, inputs) / temperature, dim=1)


def labels_to_bytes(probs: torch.Tensor, precision: str, metadata: Mapping[str, Any]) -> bytes:
    return state_to_bytes({"probs": probs.to(PRECISIONS[precision])}, metadata)


def labels_from_bytes(data: bytes) -> torch.Tensor:
    """Soft labels as float32 probabilities (stored in float16 or float32)."""
    return state_from_bytes(data)[0]["probs"].float()


def fit_soft_labels(
    model: nn.Module,
    images: torch.Tensor,
    probs: torch.Tensor,
    settings: FitSettings,
    generator: torch.Generator,
    epochs: int | None = None,
) -> dict[str, float]:
    """Distil ``probs`` (probabilities at T on ``images``) into ``model``, in place.

    The loss is the project's :func:`~components.learning.distill.kd_loss`: the
    teacher's "logits" are ``T log p`` (whose softmax at T is ``p`` again) and
    the hard labels the consensus' argmax.
    """
    teacher = settings.temperature * probs.float().clamp_min(1e-8).log()
    data = Split(images, probs.argmax(dim=1).to(torch.int64))
    return distill(model, data, teacher, settings.distill_settings(epochs), generator)


# --------------------------------------------------------------------------- the client step


def fit_settings_from(settings: Mapping[str, Any]) -> FitSettings:
    return FitSettings(**{f.name: settings[f.name] for f in fields(FitSettings) if f.name in settings})


def _start_model(task: ClientTask, store: ObjectStore) -> nn.Module:
    """The client's own model: its last personal state, else the global initial state or its own init."""
    if task.personal is None and task.settings.get("init", "global") == "own":
        # Its own architecture: an initialisation of its own, reproducible from the protocol's seed.
        return init_model(task.model, seed=int(task.settings.get("init_seed", 0)))
    model = build_model(task.model)
    start = task.personal if task.personal is not None else task.base
    model.load_state_dict(state_from_bytes(store.get_verified(start))[0])
    return model


def train_soft_label_client(task: ClientTask) -> ClientReply:
    """Fit the last consensus, train locally, upload soft labels on D and the new personal state."""
    if task.threads:
        torch.set_num_threads(task.threads)
    store = open_store(task.store_url)
    fit = fit_settings_from(task.settings)
    precision = str(task.settings.get("precision", "float32"))
    public = load_public(task.store_url, task.inputs["public"])
    model = _start_model(task, store)
    generator = torch.Generator().manual_seed(task.seed)
    metrics: dict[str, float] = {}
    consensus = task.inputs.get("consensus")
    if consensus is not None and fit.epochs > 0:
        probs = labels_from_bytes(store.get_verified(consensus))
        metrics |= {f"fit_{k}": v for k, v in fit_soft_labels(model, public, probs, fit, generator).items()}
    data = load_shard(task)
    metrics |= {k: v for k, v in train_client(model, data, task.train, generator).items() if k != "num_examples"}
    probs = soft_labels(model, public, fit.temperature)
    meta = {"client_id": task.client_id, "server_round": task.server_round, "num_examples": len(data)}
    labels = store.put(
        task.object_key("soft_labels"),
        labels_to_bytes(probs, precision, {**meta, "kind": "soft_labels", "temperature": fit.temperature}),
        overwrite=False,
    )
    state = {k: v.detach() for k, v in model.state_dict().items()}
    personal = store.put(
        task.object_key("personal"),
        state_to_bytes(state, {**meta, "kind": "personal", "model": task.model.to_dict()}),
        overwrite=False,
    )
    return ClientReply(
        client_id=task.client_id,
        server_round=task.server_round,
        num_examples=len(data),
        upload=labels,
        metrics=metrics,
        objects={"soft_labels": labels, "personal": personal},
    )
