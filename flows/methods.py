"""What ``federate.protocol`` names, built from params: the protocol object and its starting point.

Orchestration only (the methods live in ``components/federation``): which
protocol, with which settings and staged server data, and where a federation
starts (a fresh model, the teacher's tower for few-shot fine-tuning, or a
registered student, refused when its lineage holds a forgotten client).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config.runtime import Runtime
from components.config.sections import Config, ConfigError
from components.core.state import StateDict
from components.data.layout import SERVER_DIR, dvc_dir_hash, read_public, read_split
from components.federation.fewshot.model import (
    IMAGE_MODEL_NAME,
    MODEL_NAME,
    STUDENT_MODEL_NAME,
    image_start,
    student_start,
)
from components.federation.fewshot.protocol import FewShotProtocol
from components.federation.hetero.common import stage_images, stage_split
from components.federation.hetero.ensemble import EnsembleDistillation
from components.federation.hetero.shared_base import SharedBase
from components.federation.logits.client import stage_public
from components.federation.logits.protocol import SoftLabels
from components.federation.protocol import Protocol
from components.federation.split.protocol import SplitFed
from components.federation.weights.protocol import WeightAveraging
from components.lineage.history import UpdateHistory
from components.lineage.tags import manifest_ref_from_tags
from components.models.students import ModelSpec
from components.unlearning.guard import check_clean, present_clients
from flows.ledger import forgotten_for
from flows.tracking import Tracker


def starting_point(
    runtime: Runtime, config: Config, history: UpdateHistory, spec: ModelSpec, class_names: list[str]
) -> tuple[ModelSpec, StateDict | None, dict[str, Any] | None]:
    """The global model's spec, its initial state (``None``: a fresh ``model`` from ``federate.seed``) and,
    for a registered student, the record of where it came from (``FewShotProtocol.start``)."""
    if config.federate.protocol != "few-shot":
        return spec, None, None
    fewshot = config.federate.fewshot_settings()
    if fewshot.start == "tower":  # the teacher's frozen tower + adapter + text head, over images
        started, state = image_start(config.teacher.spec(), class_names, config.federate.seed, fewshot.head_init)
        return started, state, None
    name = fewshot.student_model or config.registry.model_name
    source = Tracker(runtime, config.registry.model_copy(update={"model_name": name}))
    version = source.version(fewshot.student_version)
    if version is None:
        raise ConfigError(f"federate.fewshot.student_version: no version {fewshot.student_version} of model {name}")
    ref = manifest_ref_from_tags(version.tags)
    check_clean(
        history, history.store, ref, version.version, "start a few-shot federation from",
        f"Choose a version of {name} without them (its deletion's version or a later one).",
        name, forgotten_for(source, history.store),
    )  # fmt: skip
    manifest = history.read_manifest(ref)
    if manifest.model.name in (MODEL_NAME, IMAGE_MODEL_NAME, STUDENT_MODEL_NAME):
        raise ConfigError(
            f"version {version.version} of {name} is a few-shot model: continue it with federate.resume_from"
        )
    derived = {k: manifest.model.args.get(k) for k in ("num_classes", "image_size")}
    expected = {"num_classes": spec.args.get("num_classes"), "image_size": spec.args.get("image_size")}
    if derived != expected:
        raise ConfigError(f"version {version.version} of {name} was trained for {derived}; this data needs {expected}")
    started, state = student_start(manifest.model, history.read_state(manifest.global_state))
    record = {"model": name, "version": version.version, "manifest": ref.to_dict(),
              "clients": sorted(present_clients(history, ref))}  # fmt: skip
    return started, state, record


def build_protocol(
    config: Config, data_dir: Path, store: Any, data_version: str, spec: ModelSpec, client_ids: list[str],
    cache_dir: Path | None = None,
) -> Protocol:  # fmt: skip
    """The method ``federate.protocol`` names, with its settings (soft-labels stages the public set D)."""
    name = config.federate.protocol
    if config.federate.strategy == "fltrust" and name != "weights":
        raise ConfigError(
            f"federate.strategy: fltrust compares each update with the server's own update of the whole model; "
            f"it runs with federate.protocol: weights, not {name}"
        )
    if config.federate.local_dp() is not None and name != "weights":
        raise ConfigError(f"federate.dp_mode: local perturbs weight deltas; it runs with protocol weights, not {name}")
    if name == "few-shot":  # each client fine-tunes in its device's mode; the tower is the teacher's
        settings = config.federate.fewshot_settings()
        devices = config.clients.client_devices(client_ids, settings.default_mode)
        return FewShotProtocol(
            config.teacher.spec(), settings.local, {c: d.mode for c, d in devices.items()}, settings.default_mode,
            settings.track_gradients, str(cache_dir) if cache_dir else None,
            devices={c: d.device for c, d in devices.items()},
        )  # fmt: skip
    if name in ("ensemble-distillation", "shared-base"):
        profiles = config.clients.profiles(client_ids, spec)
        few_shot = read_split(data_dir / SERVER_DIR / "few_shot.safetensors")
        server_version = dvc_dir_hash(data_dir / SERVER_DIR)
        if name == "shared-base":  # the global model is params' model; the clients' heads come from their profiles
            check_shared_base(profiles, spec, config.federate.shared_base_settings())
            server_set = stage_split(store, few_shot, server_version, "few-shot")
            return SharedBase(profiles, spec, server_set, config.federate.weight_strategy(),
                              config.federate.shared_base_settings(), config.federate.seed, config.train.settings())  # fmt: skip
        # the server distils on the unlabeled public set D, or on the few-shot images when there is none
        has_public = config.data.public_size > 0
        images = read_public(data_dir) if has_public else few_shot.images
        distill_set = stage_images(store, images, data_version if has_public else server_version,
                                   "public" if has_public else "few-shot-images")  # fmt: skip
        return EnsembleDistillation(
            profiles, spec, distill_set, config.federate.ensemble_settings(), config.federate.seed
        )
    if name == "soft-labels":
        public = stage_public(store, read_public(data_dir), data_version)
        # clients keep their own models; with clients.architectures declared, each trains its profile's
        architectures = None
        if config.clients.architectures:
            profiles = config.clients.profiles(client_ids, spec)
            architectures = {cid: profiles.spec_for(cid) for cid in client_ids}
        return SoftLabels(public, spec, config.federate.soft_label_settings(), architectures)
    strategy = config.federate.weight_strategy(fltrust_update(config, data_dir, spec))
    if config.federate.protocol == "splitfed":
        return SplitFed(strategy, config.federate.split_cut, spec.name)
    return WeightAveraging(strategy, config.history.update_dtype, config.federate.local_dp())


def fltrust_update(config: Config, data_dir: Path, spec: ModelSpec) -> Any:
    """FLTrust's server update from the server's few-shot set (``None`` for the other strategies)."""
    if config.federate.strategy != "fltrust":
        return None
    from components.federation.weights.robust import fltrust_server_update

    few_shot = read_split(data_dir / SERVER_DIR / "few_shot.safetensors")
    return fltrust_server_update(spec, few_shot, config.train.settings(), config.federate.seed)


def check_shared_base(profiles: Any, spec: ModelSpec, settings: Any) -> None:
    """Refuse client architectures whose base (everything but the head) differs from the global model's."""
    from components.models.students import build_model

    def base_shapes(model_spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        base, _ = settings.split(build_model(model_spec).state_dict())
        return {k: tuple(v.shape) for k, v in base.items()}

    expected = base_shapes(spec)
    for name in profiles.architectures:
        if base_shapes(profiles.spec_of(name)) != expected:
            raise ConfigError(
                f"shared-base: architecture {name!r} ({profiles.spec_of(name).name}) has another base than the "
                f"global model ({spec.name} {dict(spec.args)}); every clients.architectures entry must share "
                f"model's layers outside the head {list(settings.head)}"
            )
