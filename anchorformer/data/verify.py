"""Verification of a dataset on disk, and its manifest.

``verify_dataset("imagenet" | "coco" | "ade20k", root)`` checks, for both splits:

- the layout (a missing folder or file is named, with the expected layout);
- the counts: the full datasets' (ImageNet-1k 1,281,167 / 50,000 images in 1000 classes; COCO
  2017 118,287 / 5,000 images; ADE20K 20,210 / 2,000 images) or, for a mini set, the counts
  its ``mini.json`` records;
- that every image decodes (and, for ADE20K, every label map: single channel, the image's size,
  values 0..150; for COCO, that the decoded size is the one in the json and every segmentation
  decodes);
- that annotations point to files that exist (COCO ``file_name``; ADE20K image/label pairs);
- that COCO annotations can be trained on: a box has a positive width and height and overlaps its
  image, a polygon has at least three points (the loader drops such boxes; pycocotools reads a
  four-number "polygon" as a box).

It returns a manifest: counts, the number and total size of the files, and a SHA-256 of the
sorted list of (relative path, size). The manifest is small and deterministic, so DVC tracks it
(``outputs/data/manifest_*.json``) in place of the full datasets, which are never copied.
Problems are collected and raised together as a :class:`VerificationError`; with
``on_bad="skip"`` files that do not decode are listed in the manifest instead (``bad_files``),
and so are unusable annotations (``bad_annotations``, present only when there are some).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..io import write_json_atomic
from .files import (
    ADE20K_LAYOUT,
    COCO_LAYOUT,
    IMAGENET_LAYOUT,
    check_ade_pair,
    check_image,
    check_on_bad,
)
from .synthetic import read_mini_manifest

__all__ = [
    "DATASETS",
    "EXPECT",
    "FULL_COUNTS",
    "LAYOUTS",
    "VerificationError",
    "file_list_digest",
    "verify_dataset",
    "write_manifest",
]

log = logging.getLogger(__name__)

DATASETS = ("imagenet", "coco", "ade20k")
EXPECT = ("auto", "full", "mini")
LAYOUTS = {"imagenet": IMAGENET_LAYOUT, "coco": COCO_LAYOUT, "ade20k": ADE20K_LAYOUT}

# Image counts of the released datasets, per split.
FULL_COUNTS: dict[str, dict[str, int]] = {
    "imagenet": {"train": 1_281_167, "val": 50_000},
    "coco": {"train": 118_287, "val": 5_000},
    "ade20k": {"training": 20_210, "validation": 2_000},
}
IMAGENET_FULL_CLASSES = 1000
MAX_LISTED = 20


class VerificationError(ValueError):
    """A dataset failed verification; ``problems`` lists every finding (files named)."""

    def __init__(self, dataset: str, root: str | Path, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__(
            f"{dataset} at {root} failed verification ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{shown}{more}"
        )


# ----------------------------------------------------------------------------------------------
# file checks (check_image, check_ade_pair: anchorformer.data.files), in worker processes


def _map_files(fn: Callable[[str], Any], paths: list[str], workers: int, desc: str) -> list[Any]:
    show = sys.stderr.isatty()
    if workers <= 1 or len(paths) < 2000:
        return [fn(p) for p in tqdm(paths, desc=desc, disable=not show, leave=False)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        it = pool.map(fn, paths, chunksize=256)
        return list(tqdm(it, total=len(paths), desc=desc, disable=not show, leave=False))


def file_list_digest(root: str | Path) -> dict[str, Any]:
    """Number, total bytes and SHA-256 of the sorted ``relative/path<TAB>size`` lines under ``root``."""
    root = Path(root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            entries.append((p.relative_to(root).as_posix(), p.stat().st_size))
    entries.sort()
    h = hashlib.sha256()
    for rel, size in entries:
        h.update(f"{rel}\t{size}\n".encode())
    return {"files": len(entries), "bytes": sum(s for _, s in entries), "file_list_sha256": h.hexdigest()}


def _resolve_expect(root: Path, expect: str) -> tuple[str, dict[str, Any] | None]:
    if expect not in EXPECT:
        raise ValueError(f"expect must be one of {EXPECT}, got {expect!r}")
    mini = read_mini_manifest(root) if root.is_dir() else None
    if expect == "mini" and mini is None:
        raise FileNotFoundError(
            f"missing {root / 'mini.json'}: {root} is not a generated mini set (expected counts unknown); "
            "use --expect full for a real dataset"
        )
    if expect == "auto":
        expect = "mini" if mini is not None else "full"
    return expect, (mini if expect == "mini" else None)


def _expected_counts(dataset: str, expect: str, mini: dict[str, Any] | None) -> dict[str, int]:
    if expect == "full":
        return dict(FULL_COUNTS[dataset])
    assert mini is not None
    if mini.get("format") != dataset:
        raise ValueError(f"mini.json describes a {mini.get('format')!r} set, not {dataset!r}")
    return {split: int(v["images"]) for split, v in mini["splits"].items()}


def _check_decodes(
    results: Iterable[tuple[str, Any, str | None]], problems: list[str], bad: list[str], on_bad: str
) -> dict[str, Any]:
    sizes = {}
    for path, size, reason in results:
        if reason is None:
            sizes[path] = size
        elif on_bad == "skip":
            bad.append(path)
            log.warning("bad file (skipped): %s: %s", path, reason)
        else:
            problems.append(f"{path}: {reason}")
    return sizes


# ----------------------------------------------------------------------------------------------
# per dataset


def _verify_imagenet(
    root: Path, expected: dict[str, int], expect: str, decode: bool, on_bad: str, workers: int
) -> tuple[dict, list, list, list]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from .imagenet import find_imagenet_classes

    problems: list[str] = []
    bad: list[str] = []
    splits: dict[str, Any] = {}
    for split, n_expected in expected.items():
        classes = find_imagenet_classes(root, split)
        paths, empty = [], []
        for c in classes:
            files = sorted(
                e.path for e in os.scandir(root / split / c) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
            )
            if not files:
                empty.append(c)
            paths.extend(files)
        if empty:
            problems.append(
                f"{root / split}: class folders without images: {empty[:5]}{' ...' if len(empty) > 5 else ''}"
            )
        if expect == "full" and len(classes) != IMAGENET_FULL_CLASSES:
            problems.append(f"{root / split}: {len(classes)} class folders, expected {IMAGENET_FULL_CLASSES}")
        if len(paths) != n_expected:
            problems.append(f"{root / split}: {len(paths)} images, expected {n_expected} ({expect})")
        if decode:
            _check_decodes(_map_files(check_image, paths, workers, f"imagenet {split}"), problems, bad, on_bad)
        splits[split] = {"images": len(paths), "classes": len(classes)}
    return splits, problems, bad, []


def _verify_coco(
    root: Path, expected: dict[str, int], expect: str, decode: bool, on_bad: str, workers: int
) -> tuple[dict, list, list, list]:
    from pycocotools import mask as mask_utils

    from .coco import coco_paths, load_coco_api

    problems: list[str] = []
    bad: list[str] = []
    bad_anns: list[str] = []
    splits: dict[str, Any] = {}
    for split, n_expected in expected.items():
        ann_file, img_dir = coco_paths(root, split)
        coco = load_coco_api(ann_file)
        images = coco.imgs
        cat_ids = set(coco.getCatIds())
        if not cat_ids:
            problems.append(f"{ann_file}: no categories")
        on_disk = {e.name for e in os.scandir(img_dir) if e.is_file()}
        listed = {}
        for img in images.values():
            listed[str(img_dir / img["file_name"])] = img
            if img["file_name"] not in on_disk:
                problems.append(
                    f"{ann_file}: image {img['id']} refers to {img_dir / img['file_name']}, which does not exist"
                )
        unlisted = len(on_disk - {i["file_name"] for i in images.values()})
        if unlisted:
            problems.append(f"{img_dir}: {unlisted} files that {ann_file.name} does not list")
        if len(images) != n_expected:
            problems.append(f"{ann_file}: {len(images)} images, expected {n_expected} ({expect})")
        n_crowd = 0
        for ann in coco.anns.values():
            n_crowd += int(ann.get("iscrowd", 0))
            where = f"{ann_file}: annotation {ann.get('id')}"
            if ann.get("image_id") not in images:
                problems.append(f"{where} refers to image_id {ann.get('image_id')}, not listed in images")
                continue
            if ann.get("category_id") not in cat_ids:
                problems.append(f"{where} has category_id {ann.get('category_id')}, not among the categories")
            unusable = _unusable_annotation(ann, images[ann["image_id"]])
            if unusable and on_bad == "skip":
                bad_anns.append(f"{ann_file.name}: annotation {ann.get('id')} {unusable}")
                log.warning("bad annotation (skipped): %s %s", where, unusable)
            elif unusable:
                problems.append(f"{where} {unusable}")
            if decode:
                try:
                    rle = coco.annToRLE(ann)
                    mask_utils.area(rle)
                except Exception as e:
                    problems.append(f"{where}: segmentation does not decode ({type(e).__name__}: {e})")
        if decode:
            existing = [p for p in listed if Path(p).name in on_disk]
            sizes = _check_decodes(_map_files(check_image, existing, workers, f"coco {split}"), problems, bad, on_bad)
            for p, (w, h) in sizes.items():
                img = listed[p]
                if (w, h) != (img["width"], img["height"]):
                    problems.append(
                        f"{p}: decoded size {w}x{h} differs from the annotation's {img['width']}x{img['height']}"
                    )
        splits[split] = {
            "images": len(images),
            "annotations": len(coco.anns),
            "crowd": n_crowd,
            "categories": len(cat_ids),
        }
    return splits, problems, bad, bad_anns


def _unusable_annotation(ann: dict[str, Any], image: dict[str, Any]) -> str | None:
    """Why a COCO annotation cannot be trained on (of image ``image``), or None."""
    from .coco import bbox_problem

    problem = bbox_problem(ann)
    if problem is not None:
        return f"(image {ann.get('image_id')}) {problem}"
    box = ann["bbox"]
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return f"(image {ann.get('image_id')}): degenerate box {box} (non-positive width or height)"
    if min(x + w, image["width"]) <= max(x, 0.0) or min(y + h, image["height"]) <= max(y, 0.0):
        return f"(image {ann.get('image_id')}): box {box} lies outside its {image['width']}x{image['height']} image"
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        for i, poly in enumerate(seg):
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, (list, tuple)) else 0
                return (
                    f"(image {ann.get('image_id')}): polygon {i} has {n} coordinates; "
                    "expected at least 3 points (x, y pairs)"
                )
    return None


def _verify_ade20k(
    root: Path, expected: dict[str, int], expect: str, decode: bool, on_bad: str, workers: int
) -> tuple[dict, list, list, list]:
    from .ade20k import ade20k_pairs

    problems: list[str] = []
    bad: list[str] = []
    splits: dict[str, Any] = {}
    for split, n_expected in expected.items():
        pairs, unpaired = ade20k_pairs(root, split)
        for p in unpaired:
            problems.append(f"{root / 'annotations' / split / (p.stem + '.png')}: missing label map of {p}")
        images = {p.stem for p, _ in pairs} | {p.stem for p in unpaired}
        orphans = sorted(p.name for p in (root / "annotations" / split).glob("*.png") if p.stem not in images)
        if orphans:
            problems.append(
                f"{root / 'annotations' / split}: {len(orphans)} label maps without an image, e.g. {orphans[0]}"
            )
        n_images = len(pairs) + len(unpaired)
        if n_images != n_expected:
            problems.append(f"{root / 'images' / split}: {n_images} images, expected {n_expected} ({expect})")
        if decode:
            items = [(str(a), str(b)) for a, b in pairs]
            _check_decodes(_map_files(check_ade_pair, items, workers, f"ade20k {split}"), problems, bad, on_bad)
        splits[split] = {"images": n_images, "annotations": len(pairs)}
    return splits, problems, bad, []


_VERIFIERS = {"imagenet": _verify_imagenet, "coco": _verify_coco, "ade20k": _verify_ade20k}


def verify_dataset(
    dataset: str,
    root: str | Path,
    *,
    expect: str = "auto",
    on_bad: str = "fail",
    decode: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Verify ``dataset`` at ``root`` and return its manifest.

    Args:
        dataset: "imagenet", "coco" or "ade20k".
        root: the dataset's root (for ADE20K the ``ADEChallengeData2016`` folder).
        expect: "full" (the released counts), "mini" (the counts of ``root/mini.json``) or "auto"
            (mini when ``mini.json`` exists).
        on_bad: "fail": files that do not decode and unusable annotations are problems; "skip":
            they are listed in the manifest's ``bad_files`` and ``bad_annotations`` (and logged)
            and verification goes on.
        decode: decode every image (and label map, and COCO segmentation); False checks only
            the layout, the counts and the references.
        workers: processes for decoding; default: the CPU count (at most 16).

    Returns:
        The manifest: ``dataset``, ``root`` (as given), ``expect``, ``splits`` (counts per
        split), ``files``, ``bytes``, ``file_list_sha256``, ``decoded``, ``bad_files``.

    Raises:
        FileNotFoundError: a missing folder or file of the layout (named, with the layout).
        VerificationError: counts that differ, files that do not decode, dangling references.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    check_on_bad(on_bad)
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"missing {dataset} root folder: {root_path}\nexpected layout:\n{LAYOUTS[dataset]}")
    expect, mini = _resolve_expect(root_path, expect)
    expected = _expected_counts(dataset, expect, mini)
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    log.info("verifying %s at %s (%s counts%s)", dataset, root_path, expect, ", decoding every file" if decode else "")
    splits, problems, bad, bad_annotations = _VERIFIERS[dataset](root_path, expected, expect, decode, on_bad, workers)
    if problems:
        raise VerificationError(dataset, root_path, problems)
    manifest = {
        "dataset": dataset,
        "root": str(root),
        "expect": expect,
        "splits": splits,
        **file_list_digest(root_path),
        "decoded": bool(decode),
        "bad_files": sorted(os.path.relpath(p, root_path) for p in bad),
    }
    if bad_annotations:  # only then: the manifests of clean sets stay as they were
        manifest["bad_annotations"] = bad_annotations
    if mini is not None:
        manifest["mini"] = {"seed": mini.get("seed"), "version": mini.get("version")}
    log.info("%s at %s: %s", dataset, root_path, json.dumps(splits))
    return manifest


def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    """Write ``manifest`` as JSON, atomically (temporary file, then rename); the folder is created."""
    return write_json_atomic(path, manifest, sort_keys=True)
