"""Evaluation pieces against known answers, and the quick benchmark as a smoke test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from components.data.datasets import Split
from components.evaluation.unlearning import mean_std
from components.unlearning.verify import (
    apply_trigger,
    attack_success_rate,
    class_matched_sample,
    membership_inference,
    poison,
)


def split(n: int, classes: int = 4, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 200, (n, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % classes)


class Constant(nn.Module):
    """Always predicts ``cls`` (with a given confidence per input via a lookup)."""

    def __init__(self, cls: int, classes: int = 4) -> None:
        super().__init__()
        self.cls, self.classes = cls, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.classes)
        logits[:, self.cls] = 5.0
        return logits


class TriggerDetector(nn.Module):
    """Predicts class 3 when the trigger is present, class 1 otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        triggered = x[:, 0, -3:-1, -3:-1].mean(dim=(1, 2)) > 0.99
        logits = torch.zeros(len(x), 4)
        logits[triggered, 3] = 5.0
        logits[~triggered, 1] = 5.0
        return logits


def test_trigger_is_a_white_square_near_the_corner_and_inputs_stay_untouched():
    data = split(5)
    before = data.images.clone()
    out = apply_trigger(data.images, 2)
    assert torch.equal(data.images, before)
    assert (out[:, -3:-1, -3:-1] == 255).all() and torch.equal(out[:, :5, :5], before[:, :5, :5])
    with pytest.raises(ValueError, match="does not fit"):
        apply_trigger(data.images, 8)


def test_poison_relabels_the_chosen_fraction():
    data = split(100)
    poisoned, idx = poison(data, 0.3, target_class=3, trigger_size=2, rng=np.random.default_rng(0))
    assert len(idx) == 30 and (poisoned.labels[idx] == 3).all()
    untouched = np.setdiff1d(np.arange(100), idx)
    assert torch.equal(poisoned.images[untouched], data.images[untouched])
    assert (poisoned.images[idx][:, -3:-1, -3:-1] == 255).all()


def test_attack_success_rate_on_models_with_known_behaviour():
    test = split(40)
    assert attack_success_rate(TriggerDetector(), test, target_class=3, trigger_size=2) == 1.0
    assert attack_success_rate(Constant(1), test, target_class=3, trigger_size=2) == 0.0
    assert attack_success_rate(Constant(3), test, target_class=3, trigger_size=2) == 1.0


def test_membership_inference_reads_losses():
    members, others = split(50, seed=1), split(50, seed=2)
    # A model that is right on every member (labels = index % 4 coincide) and wrong on others
    right_on_members = Constant(0)
    members = Split(members.images, torch.zeros(50, dtype=torch.int64))
    others = Split(others.images, torch.ones(50, dtype=torch.int64))
    result = membership_inference(right_on_members, members, others)
    assert result["mia_auc"] == 1.0 and result["mia_advantage"] == 1.0
    same = membership_inference(right_on_members, members, Split(others.images, torch.zeros(50, dtype=torch.int64)))
    assert same["mia_auc"] == pytest.approx(0.5) and same["mia_advantage"] == pytest.approx(0.0)


def test_class_matched_sample_follows_the_label_mix():
    pool = split(400)
    like = torch.tensor([0] * 30 + [2] * 10)
    sample = class_matched_sample(pool, like, 40, np.random.default_rng(0))
    assert np.bincount(sample.labels.numpy(), minlength=4).tolist() == [30, 0, 10, 0]


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_quick_evaluation_produces_the_table_plots_and_finite_numbers(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from tests.conftest import REPO

    monkeypatch.setenv("FEDFORGET_PROJECT", str(REPO))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FEDFORGET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["evaluate", "--quick", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["all_finite"] is True
    table = (out / "results.md").read_text()
    for label in (
        "Original",
        "Retrain",
        "Subtract only",
        "KD (global model",
        "KD (CLIP-Adapter)",
        "fine-tune on few-shot labels (no teacher)",
        "Renormalise",
        "backdoor ASR",
        "MIA AUC",
        "LiRA AUC",
        "LiRA TPR at 1% FPR",
    ):
        assert label in table
    raw = json.loads((out / "results.json").read_text())
    methods = {"original", "retrain", "subtract", "finetune", "kd-global", "kd-clip", "renormalise"}
    assert len(raw["seeds"]) == 2 and set(raw["summary"]) == methods
    assert all("lira_auc" in raw["summary"][m] for m in methods)  # the quick profile runs 2 shadow federations
    assert raw["summary"]["retrain"]["l2_to_retrain"]["mean"] == 0.0
    assert raw["summary"]["original"]["backdoor_asr"]["mean"] > raw["summary"]["retrain"]["backdoor_asr"]["mean"]
    for png in ("metrics.png", "accuracy_per_round.png"):
        assert (out / png).stat().st_size > 10_000


def test_lira_separates_members_when_the_target_model_memorised_them():
    # Prepare: a tiny model trained to memorise 40 "members"; OUT shadows never saw them
    from components.data.datasets import Split
    from components.evaluation.membership import attack_metrics, lira, lira_scores
    from components.learning.train import TrainSettings, train_client
    from components.models.students import ModelSpec, build_model

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)  # random labels: only memorisation fits them
    members, non_members, pool = (
        Split(images[:40], labels[:40]),
        Split(images[40:80], labels[40:80]),
        Split(images[80:], labels[80:]),
    )
    spec = ModelSpec("mlp", {"num_classes": 10, "image_size": 8, "hidden": 64})
    settings = TrainSettings(local_epochs=60, batch_size=20, lr=0.1, momentum=0.9)

    def trained(data: Split, seed: int):
        torch.manual_seed(seed)
        model = build_model(spec)
        train_client(model, data, settings, torch.Generator().manual_seed(seed))
        return model

    target = trained(Split(torch.cat([members.images, pool.images]), torch.cat([members.labels, pool.labels])), 1)
    shadows = [trained(pool, seed) for seed in (2, 3, 4)]
    # Execute
    attack = lira(target, shadows, members, non_members)
    blind = lira(shadows[0], shadows[1:], members, non_members)  # a model that saw neither set
    # Assert: power on the memorising model, none on an OUT model
    assert attack["auc"] > 0.9 and attack["tpr_at_1fpr"] > 0.2
    assert 0.3 < blind["auc"] < 0.7
    # the score is a z-score against the OUT distribution
    scores = lira_scores(np.array([3.0, 1.0]), np.array([[1.0, 1.0], [1.0, 1.0]]), spread=2.0)
    assert scores.tolist() == [1.0, 0.0]
    assert attack_metrics(np.array([2.0, 3.0]), np.array([0.0, 1.0]))["auc"] == 1.0
