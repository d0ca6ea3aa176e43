"""Evaluation attacks: each a pure function of a client's delta or data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.data.datasets import Split
from components.evaluation.attacks import ATTACKS, apply_data_attack, apply_update_attack
from components.unlearning.verify import poison


def delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(100, 100, generator=g), "n": torch.tensor(3)}


def split() -> Split:
    g = torch.Generator().manual_seed(1)
    return Split(torch.randint(0, 200, (20, 8, 8), dtype=torch.uint8, generator=g), torch.arange(20) % 10)


def test_sign_flip_and_scaling():
    # Prepare
    d = delta()
    before = d["w"].clone()
    # Execute
    flipped = apply_update_attack("sign-flip", d)
    scaled = apply_update_attack("scaling", d)
    tripled = apply_update_attack("scaling", d, factor=3.0)
    # Assert
    torch.testing.assert_close(flipped["w"], -before)
    torch.testing.assert_close(scaled["w"], 10 * before)
    torch.testing.assert_close(tripled["w"], 3 * before)
    assert torch.equal(d["w"], before)  # never mutated


def test_gaussian_noise_has_the_requested_std_and_is_reproducible():
    # Prepare
    d = delta()
    # Execute
    noisy = apply_update_attack("gaussian", d, torch.Generator().manual_seed(5), std=0.3)
    again = apply_update_attack("gaussian", d, torch.Generator().manual_seed(5), std=0.3)
    # Assert
    noise = (noisy["w"] - d["w"]).double()
    assert float(noise.std()) == pytest.approx(0.3, rel=0.03)
    assert torch.equal(noisy["w"], again["w"])
    assert noisy["n"].item() == 3  # integer buffers carry no noise


def test_label_flip_maps_y_to_num_classes_minus_one_minus_y():
    # Prepare
    s = split()
    # Execute
    flipped = apply_data_attack("label-flip", s, num_classes=10)
    # Assert
    assert torch.equal(flipped.labels, 9 - s.labels) and torch.equal(flipped.images, s.images)
    assert torch.equal(s.labels, torch.arange(20) % 10)
    with pytest.raises(ValueError, match="num_classes"):
        apply_data_attack("label-flip", s, num_classes=5)


def test_backdoor_is_verify_poison():
    # Prepare
    s = split()
    # Execute
    attacked = apply_data_attack("backdoor", s, np.random.default_rng(3), fraction=0.5, target_class=2, trigger_size=2)
    expected, chosen = poison(s, 0.5, 2, 2, np.random.default_rng(3))
    # Assert
    assert torch.equal(attacked.images, expected.images) and torch.equal(attacked.labels, expected.labels)
    assert len(chosen) == 10 and (attacked.labels[torch.as_tensor(chosen)] == 2).all()


def test_the_registry_names_each_attack_and_refuses_the_wrong_kind():
    assert {n: a.target for n, a in ATTACKS.items()} == {
        "sign-flip": "update", "scaling": "update", "gaussian": "update", "label-flip": "data", "backdoor": "data",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown update attack"):
        apply_update_attack("label-flip", delta())
    with pytest.raises(ValueError, match="unknown data attack"):
        apply_data_attack("telepathy", split())
