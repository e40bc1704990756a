"""Registered models: build, forward/backward, distilled behaviour, bad arguments."""

from __future__ import annotations

import pytest
import timm
import torch

import anchorformer
from anchorformer.models import MODEL_NAMES, AnchorAttention

REQUIRED = [
    *(f"anchorformer_{s}_patch16_224" for s in ("tiny", "small", "base")),
    "anchorformer_base_patch16_384",
    *(f"anchorformer_{s}_distilled_patch16_224" for s in ("tiny", "small", "base")),
    "anchorformer_base_distilled_patch16_384",
    *(f"anchor_deit_{s}_distilled_patch16_224" for s in ("tiny", "small", "base")),
    "anchor_deit_base_distilled_patch16_384",
]
WIDTH = {"tiny": 192, "small": 384, "base": 768}


def test_all_required_names_registered_in_timm():
    for name in REQUIRED:
        assert name in MODEL_NAMES
        assert timm.is_model(name), name


def _native_size(name: str) -> int:
    return 384 if name.endswith("384") else 224


@pytest.mark.slow
@pytest.mark.parametrize("name", REQUIRED)
def test_forward_backward_native_and_other_resolution(name):
    width = next(w for s, w in WIDTH.items() if f"_{s}_" in name)
    distilled = "distilled" in name
    for img in (_native_size(name), 96):
        model = timm.create_model(name, img_size=img, num_classes=7, num_anchors=5)
        x = torch.randn(1, 3, img, img)
        model.train()
        out = model(x)
        if distilled:
            assert isinstance(out, tuple) and len(out) == 2
            assert all(o.shape == (1, 7) for o in out)
            loss = out[0].sum() + out[1].sum()
        else:
            assert out.shape == (1, 7)
            loss = out.sum()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert all(torch.isfinite(g).all() for g in grads)
        anchors = model.blocks[0].attn.anchors
        assert anchors.grad is not None and anchors.grad.abs().sum() > 0
        feats = model.forward_features(x)
        n_prefix = 2 if distilled else 1
        assert feats.shape == (1, (img // 16) ** 2 + n_prefix, width)


def test_distilled_train_returns_both_eval_returns_mean():
    model = anchorformer.create_model("anchorformer_tiny_distilled_patch16_224", img_size=32, num_classes=5, depth=2)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    cls_logits, dist_logits = model(x)
    model.eval()
    with torch.no_grad():
        mean = model(x)
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(mean, expected)
    assert cls_logits.shape == dist_logits.shape == (3, 5)


def test_timm_api_surface():
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=64, depth=3, num_classes=4)
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= nwd
    assert {f"blocks.{i}.attn.anchors" for i in range(3)} <= nwd
    model.reset_classifier(11)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 11)
    model.set_grad_checkpointing(True)
    model.train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    final, inter = model.forward_intermediates(torch.randn(2, 3, 64, 64), indices=2)
    assert len(inter) == 2 and inter[0].shape == (2, 192, 4, 4)
    features = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=64, depth=3, features_only=True)
    assert features(torch.randn(1, 3, 64, 64))[-1].shape == (1, 192, 4, 4)


def test_ablation_switches_reach_every_block():
    model = anchorformer.create_model(
        "anchorformer_tiny_patch16_224",
        img_size=32,
        depth=2,
        num_anchors=7,
        normalize=False,
        per_head_anchors=True,
        attn_impl="reference",
    )
    attns = [m for m in model.modules() if isinstance(m, AnchorAttention)]
    assert len(attns) == 2
    for a in attns:
        assert a.normalize is False and a.attn_impl == "reference"
        assert a.anchors.shape == (3, 7, 64)
    pooled = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=2, anchor_mode="pooled")
    assert all(m.anchors is None for m in pooled.modules() if isinstance(m, AnchorAttention))
    out = pooled(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_in_chans_and_drop_path():
    model = anchorformer.create_model(
        "anchorformer_tiny_patch16_224", img_size=32, depth=2, in_chans=1, drop_path_rate=0.2
    )
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1000)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


def test_deit_baselines_through_create_model():
    model = anchorformer.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=3)
    model.train()
    assert isinstance(model(torch.randn(1, 3, 32, 32)), tuple)
    with pytest.raises(ValueError, match="not an AnchorFormer model"):
        anchorformer.create_model("deit_tiny_patch16_224", num_anchors=8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_anchors=0), "num_anchors must be an integer >= 1"),
        (dict(img_size=100), "multiple of the patch size"),
        (dict(img_size=-16), "positive"),
        (dict(attn_impl="cuda"), "attn_impl must be one of"),
        (dict(anchor_mode="random"), "anchor_mode must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        anchorformer.create_model("anchorformer_tiny_patch16_224", **kwargs)


def test_wrong_input_size_and_unknown_name():
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=64, depth=1)
    with pytest.raises(AssertionError, match="doesn't match model"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        anchorformer.create_model("anchorformer_huge_patch16_224")
