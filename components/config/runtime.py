"""Where things are: project, params file, store, tracking URI; read from the environment at call time."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from components.config.params import (
    find_project_root,
    params_file,
)

# --------------------------------------------------------------------------- environment


class Runtime(BaseModel):
    """Where things are, resolved from the environment at call time.

    Environment variables: ``FEDFORGET_PROJECT``, ``FEDFORGET_PARAMS``,
    ``FEDFORGET_STORE`` (``s3://bucket/prefix`` or a folder; default
    ``<project>/.fedforget/store``), ``MLFLOW_TRACKING_URI`` (default a sqlite
    file in ``<project>/.fedforget``), ``FEDFORGET_RAW_DIR``. S3 endpoints and
    credentials are read by boto3 itself (``AWS_ENDPOINT_URL_S3``, ...).
    """

    model_config = ConfigDict(frozen=True)

    root: Path
    params_path: Path
    store: str
    tracking_uri: str
    raw_dir: str | None = None
    cache: Path | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / ".fedforget"

    @property
    def default_tracking(self) -> bool:
        return self.tracking_uri == default_tracking_uri(self.root)

    @property
    def cache_dir(self) -> Path:
        """Derived data that can be rebuilt (e.g. frozen teacher features)."""
        return self.cache or self.state_dir / "cache"

    @property
    def fewshot_cache_dir(self) -> Path:
        """Frozen-tower features of the few-shot federation's shards (cleared by every deletion)."""
        return self.cache_dir / "fewshot"

    @property
    def artifact_root(self) -> Path:
        return self.state_dir / "mlartifacts"

    def data_dir(self, profile: str) -> Path:
        return self.root / "data" / profile

    @classmethod
    def from_env(cls, project: str | Path | None = None) -> Runtime:
        """Resolve from the environment; ``project`` (a folder) wins over discovery."""
        root = Path(project).expanduser().resolve() if project else find_project_root()
        params = params_file(root)
        return cls(
            root=root,
            params_path=params,
            store=os.environ.get("FEDFORGET_STORE") or str(root / ".fedforget" / "store"),
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root),
            raw_dir=os.environ.get("FEDFORGET_RAW_DIR") or None,
            cache=Path(os.environ["FEDFORGET_CACHE"]) if os.environ.get("FEDFORGET_CACHE") else None,
        )


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / '.fedforget' / 'mlflow.db'}"
