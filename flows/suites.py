"""Prefect flow ``evaluate-suite``: the benchmark of one method family, over several seeds.

``fedforget evaluate <suite>`` runs one of :data:`SUITES` (plain ``fedforget
evaluate`` stays the unlearning benchmark of :mod:`flows.evaluate`). A suite is
a settings class with a full profile (its defaults, sized to about an hour on
2 cores) and a quick one (the CI smoke test), a ``run_seed`` in
``components/evaluation`` and a report in ``flows/reports``. Each seed is a
task; the result goes to ``DIR/results.json``, ``DIR/results.md``, plots and an
MLflow run tagged ``kind=evaluation, suite=<suite>``.

Settings are overridden with ``--set <suite>.<field>=<value>`` (dotted into
nested settings: ``--set distillation.data.max_train_examples=6000``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.config.params import ConfigError
from components.config.runtime import Runtime
from components.config.sections import load_config
from components.data.datasets import RawDataset, load_raw
from components.lineage.tags import evaluation_run_tags
from flows.tracking import Tracker


@dataclass(frozen=True)
class Suite:
    """How the flow drives one suite."""

    name: str
    about: str
    full: Callable[[], Any]
    quick: Callable[[], Any]
    dataset: Callable[[Any], str]
    run_seed: Callable[..., dict[str, Any]]
    result: Callable[[Any, list[dict[str, Any]], str], dict[str, Any]]
    render_markdown: Callable[[dict[str, Any]], str]
    plot: Callable[[dict[str, Any], Path], list[Path]]
    full_seeds: int = 3


def _summarised(
    record: Callable[[Any], dict[str, Any]], summarise: Callable[[list[dict[str, Any]]], dict[str, Any]]
) -> Callable[[Any, list[dict[str, Any]], str], dict[str, Any]]:
    """A suite's result: its settings' record with the profile and seed count, then its summary."""

    def result(settings: Any, seeds: list[dict[str, Any]], profile: str) -> dict[str, Any]:
        return {"config": {**record(settings), "profile": profile, "seeds": len(seeds)}, **summarise(seeds)}

    return result


def _distillation() -> Suite:
    from components.evaluation import distillation as ev
    from flows.reports import distillation as report

    result = _summarised(ev.DistillationSettings.profile, ev.summarise)
    return Suite(
        "distillation", "FedAvg vs soft labels vs grouped soft labels, and forgetting under soft labels",
        ev.DistillationSettings, ev.DistillationSettings.quick, lambda s: s.data.dataset, ev.run_seed, result,
        report.render_markdown, report.plot,
    )  # fmt: skip


def _fewshot() -> Suite:
    from components.evaluation import fewshot as ev
    from flows.reports import fewshot as report

    return Suite(
        "fewshot", "few-shot federated fine-tuning by mode vs local-only and zero-shot",
        ev.FewshotSettings, ev.FewshotSettings.quick, lambda s: s.dataset, ev.run_seed, ev.result,
        report.render_markdown, report.plot,
    )  # fmt: skip


def _heterogeneous() -> Suite:
    from components.evaluation import heterogeneous as ev
    from flows.reports import heterogeneous as report

    def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
        summary = ev.summarise(seeds)
        return {**summary, "targets": report.targets(summary), "seeds": seeds}

    result = _summarised(ev.HeterogeneousSettings.record, summarise)
    return Suite(
        "heterogeneous", "heterogeneous client models: ensemble distillation and shared base vs FedAvg",
        ev.HeterogeneousSettings, ev.HeterogeneousSettings.quick, lambda s: s.data.dataset, ev.run_seed, result,
        report.render_markdown, report.plot,
    )  # fmt: skip


def _robustness() -> Suite:
    from components.evaluation import robustness as ev
    from flows.reports import robustness as report

    result = _summarised(ev.RobustnessSettings.record, ev.summarise)
    return Suite(
        "robustness", "robust and private aggregation under attack, and forgetting an attacker",
        ev.RobustnessSettings, ev.RobustnessSettings.quick, lambda s: s.data.dataset, ev.run_seed, result,
        report.render_markdown, report.plot,
    )  # fmt: skip


SUITES: dict[str, Callable[[], Suite]] = {
    "distillation": _distillation,
    "fewshot": _fewshot,
    "heterogeneous": _heterogeneous,
    "robustness": _robustness,
}


def suite_named(name: str) -> Suite:
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; choose from unlearning, {', '.join(SUITES)}")
    return SUITES[name]()


def override_settings(settings: Any, dotted: str, value: Any) -> Any:
    """``settings`` with the field at ``dotted`` (``a.b.c``) set to ``value``; a clear error for an unknown one."""
    head, _, rest = dotted.partition(".")
    if not dataclasses.is_dataclass(settings) or head not in {f.name for f in dataclasses.fields(settings)}:
        known = ", ".join(f.name for f in dataclasses.fields(settings)) if dataclasses.is_dataclass(settings) else ""
        raise ConfigError(f"no setting {dotted!r} here" + (f"; settings: {known}" if known else ""))
    current = getattr(settings, head)
    if rest:
        new = override_settings(current, rest, value)
    elif isinstance(current, tuple) and isinstance(value, list):
        new = tuple(value)
    else:
        new = value
    try:
        return dataclasses.replace(settings, **{head: new})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {dotted}: {exc}") from None


def settings_for(suite: Suite, quick: bool, overrides: Mapping[str, Any]) -> Any:
    settings = suite.quick() if quick else suite.full()
    for key, value in overrides.items():
        prefix = f"{suite.name}."
        if not key.startswith(prefix):
            raise ConfigError(f"override {key!r}: the {suite.name} suite takes {prefix}<setting>=<value>")
        settings = override_settings(settings, key[len(prefix) :], value)
    return settings


@task(name="suite-seed", cache_policy=NO_CACHE, task_run_name="{suite_name}-seed-{seed}")
def seed_task(suite_name: str, settings: Any, raw: RawDataset, seed: int, workdir: str) -> dict[str, Any]:
    return suite_named(suite_name).run_seed(settings, raw, seed, workdir, log=get_run_logger().info)


ROW_KEYS = ("protocol", "strategy", "method", "attack", "malicious_fraction", "sigma", "alpha", "shots")


def metrics_of(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Flat MLflow metrics from result rows: ``<the row's keys>.<field>`` (means of mean/sd stats)."""
    metrics = {}
    for row in rows:
        keys = [str(row[k]) for k in ROW_KEYS if k in row]  # MLflow allows no '=' in a metric name
        for field, value in row.items():
            number = value.get("mean") if isinstance(value, Mapping) else value
            numeric = isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)
            if numeric and field not in (*ROW_KEYS, "seeds"):
                metrics[".".join([*keys, field])] = float(number)
    return metrics


