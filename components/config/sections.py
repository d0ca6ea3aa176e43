"""Typed configuration assembled from ``params.yaml``.

``params.yaml`` is the one config source: DVC tracks its sections as stage
params, flows and the CLI validate it into the frozen models below. A profile
(``profiles.<name>`` in the file) overlays the base sections; CLI flags overlay
both as dotted overrides (``federate.rounds=3``). Endpoints and credentials are
never in this file: :class:`Runtime` reads them from the environment when asked,
never at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from components.config.params import (
    DEFAULT_PROFILE,
    ConfigError,
    Section,
    find_project_root,
    parse_override,
    read_params,
    resolve_sections,
    validate,
)
from components.data.layout import DataConfig
from components.learning.distill import DistillSettings
from components.learning.train import TrainSettings
from components.models.clip_backbone import TeacherSpec
from components.models.students import ModelSpec, available_models, data_derived_args

__all__ = [
    "DEFAULT_PROFILE", "Config", "ConfigError", "DataConfig", "build_config",
    "find_project_root", "load_config", "parse_override", "read_params",
]  # fmt: skip


class ModelConfig(Section):
    """The ``model`` section: the student architecture (sizes from the data are added)."""

    name: str = "cnn"
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in available_models():
            raise ValueError(f"unknown model {value!r}; known: {available_models()}")
        return value

    def spec(self, num_classes: int, image_shape: tuple[int, int]) -> ModelSpec:
        height, width = image_shape
        if height != width:
            raise ConfigError(f"square images expected, got {height}x{width}")
        return ModelSpec(self.name, {**data_derived_args(num_classes, height), **self.args})


class TrainConfig(Section):
    """The ``train`` section: local training of every client."""

    # Defaults are TrainSettings' own: one place to change them (besides params.yaml).
    local_epochs: int = Field(TrainSettings.local_epochs, ge=1)
    batch_size: int = Field(TrainSettings.batch_size, ge=1)
    lr: float = Field(TrainSettings.lr, gt=0)
    momentum: float = Field(TrainSettings.momentum, ge=0, lt=1)
    weight_decay: float = Field(TrainSettings.weight_decay, ge=0)

    def settings(self) -> TrainSettings:
        return TrainSettings(**self.model_dump())


class FederateConfig(Section):
    """The ``federate`` section: rounds, strategy, parallelism."""

    rounds: int = Field(5, ge=1)
    # the weight protocol's aggregation rule (components/federation/weights); strategy_args are its settings,
    # e.g. {beta: 0.2} for trimmed-mean, {num_malicious: 2} for krum, {num_groups: 2, mad_factor: 3} for credit
    # weights: clients upload weight deltas (strategy below); soft-labels: clients keep their models and upload
    # soft labels on the public set D (data.public_size), grouped by similarity (grouping) per soft_labels
    # splitfed: the model cut after split_cut stages; clients send activations, the server returns their gradients
    # ensemble-distillation / shared-base: heterogeneous client models, declared in the clients section
    # few-shot: clients fine-tune the teacher's frozen tower + adapter + head in their device's mode
    # (clients.devices), with the fewshot knobs below; the tower is the teacher section's
    protocol: Literal["weights", "soft-labels", "splitfed", "ensemble-distillation", "shared-base", "few-shot"] = (
        "weights"
    )
    split_cut: int = Field(2, ge=1)
    ensemble: dict[str, Any] = Field(default_factory=dict)  # EnsembleSettings' knobs (temperature, epochs, ...)
    shared_base: dict[str, Any] = Field(default_factory=dict)  # SharedBaseSettings' knobs (head, server_epochs, ...)
    grouping: Literal["none", "similarity"] = "similarity"
    soft_labels: dict[str, Any] = Field(default_factory=dict)  # SoftLabelSettings' knobs (T, beta, epochs...)
    # FewShotSettings' knobs: steps, lr, batch_size, meta_algorithm, meta_steps, inner_steps, inner_lr, meta_lr,
    # adapt_steps, weight_decay, default_mode, head_init, track_gradients
    fewshot: dict[str, Any] = Field(default_factory=dict)
    strategy: Literal["fedavg", "median", "trimmed-mean", "krum", "credit", "fltrust"] = "fedavg"
    strategy_args: dict[str, Any] = Field(default_factory=dict)
    # server-side DP around the strategy: clip each upload to dp_clipping_norm, add N(0, (sigma C / n)^2);
    # epsilon at dp_delta (Opacus RDP accountant over the lineage) logged per round and tagged on every version
    dp_noise_multiplier: float | None = Field(None, ge=0)
    # central: the server clips and noises the aggregate (DP-FedAvg); local: every client clips its delta and
    # adds N(0, (sigma C)^2) before upload (the noise is its own, forgotten with it; epsilon per client)
    dp_mode: Literal["central", "local"] = "central"
    dp_clipping_norm: float = Field(1.0, gt=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    clients_per_round: int | None = Field(None, ge=1)
    # failures tolerated: a round commits when at least min_fit_clients of its clients finish (null = all of
    # them); a client that raises or runs past client_timeout_s is recorded and left out of that round
    min_fit_clients: int | None = Field(None, ge=1)
    client_timeout_s: float | None = Field(None, gt=0)
    seed: int = 0
    resume: bool = True
    # continue from this registered version instead of the champion (any version whose lineage holds no
    # forgotten client, e.g. a pretrained few-shot model to fine-tune again); null = the champion
    resume_from: int | None = Field(None, ge=1)
    task_runner: Literal["threads", "processes", "dask"] = "threads"
    # dask: a scheduler's address (or FEDFORGET_DASK_ADDRESS); none: a LocalCluster of max_workers workers
    dask_address: str | None = None
    max_workers: int = Field(2, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    archive_retries: int = Field(3, ge=0)
    archive_retry_delay_s: float = Field(2.0, ge=0)
    prefit_teacher: bool = True  # fit the unlearning teacher (if missing) when a federation ends

    @model_validator(mode="after")
    def _method_is_buildable(self) -> FederateConfig:
        try:
            self.weight_strategy()
        except TypeError as exc:
            raise ValueError(f"strategy_args do not fit {self.strategy}: {exc}") from None
        try:
            self.soft_label_settings()
        except TypeError as exc:
            raise ValueError(f"soft_labels: {exc}") from None
        for name, build in (("ensemble", self.ensemble_settings), ("shared_base", self.shared_base_settings),
                            ("fewshot", self.fewshot_settings)):  # fmt: skip
            try:
                build()
            except TypeError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    def local_dp(self) -> dict[str, float] | None:
        """Clients' clipping norm and noise multiplier under ``dp_mode: local`` (else ``None``)."""
        if self.dp_mode != "local" or self.dp_noise_multiplier is None:
            return None
        return {"clipping_norm": self.dp_clipping_norm, "noise_multiplier": self.dp_noise_multiplier}

    def ensemble_settings(self) -> Any:
        from components.federation.hetero.ensemble import EnsembleSettings

        return EnsembleSettings(**self.ensemble)

    def shared_base_settings(self) -> Any:
        from components.federation.hetero.shared_base import SharedBaseSettings

        return SharedBaseSettings(**self.shared_base)

    def fewshot_settings(self) -> Any:
        from components.federation.fewshot.protocol import FewShotSettings

        return FewShotSettings.from_params(self.fewshot)

    def soft_label_settings(self) -> Any:
        """The soft-label protocol's settings (``soft_labels`` over its defaults, ``grouping`` on top)."""
        from components.federation.logits.server import SoftLabelSettings

        return SoftLabelSettings(**{**self.soft_labels, "grouping": self.grouping, "seed": self.seed})

    def strategy_settings(self) -> dict[str, Any]:
        """What :func:`~components.federation.weights.protocol.weight_protocol` takes besides the name."""
        return {"clients_per_round": self.clients_per_round, **self.strategy_args}

    def weight_strategy(self, server_update: Any = None) -> Any:
        """The strategy params name, wrapped in server-side DP when ``dp_noise_multiplier`` is set.

        ``server_update``: FLTrust's (the server's delta on its few-shot set), which the flow builds.
        """
        from components.federation.weights.strategy import build_strategy

        extra = {"server_update": server_update} if self.strategy == "fltrust" and server_update else {}
        inner = build_strategy(self.strategy, **self.strategy_settings(), **extra)
        if self.dp_noise_multiplier is None or self.dp_mode == "local":  # local DP is the clients' (local_dp)
            return inner
        return build_strategy("dp-server", strategy=inner, noise_multiplier=self.dp_noise_multiplier,
                              clipping_norm=self.dp_clipping_norm, seed=self.seed)  # fmt: skip


