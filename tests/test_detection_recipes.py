"""E5's baselines as the field runs them: the windowed DeiT (ViTDet) and ViTDet's LSJ recipe."""

from __future__ import annotations

import json

import pytest
import torch
from test_windowed import _deit_macs

from anchorformer.data.coco import CocoDetection, LargeScaleJitter
from anchorformer.engine.recipe import RecipeError
from anchorformer.tasks.detection.results import standard_backbones
from anchorformer.tasks.detection.train import detector_config, resolve_recipe, train

# the full preset shrunk to seconds on a CPU: what a dry run of the full profile changes, nothing more
TINY_FULL = [
    "img_size=32",
    "global_batch=null",  # the batch below, no accumulation (the global batch has its own test)
    "patch_size=8",
    "model_sizes.tiny={embed_dim: 32, depth: 2, num_heads: 2}",
    "num_anchors=4",
    "out_channels=16",
    "representation_size=32",
    "mask_head_layers=1",
    "mask_head_channels=8",
    "rpn_pre_nms_top_n_train=50",
    "rpn_post_nms_top_n_train=20",
    "rpn_pre_nms_top_n_test=50",
    "rpn_post_nms_top_n_test=20",
    "box_batch_size_per_image=16",
    "batch_size=2",
    "epochs=1",
    "lr_steps=[1]",
    "warmup_iters=2",
    "max_train_images=4",
    "max_eval_images=2",
    "device=cpu",
    "amp=false",
    "threads=1",
    "num_workers=0",
    "log_every=1",
]


def test_lsj_preset_is_vitdets_recipe() -> None:
    one_x = resolve_recipe(profile="full")
    assert (one_x.recipe, one_x.epochs, one_x.min_size, one_x.max_size) == ("1x", 12, 800, 1333)
    lsj = resolve_recipe(profile="full", overrides=["recipe=lsj"])
    assert (lsj.epochs, lsj.lr, lsj.lr_batch, lsj.batch_size * 8) == (100, 1e-4, 64, 64)
    assert (lsj.layer_decay, lsj.drop_path, lsj.weight_decay, lsj.lsj_scale) == (0.7, 0.1, 0.1, [0.1, 2.0])
    assert (lsj.min_size, lsj.max_size, lsj.lr_steps, lsj.warmup_iters) == (1024, 1024, [89, 96], 250)
    det, _ = detector_config(lsj, 80)
    assert (det.train_resize, det.size_divisible) == (False, 1024)  # square pad, no second resize
    assert detector_config(one_x, 80)[0].train_resize and detector_config(one_x, 80)[0].size_divisible == 32
    # --set wins over the recipe's entry, and entries are checked
    assert resolve_recipe(profile="full", overrides=["recipe=lsj", "epochs=50", "lr_steps=[40]"]).epochs == 50
    with pytest.raises(RecipeError, match="must equal max_size"):
        resolve_recipe(profile="full", overrides=["recipe=lsj", "max_size=1333"])
    with pytest.raises(RecipeError, match="unknown recipe key"):
        resolve_recipe(profile="full", overrides=["recipe=lsj", "recipes.lsj.epoch=3"])
    with pytest.raises(RecipeError, match="one of"):
        resolve_recipe(profile="full", overrides=["recipe=3x"])


def test_large_scale_jitter(mini_data) -> None:
    data = CocoDetection(mini_data / "coco", "train")
    image, target = data[0]
    torch.manual_seed(0)
    sizes = set()
    for _ in range(20):
        im, t = LargeScaleJitter(96, (0.1, 2.0))(image, target)
        assert max(im.shape[-2:]) <= 96 and t["masks"].shape[-2:] == im.shape[-2:]
        sizes.add(tuple(im.shape[-2:]))
        for box, mask in zip(t["boxes"], t["masks"]):
            if mask.any():  # the box is the mask's extent, inside the crop
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            else:
                assert box.tolist() == [0, 0, 0, 0]
    assert len(sizes) > 5  # the scale jitters
    torch.manual_seed(1)
    a = LargeScaleJitter(96)(image, target)[0]
    torch.manual_seed(1)
    assert torch.equal(a, LargeScaleJitter(96)(image, target)[0])


@pytest.mark.parametrize("recipe", ["1x", "lsj"])
def test_full_preset_dry_run(mini_data, tmp_path, recipe) -> None:
    """The full preset of each recipe trains and evaluates end to end on a few tiny inputs."""
    size = ["min_size=96", "max_size=96"] if recipe == "lsj" else ["min_size=96", "max_size=128"]
    metrics = train(
        mini_data / "coco", tmp_path, "deit_tiny_patch16_224", profile="full",
        overrides=[*TINY_FULL, f"recipe={recipe}", *size, "window_size=4"],
    )  # fmt: skip
    assert metrics["iterations"] == 2 and "bbox_AP" in metrics
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["recipe"] == recipe and run["detector_config"]["backbone_kwargs"]["window_size"] == 4
    assert run["detector_config"]["train_resize"] == (recipe == "1x")


def test_windowed_deit_run_of_the_mini_pipeline() -> None:
    """The E5 row `deit_t_windowed`: the mini DeiT-T in 8x8 windows, its last block global; GMACs exact."""
    cfg = resolve_recipe(profile="mini", overrides=["window_size=8"], model="deit_tiny_patch16_224")
    det, info = detector_config(cfg, 3)
    assert det.backbone_kwargs["window_size"] == 8 and "global_blocks" not in det.backbone_kwargs
    # 128x160 input, patch 8: a 16 x 20 grid in 2 x 3 windows (padded to 16 x 24), blocks 0-2 windowed
    expected = _deit_macs(96, 4, (16, 20), 1, 8, 8, [3])
    assert round(info["backbone_gmacs_match"] * 1e9) == expected
    glob = detector_config(resolve_recipe(profile="mini", model="deit_tiny_patch16_224"), 3)[1]
    assert round(glob["backbone_gmacs_match"] * 1e9) == _deit_macs(96, 4, (16, 20), 1, 8, 0, [])
    assert info["backbone_gmacs_match"] < glob["backbone_gmacs_match"]


def test_standard_backbones_have_the_windowed_deit() -> None:
    rows = {(r["family"], r["size"], r.get("attention")): r for r in standard_backbones(("tiny",))}
    assert rows[("DeiT", "T", "global")]["gmacs"] == pytest.approx(104.244, abs=1e-3)
    assert rows[("DeiT", "T", "windowed 14×14, global blocks 2, 5, 8, 11")]["gmacs"] == pytest.approx(53.455, abs=1e-3)
    assert rows[("AnchorFormer", "T", "anchor (global), M 30")]["gmacs"] == pytest.approx(21.933, abs=1e-3)
    assert rows[("DeiT", "T", "windowed 14×14, global blocks 2, 5, 8, 11")]["gmacs"] == round(
        _deit_macs(192, 12, (50, 84), 1, 16, 14, [2, 5, 8, 11]) / 1e9, 3
    )
