"""The three fine-tuning modes, written as pure functions over parameter dicts with ``torch.func``.

``linear-probe``
    The head only, on features that do not change during local training:
    ``normalize(z*)`` is computed once per round with the received
    projection and adapter, then the head is trained on it (cheap: no
    backward pass through anything but one linear layer).
``full``
    Every unfrozen parameter: projection (when the tower's is trainable),
    adapter and head, by minibatch SGD on the cached trunk features.
``meta``
    A federated meta-learner that learns an initialisation, over the same
    parameters as ``full``. ``fomaml`` is Per-FedAvg's first-order MAML step
    (Fallah et al., 2020): ``phi = theta - a * grad L(theta; D)`` (``inner_steps``
    times), then ``theta <- theta - b * grad L(phi; D')`` with ``D'`` a fresh
    batch, the gradient taken at ``phi`` and applied to ``theta``.
    ``reptile`` (Nichol et al., 2018): ``phi`` = ``inner_steps`` SGD steps from
    ``theta``, then ``theta <- theta + b * (phi - theta)``. Either way each
    client deploys ``adapt``: ``adapt_steps`` full-batch steps from the
    received initialisation on its own examples (its personal state).

Gradients are ``torch.func.grad`` of a loss evaluated with
``torch.func.functional_call``, so every step is a function of explicit
parameters: the meta step is testable against a hand computation, and
nothing is mutated in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn import functional as F

from components.federation.fewshot.model import GROUPS, group_of

Params = dict[str, torch.Tensor]
LossGrad = Callable[[Params, torch.Tensor, torch.Tensor], Params]

MODES = ("linear-probe", "full", "meta")
MODE_GROUPS = {"linear-probe": ("head",), "full": GROUPS, "meta": GROUPS}
META_ALGORITHMS = ("fomaml", "reptile")
# Device profiles: which mode a device can afford (shared with the heterogeneous-models issue).
DEVICE_MODES = {"weak": "linear-probe", "medium": "meta", "strong": "full"}


@dataclass(frozen=True)
class LocalSettings:
    """A client's local fine-tuning (the ``fewshot`` params section).

    ``steps`` minibatch steps per round for ``linear-probe`` and ``full``;
    ``meta_steps`` outer steps of ``inner_steps`` inner steps each for ``meta``
    (so a meta round costs about ``meta_steps * (inner_steps + 1)`` gradients).
    """

    steps: int = 10
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 0.0  # an L2 term (weight_decay / 2) * ||theta||^2 in the loss
    meta_algorithm: str = "fomaml"
    meta_steps: int = 4
    inner_steps: int = 2
    inner_lr: float = 0.03
    meta_lr: float = 0.1
    adapt_steps: int = 5

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.meta_steps, self.inner_steps) < 1 or self.adapt_steps < 0:
            raise ValueError("steps, batch_size, meta_steps and inner_steps must be >= 1, adapt_steps >= 0")
        if not (self.lr > 0 and self.inner_lr > 0 and self.meta_lr > 0) or self.weight_decay < 0:
            raise ValueError("learning rates must be > 0 and weight_decay >= 0")
        if self.meta_algorithm not in META_ALGORITHMS:
            raise ValueError(f"meta_algorithm must be one of {META_ALGORITHMS}, got {self.meta_algorithm!r}")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def trained_keys(keys: Sequence[str], mode: str) -> list[str]:
    """The state keys a client in ``mode`` trains (in state order)."""
    groups = MODE_GROUPS[check_mode(mode)]
    return [k for k in keys if group_of(k) in groups]


# --------------------------------------------------------------------------- pure steps


def loss_grad(module: nn.Module, frozen: Mapping[str, torch.Tensor], weight_decay: float = 0.0) -> LossGrad:
    """``grad`` of ``CE(module(x; params + frozen), y) + weight_decay / 2 * ||params||^2`` in ``params``."""

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = F.cross_entropy(functional_call(module, {**frozen, **params}, (x,)), y)
        if weight_decay:
            value = value + 0.5 * weight_decay * sum((p * p).sum() for p in params.values())
        return value

    return grad(loss)


def sgd_step(params: Params, gradient: Params, lr: float) -> Params:
    return {k: p - lr * gradient[k] for k, p in params.items()}


def fomaml_step(
    g: LossGrad, params: Params, support: Sequence[torch.Tensor], query: Sequence[torch.Tensor],
    inner_steps: int, inner_lr: float, meta_lr: float,
) -> Params:  # fmt: skip
    """One first-order MAML (Per-FedAvg FO) step: adapt on ``support``, apply the ``query`` gradient at phi."""
    adapted = params
    for _ in range(inner_steps):
        adapted = sgd_step(adapted, g(adapted, *support), inner_lr)
    return sgd_step(params, g(adapted, *query), meta_lr)


def reptile_step(
    g: LossGrad, params: Params, batches: Sequence[Sequence[torch.Tensor]], inner_lr: float, meta_lr: float
) -> Params:
    """One Reptile step: SGD over ``batches`` to phi, then ``theta + meta_lr * (phi - theta)``."""
    phi = params
    for batch in batches:
        phi = sgd_step(phi, g(phi, *batch), inner_lr)
    return {k: p + meta_lr * (phi[k] - p) for k, p in params.items()}


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Minibatch indices forever: a fresh permutation every pass over the ``n`` examples."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


# --------------------------------------------------------------------------- a client's round


@dataclass(frozen=True)
class LocalResult:
    """A client's trained parameters (its mode's keys only) and its metrics."""

    params: Params
    metrics: dict[str, float]


class ScaledHead(nn.Module):
    """``scale * head(z)``: the model's classifier alone, over already embedded features (same state keys)."""

    def __init__(self, head: nn.Module, scale: float) -> None:
        super().__init__()
        self.head = head
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(z)


