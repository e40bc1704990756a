"""The classification recipe (``anchorformer/configs/cls.yaml``): DeiT's, typed.

full: the DeiT recipe (Touvron et al., ICML 2021; REFERENCE §5 E1). mini: the same code on the
embedded 10-class set, scaled down. Each field's comment says what it sets; the presets give the
values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...engine.recipe import TaskRecipe, setting
from ...models.anchorformer import ANCHOR_INITS
from ...models.factory import is_anchorformer
from .distillation import DISTILLATION_KINDS

__all__ = ["ClsRecipe"]


@dataclasses.dataclass
class ClsRecipe(TaskRecipe):
    """ImageNet classification (``anchorformer train cls``)."""

    task: ClassVar[str] = "cls"

    # --- the anchors (E9; AnchorFormer models only) ---------------------------------------------
    anchor_init: str = setting(choices=ANCHOR_INITS)  # official (U(-1/sqrt(D), 1/sqrt(D))) | unit | qk_norm | kmeans
    learn_temperature: bool = setting()  # a learned scale on each layer's token-anchor logits
    anchor_lr_mult: float = setting(gt=0.0)  # the anchors' learning rate = lr x anchor_lr_mult
    # --- optimisation -------------------------------------------------------------------------
    epochs: int = setting(ge=1)
    batch_size: int = setting(ge=1)  # per process; global batch = batch_size x processes x accum_steps
    accum_steps: int = setting(ge=1)  # gradient accumulation steps per optimizer step
    opt: str = setting()  # a timm optimizer name (adamw, sgd, lamb, ...)
    lr: float = setting(gt=0.0)  # learning rate at a global batch of lr_batch (scaled linearly)
    lr_batch: int = setting(ge=1)
    opt_eps: float = setting(gt=0.0)
    momentum: float = setting(ge=0.0, le=1.0)  # SGD only
    weight_decay: float = setting(ge=0.0)  # not on biases, norms, tokens, position embeddings, anchors
    sched: str = setting()  # a timm scheduler name (cosine, step, ...)
    min_lr: float = setting(ge=0.0)
    warmup_lr: float = setting(ge=0.0)
    warmup_epochs: int = setting(ge=0)
    clip_grad: float | None = setting(gt=0.0)  # max gradient norm; null: no clipping
    # --- augmentation and regularisation ------------------------------------------------------
    smoothing: float = setting(ge=0.0, le=1.0)  # label smoothing (folded into the mixup targets)
    mixup: float = setting(ge=0.0)  # mixup alpha (0: off)
    cutmix: float = setting(ge=0.0)  # cutmix alpha (0: off)
    mixup_prob: float = setting(ge=0.0, le=1.0)
    mixup_switch_prob: float = setting(ge=0.0, le=1.0)
    mixup_mode: str = setting(choices=("batch", "pair", "elem"))
    auto_augment: str | None = setting()  # e.g. rand-m9-mstd0.5-inc1; null: off
    color_jitter: float = setting(ge=0.0)
    scale: list[float] = setting()  # RandomResizedCrop area range [min, max]
    hflip: float = setting(ge=0.0, le=1.0)  # horizontal flip probability
    no_aug: bool = setting()  # train on the evaluation transform
    train_interpolation: str = setting()
    reprob: float = setting(ge=0.0, le=1.0)  # random erasing probability
    remode: str = setting()
    recount: int = setting(ge=1)
    repeated_aug: bool = setting()  # timm RepeatAugSampler (3 repeats), as in DeiT
    crop_pct: float = setting(gt=0.0, le=1.0)  # evaluation: resize to img_size / crop_pct, centre crop
    eval_interpolation: str = setting()
    ema: bool = setting()  # keep an EMA of the weights (timm ModelEmaV3) and report its top-1
    ema_decay: float = setting(ge=0.0, le=1.0)
    # --- distillation (DeiT) ------------------------------------------------------------------
    distillation: str = setting(choices=("auto", *DISTILLATION_KINDS))  # auto: hard for *_distilled_*
    distillation_alpha: float = setting(ge=0.0, le=1.0)  # weight of the distillation term
    distillation_tau: float = setting(gt=0.0)  # temperature of soft distillation
    teacher: str = setting()  # a timm model name, or a checkpoint written by `train cls`
    teacher_pretrained: bool = setting()  # for a timm name: load timm's pretrained weights
    teacher_kwargs: dict[str, Any] = setting()  # more create_model arguments for a named teacher
    # --- execution ----------------------------------------------------------------------------
    amp_dtype: str = setting(choices=("bfloat16", "float16"))  # float16 adds a gradient scaler
    channels_last: bool = setting()  # memory format for CNN models (teacher)
    compile: bool = setting(resumable=True)  # torch.compile the model
    pin_memory: bool = setting(resumable=True)
    eval_batch_size: int = setting(ge=1, resumable=True)
    eval_every: int = setting(ge=1)  # evaluate every k epochs (and always after the last)
    throughput_batch_size: int = setting(ge=1, resumable=True)  # images per forward pass, throughput
    throughput_iters: int = setting(ge=1, resumable=True)
    # --- the global batch, the teacher's weights, dry runs ------------------------------------
    global_batch: int | None = setting(ge=1)  # per optimizer step, all processes; null: batch x procs x accum
    teacher_checkpoint: str | None = setting()  # a named teacher's weights: a local .safetensors/.pth file
    max_train_images: int | None = setting(ge=1)  # train on the first N images only; null: all
    max_eval_images: int | None = setting(ge=1, resumable=True)  # evaluate on the first N images only; null: all
    dry_run: bool = setting()  # a few steps and a tiny evaluation through every code path of the recipe (DRY_RUN)

    def check(self) -> list[str]:
        problems = super().check()
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            problems.append(f"scale={self.scale}: expected [min, max] with 0 < min <= max <= 1")
        if self.patch_size is not None and self.img_size % self.patch_size:
            problems.append(f"patch_size={self.patch_size}: expected a divisor of img_size={self.img_size}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            problems.append(f"batch_size={self.batch_size}: must be even with mixup/cutmix")
        if self.global_batch is not None and self.accum_steps != 1:
            problems.append(
                f"accum_steps={self.accum_steps}: derived from global_batch={self.global_batch}; set one of them (accum_steps=1)"
            )
        ablation = self.anchor_init != "official" or self.learn_temperature or self.anchor_lr_mult != 1.0
        if ablation and not is_anchorformer(self.model):
            problems.append(
                f"anchor_init={self.anchor_init!r}, learn_temperature={self.learn_temperature}, "
                f"anchor_lr_mult={self.anchor_lr_mult}: {self.model!r} has no anchors; expected official, false, 1.0"
            )
        if self.anchor_init != "official" and self.anchor_mode != "learned":
            problems.append(
                f"anchor_init={self.anchor_init!r}: expected official with anchor_mode={self.anchor_mode!r}"
            )
        unknown = set(self.model_sizes) - {"tiny", "small", "base"}
        if unknown:
            problems.append(f"model_sizes: unknown size(s) {sorted(unknown)}; expected tiny, small, base")
        return problems
