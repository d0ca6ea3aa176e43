"""MLflow adapter: experiment runs and the model registry.

The only module that talks to MLflow. Components never see it; flows call it
through :class:`Tracker`. Everything goes through ``MlflowClient`` with explicit
run ids (MLflow's fluent "active run" is thread-local, and tasks run in worker
threads), except ``log_model`` which needs the fluent API and is only called
from the flow's own thread, with the run id passed explicitly.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config.runtime import Runtime
from components.config.sections import RegistryConfig
from components.models.students import ModelSpec, build_model

# What a registered model needs to be loaded elsewhere (no requirement inference:
# it costs seconds per call, see ENVIRONMENT.md).
MODEL_PIP_REQUIREMENTS = (f"torch=={torch.__version__.split('+')[0]}",)

_QUIET = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version and its tags."""

    name: str
    version: str
    tags: Mapping[str, str]
    run_id: str | None
    source: str

    @property
    def number(self) -> int:
        return int(self.version)


class Tracker:
    """Tracking and registry for one project runtime."""

    def __init__(self, runtime: Runtime, registry: RegistryConfig) -> None:
        for key, value in _QUIET.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.runtime = runtime
        self.registry = registry
        self._mlflow = mlflow
        if runtime.default_tracking:
            runtime.state_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(runtime.tracking_uri)
        self.client = MlflowClient(tracking_uri=runtime.tracking_uri)
        self.experiment_id = self._experiment_id()

    @property
    def tracking_uri(self) -> str:
        return self.runtime.tracking_uri

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.registry.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self.runtime.default_tracking:
            # Keep artifacts next to the embedded database, not in the caller's cwd.
            location = self.runtime.artifact_root.as_uri()
        try:
            return self.client.create_experiment(self.registry.experiment, artifact_location=location)
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(self.registry.experiment)
            if found is None:
                raise
            return found.experiment_id

    # ---- runs
    def start_run(self, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, run_id: str, figure: Any, file_name: str) -> None:
        self.client.log_figure(run_id, figure, file_name)

    def log_dict(self, run_id: str, data: Mapping[str, Any], file_name: str) -> None:
        self.client.log_dict(run_id, dict(data), file_name)

    def log_text(self, run_id: str, text: str, file_name: str) -> None:
        self.client.log_text(run_id, text, file_name)

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        """Log ``data`` as the artifact ``artifact_file`` (e.g. ``teacher/head.safetensors``)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), folder or None)

    # ---- registry
    def register_model(
        self,
        run_id: str,
        spec: ModelSpec,
        state: Mapping[str, torch.Tensor],
        input_shape: tuple[int, ...],
        artifact_name: str,
        tags: Mapping[str, str],
    ) -> VersionInfo:
        """Log ``state`` as an MLflow PyTorch model and register it with ``tags``.

        The model is exported in MLflow 3's default ``pt2`` format, so it loads
        with ``mlflow.pytorch.load_model`` without FedForget's code. The input
        example has a batch of two so the exported batch size stays dynamic.
        """
        import mlflow.pytorch

        model = build_model(spec)
        model.load_state_dict(dict(state))
        model.eval()
        example = torch.zeros((2, *input_shape)).numpy()
        # Created here so the model's artifacts live with this experiment (the fluent API
        # would file it under the Default experiment, in ./mlruns of the caller's cwd).
        logged = self.client.create_logged_model(self.experiment_id, name=artifact_name, source_run_id=run_id)
        with warnings.catch_warnings():  # pt2 packaging of constants (a few-shot model's frozen tower): harmless
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            info = mlflow.pytorch.log_model(
                model,
                name=artifact_name,
                input_example=example,
                pip_requirements=list(MODEL_PIP_REQUIREMENTS),
                run_id=run_id,
                model_id=logged.model_id,
            )
        self._ensure_registered_model()
        version = self.client.create_model_version(
            self.registry.model_name,
            source=info.model_uri,
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            model_id=info.model_id,
        )
        return VersionInfo(
            name=version.name,
            version=str(version.version),
            tags=dict(version.tags or tags),
            run_id=run_id,
            source=info.model_uri,
        )

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.registry.model_name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.registry.model_name)
            except MlflowException as exc:  # created concurrently
                if "ALREADY_EXISTS" not in str(exc.error_code):
                    raise

    def set_alias(self, version: str, alias: str | None = None) -> None:
        self.client.set_registered_model_alias(self.registry.model_name, alias or self.registry.champion_alias, version)

    def version(self, version: str | int) -> VersionInfo | None:
        """A registered version, or ``None`` if the model or the version does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.registry.model_name, str(version))
        except MlflowException:
            return None
        return VersionInfo(mv.name, str(mv.version), dict(mv.tags), mv.run_id, mv.source)

    def model_names(self) -> list[str]:
        """Every registered model in this tracking store."""
        return sorted(m.name for m in self.client.search_registered_models())

    def missing(self, what: str, profiles: Mapping[str, str]) -> str:
        """An error message for a version or alias that does not exist, naming what does.

        ``profiles`` maps each registered model name to the params profile that uses it.
        """
        names = self.model_names()
        here = ", ".join(f"{n} (--profile {profiles[n]})" if n in profiles else n for n in names) or "none yet"
        return (
            f"{self.registry.model_name} has no {what}. Registered models here: {here}; "
            f"run `fedforget federate` first, or pick the profile that registered the model you mean"
        )

    def alias(self, alias: str | None = None) -> VersionInfo | None:
        """The version an alias points at, or ``None`` if the alias (or model) is unset."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.registry.model_name, alias or self.registry.champion_alias)
        except MlflowException:
            return None
        return VersionInfo(mv.name, str(mv.version), dict(mv.tags), mv.run_id, mv.source)

    def versions(self) -> list[VersionInfo]:
        """All versions of the registered model, oldest first."""
        found = self.client.search_model_versions(f"name = '{self.registry.model_name}'")
        out = [VersionInfo(mv.name, str(mv.version), dict(mv.tags), mv.run_id, mv.source) for mv in found]
        return sorted(out, key=lambda v: v.number)

    def find_versions(self, **tags: str) -> list[VersionInfo]:
        """Versions whose tags equal all of ``tags`` (oldest first)."""
        return [v for v in self.versions() if all(v.tags.get(k) == val for k, val in tags.items())]

    def find_run(self, **tags: str) -> str | None:
        """The newest finished run of this experiment carrying all of ``tags``."""
        clauses = [f"tags.{k} = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
        runs = self.client.search_runs(
            [self.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def failed_runs(self, kind: str, unless_tag: str) -> list[tuple[str, dict[str, str]]]:
        """Runs of ``kind`` that ended FAILED and do not carry ``unless_tag`` yet."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.kind = '{kind}' and attributes.status = 'FAILED'", max_results=1000
        )
        return [(r.info.run_id, dict(r.data.tags)) for r in runs if unless_tag not in r.data.tags]

    def download(self, run_id: str, artifact_path: str) -> Path:
        """A local copy of one artifact of a run."""
        folder = Path(tempfile.mkdtemp(prefix="fedforget-artifact-"))
        return Path(self.client.download_artifacts(run_id, artifact_path, str(folder)))

    def _model_artifacts(self, version: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        found = self.version(version)
        if found is None or not found.source.startswith("models:/"):
            return None
        logged = self.client.get_logged_model(found.source.split("/", 1)[1].lstrip("/"))
        return get_artifact_repository(logged.artifact_location)

    def model_artifacts(self, version: str) -> list[str]:
        """The files of a version's logged model (empty once its weights are retired)."""
        repo = self._model_artifacts(version)
        return [] if repo is None else [f.path for f in repo.list_artifacts()]

    def retire_weights(self, version: str) -> list[str]:
        """Delete a version's model artifacts, keeping its registry entry, tags and lineage.

        Returns the artifact paths that were deleted (none if already retired).
        """
        repo = self._model_artifacts(version)
        paths = [] if repo is None else [f.path for f in repo.list_artifacts()]
        if paths:
            repo.delete_artifacts()
        return paths

    def served_weights(self, version: str, keys: list[str] | None = None) -> str | None:
        """The digest (:func:`~components.core.state.weights_digest`) of the weights the registry serves for
        ``version``, loaded from its logged model as any consumer would, over ``keys`` (default: all);
        ``None`` when the version has no weights (retired)."""
        import mlflow.pytorch

        from components.core.state import weights_digest

        found = self.version(version)
        if found is None or not self.model_artifacts(version):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served = mlflow.pytorch.load_model(found.source).state_dict()
        return weights_digest(served, keys)

    def set_version_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.registry.model_name, version, key, value)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)
