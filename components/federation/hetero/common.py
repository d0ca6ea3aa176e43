"""What the heterogeneous protocols share: server data in the store, budgeted training, distillation.

The server's own data (the unlabeled public set D, or the labelled few-shot
server set) is staged in the store like client shards, write-once under the
data version, and named in the protocol's description by key and sha256: the
server step and a later deletion read exactly the bytes the rounds used.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from components.core.ids import validate_id
from components.core.refs import ObjectRef
from components.core.serialize import state_from_bytes
from components.core.state import StateDict
from components.data.datasets import Split
from components.data.staging import split_from_bytes, split_to_bytes
from components.federation.protocol import ForgetResult
from components.learning.distill import DistillSettings, distill
from components.learning.train import TrainSettings, predict_logits, train_client
from components.lineage.store import ObjectStore, open_store
from components.models.students import ModelSpec, build_model, init_model


def server_data_key(data_version: str, name: str) -> str:
    # One level below the version: never taken for a client's object (those sit two levels down).
    return f"datasets/{validate_id(data_version.removesuffix('.dir'), 'data version')}/{validate_id(name, 'name')}.safetensors"


def stage_images(store: ObjectStore, images: torch.Tensor, data_version: str, name: str = "public") -> ObjectRef:
    """Put unlabeled uint8 images (N x H x W) into the store; return their reference."""
    return store.put(server_data_key(data_version, name), save({"images": images.contiguous()}), overwrite=False)


def stage_split(store: ObjectStore, split: Split, data_version: str, name: str = "server") -> ObjectRef:
    """Put a labelled split (the few-shot server set) into the store; return its reference."""
    return store.put(server_data_key(data_version, name), split_to_bytes(split), overwrite=False)


def read_images(store: ObjectStore, ref: ObjectRef) -> torch.Tensor:
    """Images staged by :func:`stage_images` or :func:`stage_split` (hash-checked)."""
    return load(store.get_verified(ref))["images"]


def read_split_ref(store: ObjectStore, ref: ObjectRef) -> Split:
    return split_from_bytes(store.get_verified(ref))


def read_state_at(store_url: str, ref: ObjectRef) -> StateDict:
    """A state a client reads by reference (hash-checked)."""
    return state_from_bytes(open_store(store_url).get_verified(ref))[0]


def ref_record(ref: ObjectRef | None) -> dict[str, Any] | None:
    return ref.to_dict() if ref is not None else None


def ref_from(record: Mapping[str, Any] | None) -> ObjectRef | None:
    return ObjectRef.from_dict(record) if record else None


def seed_for(seed: int, *names: str | int) -> int:
    """A seed that depends only on ``seed`` and ``names`` (architecture, round, purpose)."""
    value = seed
    for name in names:
        value = zlib.crc32(f"{value}:{name}".encode())
    return value


def initial_state(spec: ModelSpec, seed: int, architecture: str) -> StateDict:
    """The starting weights of an architecture nobody has trained yet (the same on every machine)."""
    return {
        k: v.detach().clone() for k, v in init_model(spec, seed_for(seed, "init", architecture)).state_dict().items()
    }


def pack(states: Mapping[str, Mapping[str, torch.Tensor]]) -> StateDict:
    """Several named states as one (keys ``<name>/<key>``), e.g. one model per architecture."""
    return {f"{name}/{key}": value for name, state in states.items() for key, value in state.items()}


def unpack(packed: Mapping[str, torch.Tensor] | None) -> dict[str, StateDict]:
    """Inverse of :func:`pack`."""
    out: dict[str, StateDict] = {}
    for full, value in (packed or {}).items():
        name, _, key = full.partition("/")
        out.setdefault(name, {})[key] = value
    return out


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state's tensors (what a transfer of it carries, headers aside)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def train_within_budget(
    model: nn.Module,
    data: Split,
    train: TrainSettings,
    settings: Mapping[str, Any],
    generator: torch.Generator,
) -> dict[str, float]:
    """Local training under a client's budget (``local_epochs``, ``time_cap_s`` in ``settings``).

    Without a time cap this is one :func:`train_client` call; with one, epochs
    run one at a time until the cap is passed (at least one epoch), so a slow
    client trains less. A capped run depends on the machine's speed: it is
    not reproducible bit for bit.
    """
    epochs = int(settings.get("local_epochs") or train.local_epochs)
    cap = settings.get("time_cap_s")
    if cap is None:
        metrics = train_client(model, data, replace(train, local_epochs=epochs), generator)
        return {**metrics, "epochs": float(epochs)}
    started, done, metrics = time.perf_counter(), 0, {}
    while done < epochs and (done == 0 or time.perf_counter() - started < float(cap)):
        metrics = train_client(model, data, replace(train, local_epochs=1), generator)
        done += 1
    return {**metrics, "compute_s": time.perf_counter() - started, "epochs": float(done)}


def freeze(model: nn.Module, trainable: Sequence[str]) -> None:
    """Train only the parameters whose names start with one of ``trainable`` (all when empty)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not trainable or name.startswith(tuple(trainable)))


def ensemble_logits(
    models: Sequence[nn.Module], images: torch.Tensor, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """The ensemble's logits on uint8 ``images``: the (weighted) mean of its members' logits (FedDF)."""
    inputs = Split(images, torch.zeros(len(images), dtype=torch.int64)).inputs()
    w = torch.ones(len(models)) if weights is None else torch.tensor([float(x) for x in weights])
    if not w.sum() > 0 or (w < 0).any():
        raise ValueError(f"ensemble weights must be non-negative with a positive sum, got {w.tolist()}")
    stacked = torch.stack([predict_logits(m, inputs).float() for m in models])
    return torch.einsum("m,mnk->nk", w / w.sum(), stacked)


def distil_towards(
    student: nn.Module, images: torch.Tensor, teacher: torch.Tensor, settings: DistillSettings, seed: int
) -> dict[str, float]:
    """Train ``student`` in place towards the ``teacher`` logits on unlabeled ``images``.

    Pure soft-label distillation: ``beta`` is forced to 1, so the pseudo-labels
    (the teacher's argmax, required by :class:`Split`) carry no weight.
    """
    data = Split(images, teacher.argmax(1))
    return distill(student, data, teacher, replace(settings, beta=1.0), torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class HeteroForgetResult(ForgetResult):
    """A forget result that also replaces the server's carried state and records its own objects.

    ``server_state`` (the next rounds' starting points) and ``objects`` (for
    ensemble distillation, the per-architecture averages without the client)
    belong in the unlearning manifest in place of the source's.
    """

    server_state: StateDict | None = field(default=None, repr=False)
    objects: Mapping[str, StateDict] = field(default_factory=dict, repr=False)


def model_with(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model of ``spec`` holding ``state`` (strict: every key, every shape)."""
    model = build_model(spec)
    model.load_state_dict(dict(state))
    return model


def detached(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
