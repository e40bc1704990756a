"""Datasets: ImageNet-1k, COCO 2017 and ADE20K in their real layouts, and the embedded mini sets.

- :mod:`.imagenet`: ImageFolder classification data with DeiT's transforms (timm).
- :mod:`.coco`: COCO instances (boxes, polygon/RLE masks, crowd) through pycocotools.
- :mod:`.ade20k`: ADEChallengeData2016 semantic segmentation (150 classes, 0 ignored).
- :mod:`.synthetic`: the seeded generator of the three mini sets (the ``mini`` profile's data).
- :mod:`.verify`: layout, counts, decoding and manifests (``anchorformer data verify``).
"""

from __future__ import annotations

from .files import BadFileError, MissingFileError
from .imagenet import build_imagenet_dataset, build_imagenet_transform
from .synthetic import make_mini_datasets

__all__ = [
    "BadFileError",
    "MissingFileError",
    "build_imagenet_dataset",
    "build_imagenet_transform",
    "make_mini_datasets",
]
