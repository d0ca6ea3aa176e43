"""The few-shot model: the teacher's frozen image tower, then projection, adapter and a linear head.

Only the part above the frozen trunk is a state (what clients train, what is
averaged and archived)::

    z  = P(f)                                  projection (the tower's own; trained when unfrozen)
    z* = alpha * A(z) + (1 - alpha) * z         the CLIP-Adapter bottleneck (ClipAdapter)
    logits = s * H(normalize(z*))              a linear head, initialised to the text classifier

``f`` are the frozen trunk features, computed once per image and cached
(:class:`~components.models.clip_teacher.FeatureCache`). ``s`` is CLIP's
fixed temperature ``exp(logit_scale)``: with the head's rows initialised to
the prompts' text features (bias 0) and ``alpha = 0`` the model is the frozen
teacher's zero-shot text classifier, and the head's learning rate means the
same as for a cosine classifier. The adapter starts from its own seeded
initialisation.

State keys fall into **parameter groups**, named by their first
component: ``projection`` (absent when the tower's projection is frozen),
``adapter`` and ``head``; a registered student as the starting point
(``fewshot-student``, :func:`student_start`) has ``body`` (its layers below
the classifier, trained by ``full`` and ``meta``) and ``head`` (its last
linear layer).

Production registers, serves and evaluates the same model over images
(``fewshot-clip-image``, :class:`FewShotImageModel`): the frozen tower runs
inside ``forward``, its features cached per process by image, and the state is
exactly the feature model's, so aggregation, forgetting and the archive do not
see the difference. Clients train the feature model (:func:`feature_spec`) on
cached features.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from components.core.state import StateDict, clone_state
from components.models.clip_backbone import ClipBackbone, TeacherError, TeacherSpec, build_backbone
from components.models.clip_teacher import ClipAdapter
from components.models.students import ModelSpec, build_model, init_model, register_model

MODEL_NAME = "fewshot-clip"
IMAGE_MODEL_NAME = "fewshot-clip-image"
STUDENT_MODEL_NAME = "fewshot-student"
GROUPS = ("projection", "adapter", "head", "body")  # body: a registered student's layers below its classifier


def group_of(key: str) -> str:
    """The parameter group of a state key (``adapter.fc.0.weight`` -> ``adapter``)."""
    group = key.split(".", 1)[0]
    if group not in GROUPS:
        raise ValueError(f"state key {key!r} belongs to no parameter group of {GROUPS}")
    return group


@register_model(MODEL_NAME)
class FewShotModel(nn.Module):
    """Projection -> residual adapter -> linear head over frozen trunk features.

    Parameters
    ----------
    feature_dim, embed_dim
        Trunk feature size and the tower's embedding size (equal without projection).
    num_classes
        Outputs of the head.
    reduction, alpha
        The adapter's bottleneck reduction and residual ratio (``TeacherSpec``).
    scale
        The fixed logit scale ``s`` (not a parameter).
    projection
        Whether the tower's projection is part of the state (unfrozen).
    backbone
        The frozen tower's identity, recorded with the spec (not built here).
    """

    def __init__(
        self,
        feature_dim: int,
        embed_dim: int,
        num_classes: int,
        reduction: int = 4,
        alpha: float = 0.2,
        scale: float = 1.0,
        projection: bool = True,
        projection_bias: bool = False,
        backbone: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not projection and feature_dim != embed_dim:
            raise ValueError(f"without a projection the feature size {feature_dim} must equal {embed_dim}")
        self.projection = nn.Linear(feature_dim, embed_dim, bias=projection_bias) if projection else nn.Identity()
        self.adapter = ClipAdapter(embed_dim, reduction)
        self.head = nn.Linear(embed_dim, num_classes)
        self.alpha = float(alpha)
        self.scale = float(scale)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``normalize(alpha * A(P f) + (1 - alpha) * P f)``: what the head sees."""
        z = self.projection(features)
        return F.normalize(self.alpha * self.adapter(z) + (1.0 - self.alpha) * z, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(self.embed(features))


# --------------------------------------------------------------------------- the frozen tower

_BACKBONES: dict[str, ClipBackbone] = {}
_BACKBONE_LOCK = threading.Lock()


def shared_backbone(spec: TeacherSpec) -> ClipBackbone:
    """The frozen tower of ``spec``, built once per process (clients of a round share it)."""
    key = json.dumps(asdict(spec), sort_keys=True)
    with _BACKBONE_LOCK:
        if key not in _BACKBONES:
            _BACKBONES[key] = build_backbone(spec)
        return _BACKBONES[key]


def _projection_layer(backbone: ClipBackbone) -> nn.Linear | None:
    if backbone.projection is None:
        return None
    layers = [m for m in backbone.projection.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 1:
        raise TeacherError(f"the tower's projection must hold one linear layer, found {len(layers)}")
    return layers[0]


def head_scale(backbone: ClipBackbone) -> float:
    """CLIP's temperature ``exp(logit_scale)``, capped at 100 as CLIP trains it."""
    return math.exp(min(backbone.logit_scale, math.log(100.0)))


def initial_model(
    backbone: ClipBackbone, class_names: Sequence[str], seed: int, head_init: str = "text"
) -> tuple[ModelSpec, StateDict]:
    """The pretrained starting point: the tower's projection, a seeded adapter, the text head.

    ``head_init="text"`` starts the head at the zero-shot text classifier
    (rows: the prompts' text features, bias 0); ``"zeros"`` at zero.
    """
    if head_init not in ("text", "zeros"):
        raise ValueError(f"head_init must be 'text' or 'zeros', got {head_init!r}")
    teacher = backbone.spec
    text = backbone.text_features(class_names)
    layer = _projection_layer(backbone)
    embed_dim = int(text.shape[1])
    feature_dim = layer.in_features if layer is not None else embed_dim
    spec = ModelSpec(
        MODEL_NAME,
        {
            "feature_dim": feature_dim,
            "embed_dim": embed_dim,
            "num_classes": len(class_names),
            "reduction": teacher.adapter_reduction,
            "alpha": teacher.adapter_alpha,
            "scale": head_scale(backbone),
            "projection": layer is not None,
            "projection_bias": layer is not None and layer.bias is not None,
            "backbone": teacher.backbone_identity() | {"train_projection": teacher.trains_projection},
        },
    )
    model = init_model(spec, seed)
    with torch.no_grad():
        if layer is not None:
            model.projection.load_state_dict(layer.state_dict())
        if head_init == "text":
            model.head.weight.copy_(text)
        else:
            model.head.weight.zero_()
        model.head.bias.zero_()
    return spec, clone_state(model.state_dict())


@torch.no_grad()
def zero_shot_logits(backbone: ClipBackbone, features: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """The frozen teacher's text classifier: ``exp(logit_scale) * cos(P f, text features)``."""
    layer = _projection_layer(backbone)
    z = layer(features) if layer is not None else features
    return head_scale(backbone) * F.normalize(z, dim=-1) @ backbone.text_features(class_names).t()


# --------------------------------------------------------------------------- over images (production)

_FEATURES: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()
_FEATURES_LOCK = threading.Lock()
FEATURE_CACHE_ROWS = 20_000  # per process, least recently used first out (serving sees unbounded inputs)


def image_features(spec: TeacherSpec, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The frozen tower's trunk features of model ``inputs`` (N x C x H x W), cached per image."""
    backbone = shared_backbone(spec)
    tower = json.dumps([asdict(spec), backbone.image_size], sort_keys=True)
    flat = inputs.detach().float().reshape(len(inputs), -1).contiguous().numpy()
    keys = [(tower, hashlib.blake2b(row.tobytes(), digest_size=16).digest()) for row in flat]
    with _FEATURES_LOCK:
        missing = [i for i, key in enumerate(keys) if key not in _FEATURES]
    computed = backbone.image_features(inputs[missing], batch_size) if missing else None
    rows: dict[int, torch.Tensor] = {i: computed[j] for j, i in enumerate(missing)} if computed is not None else {}
    with _FEATURES_LOCK:
        for i, key in enumerate(keys):
            if i in rows:
                _FEATURES[key] = rows[i]
            else:
                rows[i] = _FEATURES[key]
            _FEATURES.move_to_end(key)
        while len(_FEATURES) > FEATURE_CACHE_ROWS:
            _FEATURES.popitem(last=False)
    return torch.stack([rows[i] for i in range(len(keys))]) if keys else torch.zeros(0)


@register_model(IMAGE_MODEL_NAME)
class FewShotImageModel(FewShotModel):
    """:class:`FewShotModel` over images: the frozen tower of ``teacher`` (a ``TeacherSpec`` as a dict)
    computes the features in ``forward``; the state is the feature model's (the tower is not in it)."""

    def __init__(self, teacher: dict[str, Any], **args: Any) -> None:
        super().__init__(**args)
        self.teacher = TeacherSpec(**teacher)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # MLflow's pt2 export: the tower is traced into the artifact
            with torch.no_grad():
                features = shared_backbone(self.teacher).encode(inputs)
            return super().forward(features)
        return super().forward(image_features(self.teacher, inputs))


def feature_spec(spec: ModelSpec) -> ModelSpec:
    """The model clients train on cached features: the image model without its tower (a student: itself,
    on images)."""
    if spec.name == IMAGE_MODEL_NAME:
        return ModelSpec(MODEL_NAME, {k: v for k, v in spec.args.items() if k != "teacher"})
    if spec.name == STUDENT_MODEL_NAME:
        return spec
    if spec.name != MODEL_NAME:
        raise ValueError(
            f"the few-shot protocol trains {MODEL_NAME}, {IMAGE_MODEL_NAME} or {STUDENT_MODEL_NAME}, not {spec.name!r}"
        )
    return spec


def image_start(
    teacher: TeacherSpec, class_names: Sequence[str], seed: int, head_init: str = "text"
) -> tuple[ModelSpec, StateDict]:
    """Production's pretrained starting point over images: :func:`initial_model` on ``teacher``'s tower."""
    spec, state = initial_model(shared_backbone(teacher), class_names, seed, head_init)
    return ModelSpec(IMAGE_MODEL_NAME, {**spec.args, "teacher": asdict(teacher)}), state


# --------------------------------------------------------------------------- a registered student as the start


def _last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layer to serve as the few-shot head")
    return names[-1]


@register_model(STUDENT_MODEL_NAME)
class FewShotStudent(nn.Module):
    """A registered student fine-tuned few-shot: ``body`` is the student with its last linear layer (its
    classifier, applied last by every registry model) replaced by the identity, ``head`` that layer."""

    scale = 1.0

    def __init__(self, student: dict[str, Any]) -> None:
        super().__init__()
        body = build_model(ModelSpec.from_dict(student))
        name = _last_linear(body)
        layer = body.get_submodule(name)
        self.head = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        parent, _, leaf = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, leaf, nn.Identity())
        self.body = body

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """What the head sees (a linear probe trains the head on it, computed once per round)."""
        return self.body(inputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs))


def student_start(spec: ModelSpec, state: StateDict) -> tuple[ModelSpec, StateDict]:
    """A registered student's spec and state as the few-shot starting point (``fewshot-student``): its
    classifier's keys become ``head.*``, every other key ``body.*``; the model computes what the student did."""
    name = _last_linear(build_model(spec))
    renamed = {
        (f"head.{key[len(name) + 1 :]}" if key.startswith(f"{name}.") else f"body.{key}"): value.detach().clone()
        for key, value in state.items()
    }
    wrapped = ModelSpec(STUDENT_MODEL_NAME, {"student": spec.to_dict()})
    model = build_model(wrapped)
    model.load_state_dict(renamed)  # refuses a state that does not fit the student
    return wrapped, clone_state(model.state_dict())