def _problem(
    model: nn.Module, state: Mapping[str, torch.Tensor], features: torch.Tensor, mode: str
) -> tuple[nn.Module, torch.Tensor, Params, Params]:
    """(module, its inputs, trained params, frozen params) of ``mode``; linear-probe sees embedded features."""
    params = {k: state[k].detach().clone() for k in trained_keys(list(state), mode)}
    if mode == "linear-probe":
        model.load_state_dict(dict(state))
        with torch.no_grad():
            inputs = model.embed(features)  # fixed during local training: computed once
        return ScaledHead(model.head, getattr(model, "scale", 1.0)), inputs, params, {}
    frozen = {k: v.detach() for k, v in state.items() if k not in params}
    return model, features, params, frozen


def local_train(
    mode: str, model: nn.Module, state: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor,
    settings: LocalSettings, generator: torch.Generator,
) -> LocalResult:  # fmt: skip
    """Fine-tune from ``state`` in ``mode``; return the trained keys and metrics (``compute_s`` and counts)."""
    if len(labels) == 0:
        raise ValueError("cannot fine-tune on an empty client shard")
    start = time.perf_counter()
    module, inputs, params, frozen = _problem(model, state, features, check_mode(mode))
    g = loss_grad(module, frozen, settings.weight_decay)
    stream = batches(len(labels), settings.batch_size, generator)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        idx = next(stream)
        return inputs[idx], labels[idx]

    if mode != "meta":
        for _ in range(settings.steps):
            params = sgd_step(params, g(params, *draw()), settings.lr)
        evaluations = settings.steps
    elif settings.meta_algorithm == "fomaml":
        for _ in range(settings.meta_steps):
            params = fomaml_step(g, params, draw(), draw(), settings.inner_steps, settings.inner_lr, settings.meta_lr)
        evaluations = settings.meta_steps * (settings.inner_steps + 1)
    else:
        for _ in range(settings.meta_steps):
            inner = [draw() for _ in range(settings.inner_steps)]
            params = reptile_step(g, params, inner, settings.inner_lr, settings.meta_lr)
        evaluations = settings.meta_steps * settings.inner_steps
    compute_s = time.perf_counter() - start
    return LocalResult(
        {k: v.detach() for k, v in params.items()}, {"compute_s": compute_s, "gradient_evaluations": float(evaluations)}
    )


def full_gradient(
    mode: str, model: nn.Module, state: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor,
    weight_decay: float = 0.0,
) -> Params:  # fmt: skip
    """The full-batch gradient at ``state`` of the keys ``mode`` trains (for the dissimilarity estimate)."""
    module, inputs, params, frozen = _problem(model, state, features, check_mode(mode))
    gradient = loss_grad(module, frozen, weight_decay)(params, inputs, labels)
    return {k: v.detach() for k, v in gradient.items()}


def adapt(
    mode: str, model: nn.Module, state: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor,
    settings: LocalSettings,
) -> Params:  # fmt: skip
    """A meta client's personal model: ``adapt_steps`` full-batch steps from the initialisation ``state``."""
    module, inputs, params, frozen = _problem(model, state, features, check_mode(mode))
    g = loss_grad(module, frozen, settings.weight_decay)
    for _ in range(settings.adapt_steps):
        params = sgd_step(params, g(params, inputs, labels), settings.inner_lr)
    return {k: v.detach() for k, v in params.items()}


@torch.no_grad()
def loss_and_accuracy(
    model: nn.Module, state: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Cross-entropy and accuracy of ``state`` on (features, labels)."""
    model.load_state_dict(dict(state))
    logits = model(features)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())
