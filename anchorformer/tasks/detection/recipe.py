"""The detection recipe (``anchorformer/configs/det.yaml``): Mask R-CNN over a plain backbone, typed.

full: Mask R-CNN 1x (12 epochs, AdamW 1e-4 at batch 16, weight decay 0.05, steps at 8 and 11) with
ViTDet's simple feature pyramid; ``recipe: lsj`` applies ``recipes.lsj``, ViTDet's own recipe
(large-scale jitter at 1024², 100 epochs, batch 64). mini: the same code on the embedded
COCO-format set. ``window_size`` > 0 windows the backbone's attention as ViTDet does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...engine.recipe import TaskRecipe, setting

__all__ = ["RECIPES", "DetRecipe"]

RECIPES = ("1x", "lsj")  # Mask R-CNN 1x | ViTDet's large-scale jitter


@dataclasses.dataclass
class DetRecipe(TaskRecipe):
    """COCO detection and instance segmentation (``anchorformer train det``)."""

    task: ClassVar[str] = "det"

    # --- backbone input and the comparable-FLOPs pairing ----------------------------------------
    backbone_checkpoint: str | None = setting(resumable=True)  # E1 classification model.pth; null: random init
    grad_checkpointing: bool = setting()  # recompute the backbone's blocks in backward (saves memory)
    input_scale: float = setting(gt=0.0)  # multiplies min_size and max_size (ignored with match_macs_of)
    match_macs_of: str | None = setting()  # a backbone name: pick input_scale for comparable backbone GMACs
    match_size: list[int] = setting()  # (H, W) at which match_macs_of compares backbone GMACs
    # --- detector -------------------------------------------------------------------------------
    detector: str = setting(choices=("mask_rcnn", "retinanet"))
    out_channels: int = setting(ge=1)
    norm: str = setting(choices=("LN", "GN", "BN", ""))
    min_size: int = setting(ge=1)
    max_size: int = setting(ge=1)
    anchor_sizes: list[int] = setting()
    aspect_ratios: list[float] = setting()
    rpn_conv_depth: int = setting(ge=1)
    rpn_pre_nms_top_n_train: int = setting(ge=1)
    rpn_post_nms_top_n_train: int = setting(ge=1)
    rpn_pre_nms_top_n_test: int = setting(ge=1)
    rpn_post_nms_top_n_test: int = setting(ge=1)
    rpn_batch_size_per_image: int = setting(ge=1)
    box_head: str = setting(choices=("4conv1fc", "2fc"))
    representation_size: int = setting(ge=1)
    box_batch_size_per_image: int = setting(ge=1)
    box_score_thresh: float = setting(ge=0.0, le=1.0)
    box_detections_per_img: int = setting(ge=1)
    mask_head_layers: int = setting(ge=1)
    mask_head_channels: int = setting(ge=1)
    # --- optimisation ---------------------------------------------------------------------------
    epochs: int = setting(ge=1, resumable=True)  # a longer schedule may resume a shorter one
    batch_size: int = setting(ge=1)  # per process
    lr: float = setting(gt=0.0)  # at a global batch of lr_batch
    lr_batch: int = setting(ge=1)
    weight_decay: float = setting(ge=0.0)  # not on biases, norms, position embeddings, tokens, anchors
    layer_decay: float = setting(gt=0.0, le=1.0)
    warmup_iters: int = setting(ge=0)
    warmup_factor: float = setting(gt=0.0, le=1.0)
    lr_steps: list[int] = setting(resumable=True)  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = setting(gt=0.0)
    clip_grad: float | None = setting(gt=0.0)
    hflip: float = setting(ge=0.0, le=1.0)
    # --- execution and evaluation ---------------------------------------------------------------
    find_unused_parameters: bool = setting()
    pin_memory: bool = setting(resumable=True)
    eval_split: str = setting(resumable=True)
    eval_batch_size: int = setting(ge=1, resumable=True)  # 1: results independent of batch padding
    max_train_images: int | None = setting(ge=1)  # null: all
    max_eval_images: int | None = setting(ge=1, resumable=True)
    # --- windowed attention (ViTDet) and the training recipe --------------------------------------
    window_size: int = setting(ge=0)  # 0: global attention in every block; S > 0: S x S windows (ViTDet)
    global_blocks: list[int] | None = setting()  # blocks left global when windowed; null: ViTDet's rule
    recipe: str = setting(choices=RECIPES)  # 1x: resize to min_size/max_size | lsj: large-scale jitter
    lsj_scale: list[float] = setting()  # lsj: [min, max] scale of the max_size square images are resized to
    recipes: dict[str, Any] = setting(resumable=True)  # per recipe: the settings applied when it is chosen
    # --- the global batch, dry runs -------------------------------------------------------------
    global_batch: int | None = setting(ge=1)  # images per optimizer step, all processes (16); null: batch x procs
    dry_run: bool = setting()  # a few steps and a tiny evaluation through every code path of the recipe (DRY_RUN)

    def check(self) -> list[str]:
        problems = super().check()
        if any(not 0 < s <= self.epochs for s in self.lr_steps):
            problems.append(f"lr_steps={self.lr_steps}: expected epochs in 1..{self.epochs}")
        if len(self.match_size) != 2 or min(self.match_size) < 1:
            problems.append(f"match_size={self.match_size}: expected [height, width]")
        if len(self.lsj_scale) != 2 or not 0 < self.lsj_scale[0] <= self.lsj_scale[1]:
            problems.append(f"lsj_scale={self.lsj_scale}: expected [min, max] with 0 < min <= max")
        if self.recipe == "lsj" and self.min_size != self.max_size:
            problems.append(f"recipe=lsj: min_size ({self.min_size}) must equal max_size ({self.max_size}), the square")
        if self.global_blocks is not None and any(i < 0 for i in self.global_blocks):
            problems.append(f"global_blocks={self.global_blocks}: expected block indices >= 0")
        for name, values in self.recipes.items():
            if name not in RECIPES:
                problems.append(f"recipes.{name}: unknown recipe; expected some of {list(RECIPES)}")
            elif values is not None and not isinstance(values, dict):
                problems.append(f"recipes.{name}={values!r}: expected a mapping of recipe keys")
            else:
                bad = sorted(set(values or {}) - (set(self.keys()) - {"recipes", "recipe"}))
                if bad:
                    problems.append(f"recipes.{name}: unknown recipe key(s) {bad}")
        return problems
