"""The ``robustness`` suite on tiny settings: the rows the issue asks for, DP accounting, forgetting an attacker."""

from __future__ import annotations

import math
from dataclasses import replace

from components.config.sections import ModelConfig
from components.data.datasets import load_digits_dataset
from components.evaluation.robustness import ROW_FIELDS, STRATEGIES, RobustnessSettings, run_seed, summarise
from components.learning.train import TrainSettings
from flows.reports.robustness import plot, render_markdown


def tiny() -> RobustnessSettings:
    quick = RobustnessSettings.quick()
    return replace(
        quick,
        data=replace(quick.data, num_clients=5, min_client_examples=40),
        model=ModelConfig(name="mlp", args={"hidden": 16}),
        train=TrainSettings(local_epochs=1, batch_size=32, lr=0.05),
        rounds=2,
        attacks=("scaling", "backdoor"),
        fractions=(0.0, 0.2),
        sigmas=(0.0, 1.0),
        server_epochs=1,
        forget_point=("credit", "backdoor", 0.2),
    )


def test_a_tiny_run_gives_every_row_finite_and_a_forgetting_measurement(tmp_path):
    # Prepare
    settings = tiny()
    # Execute
    seed = run_seed(settings, load_digits_dataset(), 0, tmp_path / "work", log=lambda _: None)
    result = {"config": {**settings.record(), "profile": "tiny", "seeds": 1}, **summarise([seed])}
    # Assert: the grid, with exactly the fields
    rows = [r for r in result["rows"] if r["protocol"] == "weights"]
    grid = [(s, a, f) for s in STRATEGIES for a, f in (("none", 0.0), ("scaling", 0.2), ("backdoor", 0.2))]
    assert [(r["strategy"], r["attack"], r["malicious_fraction"]) for r in rows if r["sigma"] is None] == grid
    assert [(r["strategy"], r["sigma"]) for r in rows if r["sigma"] is not None] == [("credit", 0.0), ("credit", 1.0)]
    # and the split-learning run: its link moves other bytes than the weight protocol's model, both ways
    [split] = [r for r in result["rows"] if r["protocol"] == "splitfed"]
    assert (split["strategy"], split["attack"]) == ("credit", "none") and 0 <= split["test_accuracy"] <= 1
    assert split["bytes_per_round"] != rows[0]["bytes_per_round"] and split["download_bytes_per_round"] > 0
    assert split["benign_excluded_rate"] is not None
    for row in result["rows"]:
        assert tuple(row) == ROW_FIELDS and row["seeds"] == 1
        assert row["test_accuracy_sd"] == 0.0
        for key in ("test_accuracy", "backdoor_asr", "bytes_per_round"):
            assert math.isfinite(row[key])
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["backdoor_asr"] <= 1.0
        # excluded rates: None where the rule excludes nobody (or nobody was malicious), else a rate
        for key in ("malicious_excluded_rate", "benign_excluded_rate"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
        if row["strategy"] in ("fedavg", "median", "trimmed-mean"):
            assert row["malicious_excluded_rate"] is None and row["benign_excluded_rate"] is None
        if row["strategy"] in ("krum", "fltrust", "credit"):
            assert row["benign_excluded_rate"] is not None
            assert (row["malicious_excluded_rate"] is None) == (row["attack"] == "none")
        # epsilon only where noise was added
        if not row["sigma"]:
            assert row["epsilon"] is None
        else:
            assert math.isfinite(row["epsilon"]) and row["epsilon"] > 0
    assert len({r["bytes_per_round"] for r in rows}) == 1  # every strategy uploads the same deltas
    # forgetting the backdoor attacker, against retraining without it
    forgetting = result["forgetting"]
    assert forgetting["forgotten_clients"] == 1
    assert forgetting["attribution_error"] < 1e-4  # the model is exactly its initial state plus every running sum
    for name in ("original", "forgotten", "retrain"):
        assert 0 <= forgetting[f"{name}_test_accuracy"] <= 1 and 0 <= forgetting[f"{name}_asr"] <= 1
    assert [p["sigma"] for p in result["accuracy_epsilon"]] == [0.0, 1.0]
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    assert any(t["target"].startswith("forgetting the backdoor attackers") for t in result["targets"])
    # the report renders and plots
    markdown = render_markdown(result)
    assert "| weights | Credit + DP (σ=1) | none |" in markdown and "| splitfed | Credit | none |" in markdown
    assert all(p.is_file() for p in plot(result, tmp_path / "out"))
