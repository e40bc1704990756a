"""COCO evaluation with pycocotools: box and mask AP, AP50, AP75, APs, APm, APl.

The protocol of Lin et al., "Microsoft COCO: Common Objects in Context" (ECCV 2014), as
implemented by ``pycocotools.cocoeval.COCOeval``: AP averaged over IoU 0.50:0.05:0.95 and the
80 categories, at most 100 detections per image, crowd regions in the ground truth matched but
not counted. Detections are kept in the COCO results format (``detections.json``): one record
per detection with ``image_id``, ``category_id`` (the dataset's own ids), ``bbox`` [x, y, w, h]
in original-image pixels, ``score`` and, for instance segmentation, ``segmentation`` as RLE.

As in detectron2, mask AP is computed from the records without their ``bbox`` field, so that
pycocotools takes an instance's area from its mask (not its box) for the small/medium/large
split. Metrics are reported in percent (pycocotools' fractions x 100), e.g. ``bbox_AP``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ...io import write_json_atomic as _write_json_atomic

__all__ = [
    "IOU_TYPES",
    "METRIC_NAMES",
    "detections_to_coco",
    "evaluate_coco",
    "metric_keys",
    "write_json_atomic",
]

_logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def metric_keys(iou_types: Iterable[str] = IOU_TYPES) -> list[str]:
    """``["bbox_AP", ..., "bbox_APl", "segm_AP", ...]``."""
    return [f"{t}_{n}" for t in iou_types for n in METRIC_NAMES]


def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    cat_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Convert detector outputs to COCO result records.

    Args:
        outputs: per image ``boxes`` (K, 4) xyxy in original-image pixels, ``scores`` (K,),
            ``labels`` (K,) in 1..num_classes, optionally ``masks`` (K, 1, H, W) probabilities.
        image_ids: the COCO image id of each output.
        cat_ids: COCO category id of label ``i + 1`` at index ``i``.
        mask_threshold: masks are binarised at this probability.

    Returns:
        A list of records (``bbox`` as [x, y, w, h], rounded to 1/100 pixel; ``segmentation``
        as RLE with ``counts`` a string when masks are given).

    Raises:
        ValueError: lengths disagree or a label falls outside ``cat_ids``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"detections_to_coco: {len(outputs)} outputs but {len(image_ids)} image ids")
    records: list[dict[str, Any]] = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        scores = out["scores"].detach().float().cpu()
        labels = out["labels"].detach().cpu()
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > len(cat_ids)):
            raise ValueError(
                f"image {img_id}: labels must be in 1..{len(cat_ids)}; got {labels.min().item()}..{labels.max().item()}"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = None
        if "masks" in out:
            masks = out["masks"].detach().cpu()
            if masks.dim() == 4:
                masks = masks[:, 0]  # (K, H, W)
            binary = (masks > mask_threshold).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for k in range(len(scores)):
            rec: dict[str, Any] = {
                "image_id": int(img_id),
                "category_id": int(cat_ids[int(labels[k]) - 1]),
                "bbox": [round(float(v), 2) for v in xywh[k]],
                "score": round(float(scores[k]), 5),
            }
            if rles is not None:
                rle = rles[k]
                rec["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            records.append(rec)
    return records


def _load_results(coco_gt: COCO, records: list[dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes(records)``, or an empty result set when there are none (pycocotools cannot)."""
    if records:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(records)
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def evaluate_coco(
    coco_gt: COCO,
    detections: Sequence[Mapping[str, Any]] | str | os.PathLike,
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    img_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Run ``COCOeval`` and return the six standard numbers per IoU type, in percent.

    Args:
        coco_gt: the ground truth (crowd regions included).
        detections: result records or the path of a ``detections.json``.
        iou_types: any of ``"bbox"``, ``"segm"``.
        img_ids: evaluate on these images only (default: every image of ``coco_gt``).

    Returns:
        ``{"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_APl": ...}``; -1.0 (pycocotools'
        sentinel, kept as is) where a number is undefined (no ground truth in that area range).

    Raises:
        ValueError: an unknown IoU type; a record refers to an image or category not in the
            ground truth; ``segm`` requested but a record has no ``segmentation``.
    """
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad:
        raise ValueError(f"evaluate_coco: unknown IoU type(s) {bad}; expected {IOU_TYPES}")
    if isinstance(detections, (str, os.PathLike)):
        path = Path(detections)
        if not path.is_file():
            raise FileNotFoundError(f"detections file not found: {path}")
        with path.open(encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of COCO result records")
    else:
        records = [dict(r) for r in detections]
    ids = sorted(coco_gt.getImgIds() if img_ids is None else {int(i) for i in img_ids})
    known_imgs, known_cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for r in records:
        if r.get("image_id") not in known_imgs:
            raise ValueError(f"detection {r} refers to image_id {r.get('image_id')} not in the ground truth")
        if r.get("category_id") not in known_cats:
            raise ValueError(f"detection {r} refers to category_id {r.get('category_id')} not in the ground truth")
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            if any("segmentation" not in r for r in records):
                raise ValueError("evaluate_coco: 'segm' requested but some detections have no 'segmentation'")
            # mask area, not box area, decides small/medium/large (detectron2's convention)
            recs = [{k: v for k, v in r.items() if k != "bbox"} for r in records]
        else:
            recs = [dict(r) for r in records]
        coco_dt = _load_results(coco_gt, recs)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = ids
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        _logger.info("COCO %s evaluation on %d images:\n%s", iou_type, len(ids), buf.getvalue().rstrip())
        for name, value in zip(METRIC_NAMES, ev.stats[:6]):
            metrics[f"{iou_type}_{name}"] = float(value) * 100.0 if value >= 0 else -1.0
    return metrics


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON to ``path`` atomically (never half-written); numpy scalars become numbers."""
    return _write_json_atomic(path, obj, indent=indent, allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return None if math.isnan(v) else v
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
