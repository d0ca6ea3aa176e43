"""Cutting a student model into a client part and a server part.

Every splittable architecture lists its forward pass as ordered *stages*, each
owning the parameters under some name prefixes. ``cut`` is the number of
stages that run on the client; the rest run on the server. The stages, run in
order, are exactly the model's ``forward``, so the two halves together are the
model (tested against ``model(x)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Stage = tuple[tuple[str, ...], Callable[[nn.Module, torch.Tensor], torch.Tensor]]

STAGES: dict[str, list[Stage]] = {
    "cnn": [
        (("conv1",), lambda m, x: m.pool(torch.relu(m.conv1(x)))),
        (("conv2",), lambda m, x: m.pool(torch.relu(m.conv2(x)))),
        (("fc1",), lambda m, x: torch.relu(m.fc1(x.flatten(1)))),
        (("fc2",), lambda m, x: m.fc2(x)),
    ],
    "mlp": [
        (("fc1",), lambda m, x: torch.relu(m.fc1(x.flatten(1)))),
        (("fc2",), lambda m, x: m.fc2(x)),
    ],
}


def check_cut(model_name: str, cut: int) -> None:
    """Refuse a cut that leaves either side without a stage."""
    if model_name not in STAGES:
        raise ValueError(f"model {model_name!r} cannot be split; splittable: {sorted(STAGES)}")
    stages = len(STAGES[model_name])
    if not 1 <= cut < stages:
        raise ValueError(f"cut must be between 1 and {stages - 1} for model {model_name!r} (stages), got {cut}")


@dataclass
class SplitModel:
    """A built model seen as ``server(client(x))`` with ``cut`` stages on the client."""

    model: nn.Module
    model_name: str
    cut: int

    def __post_init__(self) -> None:
        check_cut(self.model_name, self.cut)
        self.stages = STAGES[self.model_name]

    def client_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.stages[: self.cut], x)

    def server_forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self._run(self.stages[self.cut :], activations)

    def _run(self, stages: Sequence[Stage], x: torch.Tensor) -> torch.Tensor:
        for _, fn in stages:
            x = fn(self.model, x)
        return x


def client_prefixes(model_name: str, cut: int) -> tuple[str, ...]:
    check_cut(model_name, cut)
    return tuple(p for prefixes, _ in STAGES[model_name][:cut] for p in prefixes)


def is_client_key(key: str, prefixes: Sequence[str]) -> bool:
    """Whether a state-dict key belongs to the client part."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)
