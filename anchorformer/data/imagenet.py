"""ImageNet-1k (ILSVRC2012) in its ImageFolder layout, with the DeiT training recipe's data side.

Touvron et al., "Training data-efficient image transformers & distillation through attention"
(ICML 2021): RandAugment (m9, mstd 0.5), colour jitter 0.3, bicubic random-resized crops, random
erasing 0.25 (pixel mode), Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, repeated augmentation
(3 repeats); evaluation resizes to ``img_size / 0.875`` and centre-crops. All of it comes from timm
(``create_transform``, ``Mixup``, ``RepeatAugSampler``); this module adds the layout checks and
the bad-file policy. Layout (``root`` is either the real set or the mini set of
:mod:`anchorformer.data.synthetic`)::

    root/train/<wnid>/*.JPEG|*.jpg   root/val/<wnid>/*.JPEG|*.jpg
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .files import IMAGENET_LAYOUT, BadFilePolicy, load_rgb, missing_path_error

__all__ = [
    "DEIT_EVAL_CROP_PCT",
    "DEIT_TRAIN_AUG",
    "IMAGENET_SPLITS",
    "ImageNetFolder",
    "build_imagenet_dataset",
    "build_imagenet_sampler",
    "build_imagenet_transform",
    "build_mixup",
    "find_imagenet_classes",
    "posterize_to_black",
]

IMAGENET_SPLITS = ("train", "val")

# DeiT's training augmentation, as keyword arguments of timm.data.create_transform.
DEIT_TRAIN_AUG: dict[str, Any] = {
    "color_jitter": 0.3,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "interpolation": "bicubic",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
}
DEIT_EVAL_CROP_PCT = 0.875


def posterize_to_black(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """RandAugment's posterize, defined for every bit count the recipe can draw.

    ``rand-m9-mstd0.5-inc1`` draws ``PosterizeIncreasing`` with ``4 - int(0.4 m)`` bits, and a
    magnitude of 10 (m 9 + 0.5 std, clipped) gives 0 bits, which Pillow >= 13 refuses
    (``ValueError: bits must be between or equal to 1 and 8``). Older Pillow masked every channel
    value with ``~(2**8 - 1)``: the image quantised to black. This keeps that.

    Args:
        img: a PIL image (any mode with 8-bit bands).
        bits_to_keep: most significant bits kept per channel; >= 8 returns ``img``; <= 0 black.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_ops_defined_at_zero_bits(transform: Any) -> Any:
    """Point the posterize ops of every RandAugment in ``transform`` (a Compose, or one
    RandAugment) at :func:`posterize_to_black`; timm's module stays as it is."""
    for t in [transform, *getattr(transform, "transforms", ())]:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_to_black
    return transform


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def find_imagenet_classes(root: str | Path, split: str) -> list[str]:
    """The class folder names of ``root/split``, checking the layout.

    Raises:
        FileNotFoundError: ``root`` or ``root/split`` is missing, or ``split`` holds no class
            folders (the message shows the expected layout; a flat ``val/`` is pointed out).
        ValueError: ``split`` is not train/val, or val's classes differ from train's.
    """
    if split not in IMAGENET_SPLITS:
        raise ValueError(f"ImageNet split must be one of {IMAGENET_SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise missing_path_error(root, "ImageNet root folder", IMAGENET_LAYOUT)
    folder = root / split
    if not folder.is_dir():
        raise missing_path_error(folder, f"ImageNet {split!r} folder", IMAGENET_LAYOUT)
    classes = _class_folders(folder)
    if not classes:
        flat = sum(1 for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        hint = (
            f" ({flat} images lie directly in it: sort them into one folder per class, e.g. with the "
            "ILSVRC2012 devkit's validation ground truth)"
            if flat
            else ""
        )
        raise FileNotFoundError(f"no class folders in {folder}{hint}\nexpected layout:\n{IMAGENET_LAYOUT}")
    if split == "val" and (root / "train").is_dir():
        train_classes = _class_folders(root / "train")
        if train_classes and train_classes != classes:
            only_val = sorted(set(classes) - set(train_classes))[:5]
            only_train = sorted(set(train_classes) - set(classes))[:5]
            raise ValueError(
                f"class folders of {folder} ({len(classes)}) differ from {root / 'train'} ({len(train_classes)}): "
                f"only in val {only_val}, only in train {only_train}; labels would not match"
            )
    return classes


class ImageNetFolder(BadFilePolicy, ImageFolder):
    """torchvision's ImageFolder with layout checks and the ``on_bad`` policy.

    Items are ``(transform(PIL RGB image), class index)``; without a transform the PIL image.
    Attributes as ImageFolder: ``classes`` (wnids), ``class_to_idx``, ``samples``, ``targets``;
    plus ``split``, ``on_bad`` and ``bad_files``.
    """

    def __init__(
        self, root: str | Path, split: str, transform: Callable[..., Any] | None = None, on_bad: str = "fail"
    ) -> None:
        self._init_bad_files(on_bad)
        self.split = split
        self._classes = find_imagenet_classes(root, split)
        try:
            super().__init__(str(Path(root) / split), transform=transform, loader=load_rgb)
        except FileNotFoundError as e:  # a class folder without images
            raise FileNotFoundError(f"{e} (in {Path(root) / split})\nexpected layout:\n{IMAGENET_LAYOUT}") from e

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}

    def _load(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        img = load_rgb(path)
        if self.transform is not None:
            img = self._transform(path, self.transform, img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._fetch(index, self._load)


def build_imagenet_dataset(
    root: str | Path, split: str, transform: Callable[..., Any] | None = None, on_bad: str = "fail"
) -> ImageNetFolder:
    """The ImageNet ``split`` ("train" or "val") under ``root`` in ImageFolder layout.

    Args:
        root: folder holding ``train/`` and ``val/`` with one sub-folder per class.
        split: "train" or "val".
        transform: applied to the PIL RGB image (e.g. :func:`build_imagenet_transform`).
        on_bad: "fail" raises :class:`~anchorformer.data.files.BadFileError` naming a file that
            does not decode; "skip" logs it, records it in ``dataset.bad_files`` and returns the
            next sample.

    Raises:
        FileNotFoundError: a missing folder, named, with the expected layout.
    """
    return ImageNetFolder(root, split, transform=transform, on_bad=on_bad)


def build_imagenet_transform(is_training: bool, img_size: int, **timm_aug_kwargs: Any) -> Callable[..., Any]:
    """DeiT's transforms through ``timm.data.create_transform``.

    Args:
        is_training: the training pipeline (RandAugment, colour jitter, random-resized crop, flip,
            random erasing) or the evaluation one (bicubic resize to ``img_size / 0.875``, centre crop).
        img_size: output side.
        **timm_aug_kwargs: overrides of any ``create_transform`` argument (e.g. ``re_prob=0``,
            ``auto_augment=None``, ``scale=(0.35, 1.0)``, ``crop_pct=1.0``).

    Returns:
        A callable mapping a PIL image to a normalised FloatTensor (3, img_size, img_size). Its
        RandAugment posterizes to black at 0 bits (:func:`posterize_to_black`) instead of raising.
    """
    kwargs: dict[str, Any] = (
        dict(DEIT_TRAIN_AUG) if is_training else {"interpolation": "bicubic", "crop_pct": DEIT_EVAL_CROP_PCT}
    )
    kwargs.update(timm_aug_kwargs)
    return _posterize_ops_defined_at_zero_bits(create_transform(img_size, is_training=is_training, **kwargs))


def build_mixup(
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    label_smoothing: float = 0.1,
) -> Mixup | None:
    """timm's Mixup/CutMix with DeiT's defaults, or None when both alphas are 0.

    The returned callable maps ``(images (B, 3, H, W), labels (B,))`` to mixed images and soft
    targets (B, num_classes); the batch size must be even.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def build_imagenet_sampler(
    dataset: Any,
    *,
    training: bool,
    repeated_aug: bool = False,
    num_repeats: int = 3,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
) -> Sampler:
    """The sampler of a split: repeated augmentation, distributed, or plain.

    Training with ``repeated_aug`` uses timm's ``RepeatAugSampler`` (DeiT's RASampler: each
    image ``num_repeats`` times per epoch, the copies on different ranks, an epoch truncated to
    about ``len(dataset)`` samples in total); call ``sampler.set_epoch(epoch)`` each epoch. Without
    it: ``DistributedSampler`` when ``num_replicas > 1``, else a seeded ``RandomSampler``.
    Evaluation is sequential (sharded across ranks when ``num_replicas > 1``).
    """
    if training and repeated_aug:
        return RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats)
    if num_replicas > 1:
        return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=training, seed=seed)
    if training:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return SequentialSampler(dataset)
