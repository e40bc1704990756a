"""COCO evaluation: our evaluator against pycocotools run directly on the same detections.json."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from anchorformer.data.coco import CocoDetection
from anchorformer.tasks.detection.coco_eval import METRIC_NAMES, detections_to_coco, evaluate_coco, metric_keys


@pytest.fixture(scope="module")
def val_set(mini_data) -> CocoDetection:
    return CocoDetection(mini_data / "coco", "val")


def _direct(gt: COCO, records: list[dict], iou_type: str) -> list[float]:
    """pycocotools, written out as its README does."""
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(records)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]


def _noisy_outputs(ds: CocoDetection, seed: int = 0) -> tuple[list[dict], list[int]]:
    """Detections made from the ground truth: jittered, some missed, false positives, random scores."""
    g = torch.Generator().manual_seed(seed)
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        keep = (t["iscrowd"] == 0) & (torch.rand(len(t["labels"]), generator=g) > 0.15)
        boxes = t["boxes"][keep] + torch.randn(int(keep.sum()), 4, generator=g) * 3
        labels = t["labels"][keep].clone()
        masks = t["masks"][keep].float()
        h, w = t["masks"].shape[-2:]
        n_fp = int(torch.randint(0, 3, (), generator=g))
        fp = torch.rand(n_fp, 2, generator=g) * torch.tensor([w - 20.0, h - 20.0])
        boxes = torch.cat([boxes, torch.cat([fp, fp + 15], 1)])
        labels = torch.cat([labels, torch.randint(1, ds.num_classes + 1, (n_fp,), generator=g)])
        fp_masks = torch.zeros(n_fp, h, w)
        for k in range(n_fp):
            x0, y0 = int(fp[k, 0]), int(fp[k, 1])
            fp_masks[k, y0 : y0 + 15, x0 : x0 + 15] = 0.9
        masks = torch.cat([masks * 0.8 + 0.1 * torch.rand(masks.shape, generator=g), fp_masks])
        outputs.append(
            {"boxes": boxes, "labels": labels, "scores": torch.rand(len(labels), generator=g), "masks": masks[:, None]}
        )
        ids.append(t["image_id"])
    return outputs, ids


def test_evaluator_equals_pycocotools_on_the_same_json(val_set: CocoDetection, tmp_path) -> None:
    outputs, ids = _noisy_outputs(val_set)
    records = detections_to_coco(outputs, ids, val_set.cat_ids)
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(records))
    ours = evaluate_coco(val_set.coco, path)
    assert sorted(ours) == sorted(metric_keys())

    loaded = json.loads(path.read_text())
    gt = COCO()
    gt.dataset = copy.deepcopy(val_set.coco.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    bbox = _direct(gt, copy.deepcopy(loaded), "bbox")
    segm_mask_area = _direct(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in loaded], "segm")
    segm_as_is = _direct(gt, copy.deepcopy(loaded), "segm")
    for name, b, s in zip(METRIC_NAMES, bbox, segm_mask_area):
        assert ours[f"bbox_{name}"] == pytest.approx(100 * b if b >= 0 else -1.0, abs=1e-12)
        assert ours[f"segm_{name}"] == pytest.approx(100 * s if s >= 0 else -1.0, abs=1e-12)
    # the area ranges aside, mask AP does not depend on where the area comes from
    for k in range(3):
        assert ours[f"segm_{METRIC_NAMES[k]}"] == pytest.approx(100 * segm_as_is[k], abs=1e-12)
    assert 20 < ours["bbox_AP"] < 95 and 20 < ours["segm_AP"] < 95  # neither trivial nor perfect


def test_perfect_detections_score_100_with_crowd_regions_ignored(val_set: CocoDetection) -> None:
    outputs, ids = [], []
    n_crowd = 0
    for i in range(len(val_set)):
        _, t = val_set[i]
        # every object, and the crowd regions too: a detection on a crowd region is not a false positive
        n_crowd += int(t["iscrowd"].sum())
        outputs.append(
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.where(t["iscrowd"] == 1, 0.99, 0.5),
                "masks": t["masks"][:, None].float(),
            }
        )
        ids.append(t["image_id"])
    assert n_crowd > 0
    m = evaluate_coco(val_set.coco, detections_to_coco(outputs, ids, val_set.cat_ids))
    assert m["bbox_AP"] == pytest.approx(100.0) and m["segm_AP"] == pytest.approx(100.0)
    assert m["bbox_AP50"] == pytest.approx(100.0)


def test_records_are_coco_results(val_set: CocoDetection) -> None:
    h, w = 20, 30
    mask = torch.zeros(1, 1, h, w)
    mask[0, 0, 5:10, 3:13] = 0.7
    out = {
        "boxes": torch.tensor([[3.0, 5.0, 13.0, 10.0]]),
        "labels": torch.tensor([3]),
        "scores": torch.tensor([0.25]),
        "masks": mask,
    }
    (rec,) = detections_to_coco([out], [42], [1, 3, 7])
    assert rec["image_id"] == 42 and rec["category_id"] == 7  # label 3 -> the third category id
    assert rec["bbox"] == [3.0, 5.0, 10.0, 5.0] and rec["score"] == 0.25
    decoded = mask_utils.decode({"size": rec["segmentation"]["size"], "counts": rec["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(decoded, (mask[0, 0] > 0.5).numpy().astype(np.uint8))
    json.dumps(rec)  # plain JSON
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        detections_to_coco([dict(out, labels=torch.tensor([4]))], [42], [1, 3, 7])


def test_no_detections_and_bad_records(val_set: CocoDetection) -> None:
    m = evaluate_coco(val_set.coco, [])
    assert all(m[k] in (0.0, -1.0) for k in metric_keys())
    assert m["bbox_AP"] == 0.0
    img = val_set.ids[0]
    with pytest.raises(ValueError, match="image_id 123456789"):
        evaluate_coco(val_set.coco, [{"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_coco(val_set.coco, [{"image_id": img, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])
    with pytest.raises(ValueError, match="unknown IoU type"):
        evaluate_coco(val_set.coco, [], iou_types=("keypoints",))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_coco(val_set.coco, "nope.json")
