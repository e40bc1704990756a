"""Datasets: ImageNet-1k, COCO 2017 and ADE20K in their real layouts, and the embedded mini sets.

- :mod:`.imagenet`: ImageFolder classification data with DeiT's transforms, Mixup and samplers (timm).
- :mod:`.coco`: COCO instances (boxes, polygon/RLE masks, crowd) through pycocotools.
- :mod:`.ade20k`: ADEChallengeData2016 semantic segmentation (150 classes, 0 ignored).
- :mod:`.synthetic`: the seeded generator of the three mini sets (the ``mini`` profile's data).
- :mod:`.verify`: layout, counts, decoding and manifests (``anchorformer data verify``).
- :mod:`.stage`: the pipeline's ``data`` stage; :mod:`.preview`: sample figures.
- :mod:`.files`: decoding with errors that name the file, expected layouts, the ``on_bad`` policy.
"""

from __future__ import annotations

from .ade20k import IGNORE_INDEX, NUM_CLASSES, ADE20KSegmentation
from .coco import CocoDetection, build_coco_transforms, detection_collate
from .files import BadFileError, MissingFileError, SampleError
from .imagenet import build_imagenet_dataset, build_imagenet_sampler, build_imagenet_transform, build_mixup
from .synthetic import make_mini_datasets
from .verify import VerificationError, verify_dataset

__all__ = [
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "ADE20KSegmentation",
    "BadFileError",
    "CocoDetection",
    "MissingFileError",
    "SampleError",
    "VerificationError",
    "build_coco_transforms",
    "build_imagenet_dataset",
    "build_imagenet_sampler",
    "build_imagenet_transform",
    "build_mixup",
    "detection_collate",
    "make_mini_datasets",
    "verify_dataset",
]
