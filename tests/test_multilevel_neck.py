"""The multi-level neck of E6 (mmsegmentation's ViT/DeiT + UperNet): blocks, strides, shapes, the recipe."""

from __future__ import annotations

import math

import pytest
import torch

from anchorformer.models.pyramid import MultiLevelNeck, default_neck_indices, param_groups_layer_decay
from anchorformer.models.segmentation import build_segmentation_model, segmentation_model_from_config
from anchorformer.tasks.segmentation.results import complexity_rows
from anchorformer.tasks.segmentation.train import build_model, resolve_recipe

TINY = dict(img_size=32, embed_dim=32, depth=4, num_heads=2)


def test_default_indices() -> None:
    assert default_neck_indices(12) == [2, 5, 8, 11]
    assert default_neck_indices(24) == [5, 11, 17, 23]
    assert default_neck_indices(4) == [0, 1, 2, 3]
    assert default_neck_indices(3) == [0, 1, 1, 2]


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("hw", [(64, 96), (67, 93), (33, 50)])
def test_strides_and_shapes_for_odd_sizes(patch, hw) -> None:
    torch.manual_seed(0)
    scales = tuple(patch / s for s in (4, 8, 16, 32))
    neck = MultiLevelNeck(
        "deit_tiny_patch16_224", 24, scales, backbone_kwargs=dict(TINY, patch_size=patch)
    ).eval()  # fmt: skip
    assert neck.strides == (4, 8, 16, 32) and neck.indices == [0, 1, 2, 3]
    out = neck(torch.randn(2, 3, *hw))
    h, w = math.ceil(hw[0] / patch), math.ceil(hw[1] / patch)  # the padded grid
    assert list(out) == ["0", "1", "2", "3"]
    for level, scale in zip(out.values(), scales):
        assert level.shape == (2, 24, max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))


def test_reads_the_named_blocks_without_the_final_norm() -> None:
    torch.manual_seed(0)
    neck = MultiLevelNeck("anchorformer_tiny_patch16_224", 8, (1.0, 1.0), indices=[3, 1],
                          backbone_kwargs=dict(TINY, patch_size=8)).eval()  # fmt: skip
    x = torch.randn(1, 3, 40, 48)
    maps = neck.forward_backbone(x)
    vit = neck.backbone
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    seen = []
    for blk in vit.blocks:
        tokens = blk(tokens)
        seen.append(tokens[:, vit.num_prefix_tokens :].reshape(1, 5, 6, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(maps[0], seen[3])
    torch.testing.assert_close(maps[1], seen[1])
    with pytest.raises(ValueError, match="one block in 0..3 per scale"):
        MultiLevelNeck("deit_tiny_patch16_224", 8, (1.0,), indices=[4], backbone_kwargs=dict(TINY, patch_size=8))


def test_segmentation_models_with_either_neck() -> None:
    torch.manual_seed(0)
    for head in ("fpn", "upernet"):
        model = build_segmentation_model(
            "deit_tiny_patch16_224", head, 7, pyramid_channels=16, head_channels=16,
            backbone_kwargs=dict(TINY, patch_size=8), neck="multilevel", aux_head=True,
        )  # fmt: skip
        assert isinstance(model.pyramid, MultiLevelNeck)
        model.eval()
        assert model(torch.randn(1, 3, 75, 61)).shape == (1, 7, 75, 61)
        model.train()
        losses = model(torch.randn(2, 3, 64, 64), torch.randint(0, 7, (2, 64, 64)))
        losses["loss"].backward()
        rebuilt = segmentation_model_from_config(model.config)
        assert isinstance(rebuilt.pyramid, MultiLevelNeck)
        rebuilt.load_state_dict(model.state_dict())
        # layer-wise lr decay reaches the backbone through the neck
        groups = param_groups_layer_decay(model, lr=1.0, weight_decay=0.0, layer_decay=0.5)
        assert min(g["lr_scale"] for g in groups) == 0.5**5
    old = dict(model.config)  # a config saved before the neck existed builds the simple pyramid
    old.pop("neck"), old.pop("neck_indices")
    assert type(segmentation_model_from_config(old).pyramid).__name__ == "SimpleFeaturePyramid"


def test_recipes_choose_the_neck() -> None:
    for profile in ("mini", "full"):
        assert resolve_recipe(profile).neck == "multilevel"
    mini = resolve_recipe("mini", ["neck=simple"])
    assert mini.neck == "simple"
    with torch.device("meta"):
        assert isinstance(build_model(resolve_recipe("mini"), init_checkpoint="").pyramid, MultiLevelNeck)
        assert type(build_model(mini, init_checkpoint="").pyramid).__name__ == "SimpleFeaturePyramid"
    rows = complexity_rows([("deit_small_patch16_224", "upernet")], profile="full")
    assert rows[0]["gmacs"] > 0 and rows[0]["params_m"] > 22
