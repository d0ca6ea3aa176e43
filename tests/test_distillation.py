"""The KD loss against a hand computation; distillation moves the student to the teacher."""

from __future__ import annotations

import math

import pytest
import torch

from components.data.datasets import Split
from components.learning.distill import DistillSettings, distill, kd_loss, teacher_logits_for
from components.models.students import ModelSpec, init_model


def test_kd_loss_equals_a_hand_computation():
    # Prepare: one example, three classes
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 3.0, -1.0]])
    y = torch.tensor([1])
    T, beta = 2.0, 0.3
    # Execute
    loss = float(kd_loss(s, t, y, T, beta))

    # Assert
    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ce = -math.log(softmax([1.0, 2.0, 0.5])[1])
    p_t = softmax([x / T for x in (0.2, 3.0, -1.0)])
    p_s = softmax([x / T for x in (1.0, 2.0, 0.5)])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    assert loss == pytest.approx((1 - beta) * ce + beta * T * T * kl, rel=1e-6)
    assert float(kd_loss(s, t, y, T, 0.0)) == pytest.approx(ce, rel=1e-6)
    assert float(kd_loss(t, t, y, T, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_moves_the_student_towards_the_teacher():
    # Prepare: a random teacher and a differently initialised student on random images
    spec = ModelSpec("cnn", {"num_classes": 4, "image_size": 8, "channels": [4, 8], "hidden": 16})
    g = torch.Generator().manual_seed(0)
    data = Split(
        torch.randint(0, 256, (64, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 4, (64,), generator=g)
    )
    teacher, student = init_model(spec, seed=1), init_model(spec, seed=2)
    teacher.train()
    target = teacher_logits_for(teacher, data.inputs())
    assert teacher.training  # its mode is restored afterwards
    assert not target.requires_grad
    before = (student(data.inputs()).argmax(1) == target.argmax(1)).float().mean()
    # Execute: pure distillation (beta = 1)
    settings = DistillSettings(epochs=60, lr=0.05, beta=1.0, temperature=2.0)
    distill(student, data, target, settings, torch.Generator().manual_seed(0))
    # Assert
    after = (student(data.inputs()).argmax(1) == target.argmax(1)).float().mean()
    assert after > max(before, 0.8)
    with pytest.raises(ValueError, match="teacher logits"):
        distill(student, data, target[:3], settings, torch.Generator())
