"""The segmentation recipe (``anchorformer/configs/seg.yaml``): the ADE20K recipes, typed.

full: the field's standard recipes with plain ViT backbones (REFERENCE §5 E6): Semantic FPN
(80k iterations, AdamW lr 1e-4, poly 0.9) and UperNet (160k iterations, AdamW lr 6e-5, 1500
warm-up iterations, poly 1.0, auxiliary FCN head), 512² crops, global batch 16, sliding-window
testing at the (2048, 512) scale; the backbone's blocks 2, 5, 8, 11 through mmsegmentation's
multi-level neck (``neck: multilevel``; ``simple``: ViTDet's pyramid from the last block, the
ablation). mini: the same code on the embedded mini set, scaled down.

``recipes`` holds, per decode head, the settings that differ between the heads; the chosen head's
entry is applied over the preset before ``--set`` and the flags
(:func:`anchorformer.tasks.segmentation.resolve_recipe`). Each field's comment says what it
sets; the presets give the values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...engine.recipe import TaskRecipe, setting
from ...models.pyramid import NECKS
from ...models.segmentation import HEADS

__all__ = ["SegRecipe"]

_PYRAMID_NORMS = ("LN", "GN", "BN", "")
_HEAD_NORMS = ("bn", "gn")
_SIZES = ("tiny", "small", "base")


@dataclasses.dataclass
class SegRecipe(TaskRecipe):
    """ADE20K semantic segmentation (``anchorformer train seg``)."""

    task: ClassVar[str] = "seg"

    # --- model --------------------------------------------------------------------------------
    head: str = setting(choices=HEADS)  # fpn (Semantic FPN) | upernet
    init_checkpoint: str | None = setting()  # classification weights for the backbone (an E1 model.pth)
    pyramid_channels: int = setting(ge=1)  # channels of the shared pyramid's four levels
    pyramid_norm: str = setting(choices=_PYRAMID_NORMS)  # after the pyramid's convolutions; "": none
    head_channels: int | None = setting(ge=1)  # decode head width; null: 128 for fpn, 512 for upernet
    aux_head: bool = setting()  # auxiliary FCN head on the stride-16 map (training only)
    aux_weight: float = setting(ge=0.0)  # its loss weight
    norm: str = setting(choices=_HEAD_NORMS)  # in the heads; bn becomes SyncBN when distributed on CUDA
    dropout: float = setting(ge=0.0, le=1.0)  # before the classifiers
    # --- data ---------------------------------------------------------------------------------
    crop_size: int = setting(ge=1)  # side of the training crops
    scale_range: list[float] = setting()  # random rescale range [min, max] of the training images
    num_classes: int = setting(ge=1, le=255)  # K (150 for ADE20K); label maps store 1..K in 8 bits
    # --- optimisation -------------------------------------------------------------------------
    iters: int = setting(ge=1)  # training iterations (`--epochs N` converts N passes to iterations)
    batch_size: int = setting(ge=1)  # global batch, split over the processes
    lr: float = setting(gt=0.0)
    betas: list[float] = setting()  # AdamW's (beta1, beta2)
    weight_decay: float = setting(ge=0.0)  # not on biases, norms, tokens, position embeddings, anchors
    layer_decay: float = setting(gt=0.0, le=1.0)  # layer-wise lr decay over the backbone's blocks (1.0: off)
    poly_power: float = setting(ge=0.0)  # poly schedule exponent after the warm-up
    min_lr: float = setting(ge=0.0)  # lr at the last iteration
    warmup_iters: int = setting(ge=0)  # linear warm-up iterations
    warmup_ratio: float = setting(ge=0.0, le=1.0)  # lr at iteration 0 as a fraction of lr
    clip_grad: float | None = setting(gt=0.0)  # max gradient norm; null: no clipping
    # --- evaluation (may change when a run is resumed: they act after training) ---------------
    test_mode: str = setting(choices=("slide", "whole"), resumable=True)  # sliding windows or the whole image
    test_crop_size: int = setting(ge=1, resumable=True)  # side of the sliding windows
    test_stride: int = setting(ge=1, resumable=True)  # step between windows
    test_scale: list[int] = setting(resumable=True)  # (long, short) side the image is resized to fit
    test_scales: list[float] = setting(resumable=True)  # ratios of test_scale; several: multi-scale testing
    test_flip: bool = setting(resumable=True)  # add the horizontally flipped prediction
    eval_at_end: bool = setting(resumable=True)  # evaluate the final model on the validation split
    # --- execution ----------------------------------------------------------------------------
    checkpoint_every: int = setting(ge=1, resumable=True)  # iterations between checkpoints (and the last)
    recipes: dict[str, Any] = setting(resumable=True)  # per head: settings applied when it is chosen
    # --- the neck -----------------------------------------------------------------------------
    neck: str = setting(choices=NECKS)  # multilevel (blocks 2, 5, 8, 11; mmsegmentation) | simple (ViTDet)
    # --- the global batch, dry runs -------------------------------------------------------------
    device_batch: int | None = setting(
        ge=1
    )  # crops per forward pass on one process; batch_size is made up by accumulation; null: batch_size / processes
    dry_run: bool = setting()  # a few iterations and a tiny evaluation through every code path of the recipe (DRY_RUN)

    def check(self) -> list[str]:
        problems = super().check()
        lo_hi = self.scale_range
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            problems.append(f"scale_range={lo_hi}: expected [min, max] with 0 < min <= max")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas}: expected [beta1, beta2], each in [0, 1)")
        if len(self.test_scale) != 2 or min(self.test_scale, default=0) < 1:
            problems.append(f"test_scale={self.test_scale}: expected [long side, short side], both >= 1")
        if not self.test_scales or min(self.test_scales) <= 0:
            problems.append(f"test_scales={self.test_scales}: expected a non-empty list of ratios > 0")
        unknown = set(self.model_sizes) - set(_SIZES)
        if unknown:
            problems.append(f"model_sizes: unknown size(s) {sorted(unknown)}; expected tiny, small, base")
        keys = set(self.keys()) - {"recipes"}
        for head, values in self.recipes.items():
            if head not in HEADS:
                problems.append(f"recipes.{head}: unknown head; expected some of {list(HEADS)}")
            elif values is not None and not isinstance(values, dict):
                problems.append(f"recipes.{head}={values!r}: expected a mapping of recipe keys")
            else:
                bad = sorted(set(values or {}) - keys)
                if bad:
                    problems.append(f"recipes.{head}: unknown recipe key(s) {bad}")
        return problems