class ClientsConfig(Section):
    """The ``clients`` section: each client's (or group's) architecture and compute budget.

    Used by the heterogeneous protocols (``federate.protocol: ensemble-distillation | shared-base``);
    :class:`~components.federation.hetero.profiles.ClientProfiles` resolves it.
    """

    assign: Literal["groups", "round-robin"] = "round-robin"
    architectures: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> {name, args, local_epochs}
    groups: list[dict[str, Any]] = Field(default_factory=list)  # [{clients: [ids or patterns], architecture}]
    # few-shot: device profiles -> mode (linear-probe | full | meta), assigned like the architectures
    devices: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> {mode, description}
    device_groups: list[dict[str, Any]] = Field(default_factory=list)  # [{clients: [ids or patterns], device}]
    device_assign: Literal["groups", "round-robin"] = "round-robin"

    @model_validator(mode="after")
    def _devices_are_valid(self) -> ClientsConfig:
        from components.federation.fewshot.devices import check_devices

        check_devices(self.devices, self.device_groups, self.device_assign)
        return self

    def client_devices(self, client_ids: list[str], default_mode: str) -> dict[str, Any]:
        """Each client's device profile and fine-tuning mode (few-shot protocol)."""
        from components.federation.fewshot.devices import assign_devices

        return assign_devices(self.devices, self.device_groups, self.device_assign, client_ids, default_mode)

    def profiles(self, client_ids: list[str], global_model: ModelSpec) -> Any:
        """The resolved profiles (data-derived sizes added); a clear error when none are declared."""
        from components.federation.hetero.profiles import ClientProfiles

        if not self.architectures:
            raise ConfigError("the heterogeneous protocols need clients.architectures in params.yaml")
        return ClientProfiles.from_params(self.model_dump(), client_ids).resolved(global_model)


