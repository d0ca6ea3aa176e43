"""``fedforget evaluate <suite> --quick``: every method suite's CI smoke test, through the CLI as a user runs it."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.suites import SUITES, override_settings, settings_for, suite_named

ROWS = {
    "robustness": {"protocol", "strategy", "attack", "malicious_fraction", "sigma", "test_accuracy",
                   "test_accuracy_sd", "backdoor_asr", "malicious_excluded_rate", "benign_excluded_rate", "epsilon",
                   "bytes_per_round", "seeds", "download_bytes_per_round"},
    "distillation": {"method", "alpha", "test_accuracy", "test_accuracy_sd", "client_accuracy_mean",
                     "bytes_per_round", "seeds"},
    "fewshot": {"method", "shots", "client_accuracy_mean", "client_accuracy_mean_sd", "client_accuracy_min",
                "client_accuracy_min_sd", "test_accuracy", "test_accuracy_sd", "rounds_to_plateau",
                "rounds_to_plateau_sd", "client_compute_s", "client_compute_s_sd", "seeds"},
    "heterogeneous": {"method", "alpha", "test_accuracy", "test_accuracy_sd", "personalized_accuracy_mean",
                      "personalized_accuracy_mean_sd", "personalized_accuracy_min", "personalized_accuracy_min_sd",
                      "bytes_per_round", "bytes_per_round_sd", "seeds"},
}  # fmt: skip


def test_settings_overrides_reach_nested_fields_and_bad_ones_are_refused():
    # Prepare
    suite = suite_named("distillation")
    # Execute
    settings = settings_for(
        suite, True, {"distillation.rounds": 2, "distillation.data.max_train_examples": 500, "distillation.alphas": [1]}
    )
    # Assert
    assert (settings.rounds, settings.data.max_train_examples, settings.alphas) == (2, 500, (1,))
    with pytest.raises(ValueError, match="no setting 'nope'"):
        override_settings(settings, "nope", 1)
    with pytest.raises(ValueError, match=r"takes distillation\.<setting>"):
        settings_for(suite, True, {"train.lr": 0.1})


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "nosuch", "--quick"],
        ["evaluate", "distillation", "--quick", "--clients", "4"],
        ["evaluate", "fewshot", "--quick", "--set", "fewshot.nope=1"],
    ],
)
def test_bad_suite_arguments_end_in_one_line_errors(args, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("mlflow.db"))  # nothing started


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_quick_suite_writes_rows_report_plots_and_an_mlflow_run(suite, tmp_path, monkeypatch):
    # Prepare
    from tests.conftest import REPO

    monkeypatch.setenv("FEDFORGET_PROJECT", str(REPO))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("FEDFORGET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    # Execute
    result = CliRunner().invoke(app, ["evaluate", suite, "--quick", "--out", str(out), "--json"])
    # Assert: the row fields, finite numbers, the report, plots and the MLflow run
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    raw = json.loads((out / "results.json").read_text())
    assert raw["rows"] and all(set(row) == ROWS[suite] for row in raw["rows"])
    for row in raw["rows"]:
        for value in row.values():
            number = value["mean"] if isinstance(value, dict) else value
            assert not isinstance(number, float) or math.isfinite(number)
    assert raw["config"]["profile"] == "quick" and (out / "results.md").read_text().strip()
    assert list(out.glob("*.png"))
    from mlflow import MlflowClient

    run = MlflowClient(tracking).get_run(summary["run_id"])
    assert run.data.tags["suite"] == suite and run.data.tags["kind"] == "evaluation"
    assert run.data.metrics and run.info.status == "FINISHED"
