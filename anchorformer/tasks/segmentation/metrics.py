"""Semantic-segmentation metrics: mIoU, mAcc and aAcc from a confusion matrix (ADE20K protocol).

The protocol of the ADE20K benchmark as the field computes it (MMSegmentation's ``IoUMetric``):
the pixel counts of every validation image are accumulated into one K x K confusion matrix over
the whole split (not averaged per image), pixels whose ground truth is the ignore index (255,
ADE20K's "other" after ``reduce_zero_label``) are left out, and for class k

- IoU_k = TP_k / (TP_k + FP_k + FN_k), undefined (NaN) when class k appears neither in the
  prediction nor in the ground truth;
- Acc_k = TP_k / (TP_k + FN_k), undefined (NaN) when class k does not appear in the ground truth;
- mIoU and mAcc are the means over the classes where they are defined (NaN ignored);
- aAcc = sum_k TP_k / (number of labelled pixels).

All three are reported in percent, as the field does (mIoU 44.0 means 0.440).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "SegMetrics", "confusion_matrix", "metrics_from_confusion"]

IGNORE_INDEX = 255  # ADE20K's label 0 ("other") after reduce_zero_label


def _check_pair(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int, name: str) -> None:
    where = f" ({name})" if name else ""
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction and ground truth differ in size{where}: prediction {tuple(pred.shape)}, "
            f"ground truth {tuple(target.shape)}; expected the same (H, W)"
        )
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise ValueError(f"label maps must be integer tensors{where}; got {pred.dtype} and {target.dtype}")
    if pred.numel() == 0:
        return
    pmin, pmax = int(pred.min()), int(pred.max())
    if pmin < 0 or pmax >= num_classes:
        raise ValueError(f"prediction values must lie in [0, {num_classes - 1}]{where}; got [{pmin}, {pmax}]")
    valid = target[target != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(
            f"ground-truth values must lie in [0, {num_classes - 1}] or be {ignore_index}{where}; "
            f"got [{int(valid.min())}, {int(valid.max())}]"
        )


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    *,
    name: str = "",
) -> torch.Tensor:
    """Pixel confusion matrix of one prediction against its ground truth.

    Args:
        pred: (..., H, W) integer class indices in [0, K).
        target: same shape; class indices in [0, K) or ``ignore_index``.
        num_classes: K.
        ignore_index: ground-truth value whose pixels are not counted.
        name: what the pair is (e.g. the ground-truth file), for error messages.

    Returns:
        (K, K) int64 counts; row = ground-truth class, column = predicted class.

    Raises:
        ValueError: shapes differ, or a value lies outside its range (the message names ``name``).
    """
    _check_pair(pred, target, num_classes, ignore_index, name)
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx.flatten().cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _percent(x: float) -> float | None:
    return None if math.isnan(x) else round(100.0 * x, 4)


def metrics_from_confusion(cm: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mAcc and aAcc (percent) and the per-class IoU / Acc of a confusion matrix.

    Args:
        cm: (K, K) counts, rows ground truth, columns prediction.
        class_names: K names for the per-class table (default: "0".."K-1").

    Returns:
        ``{"mIoU", "mAcc", "aAcc", "num_pixels", "num_classes_evaluated", "per_class": [{"class",
        "name", "IoU", "Acc", "gt_pixels", "pred_pixels"}, ...]}``; undefined per-class values
        are ``None`` (NaN in the maths) and are left out of the means.
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K); got {tuple(cm.shape)}")
    cm = cm.double()
    tp = cm.diagonal()
    gt = cm.sum(1)  # pixels of each class in the ground truth
    pr = cm.sum(0)  # pixels predicted as each class
    union = gt + pr - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = float(gt.sum())
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names; expected {k}")
    per_class = [
        {
            "class": i,
            "name": names[i],
            "IoU": _percent(float(iou[i])),
            "Acc": _percent(float(acc[i])),
            "gt_pixels": int(gt[i]),
            "pred_pixels": int(pr[i]),
        }
        for i in range(k)
    ]
    defined = ~torch.isnan(iou)
    return {
        "mIoU": _percent(float(iou[defined].mean())) if defined.any() else None,
        "mAcc": _percent(float(acc[~torch.isnan(acc)].mean())) if (~torch.isnan(acc)).any() else None,
        "aAcc": _percent(float(tp.sum()) / total) if total > 0 else None,
        "num_pixels": int(total),
        "num_classes_evaluated": int(defined.sum()),
        "per_class": per_class,
    }


class SegMetrics:
    """Accumulates one confusion matrix over a split; ``compute()`` gives the metrics.

    Example::

        metrics = SegMetrics(150)
        for pred, gt in pairs:  # (H, W) each
            metrics.update(pred, gt, name=gt_file)
        result = metrics.compute()  # {"mIoU": ..., "mAcc": ..., "aAcc": ..., ...}
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor, *, name: str = "") -> None:
        """Add one prediction / ground-truth pair ((H, W) or (B, H, W) integer tensors)."""
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index, name=name)

    def all_reduce(self) -> None:
        """Sum the matrices of every process (no-op outside ``torch.distributed``)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = self.cm.to(device)
            dist.all_reduce(t)
            self.cm = t.cpu()

    def compute(self) -> dict[str, Any]:
        """The metrics of :func:`metrics_from_confusion` for the pixels seen so far."""
        return metrics_from_confusion(self.cm, self.class_names)
