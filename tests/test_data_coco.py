"""COCO loader on the mini set: targets against pycocotools, protocol details, transforms, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from anchorformer.data.coco import (
    CocoDetection,
    RandomHorizontalFlip,
    ResizeShorterSide,
    build_coco_transforms,
    detection_collate,
)
from anchorformer.data.files import BadFileError, MissingFileError


@pytest.fixture
def coco_copy(mini_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(mini_data / "coco", root)
    return root


def _edit_json(root: Path, split: str, fn) -> None:
    p = root / "annotations" / f"instances_{split}2017.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))


def _mask_box(m: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def _decode_independently(seg: object, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle)


def test_targets_match_annotations(mini_data: Path) -> None:
    ds = CocoDetection(mini_data / "coco", "val")
    doc = json.loads((mini_data / "coco/annotations/instances_val2017.json").read_text())
    anns_by_image: dict[int, list] = {}
    for a in doc["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    assert ds.cat_ids == [1, 3, 7] and ds.num_classes == 3 and ds.class_names == ["circle", "square", "triangle"]
    assert len(ds) == len(doc["images"]) and ds.num_degenerate == 0
    n_crowd = n_empty = 0
    for i in range(len(ds)):
        image, t = ds[i]
        info = ds.coco.imgs[t["image_id"]]
        h, w = info["height"], info["width"]
        anns = anns_by_image.get(t["image_id"], [])
        k = len(anns)
        assert image.shape == (3, h, w) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert t["boxes"].shape == (k, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].shape == (k,) and t["labels"].dtype == torch.int64
        assert t["masks"].shape == (k, h, w) and t["masks"].dtype == torch.uint8
        assert t["iscrowd"].shape == (k,) and t["area"].shape == (k,)
        assert t["orig_size"].tolist() == [h, w]
        n_empty += k == 0
        for j, a in enumerate(anns):
            # label = position of the category id among the sorted ids, plus one
            assert t["labels"][j].item() == {1: 1, 3: 2, 7: 3}[a["category_id"]]
            assert t["iscrowd"][j].item() == a["iscrowd"]
            n_crowd += a["iscrowd"]
            m = t["masks"][j]
            assert np.array_equal(m.numpy(), _decode_independently(a["segmentation"], h, w))
            assert m.sum().item() == pytest.approx(t["area"][j].item())
            box = t["boxes"][j]
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            assert _mask_box(m) == box.tolist()
    assert n_crowd > 0 and n_empty > 0


def test_empty_image_targets(mini_data: Path) -> None:
    ds = CocoDetection(mini_data / "coco", "train")
    empty = [i for i, image_id in enumerate(ds.ids) if not ds.coco.imgToAnns[image_id]]
    assert empty
    image, t = ds[empty[0]]
    h, w = image.shape[-2:]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, h, w)
    kept = CocoDetection(mini_data / "coco", "train", remove_empty=True)
    assert len(kept) == len(ds) - len(empty)
    _, t = build_coco_transforms(True, min_size=64, max_size=100)(image, t)
    assert t["masks"].shape[0] == 0 and t["masks"].shape[1:] == (64, min(100, round(w * 64 / h)))


def test_resize_and_flip_keep_boxes_and_masks_consistent(mini_data: Path) -> None:
    ds = CocoDetection(mini_data / "coco", "train")
    i = next(i for i, image_id in enumerate(ds.ids) if len(ds.coco.imgToAnns[image_id]) >= 3)
    image, t = ds[i]
    h, w = image.shape[-2:]
    resize = ResizeShorterSide(200, 230)
    image2, t2 = resize(image, t)
    nh, nw = image2.shape[-2:]
    scale = min(200 / min(h, w), 230 / max(h, w))
    assert (nh, nw) == (round(h * scale), round(w * scale)) and max(nh, nw) <= 230
    assert t2["masks"].shape == (len(t["boxes"]), nh, nw)
    sx, sy = nw / w, nh / h
    assert torch.allclose(t2["boxes"], t["boxes"] * torch.tensor([sx, sy, sx, sy]))
    for m, box in zip(t2["masks"], t2["boxes"]):
        assert np.allclose(_mask_box(m), box.tolist(), atol=2.0)  # nearest-neighbour resize
    assert torch.allclose(t2["area"], t["area"] * sx * sy)
    image3, t3 = RandomHorizontalFlip(1.0)(image, t)
    assert torch.equal(image3, image.flip(-1)) and torch.equal(t3["masks"], t["masks"].flip(-1))
    for m, box in zip(t3["masks"], t3["boxes"]):
        assert _mask_box(m) == box.tolist()
    image4, t4 = RandomHorizontalFlip(1.0)(image3, t3)
    assert torch.equal(image4, image) and torch.equal(t4["boxes"], t["boxes"])
    image5, t5 = RandomHorizontalFlip(0.0)(image, t)
    assert image5 is image and t5 is t


def test_multiscale_and_eval_transforms() -> None:
    train = build_coco_transforms(True, min_size=(64, 96), max_size=1000)
    evalt = build_coco_transforms(False, min_size=(64, 96), max_size=1000)
    assert len(train.transforms) == 2 and len(evalt.transforms) == 1
    t = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 50, 100, dtype=torch.uint8), "area": torch.zeros(0)}
    sides = {train(torch.rand(3, 50, 100), t)[0].shape[-2] for _ in range(30)}
    assert sides == {64, 96}
    assert evalt(torch.rand(3, 50, 100), t)[0].shape[-2:] == (96, 192)


def test_dataloader_collate(mini_data: Path) -> None:
    ds = CocoDetection(mini_data / "coco", "val", build_coco_transforms(True, min_size=96, max_size=160))
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=detection_collate)))
    assert len(images) == len(targets) == 4
    assert all(im.shape[0] == 3 and min(im.shape[-2:]) == 96 for im in images)


def test_degenerate_boxes_dropped_and_counted(coco_copy: Path) -> None:
    def degenerate(doc: dict) -> None:
        doc["annotations"][0]["bbox"][2] = 0.0  # zero width
        doc["annotations"][1]["bbox"][:2] = [5000.0, 5000.0]  # outside the image

    _edit_json(coco_copy, "val", degenerate)
    ds = CocoDetection(coco_copy, "val")
    assert ds.num_degenerate == 2
    doc = json.loads((coco_copy / "annotations/instances_val2017.json").read_text())
    dropped = {doc["annotations"][0]["id"], doc["annotations"][1]["id"]}
    image_id = doc["annotations"][0]["image_id"]
    anns = ds.annotations(image_id)
    assert not dropped & {a["id"] for a in anns}
    _, t = ds[ds.ids.index(image_id)]
    assert len(t["boxes"]) == len(anns)


def test_missing_files_are_named(coco_copy: Path) -> None:
    with pytest.raises(FileNotFoundError, match="COCO root folder") as e:
        CocoDetection(coco_copy / "nope", "train")
    assert "instances_train2017.json" in str(e.value)
    shutil.rmtree(coco_copy / "val2017")
    with pytest.raises(FileNotFoundError, match=r"COCO image folder: .*val2017"):
        CocoDetection(coco_copy, "val")
    (coco_copy / "annotations/instances_train2017.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"COCO annotation file: .*instances_train2017.json\nexpected layout"):
        CocoDetection(coco_copy, "train")


def test_bad_json_and_categories(coco_copy: Path) -> None:
    p = coco_copy / "annotations/instances_val2017.json"
    text = p.read_text()
    p.write_text(text[:-100])
    with pytest.raises(ValueError, match="instances_val2017.json: not valid JSON"):
        CocoDetection(coco_copy, "val")
    p.write_text(text)
    _edit_json(coco_copy, "val", lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(ValueError, match="has category_id 99, not among the categories"):
        CocoDetection(coco_copy, "val")


def test_image_listed_but_missing_fail_and_skip(coco_copy: Path) -> None:
    _edit_json(coco_copy, "val", lambda d: d["images"][0].update(file_name="does_not_exist.jpg"))
    ds = CocoDetection(coco_copy, "val")
    idx = ds.ids.index(json.loads((coco_copy / "annotations/instances_val2017.json").read_text())["images"][0]["id"])
    with pytest.raises(MissingFileError, match="does_not_exist.jpg"):
        ds[idx]
    skip = CocoDetection(coco_copy, "val", on_bad="skip")
    _, t = skip[idx]
    assert t["image_id"] == skip.ids[idx + 1] and skip.num_bad == 1 and skip.bad_files[0].endswith("does_not_exist.jpg")


def test_truncated_image_and_wrong_size(coco_copy: Path) -> None:
    ds = CocoDetection(coco_copy, "val")
    path = ds.image_path(ds.ids[2])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BadFileError, match="cannot decode image") as e:
        ds[2]
    assert e.value.path == str(path)
    _edit_json(coco_copy, "val", lambda d: d["images"][5].update(width=d["images"][5]["width"] + 1))
    ds = CocoDetection(coco_copy, "val")
    with pytest.raises(BadFileError, match="differs from the annotation's"):
        ds[5]