class HistoryConfig(Section):
    """The ``history`` section: what the update archive keeps (components/lineage/retention.py)."""

    # full: every per-round update object stays; sums: each client's running sum and every manifest stay, and
    # the per-round update objects (and superseded sums) of rounds older than keep_rounds are dropped
    retention: Literal["full", "sums"] = "full"
    keep_rounds: int = Field(2, ge=1)
    # float16: clients upload their deltas in half precision (half the archive); the server applies exactly
    # what was stored, so forgetting stays exact with respect to the model that was trained
    update_dtype: Literal["float32", "float16"] = "float32"


class UnlearnConfig(Section):
    """The ``unlearn`` section: how a client is forgotten and quality restored."""

    variant: Literal["subtract", "renormalise"] = "subtract"
    teacher: Literal["clip", "global-model", "none"] = "clip"
    # global-model saw the client: refused unless forced (the version is then tagged and flagged)
    force_teacher: bool = False
    retire_tainted: Literal["tag", "delete-weights"] = "delete-weights"
    seed: int = 0
    # a forgetting method that keeps part of the client's direct contribution runs only when opted in
    allow_approximate: bool = False


class TeacherConfig(Section):
    """The ``teacher`` section: the CLIP-Adapter teacher fitted on the few-shot data.

    ``preset``: ``offline`` (EfficientNet-Lite0 + MiniLM from registry packages,
    no network), ``pretrained`` (any open_clip model name + pretrained tag or
    checkpoint file) or ``tiny`` (random weights, tests only).
    """

    preset: Literal["offline", "pretrained", "tiny"] = "offline"
    model_name: str | None = None  # pretrained preset: an open_clip model name, e.g. ViT-B-32
    pretrained: str | None = None  # pretrained preset: a tag (e.g. openai) or a checkpoint file
    image_size: int | None = Field(None, ge=16)  # None = the preset's own size
    prompt: str = "a photo of a {}."
    adapter_reduction: int = Field(4, ge=1)
    adapter_alpha: float = Field(0.2, ge=0, le=1)
    train_projection: bool | None = None  # None = the preset's default (True only for offline)
    epochs: int = Field(300, ge=1)
    patience: int = Field(40, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=1)
    val_fraction: float = Field(0.25, gt=0, lt=1)
    test_subset: int = Field(1000, ge=1)
    seed: int = 0

    def spec(self) -> TeacherSpec:
        return TeacherSpec(**self.model_dump(exclude={"test_subset"}))


class DistillConfig(Section):
    """The ``distill`` section: recovery training of the unlearned student."""

    # Defaults are DistillSettings' own: one place to change them (besides params.yaml).
    epochs: int = Field(DistillSettings.epochs, ge=0)
    lr: float = Field(DistillSettings.lr, gt=0)
    momentum: float = Field(DistillSettings.momentum, ge=0, lt=1)
    batch_size: int = Field(DistillSettings.batch_size, ge=1)
    temperature: float = Field(DistillSettings.temperature, gt=0)
    beta: float = Field(DistillSettings.beta, ge=0, le=1)

    def settings(self) -> DistillSettings:
        return DistillSettings(**self.model_dump())