@flow(name="evaluate-suite")
def suite_flow(
    suite: str,
    quick: bool = False,
    seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
    out_dir: str | None = None,
    project: str | None = None,
) -> dict[str, Any]:
    """Run ``suite`` for ``seeds`` seeds and write its results; see the module docstring."""
    logger = get_run_logger()
    runtime = Runtime.from_env(project)
    chosen = suite_named(suite)
    settings = settings_for(chosen, quick, overrides or {})
    count = seeds or (1 if quick else chosen.full_seeds)
    profile = "quick" if quick else "full"
    config = load_config(runtime.params_path, "default", {})
    raw = load_raw(chosen.dataset(settings), runtime.raw_dir or config.data.raw_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder = Path(out_dir or runtime.state_dir / "evaluation" / f"{suite}-{profile}-{stamp}")
    workdir = tempfile.mkdtemp(prefix=f"{suite}-", dir=runtime.cache_dir if runtime.cache_dir.exists() else None)
    try:
        results = [seed_task(suite, settings, raw, seed, workdir) for seed in range(count)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = chosen.result(settings, results, profile)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"results_json": folder / "results.json", "results_md": folder / "results.md"}
    files["results_json"].write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    files["results_md"].write_text(chosen.render_markdown(result))
    for path in chosen.plot(result, folder):
        files[Path(path).stem] = Path(path)
    tracker = Tracker(runtime, config.registry)
    run_id = tracker.start_run(f"evaluation-{suite}-{profile}", tags=evaluation_run_tags(suite))
    tracker.log_params(run_id, {k: json.dumps(v, default=str) for k, v in result["config"].items()})
    tracker.log_metrics(run_id, metrics_of(result.get("rows", [])), step=0)
    for path in files.values():
        tracker.log_file(run_id, path, "evaluation")
    tracker.end_run(run_id)
    logger.info("%s written to %s (MLflow run %s)", suite, folder, run_id)
    return {**result, "files": {k: str(v) for k, v in files.items()}, "run_id": run_id}
