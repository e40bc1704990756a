"""ADE20K (the SceneParsing challenge release, ``ADEChallengeData2016``) for semantic segmentation.

Zhou et al., "Scene Parsing through ADE20K Dataset" (CVPR 2017); the training and evaluation
protocol as MMSegmentation runs it for Semantic FPN / UperNet:

- label maps are PNGs (one channel) with 0 = "other" and 1..150 the classes; ``reduce_zero_label``
  maps 0 to the ignore index 255 and k to k - 1, so the model predicts 150 classes 0..149;
- training: rescale keeping the aspect ratio to fit ``base_size`` = (4 crop, crop) = (2048, 512)
  times a ratio drawn from ``scale_range`` (0.5, 2.0); a random ``crop_size``² crop in which no
  class covers more than 75% of the labelled pixels (10 tries, ``cat_max_ratio``); horizontal
  flip (0.5); photometric distortion (brightness, contrast, saturation, hue); ImageNet
  normalisation; padding to ``crop_size``² (image 0, label 255);
- evaluation: the image at its own size, normalised, and its full-resolution label; the test-time
  resize, sliding windows and resizing back are the inference's job
  (:mod:`anchorformer.tasks.segmentation.inference`), so the metric is computed at the labels' size.

Layout: ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{...}/<stem>.png``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import ColorJitter
from torchvision.transforms.functional import normalize, pil_to_tensor

from .files import (
    ADE20K_LAYOUT,
    BadFileError,
    BadFilePolicy,
    MissingFileError,
    check_ade_pair,
    load_label_map,
    load_rgb,
    missing_path_error,
)

__all__ = [
    "ADE20KSegmentation",
    "ADE20K_CLASSES",
    "ADE20K_SPLITS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "ade20k_pairs",
    "reduce_zero_label",
]

NUM_CLASSES = 150
IGNORE_INDEX = 255
ADE20K_SPLITS = ("training", "validation")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Class names of the 150 classes, in label order (label k of the model = file value k + 1).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
assert len(ADE20K_CLASSES) == NUM_CLASSES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def ade20k_pairs(root: str | Path, split: str) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, label map) pairs of ``split``, checking the layout.

    Returns:
        ``(pairs, unpaired)``: pairs sorted by file name; ``unpaired`` the images whose label
        map is missing.

    Raises:
        ValueError: ``split`` is not training/validation.
        FileNotFoundError: a missing folder (named, with the expected layout), or no images.
    """
    if split not in ADE20K_SPLITS:
        raise ValueError(f"ADE20K split must be one of {ADE20K_SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise missing_path_error(root, "ADE20K root folder (ADEChallengeData2016)", ADE20K_LAYOUT)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d, what in ((img_dir, "ADE20K image folder"), (ann_dir, "ADE20K annotation folder")):
        if not d.is_dir():
            raise missing_path_error(d, what, ADE20K_LAYOUT)
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise FileNotFoundError(f"no images (.jpg) in {img_dir}\nexpected layout:\n{ADE20K_LAYOUT}")
    pairs, unpaired = [], []
    for p in images:
        ann = ann_dir / f"{p.stem}.png"
        if ann.is_file():
            pairs.append((p, ann))
        else:
            unpaired.append(p)
    return pairs, unpaired


def reduce_zero_label(label: np.ndarray, path: str | Path = "<label map>") -> torch.Tensor:
    """Map file values (0 other, 1..150) to training labels (255 ignore, 0..149).

    Args:
        label: uint8 array (H, W) as stored.
        path: named in the error.

    Returns:
        LongTensor (H, W).

    Raises:
        BadFileError: a value above 150.
    """
    top = int(label.max(initial=0))
    if top > NUM_CLASSES:
        raise BadFileError(path, f"label value {top} found; expected 0 (other) or 1..{NUM_CLASSES}")
    out = torch.from_numpy(label.astype(np.int64)) - 1
    out[out < 0] = IGNORE_INDEX
    return out


class ADE20KSegmentation(BadFilePolicy, Dataset):
    """ADE20K scene parsing, one split.

    Items are ``(image, label)``: image FloatTensor (3, H, W) normalised with ImageNet's mean and
    std; label LongTensor (H, W) with classes 0..149 and 255 = ignore ("other" and padding).
    Training items are ``crop_size`` x ``crop_size``; evaluation items keep the file's size.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: "training" or "validation".
        crop_size: side of the training crops.
        train: training augmentation (rescale, crop, flip, photometric) or none.
        scale_range: ratios of ``base_size`` for the random rescale.
        on_bad: "fail" raises on a file that does not decode, a label map of the wrong size or with
            values above 150, or a missing label map; "skip" logs it, records it in ``bad_files``
            and uses the next sample (images without a label map are left out at construction).
        base_size: (long, short) scale of the rescale; default (4 crop_size, crop_size).
        cat_max_ratio: a crop is redrawn (up to 10 times) while one class covers more than this
            share of its labelled pixels; 1.0 disables.
        flip_prob: probability of the horizontal flip.
        photometric: apply the photometric distortion when training.

    Attributes:
        samples: ``[(image path, label path)]``.
        class_names: the 150 class names, in label order.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        crop_size: int = 512,
        train: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0),
        on_bad: str = "fail",
        base_size: tuple[int, int] | None = None,
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
    ) -> None:
        self._init_bad_files(on_bad)
        self.root, self.split, self.train = Path(root), split, train
        pairs, unpaired = ade20k_pairs(root, split)
        if unpaired:
            if self.on_bad == "fail":
                raise MissingFileError(
                    self.root / "annotations" / split / f"{unpaired[0].stem}.png",
                    f"label map of {unpaired[0].name} ({len(unpaired)} images without one)",
                )
            for p in unpaired:
                self.skip_file(str(p), "its label map does not exist")
        if not pairs:
            raise FileNotFoundError(f"no image of {self.root / 'images' / split} has a label map")
        self.samples = pairs
        self.crop_size = int(crop_size)
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)
        self.base_size = tuple(base_size) if base_size is not None else (4 * self.crop_size, self.crop_size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.jitter = ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05) if photometric else None
        self.class_names = list(ADE20K_CLASSES)
        self.num_classes = NUM_CLASSES
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fetch(index, self._load)

    def check_sample(self, index: int) -> tuple[str, str | None]:
        """The image decodes, and its label map is single-channel, of its size, with values 0..150."""
        img_path, ann_path = self.samples[index]
        path, _, reason = check_ade_pair((str(img_path), str(ann_path)))
        return path, reason

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The PIL image and the label map as stored (uint8 (H, W), 0..150), checked."""
        img_path, ann_path = self.samples[index]
        image = load_rgb(img_path)
        label = load_label_map(ann_path, expected_size=image.size)
        return image, label

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, raw = self.load_raw(index)
        label = reduce_zero_label(raw, self.samples[index][1])
        if not self.train:
            return self._to_tensor(image), label
        return self._transform(self.samples[index][0], self._augment, image, label)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        x = pil_to_tensor(image).float().div_(255.0)
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def _augment(self, image: Image.Image, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 1. random rescale, keeping the aspect ratio, to fit base_size x ratio
        w, h = image.size
        ratio = random.uniform(*self.scale_range)
        long_side, short_side = self.base_size[0] * ratio, self.base_size[1] * ratio
        s = min(long_side / max(h, w), short_side / min(h, w))
        nw, nh = max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))
        image = image.resize((nw, nh), Image.BILINEAR)
        lab = Image.fromarray(label.to(torch.uint8).numpy(), "L").resize((nw, nh), Image.NEAREST)
        label = torch.from_numpy(np.asarray(lab, dtype=np.int64).copy())
        # 2. random crop, redrawn while one class dominates
        c = self.crop_size
        ch, cw = min(c, nh), min(c, nw)
        for _ in range(10):
            y0, x0 = random.randint(0, nh - ch), random.randint(0, nw - cw)
            crop = label[y0 : y0 + ch, x0 : x0 + cw]
            if self.cat_max_ratio >= 1.0:
                break
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten(), minlength=1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        image = image.crop((x0, y0, x0 + cw, y0 + ch))
        label = crop
        # 3. flip, 4. photometric distortion, 5. normalise, 6. pad to crop_size
        if random.random() < self.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            label = label.flip(-1)
        x = pil_to_tensor(image).float().div_(255.0)
        if self.jitter is not None:
            x = self.jitter(x)
        x = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        out_x = torch.zeros(3, c, c, dtype=x.dtype)
        out_y = torch.full((c, c), IGNORE_INDEX, dtype=torch.int64)
        out_x[:, :ch, :cw] = x
        out_y[:ch, :cw] = label
        return out_x, out_y
