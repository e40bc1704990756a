"""Segmentation inference: test-time resize, whole-image or sliding-window, multi-scale and flip.

The ADE20K protocol as the field runs it (MMSegmentation's test pipeline):

1. the image is resized, keeping its aspect ratio, to fit ``test_scale`` = (long, short) =
   (2048, 512): scale factor ``min(long / long_side, short / short_side)``;
2. the model runs on the whole (padded) image, or on ``crop_size`` windows placed every
   ``stride`` pixels (512 and 341), the last window of each row and column flush with the
   image's edge; overlapping logits are averaged;
3. the logits are resized (bilinear) to the original image size, turned into probabilities
   and, for multi-scale (ratios of the test scale, e.g. 0.5 ... 1.75) and flip testing,
   averaged over the augmentations; the prediction is the argmax.

Letters used in shapes: B batch, K classes, H, W the image's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODES", "predict_probs", "slide_logits", "rescaled_size", "whole_logits"]

MODES = ("whole", "slide")


def _pair(x: int | Sequence[int], name: str) -> tuple[int, int]:
    t = (int(x), int(x)) if isinstance(x, int) else tuple(int(v) for v in x)
    if len(t) != 2 or min(t) <= 0:
        raise ValueError(f"{name} must be a positive int or (height, width); got {x!r}")
    return t  # type: ignore[return-value]


def rescaled_size(h: int, w: int, test_scale: Sequence[int] | None, ratio: float = 1.0) -> tuple[int, int]:
    """Size (h', w') of an (h, w) image rescaled to fit ``test_scale`` = (long, short), times ``ratio``.

    ``None`` keeps the image's size (times ``ratio``). Rounded to the nearest pixel, as mmcv does.
    """
    if test_scale is None:
        factor = ratio
    else:
        long_max, short_max = max(test_scale) * ratio, min(test_scale) * ratio
        factor = min(long_max / max(h, w), short_max / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def whole_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model on whole images: (B, 3, H, W) -> (B, K, H, W)."""
    return model(images)


def slide_logits(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
) -> torch.Tensor:
    """Sliding-window logits, averaged where windows overlap.

    Windows of ``crop_size`` start every ``stride`` pixels; the last one of each row and column
    is moved back to end at the image's edge; an image smaller than the crop in a dimension is
    one window there (the model pads it).

    Args:
        model: maps (B, 3, h, w) to (B, K, h, w) for any h, w.
        images: (B, 3, H, W).
        crop_size: window (height, width).
        stride: step (height, width), at most the crop size (no gaps).
        num_classes: K.

    Returns:
        (B, K, H, W) float32 logits.
    """
    ch, cw = _pair(crop_size, "crop_size")
    sh, sw = _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {(sh, sw)} must not exceed crop_size {(ch, cw)} (windows would leave gaps)")
    b, _, h, w = images.shape
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1 = min(r * sh, max(h - ch, 0))
            x1 = min(c * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            logits = model(images[:, :, y1:y2, x1:x2])  # (B, K, y2 - y1, x2 - x1)
            if logits.shape[1] != num_classes:
                raise ValueError(f"the model gives {logits.shape[1]} classes; expected {num_classes}")
            out[:, :, y1:y2, x1:x2] += logits.float()
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    *,
    mode: str = "slide",
    crop_size: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    test_scale: Sequence[int] | None = (2048, 512),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class probabilities of images at ``out_size``, over the test-time augmentations.

    Args:
        model: a segmentation model in eval mode, (B, 3, h, w) -> (B, K, h, w) logits.
        images: (B, 3, H, W) normalised images at their original size.
        num_classes: K.
        mode: ``"whole"`` or ``"slide"``.
        crop_size: sliding window (height, width).
        stride: sliding step.
        test_scale: (long, short) the image is resized to fit; ``None``: no resize.
        scales: ratios of the test scale (``(1.0,)``: single scale).
        flip: also run on the horizontally flipped images.
        out_size: (H_out, W_out) of the result; default the input's (H, W).

    Returns:
        (B, K, H_out, W_out) probabilities averaged over ``len(scales) * (1 + flip)`` runs.
    """
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {MODES}; got {mode!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
    if not scales:
        raise ValueError("scales must hold at least one ratio")
    h, w = images.shape[-2:]
    out_hw = tuple(out_size) if out_size is not None else (h, w)
    total = None
    runs = 0
    for ratio in scales:
        size = rescaled_size(h, w, test_scale, float(ratio))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            if mode == "slide":
                logits = slide_logits(model, xi, crop_size, stride, num_classes)
            else:
                logits = whole_logits(model, xi).float()
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != out_hw:
                logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
            runs += 1
    assert total is not None
    return total / runs