class EvaluateConfig(Section):
    """The ``evaluate`` section: unlearning measured against retraining from scratch."""

    data: dict[str, Any] = Field(default_factory=dict)  # overrides of the data section
    rounds: int = Field(10, ge=1)
    seeds: int = Field(3, ge=1)
    target_client: str | None = None  # None = the client with the most training data
    backdoor_fraction: float = Field(0.5, gt=0, le=1)
    backdoor_target_class: int = Field(0, ge=0)
    trigger_size: int = Field(3, ge=1)
    mia_examples: int = Field(500, ge=10)
    max_workers: int = Field(2, ge=1)
    clients_per_round: int | None = Field(None, ge=1)  # partial participation
    deletions: int = Field(1, ge=1)  # forget this many clients one after another (largest first)
    mia_shadows: int = Field(0, ge=0)  # shadow federations for LiRA (offline); 0 = off, else at least 2
    target_max_examples: int | None = Field(None, ge=2)  # the detectable setting: a small target ...
    target_local_epochs: int | None = Field(None, ge=1)  # ... trained for more local epochs

    @field_validator("mia_shadows")
    @classmethod
    def _enough_shadows(cls, value: int) -> int:
        if value == 1:
            raise ValueError("mia_shadows must be 0 (off) or at least 2 (LiRA needs a spread of OUT models)")
        return value


class VerificationConfig(Section):
    """The ``verification`` section: checks every deletion reports (no retraining needed)."""

    backdoor_target_class: int | None = None  # set when the deleted client carries a backdoor marker
    trigger_size: int = Field(3, ge=1)
    mia_examples: int = Field(500, ge=10)


class OperationsConfig(Section):
    """The ``operations`` section: what ``fedforget serve`` runs and how."""

    retrain_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    promote: Literal["gate", "always", "never"] = "gate"  # scheduled retraining's promotion rule
    gate_tolerance: float = Field(0.01, ge=-1, le=1)  # promote if accuracy >= champion's - this
    model_write_limit: str = "fedforget-model-writes"  # Prefect global concurrency limit (1 slot)
    sweep_interval_s: float = Field(30.0, gt=0)
    sweep_grace_s: float = Field(60.0, ge=0)
    retry_base_s: float = Field(60.0, ge=0)  # a failed deletion runs again after this, doubling each time
    retry_max_attempts: int = Field(5, ge=1)  # then it stays failed, for a person to look at
    deployment_prefix: str = "fedforget"

    @field_validator("retrain_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"retrain_cron must have 5 fields (minute hour day month weekday), got {value!r}")
        return value


class RegistryConfig(Section):
    """The ``registry`` section: MLflow names."""

    model_name: str = "fedforget"
    experiment: str = "fedforget"
    champion_alias: str = "champion"


class Config(Section):
    """All of ``params.yaml`` for one profile."""

    profile: str = DEFAULT_PROFILE
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federate: FederateConfig = Field(default_factory=FederateConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    unlearn: UnlearnConfig = Field(default_factory=UnlearnConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    verification: VerificationConfig = Field(default_factory=VerificationConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    operations: OperationsConfig = Field(default_factory=OperationsConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    def evaluation_data(self) -> DataConfig:
        """The data section as the evaluation uses it (``evaluate.data`` laid over ``data``)."""
        return validate(DataConfig, {**self.data.model_dump(), **self.evaluate.data}, prefix="evaluate.data")


def build_config(
    raw: Mapping[str, Any],
    profile: str = DEFAULT_PROFILE,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate ``raw`` params for ``profile`` with ``overrides`` applied."""
    sections = resolve_sections(raw, profile, overrides)
    sections["profile"] = profile
    return validate(Config, sections)


def load_config(path: str | Path, profile: str = DEFAULT_PROFILE, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate ``params.yaml`` for ``profile``."""
    return build_config(read_params(path), profile, overrides)


def registered_model_profiles(path: str | Path) -> dict[str, str]:
    """Which profile registers which MLflow model (for errors that name the right ``--profile``)."""
    raw = read_params(path)
    names = {}
    for profile in [DEFAULT_PROFILE, *sorted(raw.get("profiles") or {})]:
        try:
            names.setdefault(build_config(raw, profile).registry.model_name, profile)
        except ConfigError:
            continue
    return names
