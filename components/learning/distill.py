"""Knowledge distillation of the unlearned student on the server's few-shot data.

The teacher is frozen: its logits on the distillation set are computed once,
in eval mode under ``torch.no_grad()``, before the student trains (there is no
augmentation, so per-batch teacher calls would give the same numbers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from components.data.datasets import Split
from components.learning.train import prefer_channels_last, shuffled_batches


@dataclass(frozen=True)
class DistillSettings:
    """The ``distill`` params section."""

    epochs: int = 10
    lr: float = 0.02
    momentum: float = 0.9
    batch_size: int = 32
    temperature: float = 8.0
    beta: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"distill epochs must be >= 0, got {self.epochs}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    beta: float,
) -> torch.Tensor:
    """``(1 - beta) * CE(student, labels) + beta * T^2 * KL(p_teacher^T || p_student^T)``.

    The KL term is averaged over the batch; ``T^2`` keeps its gradient scale
    independent of the temperature (Hinton et al., 2015).
    """
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - beta) * hard + beta * temperature**2 * soft


@torch.no_grad()
def teacher_logits_for(teacher: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen teacher's logits, computed in eval mode without gradients."""
    was_training = teacher.training
    teacher.eval()
    try:
        return torch.cat([teacher(chunk) for chunk in inputs.split(batch_size)]).float()
    finally:
        teacher.train(was_training)


def distill(
    student: nn.Module,
    data: Split,
    teacher_logits: torch.Tensor,
    settings: DistillSettings,
    generator: torch.Generator,
) -> dict[str, float]:
    """Train ``student`` in place towards the teacher's logits on ``data``."""
    if teacher_logits.shape[0] != len(data):
        raise ValueError(f"{teacher_logits.shape[0]} teacher logits for {len(data)} examples")
    start = time.perf_counter()
    prefer_channels_last(student)
    inputs, labels = data.inputs(), data.labels
    optimizer = torch.optim.SGD(student.parameters(), lr=settings.lr, momentum=settings.momentum)
    student.train()
    last = math.nan
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for idx in shuffled_batches(len(data), settings.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = kd_loss(student(inputs[idx]), teacher_logits[idx], labels[idx], settings.temperature, settings.beta)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / count
    return {"distill_loss": last, "distill_s": time.perf_counter() - start}
