"""Prefect flow ``teacher``: the CLIP-Adapter teacher for the current few-shot data.

A teacher depends only on its spec and the few-shot data version, never on
which client is deleted, so it is fitted once per data version and reused by
every deletion (looked up in MLflow by a key over spec + data). ``federate``
ensures one exists when it finishes, so a deletion request never waits for it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save

from components.config.runtime import Runtime
from components.config.sections import Config, load_config
from components.data.layout import FEDERATION_DIR, SERVER_DIR, FederationData, dvc_dir_hash, read_split
from components.lineage.tags import teacher_run_tags
from components.models.clip_backbone import build_backbone
from components.models.clip_teacher import FeatureCache, fit_teacher, teacher_logits
from flows.tracking import Tracker

TEACHER_ARTIFACT = "teacher/head.safetensors"
TEACHER_LOGITS_ARTIFACT = "teacher/few_shot_logits.safetensors"


@task(name="fit-teacher", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def teacher_task(
    tracker: Tracker, config: Config, runtime: Runtime, data_version: str, refit: bool = False
) -> tuple[str, dict[str, float], torch.Tensor]:
    """Reuse a teacher fitted for the same spec and few-shot data, else fit and log one.

    Returns the teacher run id, its fit metrics and its logits on the few-shot
    set. The logits depend only on what the reuse key covers, so they are kept
    with the run: a reused teacher needs no backbone at all.
    """
    logger = get_run_logger()
    spec = config.teacher.spec()
    data_dir = runtime.data_dir(config.profile)
    federation = FederationData(data_dir / FEDERATION_DIR)
    class_names = tuple(federation.meta["class_names"])
    key = spec.fit_key(data_version, class_names)
    run_id = None if refit else tracker.find_run(kind="teacher", teacher_key=key)
    if run_id is not None:
        logits = load_file(tracker.download(run_id, TEACHER_LOGITS_ARTIFACT))["logits"]
        logger.info("reusing teacher run %s (key %s)", run_id, key)
        return run_id, tracker.run_metrics(run_id), logits
    few_shot = read_split(data_dir / SERVER_DIR / "few_shot.safetensors")
    test = federation.test()
    test = test.subset(range(min(config.teacher.test_subset, len(test))))
    cache = FeatureCache(runtime.cache_dir / "teacher-features")
    backbone = build_backbone(spec)
    fitted = fit_teacher(spec, backbone, few_shot, class_names, test, cache)
    logits = teacher_logits(fitted, backbone, few_shot, cache)
    run_id = tracker.start_run(
        f"teacher-{spec.preset}-{key[:8]}",
        tags=teacher_run_tags(key=key, preset=spec.preset, data_version=data_version),
    )
    tracker.log_params(run_id, {f"teacher.{k}": v for k, v in asdict(spec).items()})
    tracker.log_metrics(run_id, fitted.metrics, step=0)
    tracker.log_bytes(run_id, fitted.to_bytes(), TEACHER_ARTIFACT)
    tracker.log_bytes(run_id, save({"logits": logits.contiguous()}), TEACHER_LOGITS_ARTIFACT)
    tracker.end_run(run_id)
    logger.info(
        "fitted teacher %s: few-shot val accuracy %.3f, test-subset accuracy %.3f",
        run_id, fitted.metrics["val_accuracy"], fitted.metrics.get("test_accuracy", float("nan")),
    )  # fmt: skip
    return run_id, fitted.metrics, logits


@flow(name="teacher")
def teacher(
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    project: str | None = None,
    refit: bool = False,
) -> dict[str, Any]:
    """Fit (or find) the teacher for the profile's few-shot data; return its run and metrics."""
    runtime = Runtime.from_env(project)
    config = load_config(runtime.params_path, profile, dict(overrides or {}))
    tracker = Tracker(runtime, config.registry)
    data_version = dvc_dir_hash(runtime.data_dir(profile) / SERVER_DIR)
    existing = None if refit else tracker.find_run(kind="teacher", teacher_key=config.teacher.spec().fit_key(
        data_version, tuple(FederationData(runtime.data_dir(profile) / FEDERATION_DIR).meta["class_names"])
    ))  # fmt: skip
    run_id, metrics, _ = teacher_task(tracker, config, runtime, data_version, refit)
    return {
        "run_id": run_id,
        "reused": existing is not None,
        "preset": config.teacher.preset,
        "data_version": data_version,
        "metrics": metrics,
    }
