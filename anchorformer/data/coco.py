"""COCO 2017 instances (detection and instance segmentation) read with pycocotools.

Lin et al., "Microsoft COCO: Common Objects in Context" (ECCV 2014); the protocol of Mask R-CNN
(He et al., ICCV 2017) as in torchvision's detection references:

- category ids (1..90 with gaps in COCO) map to contiguous labels 1..num_classes in sorted order
  (0 is the background of torchvision's detectors): ``label = cat_ids.index(category_id) + 1``;
- masks come from polygons, compressed RLE or uncompressed RLE (``pycocotools.COCO.annToMask``);
- crowd annotations are kept, flagged ``iscrowd=1`` (the trainer ignores them, COCOeval treats
  them as "ignore" regions);
- annotations whose box has no width or height inside the image are dropped and counted
  (``num_degenerate``);
- images without annotations are kept, with empty targets of the right shapes, unless
  ``remove_empty`` (the training-set filter of torchvision's references).

Layout: ``root/annotations/instances_{split}2017.json`` and ``root/{split}2017/<file_name>``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from .files import COCO_LAYOUT, BadFileError, BadFilePolicy, check_image, load_rgb, missing_path_error

__all__ = [
    "COCO_SPLITS",
    "CocoDetection",
    "Compose",
    "LargeScaleJitter",
    "RandomHorizontalFlip",
    "ResizeShorterSide",
    "build_coco_transforms",
    "coco_paths",
    "detection_collate",
]

log = logging.getLogger(__name__)

COCO_SPLITS = ("train", "val")
Target = dict[str, Any]


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` of ``split``, checking that both exist.

    Raises:
        ValueError: ``split`` is not train/val.
        FileNotFoundError: the root, the json or the image folder is missing (named, with the layout).
    """
    if split not in COCO_SPLITS:
        raise ValueError(f"COCO split must be one of {COCO_SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise missing_path_error(root, "COCO root folder", COCO_LAYOUT)
    ann = root / "annotations" / f"instances_{split}2017.json"
    if not ann.is_file():
        raise missing_path_error(ann, "COCO annotation file", COCO_LAYOUT)
    img_dir = root / f"{split}2017"
    if not img_dir.is_dir():
        raise missing_path_error(img_dir, "COCO image folder", COCO_LAYOUT)
    return ann, img_dir


def load_coco_api(ann_file: str | Path) -> COCO:
    """pycocotools' COCO index of ``ann_file`` (its prints silenced; bad JSON named)."""
    ann_file = Path(ann_file)
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from e
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{ann_file}: not a COCO instances file, missing keys {missing}")
    _check_records(ann_file, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_records(ann_file: Path, data: dict[str, Any]) -> None:
    """Every image and annotation record has the fields the loaders read, of the right type:
    one ValueError naming the file, the record (image or annotation id) and the field."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: {key} is a {type(data[key]).__name__}, expected a list")
    image_fields = {"id": "an integer", "file_name": "a file name", "width": "a positive integer",
                    "height": "a positive integer"}  # fmt: skip
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise ValueError(f"{ann_file}: images[{i}] is not an object")
        what = f"image {img['id']}" if "id" in img else f"images[{i}]"
        for field, expected in image_fields.items():
            if field not in img:
                raise ValueError(f"{ann_file}: {what} has no {field!r} ({expected})")
            v = img[field]
            ok = (
                isinstance(v, str) and v != ""
                if field == "file_name"
                else isinstance(v, int) and not isinstance(v, bool) and (field == "id" or v > 0)
            )
            if not ok:
                raise ValueError(f"{ann_file}: {what}: {field} is {v!r}, expected {expected}")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{ann_file}: annotations[{i}] is not an object")
        what = f"annotation {ann['id']}" if "id" in ann else f"annotations[{i}]"
        for field in ("id", "image_id", "category_id"):
            if field not in ann:
                raise ValueError(f"{ann_file}: {what} has no {field!r}")


def bbox_problem(ann: dict[str, Any]) -> str | None:
    """Why ``ann``'s ``bbox`` is not ``[x, y, width, height]`` (four numbers), or None."""
    box = ann.get("bbox")
    if box is None:
        return "has no 'bbox' ([x, y, width, height])"
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        return f"bbox {box!r} is not [x, y, width, height] (four numbers)"
    return None


class CocoDetection(BadFilePolicy, Dataset):
    """COCO instances of one split.

    Items are ``(image, target)``: image FloatTensor (3, H, W) in [0, 1]; target a dict with
    ``boxes`` (K, 4) float32 xyxy in absolute pixels, ``labels`` (K,) int64 in 1..num_classes,
    ``masks`` (K, H, W) uint8, ``iscrowd`` (K,) int64, ``area`` (K,) float32 (the mask area from
    the annotation, scaled with the image), ``image_id`` int, ``orig_size`` (2,) int64 (H, W of
    the file, before transforms). K may be 0: boxes (0, 4), masks (0, H, W).

    Attributes:
        coco: the pycocotools ``COCO`` index (for COCOeval).
        cat_ids: sorted COCO category ids; label ``i + 1`` is ``cat_ids[i]``.
        class_names: names of the categories, in label order.
        num_classes: number of categories (without background).
        ids: image ids in dataset order.
        num_degenerate: annotations dropped for an empty box.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
        on_bad: str = "fail",
        *,
        remove_empty: bool = False,
    ) -> None:
        self._init_bad_files(on_bad)
        self.root = Path(root)
        self.split = split
        self.ann_file, self.img_dir = coco_paths(root, split)
        self.coco = load_coco_api(self.ann_file)
        self.transforms = transforms
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self._degenerate: set[int] = set()
        for ann in self.coco.anns.values():
            if ann["category_id"] not in self.cat_id_to_label:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann['id']} has category_id {ann['category_id']}, "
                    f"not among the categories {self.cat_ids}"
                )
            if ann["image_id"] not in self.coco.imgs:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann['id']} refers to image_id {ann['image_id']}, not listed in images"
                )
            problem = bbox_problem(ann)
            if problem is not None:  # skipped with on_bad=skip, as `data verify --on-bad skip` lists it
                where = f"{self.ann_file}: annotation {ann['id']} (image {ann['image_id']}) {problem}"
                if self.on_bad != "skip":
                    raise ValueError(f"{where}; `--set on_bad=skip` skips such annotations")
                log.warning("bad annotation (skipped): %s", where)
                self._degenerate.add(ann["id"])
            elif _clipped_box(ann, self.coco.imgs[ann["image_id"]]) is None:
                self._degenerate.add(ann["id"])
        self.num_degenerate = len(self._degenerate)
        if self.num_degenerate:
            log.warning(
                "%s: dropped %d annotations with an empty box (`anchorformer data verify coco ROOT` lists them)",
                self.ann_file,
                self.num_degenerate,
            )
        ids = sorted(self.coco.imgs)
        if remove_empty:
            ids = [i for i in ids if any(a["id"] not in self._degenerate for a in self.coco.imgToAnns[i])]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self._fetch(index, self._load)

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        """The annotations of ``image_id`` that the targets use (degenerate boxes dropped)."""
        return [a for a in self.coco.imgToAnns[image_id] if a["id"] not in self._degenerate]

    def sample_path(self, index: int) -> str:
        return str(self.image_path(self.ids[index]))

    def check_sample(self, index: int) -> tuple[str, str | None]:
        """What loading sample ``index`` checks, without building its tensors: the image decodes at
        the size the annotation file gives, and each annotation's segmentation decodes."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path, size, reason = check_image(str(self.image_path(image_id)))
        if reason is not None:
            return path, reason
        w, h = info["width"], info["height"]
        if size != (w, h):
            return path, f"decoded size {size[0]}x{size[1]} differs from the annotation's {w}x{h}"
        for ann in self.annotations(image_id):
            try:
                self.coco.annToRLE(ann)
            except Exception as e:  # malformed segmentation inside pycocotools
                return str(self.ann_file), (
                    f"annotation {ann['id']} of image {image_id}: cannot decode its segmentation ({type(e).__name__}: {e})"
                )
        return path, None

    def image_path(self, image_id: int) -> Path:
        return self.img_dir / self.coco.imgs[image_id]["file_name"]

    def _load(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(image_id)
        pil = load_rgb(path)
        w, h = info["width"], info["height"]
        if pil.size != (w, h):
            raise BadFileError(path, f"decoded size {pil.size[0]}x{pil.size[1]} differs from the annotation's {w}x{h}")
        image = pil_to_tensor(pil).float().div_(255.0)  # (3, H, W)
        anns = self.annotations(image_id)
        boxes, masks = [], []
        for ann in anns:
            boxes.append(_clipped_box(ann, info))
            try:
                masks.append(torch.from_numpy(self.coco.annToMask(ann)))
            except Exception as e:  # malformed segmentation inside pycocotools
                raise BadFileError(
                    self.ann_file,
                    f"annotation {ann['id']} of image {image_id}: cannot decode its segmentation ({type(e).__name__}: {e})",
                ) from e
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "image_id": int(image_id),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self._transform(path, self.transforms, image, target)
        return image, target


def _clipped_box(ann: dict[str, Any], info: dict[str, Any]) -> list[float] | None:
    """xyxy box of ``ann`` clipped to its image, or None when empty."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    x0, y0 = min(max(x, 0.0), info["width"]), min(max(y, 0.0), info["height"])
    x1, y1 = min(max(x + w, 0.0), info["width"]), min(max(y + h, 0.0), info["height"])
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1, y1]


def detection_collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Collate detection samples into a list of images and a list of targets (sizes differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# ----------------------------------------------------------------------------------------------
# transforms on (image (3, H, W), target); each keeps boxes, masks and area consistent


class Compose:
    """Apply transforms of ``(image, target)`` in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class ResizeShorterSide:
    """Resize so the shorter side is ``min_size`` (one of them at random, multi-scale training)
    unless the longer side would exceed ``max_size``; boxes and area are scaled, masks resized
    with nearest neighbours.

    Args:
        min_size: the shorter side, or a sequence to draw from (Python's ``random``, seeded per
            DataLoader worker by torch).
        max_size: cap of the longer side.
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int) -> None:
        self.min_sizes = [int(min_size)] if isinstance(min_size, int) else [int(s) for s in min_size]
        if not self.min_sizes or min(self.min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"sizes must be positive, got min_size={min_size}, max_size={max_size}")
        self.max_size = int(max_size)

    def target_size(self, h: int, w: int, min_size: int) -> tuple[int, int]:
        scale = min(min_size / min(h, w), self.max_size / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        min_size = self.min_sizes[0] if len(self.min_sizes) == 1 else random.choice(self.min_sizes)
        nh, nw = self.target_size(h, w, min_size)
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        sx, sy = nw / w, nh / h
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        target["area"] = target["area"] * (sx * sy)
        masks = target["masks"]
        if masks.shape[0]:
            masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
        else:
            masks = torch.zeros((0, nh, nw), dtype=torch.uint8)
        target["masks"] = masks
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShorterSide(min_size={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Flip image, boxes and masks left-right with probability ``p`` (torch's RNG)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        w = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al., "Simple Copy-Paste", CVPR 2021), as ViTDet trains with it.

    detectron2's ``ResizeScale(min_scale, max_scale, size, size)`` then ``FixedSizeCrop((size, size),
    pad=False)``: the image is resized (aspect ratio kept) to fit a ``size`` x ``size`` square
    times a scale drawn uniformly from ``scale_range``, then a random ``size`` x ``size`` window
    of it is kept (all of it when smaller). Boxes are recomputed from the cropped masks, as
    ViTDet does (``recompute_boxes``); objects cut away get empty boxes, which the training
    targets drop (:func:`anchorformer.models.detection.sanitize_targets`). Padding to the square
    is the detector's (``size_divisible``). Random numbers come from torch's RNG.

    Args:
        size: the square's side (1024 in ViTDet).
        scale_range: (min, max) scale (0.1, 2.0 in ViTDet).
    """

    def __init__(self, size: int, scale_range: Sequence[float] = (0.1, 2.0)) -> None:
        lo, hi = (float(v) for v in scale_range)
        if size <= 0 or not 0 < lo <= hi:
            raise ValueError(f"LargeScaleJitter: expected size > 0 and 0 < min <= max; got {size}, {scale_range}")
        self.size, self.scale_range = int(size), (lo, hi)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()))
        ratio = min(self.size * scale / h, self.size * scale / w)
        nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
        target = dict(target)
        masks = target["masks"]
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
            if masks.shape[0]:
                masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
            else:
                masks = torch.zeros((0, nh, nw), dtype=torch.uint8)
        y0 = int(torch.randint(0, nh - self.size + 1, ())) if nh > self.size else 0
        x0 = int(torch.randint(0, nw - self.size + 1, ())) if nw > self.size else 0
        image = image[:, y0 : y0 + self.size, x0 : x0 + self.size]
        masks = masks[:, y0 : y0 + self.size, x0 : x0 + self.size]
        boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
        for k, m in enumerate(masks):  # (x0, y0, x1, y1) of the mask's pixels
            ys, xs = torch.nonzero(m, as_tuple=True)
            if ys.numel():
                boxes[k] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        target["masks"], target["boxes"] = masks, boxes
        target["area"] = masks.flatten(1).sum(1).float() if masks.shape[0] else torch.zeros(0)
        return image, target

    def __repr__(self) -> str:
        return f"LargeScaleJitter(size={self.size}, scale_range={self.scale_range})"


def build_coco_transforms(
    train: bool, *, min_size: int | Sequence[int] = 800, max_size: int = 1333, flip_prob: float = 0.5
) -> Compose:
    """The usual detection transforms: resize the shorter side (max size), and flip when training.

    Mask R-CNN 1x: ``min_size=800, max_size=1333``; multi-scale training passes a sequence of
    shorter sides (e.g. ``(480, 512, ..., 800)``).
    """
    ts: list[Any] = [ResizeShorterSide(min_size if train else _eval_size(min_size), max_size)]
    if train and flip_prob > 0:
        ts.append(RandomHorizontalFlip(flip_prob))
    return Compose(ts)


def _eval_size(min_size: int | Sequence[int]) -> int:
    return int(min_size) if isinstance(min_size, int) else int(max(min_size))
