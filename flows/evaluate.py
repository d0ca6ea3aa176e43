"""Prefect flow ``evaluate``: unlearning measured against retraining, over several seeds.

Each seed is a task: prepare the data (seeded split), plant a backdoor in the
target client's data, federate with all clients (Original) and without the
target (Retrain) from the same initial model, then forget the target three
ways (subtract only; + KD from the pre-deletion model; + KD from the
CLIP-Adapter teacher) and measure every model. The table, the raw numbers and
the plots go to a results folder and to an MLflow run (``kind=evaluation``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.config.runtime import Runtime
from components.config.sections import Config, load_config
from components.data.datasets import RawDataset, load_raw
from components.data.layout import validate_settings
from components.evaluation.unlearning import EvaluationSettings, evaluate_seed
from components.lineage.tags import evaluation_run_tags
from flows.reports.evaluation import (
    all_finite,
    plot_accuracy_per_round,
    plot_metrics,
    render_markdown,
    summarise,
    targets,
)
from flows.tracking import Tracker


def settings_for(config: Config) -> EvaluationSettings:
    data = config.evaluation_data()
    ev = config.evaluate
    return EvaluationSettings(
        data=data.prepare_settings(),
        model=config.model,
        train=config.train.settings(),
        distill=config.distill.settings(),
        teacher=config.teacher.spec(),
        teacher_test_subset=config.teacher.test_subset,
        rounds=ev.rounds,
        target_client=ev.target_client,
        backdoor_fraction=ev.backdoor_fraction,
        backdoor_target_class=ev.backdoor_target_class,
        trigger_size=ev.trigger_size,
        mia_examples=ev.mia_examples,
        max_workers=ev.max_workers,
        federate_seed=config.federate.seed,
        clients_per_round=ev.clients_per_round,
        deletions=ev.deletions,
        mia_shadows=ev.mia_shadows,
        target_max_examples=ev.target_max_examples,
        target_local_epochs=ev.target_local_epochs,
    )


@task(name="evaluate-seed", cache_policy=NO_CACHE, task_run_name="evaluate-seed-{seed}")
def seed_task(settings: EvaluationSettings, raw: RawDataset, seed: int, workdir: str) -> dict[str, Any]:
    return evaluate_seed(settings, raw, seed, workdir, log=get_run_logger().info)


@task(name="write-results", cache_policy=NO_CACHE)
def write_task(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "results_json": folder / "results.json",
        "results_md": folder / "results.md",
        "metrics_png": plot_metrics(result, folder / "metrics.png"),
        "accuracy_png": plot_accuracy_per_round(result, folder / "accuracy_per_round.png"),
    }
    files["results_json"].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    files["results_md"].write_text(render_markdown(result))
    return {k: str(v) for k, v in files.items()}


@task(name="log-evaluation", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def log_task(tracker: Tracker, result: dict[str, Any], files: dict[str, str]) -> str:
    cfg = result["config"]
    run_id = tracker.start_run(
        f"evaluation-{cfg['dataset']}-{cfg['clients']}c-{cfg['rounds']}r", tags=evaluation_run_tags("unlearning")
    )
    tracker.log_params(run_id, cfg)
    tracker.log_metrics(run_id, {
        f"{method}.{metric}": values["mean"]
        for method, metrics in result["summary"].items() for metric, values in metrics.items()
    }, step=0)  # fmt: skip
    for path in files.values():
        tracker.log_file(run_id, path, "evaluation")
    tracker.end_run(run_id)
    return run_id


@flow(name="evaluate")
def evaluate_flow(
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    out_dir: str | None = None,
    project: str | None = None,
) -> dict[str, Any]:
    """Benchmark the unlearning methods against retraining; see the module docstring."""
    logger = get_run_logger()
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile, dict(overrides or {}))
    settings = settings_for(config)
    data = config.evaluation_data()
    raw = load_raw(data.dataset, runtime.raw_dir or data.raw_dir)
    validate_settings(settings.data, raw)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder = out_dir or str(runtime.state_dir / "evaluation" / f"{profile}-{stamp}")
    workdir = tempfile.mkdtemp(prefix="evaluation-", dir=runtime.cache_dir if runtime.cache_dir.exists() else None)
    try:
        seeds = [seed_task(settings, raw, seed, workdir) for seed in range(config.evaluate.seeds)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(seeds)
    result = {
        "config": {
            "profile": profile,
            "dataset": data.dataset,
            "clients": data.num_clients,
            "alpha": data.alpha,
            "shots": data.shots,
            "rounds": config.evaluate.rounds,
            "seeds": config.evaluate.seeds,
            "target_client": config.evaluate.target_client,
            "backdoor_fraction": config.evaluate.backdoor_fraction,
            "backdoor_target_class": config.evaluate.backdoor_target_class,
            "trigger_size": config.evaluate.trigger_size,
            "clients_per_round": config.evaluate.clients_per_round,
            "deletions": config.evaluate.deletions,
            "mia_shadows": config.evaluate.mia_shadows,
            "target_max_examples": config.evaluate.target_max_examples,
            "target_local_epochs": config.evaluate.target_local_epochs,
            "teacher_preset": config.teacher.preset,
            "teacher": asdict(settings.teacher),
            "distill": config.distill.model_dump(),
            "train": config.train.model_dump(),
        },
        "seeds": seeds,
        "summary": summary,
        "targets": targets(
            summary, cold_teacher_s=float(sum(s["kd_clip_seconds_with_cold_teacher"] for s in seeds) / len(seeds))
        ),
    }
    result["all_finite"] = all_finite(result["seeds"]) and all_finite(summary)
    files = write_task(result, folder)
    tracker = Tracker(runtime, config.registry)
    run_id = log_task(tracker, result, files)
    logger.info("evaluation written to %s (MLflow run %s)", folder, run_id)
    return {**result, "files": files, "run_id": run_id}
