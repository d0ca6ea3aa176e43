"""Student models and their registry.

A model is described by a :class:`ModelSpec` (registry name + constructor
arguments), which travels with every archived state so a checkpoint says what
it is. New architectures are added with :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator that makes a model buildable by ``name``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


# Modules whose models register themselves on import (they import this module, so they load on first use).
BUILTIN_MODEL_MODULES = ("components.models.heads", "components.federation.fewshot.model")


def _load_builtins() -> None:
    import importlib

    for module in BUILTIN_MODEL_MODULES:
        importlib.import_module(module)


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    _load_builtins()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build and with what arguments."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": dict(self.args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(name=str(data["name"]), args=dict(data.get("args", {})))


def data_derived_args(num_classes: int, image_size: int) -> dict[str, int]:
    """The model arguments the data decides (grayscale, square images): merged under a spec's own args."""
    return {"num_classes": int(num_classes), "in_channels": 1, "image_size": int(image_size)}


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate the model described by ``spec`` (random initialisation)."""
    if spec.name not in _REGISTRY:
        _load_builtins()
    try:
        factory = _REGISTRY[spec.name]
    except KeyError:
        raise ValueError(f"unknown model {spec.name!r}; known: {available_models()}") from None
    try:
        return factory(**spec.args)
    except TypeError as exc:
        raise ValueError(f"bad arguments for model {spec.name!r}: {exc}") from None


def init_model(spec: ModelSpec, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on ``seed``.

    The global RNG is forked so that the caller's random state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


@register_model("cnn")
class CNN(nn.Module):
    """The classic FedAvg CNN (McMahan et al., 2017), sized by its arguments.

    conv5x5(c1) -> pool -> conv5x5(c2) -> pool -> fc(hidden) -> fc(num_classes).
    Defaults are the paper's 28x28 model (32, 64, 512).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        channels: tuple[int, int] | list[int] = (32, 64),
        hidden: int = 512,
    ) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for two 2x2 poolings")
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@register_model("mlp")
class MLP(nn.Module):
    """A two-layer perceptron over flattened images (a cheap baseline)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 200) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
