"""The simple feature pyramid (ViTDet) over AnchorFormer and DeiT backbones."""

from __future__ import annotations

import math

import pytest
import torch

from anchorformer import count_macs, create_model
from anchorformer.models import CheckpointMismatchError
from anchorformer.models.pyramid import SimpleFeaturePyramid, backbone_macs, param_groups_layer_decay

TINY = dict(img_size=64, embed_dim=48, depth=2, num_heads=3)
BACKBONES = [
    "anchorformer_tiny_patch16_224",
    "anchorformer_tiny_distilled_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
]


def _pyramid(name: str, **kw) -> SimpleFeaturePyramid:
    extra = dict(num_anchors=8) if name.startswith("anchor") else {}
    return SimpleFeaturePyramid(name, 32, backbone_kwargs={**TINY, **extra}, **kw)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("hw", [(64, 64), (97, 131), (33, 200), (16, 16)])
def test_strides_and_shapes_for_odd_sizes(name: str, hw: tuple[int, int]) -> None:
    pyr = _pyramid(name).eval()
    out = pyr(torch.randn(2, 3, *hw))
    assert list(out) == ["0", "1", "2", "3"]
    assert pyr.strides == (4, 8, 16, 32)
    h, w = math.ceil(hw[0] / 16), math.ceil(hw[1] / 16)
    expected = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (math.ceil(h / 2), math.ceil(w / 2))]
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, *s) for s in expected]
    assert all(torch.isfinite(v).all() for v in out.values())


def test_scales_relative_to_patch() -> None:
    pyr = SimpleFeaturePyramid(
        "anchorformer_tiny_patch16_224",
        16,
        scales=(2.0, 1.0, 0.5, 0.25),
        backbone_kwargs=dict(TINY, patch_size=8, num_anchors=4),
    )
    assert pyr.strides == (4, 8, 16, 32)
    out = pyr(torch.randn(1, 3, 40, 56))  # 5 x 7 tokens
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(10, 14), (5, 7), (3, 4), (2, 2)]


@pytest.mark.parametrize("name", BACKBONES)
def test_gradients_reach_the_backbone(name: str) -> None:
    pyr = _pyramid(name)
    out = pyr(torch.randn(2, 3, 50, 70))
    sum(v.square().mean() for v in out.values()).backward()
    for n, p in pyr.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
    for n in ["backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.blocks.0.norm1.weight"]:
        assert pyr.get_parameter(n).grad.abs().sum() > 0, n
    if name.startswith("anchor"):
        assert pyr.backbone.blocks[0].attn.anchors.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["anchorformer_tiny_distilled_patch16_224", "deit_tiny_patch16_224"])
def test_dynamic_path_equals_fixed_model_at_pretraining_size(name: str) -> None:
    """At the pre-training size the dynamic path is exactly timm's fixed-size forward_features."""
    extra = dict(num_anchors=8) if name.startswith("anchor") else {}
    fixed = create_model(name, num_classes=5, **TINY, **extra).eval()
    pyr = SimpleFeaturePyramid(fixed, 32).eval()  # the module itself: dynamic size switched on, head dropped
    ref = create_model(name, num_classes=5, **TINY, **extra).eval()
    ref.load_state_dict(fixed.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, ref.num_prefix_tokens :]  # (B, 16, C), normed
        expected = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
        got = pyr.forward_backbone(x)
        torch.testing.assert_close(got, expected)
        # and an odd input equals the explicitly zero-padded one
        odd = torch.randn(1, 3, 50, 61)
        padded = torch.nn.functional.pad(odd, (0, 3, 0, 14))
        torch.testing.assert_close(pyr.forward_backbone(odd), pyr.forward_backbone(padded))
    assert not any(n.startswith(("backbone.head.", "backbone.head_dist.")) for n, _ in pyr.named_parameters())


