"""The ``distillation`` suite on tiny settings: every method, the rows the issue asks for, forgetting."""

from __future__ import annotations

import math
from dataclasses import replace

from components.config.sections import ModelConfig
from components.data.datasets import load_digits_dataset
from components.evaluation.distillation import METHODS, ROW_FIELDS, DistillationSettings, run_seed, summarise
from components.learning.train import TrainSettings
from flows.reports.distillation import plot, render_markdown


def tiny() -> DistillationSettings:
    quick = DistillationSettings.quick()
    return replace(
        quick,
        data=replace(quick.data, num_clients=3, public_size=100, min_client_examples=30),
        model=ModelConfig(name="mlp", args={"hidden": 16}),
        train=TrainSettings(local_epochs=1, batch_size=32, lr=0.05),
        soft_labels=replace(quick.soft_labels, client_epochs=1, server_epochs=1, forget_epochs=2),
        rounds=2,
        alphas=(0.5,),
        forget_alpha=0.5,
    )


def test_a_tiny_run_gives_every_row_finite_and_a_forgetting_measurement(tmp_path):
    # Prepare
    settings = tiny()
    # Execute
    seed = run_seed(settings, load_digits_dataset(), 0, tmp_path / "work", log=lambda _: None)
    result = {"config": {**settings.profile(), "profile": "tiny", "seeds": 1}, **summarise([seed])}
    # Assert: one row per method with exactly the fields, all finite
    rows = result["rows"]
    assert [(r["method"], r["alpha"]) for r in rows] == [(m, 0.5) for m in METHODS]
    for row in rows:
        assert tuple(row) == ROW_FIELDS and row["seeds"] == 1 and row["test_accuracy_sd"] == 0.0
        assert all(math.isfinite(row[k]) for k in ROW_FIELDS[2:])
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["client_accuracy_mean"] <= 1.0
    bytes_by = {r["method"]: r["bytes_per_round"] for r in rows}
    assert bytes_by["soft-labels"] == bytes_by["soft-labels-grouped"] > 0  # equal bytes, whatever the grouping
    # forgetting against retraining without the client, in accuracy and time
    forgetting = result["forgetting"]
    for name in ("original", "retrain", "final", "replay", "rewind"):
        assert 0 <= forgetting[f"{name}_test_accuracy"] <= 1 and forgetting[f"{name}_s"] > 0
    assert all(math.isfinite(v) for v in forgetting.values())
    assert [t["target"] for t in result["targets"]][-2:] == [
        "forgetting (rewind): test accuracy >= retrain - 1.5 pt",
        "forgetting (rewind): time <= 1/20 of retrain",
    ]
    # the report renders and plots
    assert "| Soft labels, grouped | 0.5 |" in render_markdown(result)
    assert all(p.is_file() for p in plot(result, tmp_path / "out"))
