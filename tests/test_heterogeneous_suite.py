"""The heterogeneous suite on tiny settings: every row field present and finite, the report and plots written."""

from __future__ import annotations

import math
from dataclasses import replace

from components.data.datasets import load_digits_dataset
from components.evaluation.heterogeneous import METHODS, ROW_FIELDS, HeterogeneousSettings, run_seed, summarise
from components.learning.distill import DistillSettings
from components.models.clip_backbone import TeacherSpec
from flows.reports.heterogeneous import plot, render_markdown, targets

ROW_KEYS = {"method", "alpha", "test_accuracy", "personalized_accuracy_mean", "personalized_accuracy_min",
            "bytes_per_round", "seeds", *(f"{f}_sd" for f in ROW_FIELDS)}  # fmt: skip


def tiny() -> HeterogeneousSettings:
    quick = HeterogeneousSettings.quick()
    small = {"name": "cnn", "args": {"channels": [2, 4], "hidden": 8}}
    return replace(
        quick,
        data=replace(quick.data, num_clients=3, public_size=60),
        alphas=(0.1,),
        rounds=2,
        architectures={"small-cnn": small, "wide-cnn": {"name": "cnn", "args": {"channels": [4, 8], "hidden": 16}},
                       "mlp": {"name": "mlp", "args": {"hidden": 8}}},
        shared_base={"linear-head": small, "mlp-head": {"name": "cnn-mlp-head", "args": {**small["args"], "head_hidden": 4}},
                     "wide-head": {"name": "cnn-mlp-head", "args": {**small["args"], "head_hidden": 16}}},
        ensemble=replace(quick.ensemble, epochs=1, forget_epochs=1),
        distill=DistillSettings(epochs=1),
        teacher=TeacherSpec(epochs=3, patience=3, image_size=64),
        max_workers=2,
    )  # fmt: skip


def test_a_tiny_run_gives_every_row_finite_numbers_and_a_report(tmp_path):
    # Prepare
    settings = tiny()
    # Execute
    seed = run_seed(settings, load_digits_dataset(), 0, tmp_path / "work", log=lambda _: None)
    summary = summarise([seed])
    result = {"config": {**settings.record(), "profile": "tiny", "seeds": 1}, **summary}
    result["targets"] = targets(summary)
    markdown = render_markdown(result)
    files = plot(result, tmp_path / "out")
    # Assert: one row per method and alpha with exactly the fields, finite where they apply
    assert [(r["method"], r["alpha"]) for r in summary["rows"]] == [(m, 0.1) for m in METHODS]
    for row in summary["rows"]:
        assert set(row) == ROW_KEYS and row["seeds"] == 1
        for field in ROW_FIELDS:
            assert math.isfinite(row[field]) and row[f"{field}_sd"] == 0.0
        assert row["personalized_accuracy_min"] <= row["personalized_accuracy_mean"]
    by_method = {r["method"]: r for r in summary["rows"]}
    assert by_method["local-only"]["bytes_per_round"] == 0.0
    assert by_method["ensemble-distillation"]["bytes_per_round"] > 0
    # forgetting in both protocols, against retraining without the client
    assert [(f["method"], f["alpha"]) for f in summary["forgetting"]] == [
        ("ensemble-distillation", 0.1),
        ("shared-base", 0.1),
    ]
    for f in summary["forgetting"]:
        assert all(math.isfinite(v["mean"]) for k, v in f.items() if isinstance(v, dict))
        assert f["retrain_seconds"]["mean"] > 0
        assert f["recovery"] == "clip" and f["teacher_fit_seconds"]["mean"] > 0  # production's teacher recovered it
    assert "| Shared base + personal heads | 0.1 |" in markdown and "profile tiny" in markdown
    assert "CLIP-Adapter teacher" in markdown
    assert len(result["targets"]) == 5 and all(p.stat().st_size > 5_000 for p in files)


def test_an_unknown_recovery_is_refused_when_the_profile_is_built():
    import pytest

    with pytest.raises(ValueError, match="recovery must be one of clip, finetune, global-model, none"):
        replace(HeterogeneousSettings.quick(), recovery="teacher")
