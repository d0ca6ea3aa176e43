"""The ``fewshot`` suite end to end on digits with the tiny tower: rows, forgetting, report and plots."""

from __future__ import annotations

import json
import math

from components.data.datasets import load_digits_dataset
from components.evaluation.fewshot import METHODS, ROW_FIELDS, FewshotSettings, result, run_seed
from components.federation.fewshot.modes import LocalSettings
from components.models.clip_backbone import TeacherSpec
from flows.reports.fewshot import plot, render_markdown


def test_a_tiny_seed_gives_every_row_finite_and_the_report_renders(tmp_path):
    # Prepare: the quick profile shrunk (3 clients, 2 rounds, k = 2 and 3) with the tiny tower
    settings = FewshotSettings.quick(
        teacher=TeacherSpec(preset="tiny"),
        num_clients=3,
        shots=(2, 3),
        rounds=2,
        forget_shots=2,
        local=LocalSettings(steps=2, meta_steps=1, adapt_steps=1),
    )
    # Execute
    seed = run_seed(settings, load_digits_dataset(), 0, tmp_path / "work", log=lambda _: None)
    summary = result(settings, [seed], "quick")
    markdown = render_markdown(summary)
    paths = plot(summary, tmp_path / "out")
    # Assert: one row per method and k, exactly the fields, finite where they apply
    rows = summary["rows"]
    assert [(r["method"], r["shots"]) for r in rows] == [(m, k) for m in METHODS for k in (2, 3)]
    for row in rows:
        assert set(row) == {"method", "shots", *ROW_FIELDS, *(f"{n}_sd" for n in ROW_FIELDS), "seeds"}
        assert row["seeds"] == 1
        for name in ROW_FIELDS:
            value = row[name]
            not_applicable = name == "rounds_to_plateau" and row["method"] in ("local-only", "zero-shot")
            not_applicable |= name == "client_compute_s" and row["method"] == "zero-shot"
            assert (value is None) == not_applicable == (row[f"{name}_sd"] is None), (row["method"], name)
            if value is not None:
                assert math.isfinite(value) and row[f"{name}_sd"] == 0.0
        assert 0.0 <= row["client_accuracy_min"] <= row["client_accuracy_mean"] <= 1.0
    # convergence curves per round, forgetting measured against retraining for every federated method
    curve = summary["curves"]["per-device"]["2"]
    assert len(curve["update_norm"]) == 2 and all(p["mean"] > 0 for p in curve["drift_mean"])
    assert set(summary["forgetting"]) == {"linear-probe", "full", "meta", "per-device"}
    assert all(f["l2_forgotten_to_retrain"]["mean"] > 0 for f in summary["forgetting"].values())
    # the result is JSON, the report states the profile, the plots exist
    json.dumps(summary)
    assert "Profile **quick**" in markdown and "| per-device | 3 |" in markdown
    assert {p.name for p in paths} == {"accuracy_by_shots.png", "convergence_k2.png", "convergence_k3.png"}
