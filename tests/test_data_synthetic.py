"""The mini-dataset generator: determinism, layouts, counts, COCO/ADE annotations, learnability."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from anchorformer.cli import main
from anchorformer.data.synthetic import (
    ADE_MINI_CLASSES,
    COCO_MINI_CATEGORIES,
    IMAGENET_MINI_CLASSES,
    make_mini_ade20k,
    make_mini_coco,
    make_mini_imagenet,
    read_mini_manifest,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(mini_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Regenerated through the command line, the sets are byte-identical to the fixture's."""
    assert main(["data", "make-mini", "--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    assert "ade20k: " + str(tmp_path / "again" / "ade20k" / "ADEChallengeData2016") in capsys.readouterr().out
    a, b = _hashes(mini_data), _hashes(tmp_path / "again")
    assert len(a) > 1500
    assert a == b
    # no temporary folders left behind
    assert not [p for p in (tmp_path / "again").rglob(".*tmp")]


def test_other_seed_other_bytes(tmp_path: Path) -> None:
    make_mini_imagenet(tmp_path / "s0", seed=0, train_per_class=2, val_per_class=1)
    make_mini_imagenet(tmp_path / "s1", seed=1, train_per_class=2, val_per_class=1)
    a, b = _hashes(tmp_path / "s0"), _hashes(tmp_path / "s1")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) >= len(a) - 1  # every image differs (mini.json differs in its seed)


def test_sizes_and_counts(mini_data: Path) -> None:
    total = sum(p.stat().st_size for p in mini_data.rglob("*") if p.is_file())
    assert total < 100 * 2**20
    inet = read_mini_manifest(mini_data / "imagenet")
    assert inet["num_classes"] == len(IMAGENET_MINI_CLASSES) >= 10
    for split in ("train", "val"):
        files = list((mini_data / "imagenet" / split).rglob("*.jpg"))
        assert len(files) == inet["splits"][split]["images"]
        assert len({f.parent.name for f in files}) == 10
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (72, 72) and im.mode == "RGB"
    ade = read_mini_manifest(mini_data / "ade20k" / "ADEChallengeData2016")
    for split in ("training", "validation"):
        assert (
            len(list((mini_data / "ade20k/ADEChallengeData2016/images" / split).glob("*.jpg")))
            == ade["splits"][split]["images"]
        )


def test_coco_json_loads_and_every_mask_decodes(mini_data: Path) -> None:
    root = mini_data / "coco"
    manifest = read_mini_manifest(root)
    seen_kinds = set()
    for split in ("train", "val"):
        doc = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations", "categories"}
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert sorted(coco.getCatIds()) == sorted(COCO_MINI_CATEGORIES) == [1, 3, 7]
        stats = manifest["splits"][split]
        assert len(coco.getImgIds()) == stats["images"] and len(coco.getAnnIds()) == stats["annotations"]
        assert stats["crowd"] > 0 and stats["rle"] > 0 and stats["empty_images"] > 0
        empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i)]
        assert len(empty) == stats["empty_images"]
        for img in coco.loadImgs(coco.getImgIds()):
            path = root / f"{split}2017" / img["file_name"]
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
        sizes = {(i["width"], i["height"]) for i in coco.loadImgs(coco.getImgIds())}
        assert any(w != h for w, h in sizes)
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann["image_id"])[0]
            m = coco.annToMask(ann)
            assert m.shape == (img["height"], img["width"])
            assert m.sum() == ann["area"] > 0
            ys, xs = np.nonzero(m)
            x, y, w, h = ann["bbox"]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            seg = ann["segmentation"]
            if isinstance(seg, list):
                kind = "polygon"
            else:
                kind = "rle-uncompressed" if isinstance(seg["counts"], list) else "rle-compressed"
                rle = mask_utils.frPyObjects(seg, *seg["size"]) if kind == "rle-uncompressed" else seg
                assert np.array_equal(mask_utils.decode(rle), m)
            assert (kind == "rle-uncompressed") == bool(ann["iscrowd"])
            seen_kinds.add(kind)
    assert seen_kinds == {"polygon", "rle-compressed", "rle-uncompressed"}


def test_ade_label_maps(mini_data: Path) -> None:
    root = mini_data / "ade20k" / "ADEChallengeData2016"
    allowed = {0, *ADE_MINI_CLASSES}
    present: set[int] = set()
    for split in ("training", "validation"):
        images = sorted((root / "images" / split).glob("*.jpg"))
        prefix = "ADE_train_" if split == "training" else "ADE_val_"
        assert images[0].name == f"{prefix}00000001.jpg"
        for p in images:
            lab_path = root / "annotations" / split / (p.stem + ".png")
            with Image.open(p) as im, Image.open(lab_path) as lab:
                assert lab.mode == "L" and lab.size == im.size
                values = set(np.unique(np.asarray(lab)).tolist())
            assert values <= allowed
            present |= values
    assert present == allowed  # every class, and 0, occurs


def test_imagenet_classes_are_separable_by_colour(mini_data: Path) -> None:
    """A crude independent check of learnability: nearest centroid on hue histograms, far above 10%."""

    def feats(split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for c, folder in enumerate(sorted((mini_data / "imagenet" / split).iterdir())):
            for p in sorted(folder.glob("*.jpg")):
                hsv = np.asarray(Image.open(p).convert("HSV"), dtype=np.float64)
                sat = hsv[..., 1] > 120
                hist = np.bincount((hsv[..., 0][sat] // 8).astype(int), minlength=32)[:32]
                xs.append(hist / max(hist.sum(), 1))
                ys.append(c)
        return np.stack(xs), np.array(ys)

    xtr, ytr = feats("train")
    xva, yva = feats("val")
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    pred = np.argmin(((xva[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == yva).mean() > 0.5


@pytest.mark.parametrize("fn", [make_mini_coco, make_mini_ade20k])
def test_small_counts(tmp_path: Path, fn) -> None:
    manifest = fn(tmp_path, seed=3, num_train=4, num_val=2)
    splits = list(manifest["splits"])
    assert manifest["splits"][splits[0]]["images"] == 4 and manifest["splits"][splits[1]]["images"] == 2
    assert read_mini_manifest(tmp_path) == manifest