def test_position_embedding_is_resampled() -> None:
    pyr = _pyramid("anchorformer_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = pyr.forward_backbone(x)
        pyr.backbone.pos_embed.add_(1.0)
        b = pyr.forward_backbone(x)
        c = pyr.forward_backbone(torch.randn(1, 3, 96, 128))  # a 6 x 8 grid from the 4 x 4 embedding
    assert not torch.allclose(a, b)
    assert c.shape == (1, 48, 6, 8)


def test_init_from_classification_checkpoint(tmp_path) -> None:
    cls = create_model("anchorformer_tiny_patch16_224", num_classes=7, num_anchors=8, **TINY)
    path = tmp_path / "cls.pth"
    torch.save({"model": cls.state_dict(), "epoch": 3}, path)
    pyr = SimpleFeaturePyramid(
        "anchorformer_tiny_patch16_224", 32, checkpoint=path, backbone_kwargs=dict(TINY, num_anchors=8)
    )
    own = pyr.backbone.state_dict()
    for k, v in cls.state_dict().items():
        if not k.startswith("head"):
            torch.testing.assert_close(own[k], v, msg=k)

    wrong = create_model("anchorformer_tiny_patch16_224", num_classes=7, num_anchors=8, **dict(TINY, embed_dim=24))
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(CheckpointMismatchError, match="embed_dim|expected"):
        SimpleFeaturePyramid(
            "anchorformer_tiny_patch16_224",
            32,
            checkpoint=tmp_path / "wrong.pth",
            backbone_kwargs=dict(TINY, num_anchors=8),
        )
    partial = {k: v for k, v in cls.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointMismatchError, match="blocks.1."):
        SimpleFeaturePyramid(
            "anchorformer_tiny_patch16_224", 32, checkpoint=partial, backbone_kwargs=dict(TINY, num_anchors=8)
        )


def test_deit_weights_into_anchorformer_leave_only_anchors() -> None:
    deit = create_model("deit_tiny_patch16_224", num_classes=3, **TINY)
    pyr = SimpleFeaturePyramid(
        "anchorformer_tiny_patch16_224", 32, checkpoint=deit.state_dict(), backbone_kwargs=dict(TINY, num_anchors=8)
    )
    q, _, v = deit.blocks[1].attn.qkv.weight.chunk(3)
    torch.testing.assert_close(pyr.backbone.blocks[1].attn.in_proj.weight, torch.cat([q, v]))


def test_layer_decay_param_groups() -> None:
    pyr = _pyramid("anchorformer_tiny_patch16_224")
    model = torch.nn.Sequential(pyr, torch.nn.Conv2d(32, 4, 1))
    groups = param_groups_layer_decay(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    where = {id(p): g for g in groups for p in g["params"]}
    depth = 2
    vit = pyr.backbone
    assert where[id(vit.pos_embed)]["lr"] == 0.5 ** (depth + 1)
    assert where[id(vit.patch_embed.proj.weight)]["lr"] == 0.5 ** (depth + 1)
    assert where[id(vit.blocks[0].mlp.fc1.weight)]["lr"] == 0.5**depth
    assert where[id(vit.blocks[1].mlp.fc1.weight)]["lr"] == 0.5 ** (depth - 1)
    assert where[id(vit.norm.weight)]["lr"] == 1.0
    assert where[id(model[1].weight)]["lr"] == 1.0
    assert where[id(pyr.stages[0][0].weight)]["lr"] == 1.0
    for p in [vit.pos_embed, vit.cls_token, vit.blocks[0].attn.anchors, vit.blocks[0].mlp.fc1.bias]:
        assert where[id(p)]["weight_decay"] == 0.0
    assert where[id(vit.blocks[0].mlp.fc1.weight)]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(model, lr=1.0, weight_decay=0.0, layer_decay=0.0)


def test_backbone_macs_at_coco_size_matches_a_fixed_size_model() -> None:
    with torch.device("meta"):
        pyr = SimpleFeaturePyramid("anchorformer_tiny_patch16_224", 256)
        fixed = create_model("anchorformer_tiny_patch16_224", num_classes=0, img_size=(800, 1344))
    macs = backbone_macs(pyr)  # 1333x800 padded to 1344x800: 50 x 84 = 4,200 tokens
    assert macs == count_macs(fixed, (800, 1344))
    # closed form of the per-block matmuls: in_proj 2C², proj C², MLP 8C², anchor attention 3·N·M·D·H (+ N·M·D·H for Λ^-1 A^T v)
    N, C, M, depth = 4200 + 1, 192, 30, 12
    patch = 4200 * 3 * 16 * 16 * C
    per_block = N * (2 * C * C + C * C + 8 * C * C)
    assert per_block * depth + patch < macs < (per_block + 4 * N * M * C) * depth + patch


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scales"):
        _pyramid("deit_tiny_patch16_224", scales=(1.0, 3.0))
    with pytest.raises(ValueError, match="norm"):
        _pyramid("deit_tiny_patch16_224", norm="XX")
    with pytest.raises(ValueError, match="expected images"):
        _pyramid("deit_tiny_patch16_224")(torch.randn(3, 32, 32))
