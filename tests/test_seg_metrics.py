"""mIoU / mAcc / aAcc against a naive per-pixel computation written here."""

from __future__ import annotations

import math

import pytest
import torch

from anchorformer.tasks.segmentation.metrics import IGNORE_INDEX, SegMetrics, confusion_matrix, metrics_from_confusion


def naive_metrics(pairs: list[tuple[torch.Tensor, torch.Tensor]], k: int, ignore: int = 255) -> dict[str, float]:
    """Pixel-by-pixel counting in plain Python, then the ADE20K protocol's means."""
    tp = [0] * k
    fp = [0] * k
    fn = [0] * k
    labelled = 0
    for pred, gt in pairs:
        for p, g in zip(pred.flatten().tolist(), gt.flatten().tolist()):
            if g == ignore:
                continue  # ignored pixels count for nothing, whatever was predicted
            labelled += 1
            if p == g:
                tp[g] += 1
            else:
                fp[p] += 1
                fn[g] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(k) if tp[c] + fp[c] + fn[c] > 0]
    accs = [tp[c] / (tp[c] + fn[c]) for c in range(k) if tp[c] + fn[c] > 0]
    return {
        "mIoU": 100 * sum(ious) / len(ious),
        "mAcc": 100 * sum(accs) / len(accs),
        "aAcc": 100 * sum(tp) / labelled,
        "n_iou": len(ious),
    }


def test_matches_naive_with_ignore_and_absent_classes() -> None:
    g = torch.Generator().manual_seed(1)
    k = 9
    pairs = []
    for h, w in [(7, 11), (13, 5), (4, 4)]:
        # classes 0..5 only in the ground truth; class 6 only predicted; 7, 8 absent from both
        gt = torch.randint(0, 6, (h, w), generator=g)
        gt[torch.rand(h, w, generator=g) < 0.2] = IGNORE_INDEX
        pred = torch.randint(0, 7, (h, w), generator=g)
        pairs.append((pred, gt))
    m = SegMetrics(k)
    for pred, gt in pairs:
        m.update(pred, gt)
    got = m.compute()
    want = naive_metrics(pairs, k)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-3), key
    # 7 and 8 appear nowhere: excluded from mIoU; 6 is predicted only: IoU 0 counted, Acc undefined
    assert got["num_classes_evaluated"] == want["n_iou"] == 7
    per = {r["class"]: r for r in got["per_class"]}
    assert per[7]["IoU"] is None and per[8]["IoU"] is None
    assert per[6]["IoU"] == 0.0 and per[6]["Acc"] is None


def test_ignored_pixels_do_not_count_even_when_predicted() -> None:
    gt = torch.tensor([[0, 1], [255, 255]])
    pred = torch.tensor([[0, 1], [2, 3]])  # 2 and 3 only on ignored pixels
    r = metrics_from_confusion(confusion_matrix(pred, gt, 4))
    assert r["mIoU"] == 100.0 and r["mAcc"] == 100.0 and r["aAcc"] == 100.0
    assert r["num_classes_evaluated"] == 2 and r["num_pixels"] == 2


def test_known_values() -> None:
    gt = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([0, 0, 1, 1])
    r = metrics_from_confusion(confusion_matrix(pred, gt, 2))
    # IoU0 = 2/3, IoU1 = 1/2; Acc0 = 2/3, Acc1 = 1; aAcc = 3/4
    assert r["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2, abs=1e-3)
    assert r["mAcc"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-3)
    assert r["aAcc"] == 75.0


def test_accumulates_over_images_not_per_image_mean() -> None:
    a = (torch.tensor([0, 0]), torch.tensor([0, 0]))  # perfect on a 2-pixel image
    b = (torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long))  # all wrong on 6 pixels
    m = SegMetrics(2)
    for p, t in (a, b):
        m.update(p, t)
    assert m.compute()["aAcc"] == 25.0  # 2 / 8, not mean(100, 0)
    assert math.isclose(m.compute()["mIoU"], 100 * (2 / 8 + 0) / 2, abs_tol=1e-3)


def test_bad_input_names_the_file() -> None:
    m = SegMetrics(150)
    with pytest.raises(ValueError, match=r"ADE_val_1\.png.*\(4, 5\).*\(4, 6\)"):
        m.update(torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 6, dtype=torch.long), name="ADE_val_1.png")
    with pytest.raises(ValueError, match=r"ground-truth values.*ADE_val_2\.png.*151"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 151), name="ADE_val_2.png")
    with pytest.raises(ValueError, match=r"prediction values"):
        m.update(torch.full((2, 2), 150), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
