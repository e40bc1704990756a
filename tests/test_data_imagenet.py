"""ImageNet loader on the mini set: layout checks, transforms, bad files, Mixup, samplers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader

from anchorformer.data.files import BadFileError, MissingFileError
from anchorformer.data.imagenet import (
    build_imagenet_dataset,
    build_imagenet_sampler,
    build_imagenet_transform,
    build_mixup,
)


@pytest.fixture
def inet_copy(mini_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    shutil.copytree(mini_data / "imagenet", root)
    return root


def test_items_shapes_labels(mini_data: Path) -> None:
    root = mini_data / "imagenet"
    train = build_imagenet_dataset(root, "train", build_imagenet_transform(True, 64))
    val = build_imagenet_dataset(root, "val", build_imagenet_transform(False, 64))
    assert len(train) == 1000 and len(val) == 200
    assert train.classes == val.classes == [f"n{c:08d}" for c in range(10)]
    assert sorted(set(train.targets)) == list(range(10))
    x, y = train[123]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= y < 10
    assert y == train.class_to_idx[Path(train.samples[123][0]).parent.name]
    xb, yb = next(iter(DataLoader(val, batch_size=8)))
    assert xb.shape == (8, 3, 64, 64) and yb.dtype == torch.int64
    # normalised: roughly zero-centred, not in [0, 1]
    assert xb.min() < 0


def test_untransformed_item_is_pil(mini_data: Path) -> None:
    img, y = build_imagenet_dataset(mini_data / "imagenet", "val")[0]
    assert img.mode == "RGB" and img.size == (72, 72) and y == 0


def test_deit_eval_transform() -> None:
    t = build_imagenet_transform(False, 224)
    names = [type(s).__name__ for s in t.transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    assert t.transforms[0].size == 256  # 224 / 0.875
    train = build_imagenet_transform(True, 224)
    assert "RandAugment" in repr(train) and "RandomErasing" in repr(train)
    assert "RandomErasing" not in repr(build_imagenet_transform(True, 224, re_prob=0.0))


def test_missing_folders_name_the_path_and_layout(inet_copy: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ImageNet root folder") as e:
        build_imagenet_dataset(inet_copy.parent / "nowhere", "train")
    assert "expected layout" in str(e.value) and "train/" in str(e.value)
    shutil.rmtree(inet_copy / "val")
    with pytest.raises(FileNotFoundError, match=r"ImageNet 'val' folder: .*imagenet/val"):
        build_imagenet_dataset(inet_copy, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        build_imagenet_dataset(inet_copy, "test")


def test_flat_val_folder_is_pointed_out(inet_copy: Path) -> None:
    val = inet_copy / "val"
    for p in list(val.rglob("*.jpg")):
        p.rename(val / p.name)
    for d in [d for d in val.iterdir() if d.is_dir()]:
        d.rmdir()
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*val \(200 images lie directly in it"):
        build_imagenet_dataset(inet_copy, "val")


def test_val_classes_must_match_train(inet_copy: Path) -> None:
    shutil.rmtree(inet_copy / "val" / "n00000003")
    with pytest.raises(ValueError, match=r"only in train \['n00000003'\]"):
        build_imagenet_dataset(inet_copy, "val")


def test_bad_image_fail_and_skip(inet_copy: Path) -> None:
    ds = build_imagenet_dataset(inet_copy, "val")
    bad = Path(ds.samples[3][0])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated JPEG
    with pytest.raises(BadFileError, match="cannot decode image") as e:
        ds[3]
    assert e.value.path == str(bad)
    skip = build_imagenet_dataset(inet_copy, "val", on_bad="skip")
    img, y = skip[3]
    assert img.size == (72, 72) and skip.bad_files == [str(bad)]
    assert skip[4][1] == y  # the replacement is the next sample
    skip[3]
    assert skip.num_bad == 1  # counted once
    Path(ds.samples[5][0]).unlink()
    with pytest.raises(MissingFileError, match="image file does not exist"):
        ds[5]
    with pytest.raises(ValueError, match="on_bad"):
        build_imagenet_dataset(inet_copy, "val", on_bad="ignore")


def test_mixup_soft_targets() -> None:
    mix = build_mixup(10)
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    xm, ym = mix(x, y)
    assert xm.shape == x.shape and ym.shape == (4, 10)
    assert torch.allclose(ym.sum(1), torch.ones(4))
    assert build_mixup(10, mixup_alpha=0.0, cutmix_alpha=0.0) is None


def test_samplers(mini_data: Path) -> None:
    ds = build_imagenet_dataset(mini_data / "imagenet", "val")
    ra = [build_imagenet_sampler(ds, training=True, repeated_aug=True, num_replicas=3, rank=r) for r in range(3)]
    assert isinstance(ra[0], RepeatAugSampler)
    # each image goes to the three ranks once (DeiT's repeated augmentation)
    firsts = [list(s)[0] for s in ra]
    assert len(set(firsts)) == 1
    first = list(build_imagenet_sampler(ds, training=True, seed=1))
    assert sorted(first) == list(range(len(ds))) and first != list(range(len(ds)))
    assert first == list(build_imagenet_sampler(ds, training=True, seed=1))  # seeded
    assert list(build_imagenet_sampler(ds, training=False)) == list(range(len(ds)))
