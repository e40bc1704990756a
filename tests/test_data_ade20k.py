"""ADE20K loader on the mini set: label mapping, ignore index, augmentation consistency, errors."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import normalize, pil_to_tensor

from anchorformer.data.ade20k import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    ADE20KSegmentation,
)
from anchorformer.data.files import BadFileError, MissingFileError
from anchorformer.data.synthetic import ADE_MINI_CLASSES


@pytest.fixture
def ade_root(mini_data: Path) -> Path:
    return mini_data / "ade20k" / "ADEChallengeData2016"


@pytest.fixture
def ade_copy(ade_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade_root, root)
    return root


def test_mini_classes_use_the_real_indices() -> None:
    assert len(ADE20K_CLASSES) == NUM_CLASSES == 150
    for k, name in ADE_MINI_CLASSES.items():
        assert ADE20K_CLASSES[k - 1] == name


def test_eval_items_keep_size_and_map_labels(ade_root: Path) -> None:
    ds = ADE20KSegmentation(ade_root, "validation", train=False)
    assert len(ds) == 50 and ds.class_names[2] == "sky"
    allowed = {k - 1 for k in ADE_MINI_CLASSES} | {IGNORE_INDEX}
    for i in (0, 7, 49):
        image, label = ds[i]
        img_path, ann_path = ds.samples[i]
        assert img_path.stem == ann_path.stem
        raw = np.asarray(Image.open(ann_path), dtype=np.int64)
        assert image.shape == (3, *raw.shape) and image.dtype == torch.float32
        assert label.shape == raw.shape and label.dtype == torch.int64
        expected = np.where(raw == 0, IGNORE_INDEX, raw - 1)
        assert np.array_equal(label.numpy(), expected)
        assert set(label.unique().tolist()) <= allowed
        ref = normalize(pil_to_tensor(Image.open(img_path).convert("RGB")).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(image, ref)


def test_train_items_are_crops(ade_root: Path) -> None:
    ds = ADE20KSegmentation(ade_root, "training", crop_size=96, train=True)
    labelled = 0
    for i in range(12):
        image, label = ds[i]
        assert image.shape == (3, 96, 96) and label.shape == (96, 96) and label.dtype == torch.int64
        values = set(label.unique().tolist())
        assert values <= {k - 1 for k in ADE_MINI_CLASSES} | {IGNORE_INDEX}
        labelled += (label != IGNORE_INDEX).sum().item()
        # padding: where the image is zero in every channel the label is ignored
        pad = (image == 0).all(0)
        assert (label[pad] == IGNORE_INDEX).all()
    assert labelled > 0.3 * 12 * 96 * 96


def test_small_scale_pads_with_ignore(ade_root: Path) -> None:
    ds = ADE20KSegmentation(ade_root, "training", crop_size=128, scale_range=(0.5, 0.5), photometric=False)
    image, label = ds[0]
    assert image.shape == (3, 128, 128)
    # rescaled to fit (256, 64): the short side is 64 pixels, the rest of the crop is padding
    w, h = ds.load_raw(0)[0].size
    nh, nw = int(h * 64 / min(h, w) + 0.5), int(w * 64 / min(h, w) + 0.5)
    assert min(nh, nw) == 64 and max(nh, nw) < 128
    assert (label[nh:] == IGNORE_INDEX).all() and (label[:, nw:] == IGNORE_INDEX).all()
    assert (image[:, nh:] == 0).all() and (image[:, :, nw:] == 0).all()
    assert (label[:nh, :nw] != IGNORE_INDEX).float().mean() > 0.3


def test_flip_keeps_image_and_label_aligned(ade_root: Path) -> None:
    probe = ADE20KSegmentation(ade_root, "training", train=False)
    pil, raw = probe.load_raw(3)
    w, h = pil.size
    ds = ADE20KSegmentation(
        ade_root,
        "training",
        crop_size=max(w, h),
        scale_range=(1.0, 1.0),
        base_size=(max(w, h), min(w, h)),
        flip_prob=1.0,
        photometric=False,
        cat_max_ratio=1.0,
    )
    image, label = ds[3]
    expected = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1)[:, ::-1]
    assert np.array_equal(label[:h, :w].numpy(), expected)
    ref = normalize(pil_to_tensor(pil).float() / 255, IMAGENET_MEAN, IMAGENET_STD).flip(-1)
    assert torch.allclose(image[:, :h, :w], ref)


def test_seeded_augmentation_is_reproducible(ade_root: Path) -> None:
    ds = ADE20KSegmentation(ade_root, "training", crop_size=64)
    torch.manual_seed(1)
    random.seed(1)
    a = ds[5]
    torch.manual_seed(1)
    random.seed(1)
    b = ds[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_missing_folders(ade_copy: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ADE20K root folder") as e:
        ADE20KSegmentation(ade_copy.parent / "nope", "training")
    assert "annotations/" in str(e.value)
    shutil.rmtree(ade_copy / "annotations" / "validation")
    with pytest.raises(FileNotFoundError, match=r"ADE20K annotation folder: .*annotations/validation"):
        ADE20KSegmentation(ade_copy, "validation")
    with pytest.raises(ValueError, match="split must be one of"):
        ADE20KSegmentation(ade_copy, "val")


def test_missing_label_map(ade_copy: Path) -> None:
    (ade_copy / "annotations/training/ADE_train_00000004.png").unlink()
    with pytest.raises(MissingFileError, match=r"ADE_train_00000004.png: label map of ADE_train_00000004.jpg"):
        ADE20KSegmentation(ade_copy, "training")
    ds = ADE20KSegmentation(ade_copy, "training", on_bad="skip")
    assert len(ds) == 199 and ds.bad_files[0].endswith("ADE_train_00000004.jpg")


def test_label_map_of_the_wrong_size(ade_copy: Path) -> None:
    ann = ade_copy / "annotations/validation/ADE_val_00000002.png"
    lab = Image.open(ann)
    lab.resize((lab.width + 3, lab.height)).save(ann)
    ds = ADE20KSegmentation(ade_copy, "validation", train=False)
    with pytest.raises(
        BadFileError, match=r"ADE_val_00000002.png: label map size \d+x\d+ differs from its image's"
    ) as e:
        ds[1]
    assert e.value.path == str(ann)
    skip = ADE20KSegmentation(ade_copy, "validation", train=False, on_bad="skip")
    image, label = skip[1]
    assert image.shape[-2:] == label.shape and skip.bad_files == [str(ann)]


def test_bad_label_values_and_modes(ade_copy: Path) -> None:
    ann = ade_copy / "annotations/validation/ADE_val_00000003.png"
    arr = np.asarray(Image.open(ann)).copy()
    arr[0, 0] = 200
    Image.fromarray(arr, "L").save(ann)
    ds = ADE20KSegmentation(ade_copy, "validation", train=False)
    with pytest.raises(BadFileError, match="label value 200 found"):
        ds[2]
    Image.fromarray(np.stack([arr] * 3, -1), "RGB").save(ann)
    with pytest.raises(BadFileError, match="must be single-channel"):
        ds[2]
    img = ade_copy / "images/validation/ADE_val_00000003.jpg"
    img.write_bytes(b"not a jpeg")
    with pytest.raises(BadFileError, match=r"ADE_val_00000003.jpg: cannot decode image"):
        ds[2]
