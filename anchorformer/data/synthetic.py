"""The embedded mini datasets: a seeded generator of three small sets in the real on-disk layouts.

The ``mini`` profile trains and evaluates on these instead of ImageNet-1k, COCO 2017 and ADE20K,
through exactly the same loaders (:mod:`anchorformer.data.imagenet`, :mod:`.coco`, :mod:`.ade20k`):

- ``imagenet/``: ImageFolder ``train/`` and ``val/``, 10 classes with WordNet-like folder names
  (``n00000000`` ...), 72x72 JPEGs. Each class is one shape with its own hue and surface texture
  (a red disc, an orange square with stripes, ...), at a random scale, position and rotation.
- ``coco/``: ``annotations/instances_{train,val}2017.json`` in the COCO format (info, licenses,
  images, annotations, categories with non-contiguous ids 1, 3, 7), ``{train,val}2017/`` JPEGs of
  128–160 pixels (not all square), 1–4 objects per image with polygon masks (most) or RLE masks,
  crowd regions (``iscrowd=1``, uncompressed RLE, a cluster of small objects) and a few images
  without any annotation. Boxes and areas are computed from the masks the images were drawn
  with, so they agree exactly with what pycocotools decodes.
- ``ade20k/ADEChallengeData2016/``: ``images/{training,validation}/ADE_*_XXXXXXXX.jpg`` and PNG
  label maps (mode L) of the same stem in ``annotations/``, street-like scenes with six of the
  150 ADE20K classes (their real indices: building, sky, tree, road, grass, car) and 0 ("other")
  wherever something else is drawn.

Backgrounds are gradients, smooth noise, low-contrast textures or clutter, with pixel noise, so
colour alone or position alone does not give the answer. Everything is drawn with integer
arithmetic, numpy's PCG64 stream and PIL (fixed JPEG quality, no metadata), so the same seed gives
the same bytes. Each root holds a ``mini.json`` (seed, counts, class names) which
``anchorformer data verify`` reads as the expected counts.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

__all__ = [
    "ADE_MINI_CLASSES",
    "COCO_MINI_CATEGORIES",
    "GENERATOR_VERSION",
    "IMAGENET_MINI_CLASSES",
    "MINI_MANIFEST",
    "make_mini_ade20k",
    "make_mini_coco",
    "make_mini_datasets",
    "make_mini_imagenet",
    "read_mini_manifest",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MINI_MANIFEST = "mini.json"
JPEG_QUALITY = 90

# (shape, hue in degrees, texture, name); hues 36 degrees apart, every shape different.
IMAGENET_MINI_CLASSES: list[tuple[str, float, str, str]] = [
    ("disc", 0.0, "solid", "red disc"),
    ("square", 36.0, "stripes", "orange striped square"),
    ("triangle", 72.0, "dots", "yellow dotted triangle"),
    ("star", 108.0, "checker", "lime checkered star"),
    ("ring", 144.0, "solid", "green ring"),
    ("cross", 180.0, "stripes", "cyan striped cross"),
    ("rhombus", 216.0, "dots", "azure dotted rhombus"),
    ("crescent", 252.0, "checker", "blue checkered crescent"),
    ("bar", 288.0, "solid", "purple bar"),
    ("hexagon", 324.0, "stripes", "magenta striped hexagon"),
]

# category id -> (name, shape, hue); ids deliberately non-contiguous like COCO's.
COCO_MINI_CATEGORIES: dict[int, tuple[str, str, float]] = {
    1: ("circle", "disc", 0.0),
    3: ("square", "square", 220.0),
    7: ("triangle", "triangle", 115.0),
}
COCO_SIZES = [(160, 128), (128, 160), (144, 144), (160, 120), (128, 128), (152, 136)]

# ADE20K class index (1..150, the real indices) -> name.
ADE_MINI_CLASSES: dict[int, str] = {2: "building", 3: "sky", 5: "tree", 7: "road", 10: "grass", 21: "car"}
ADE_SIZES = [(128, 128), (160, 128), (128, 96), (144, 112), (112, 144)]


# ----------------------------------------------------------------------------------------------
# drawing primitives (float32 HxWx3 images in 0..255, boolean HxW masks)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _hsv(hue_deg: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, s, v)
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A random colour pulled towards grey (backgrounds)."""
    c = rng.uniform(20, 235, 3).astype(np.float32)
    s = rng.uniform(0.1, 0.55)
    return c.mean() + s * (c - c.mean())


def _noise(rng: np.random.Generator, h: int, w: int, amp: float, channels: int = 3) -> np.ndarray:
    """Triangular pixel noise in [-amp, amp] (from uniforms only, so identical on every platform)."""
    shape = (h, w, channels)
    return ((rng.random(shape, dtype=np.float32) + rng.random(shape, dtype=np.float32) - 1.0) * amp).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Colour noise at ``cells`` x ``cells`` resolution, bilinearly upsampled."""
    small = np.stack([_muted(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
    im = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def _pattern(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A {0, 1} float pattern (H, W): stripes, dots or checker, random period and angle."""
    yy, xx = _grid(h, w)
    a = rng.uniform(0, math.pi)
    ca, sa = round(math.cos(a), 6), round(math.sin(a), 6)
    u, v = xx * ca + yy * sa, -xx * sa + yy * ca
    if kind == "stripes":
        p = float(rng.integers(3, 6))
        return (np.floor(u / p) % 2).astype(np.float32)
    if kind == "checker":
        p = float(rng.integers(3, 6))
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if kind == "dots":
        p = float(rng.integers(5, 8))
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        return ((du * du + dv * dv) < (p * 0.3) ** 2).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A varied background: gradient, smooth noise, low-contrast texture or clutter, plus noise."""
    kind = int(rng.integers(4))
    if kind == 0:  # linear gradient between two muted colours
        yy, xx = _grid(h, w)
        a = rng.uniform(0, 2 * math.pi)
        t = xx * round(math.cos(a), 6) + yy * round(math.sin(a), 6)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        c0, c1 = _muted(rng), _muted(rng)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    elif kind == 1:
        img = _smooth_noise(rng, h, w, int(rng.integers(3, 7)))
    elif kind == 2:  # two close colours in a pattern
        c0 = _muted(rng)
        c1 = np.clip(c0 + rng.uniform(-35, 35, 3).astype(np.float32), 0, 255)
        p = _pattern(rng, ["stripes", "checker", "dots"][int(rng.integers(3))], h, w)[..., None]
        img = c0 * (1 - p) + c1 * p
    else:  # clutter: muted blobs on a muted base
        img = np.broadcast_to(_muted(rng), (h, w, 3)).copy()
        for _ in range(int(rng.integers(6, 16))):
            m = _polygon_mask(h, w, _blob(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 0.25 * min(h, w))))
            img[m] = _muted(rng)
    return img + _noise(rng, h, w, float(rng.uniform(4, 14)))


def _texture(rng: np.random.Generator, kind: str, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """An object's surface: its colour with shading, and a darker pattern unless ``solid``."""
    yy, xx = _grid(h, w)
    a = rng.uniform(0, 2 * math.pi)
    t = xx * round(math.cos(a), 6) + yy * round(math.sin(a), 6)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    shade = 0.8 + 0.35 * t
    img = colour * shade[..., None]
    if kind != "solid":
        p = _pattern(rng, kind, h, w)[..., None]
        img = img * (1 - 0.5 * p)
    return img + _noise(rng, h, w, 6.0)


def _polygon_mask(h: int, w: int, polygon: list[tuple[float, float]] | np.ndarray) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in polygon], fill=1)
    return np.asarray(im, dtype=bool)


def _regular(cx: float, cy: float, radii: list[float], angle: float, n: int) -> list[tuple[float, float]]:
    """Vertices at radii[i % len(radii)], n of them evenly spaced, rotated by ``angle``."""
    pts = []
    for i in range(n):
        a = angle + 2 * math.pi * i / n
        r = radii[i % len(radii)]
        pts.append((round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)))
    return pts


def _rotated(cx: float, cy: float, pts: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(round(cx + x * c - y * s, 2), round(cy + x * s + y * c, 2)) for x, y in pts]


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    n = int(rng.integers(6, 11))
    radii = [float(r * rng.uniform(0.5, 1.0)) for _ in range(n)]
    return _regular(cx, cy, radii, float(rng.uniform(0, 2 * math.pi)), n)


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """Polygon(s) of a simple shape of circumradius ``r``; one polygon except cutting shapes."""
    if shape == "disc":
        return [_regular(cx, cy, [r], angle, 28)]
    if shape == "square":
        return [_regular(cx, cy, [r], angle + math.pi / 4, 4)]
    if shape == "triangle":
        return [_regular(cx, cy, [r], angle, 3)]
    if shape == "hexagon":
        return [_regular(cx, cy, [r], angle, 6)]
    if shape == "star":
        return [_regular(cx, cy, [r, 0.42 * r], angle, 10)]
    if shape == "rhombus":
        return [_regular(cx, cy, [r, 0.42 * r], angle, 4)]
    if shape == "bar":
        hw, hh = r, 0.3 * r
        return [_rotated(cx, cy, [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)], angle)]
    if shape == "cross":
        a, b = r, 0.32 * r
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        return [_rotated(cx, cy, pts, angle)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _shape_mask(h: int, w: int, shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask (H, W) of a shape (holes and cuts included)."""
    if shape == "ring":
        outer = _polygon_mask(h, w, _regular(cx, cy, [r], angle, 28))
        return outer & ~_polygon_mask(h, w, _regular(cx, cy, [0.55 * r], angle, 28))
    if shape == "crescent":
        outer = _polygon_mask(h, w, _regular(cx, cy, [r], angle, 28))
        ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
        return outer & ~_polygon_mask(h, w, _regular(ox, oy, [0.85 * r], angle, 28))
    m = np.zeros((h, w), dtype=bool)
    for poly in _shape_polygons(shape, cx, cy, r, angle):
        m |= _polygon_mask(h, w, poly)
    return m


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    # Fixed quality and subsampling, no EXIF/ICC/comment: the bytes depend on the pixels only.
    Image.fromarray(_to_u8(img), "RGB").save(path, "JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)


def _save_png_l(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr.astype(np.uint8), "L").save(path, "PNG", compress_level=6)


def _write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=None, separators=(",", ":")) + "\n")


def read_mini_manifest(root: str | Path) -> dict[str, Any] | None:
    """The ``mini.json`` the generator wrote into a dataset root, or None if there is none."""
    p = Path(root) / MINI_MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------------------------
# ImageNet format


def _imagenet_image(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    shape, hue, texture, _ = IMAGENET_MINI_CLASSES[cls]
    img = _background(rng, size, size)
    # Distractors: small muted blobs, so "something is there" is not the cue.
    for _ in range(int(rng.integers(0, 3))):
        m = _polygon_mask(size, size, _blob(rng, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)))
        img[m] = _muted(rng)
    r = float(rng.uniform(0.2, 0.42)) * size
    cx, cy = (float(rng.uniform(0.75 * r, size - 0.75 * r)) for _ in range(2))
    colour = _hsv(hue + rng.uniform(-10, 10), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    m = _shape_mask(size, size, shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
    tex = _texture(rng, texture, size, size, colour)
    img[m] = tex[m]
    return img


def make_mini_imagenet(
    root: str | Path, seed: int = 0, *, train_per_class: int = 100, val_per_class: int = 20, img_size: int = 72
) -> dict[str, Any]:
    """Write the ImageNet-format mini set into ``root`` (``train/``, ``val/``, ``mini.json``).

    Returns:
        The contents of ``mini.json``.
    """
    root = Path(root)
    splits = {"train": train_per_class, "val": val_per_class}
    classes = []
    for c, (_, _, _, name) in enumerate(IMAGENET_MINI_CLASSES):
        wnid = f"n{c:08d}"
        classes.append({"wnid": wnid, "name": name})
        for s, (split, n) in enumerate(splits.items()):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, 0, s, c])
            for i in range(n):
                _save_jpeg(_imagenet_image(rng, c, img_size), folder / f"{wnid}_{i:05d}.jpg")
    manifest = {
        "format": "imagenet",
        "generator": "anchorformer.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": img_size,
        "num_classes": len(classes),
        "classes": classes,
        "splits": {split: {"images": n * len(classes)} for split, n in splits.items()},
    }
    _write_json(manifest, root / MINI_MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------------
# COCO format


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (crowd annotations): column-major run lengths, starting with 0s."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"counts": [int(x) for x in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _overlaps(box: list[float], others: list[list[float]], margin: float = 2.0) -> bool:
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        if x < ox + ow + margin and ox < x + w + margin and y < oy + oh + margin and oy < y + h + margin:
            return True
    return False


def _coco_split(
    rng: np.random.Generator, split: str, n: int, first_image_id: int, first_ann_id: int, img_dir: Path
) -> tuple[list[dict], list[dict], dict[str, int]]:
    cat_ids = list(COCO_MINI_CATEGORIES)
    images: list[dict] = []
    anns: list[dict] = []
    stats = {"images": 0, "annotations": 0, "crowd": 0, "rle": 0, "empty_images": 0}
    image_id, ann_id = first_image_id, first_ann_id
    for i in range(n):
        image_id += int(rng.integers(1, 8))  # ids with gaps, like COCO's
        w, h = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
        img = _background(rng, h, w)
        file_name = f"{image_id:012d}.jpg"
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": h,
                "width": w,
                "date_captured": "2024-01-01 00:00:00",
                "flickr_url": "",
                "id": image_id,
            }
        )
        empty = i % 20 == 7  # a few images without annotations
        n_obj = 0 if empty else int(rng.integers(1, 5))
        want_crowd = not empty and i % 8 == 3
        boxes: list[list[float]] = []
        n_before = len(anns)
        s = min(w, h)
        # A crowd region: a cluster of small objects of one category, one RLE annotation.
        if want_crowd:
            cat = cat_ids[int(rng.integers(len(cat_ids)))]
            _, shape, hue = COCO_MINI_CATEGORIES[cat]
            cw, ch = float(rng.uniform(0.3, 0.45) * s), float(rng.uniform(0.3, 0.45) * s)
            x0, y0 = float(rng.uniform(2, w - cw - 2)), float(rng.uniform(2, h - ch - 2))
            m = np.zeros((h, w), dtype=bool)
            for _ in range(int(rng.integers(6, 13))):
                r = float(rng.uniform(2.5, 4.5))
                cx, cy = float(rng.uniform(x0 + r, x0 + cw - r)), float(rng.uniform(y0 + r, y0 + ch - r))
                m |= _shape_mask(h, w, shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            colour = _hsv(hue + rng.uniform(-12, 12), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
            tex = _texture(rng, "solid", h, w, colour)
            img[m] = tex[m]
            box = _mask_bbox(m)
            boxes.append(box)
            ann_id += 1
            anns.append(
                {
                    "segmentation": _uncompressed_rle(m),
                    "area": float(m.sum()),
                    "iscrowd": 1,
                    "image_id": image_id,
                    "bbox": box,
                    "category_id": cat,
                    "id": ann_id,
                }
            )
            stats["crowd"] += 1
        for _ in range(n_obj):
            cat = cat_ids[int(rng.integers(len(cat_ids)))]
            _, shape, hue = COCO_MINI_CATEGORIES[cat]
            r = float(rng.uniform(0.09, 0.26) * s)
            angle = float(rng.uniform(0, 2 * math.pi))
            placed = None
            for _try in range(30):
                cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
                (poly,) = _shape_polygons(shape, cx, cy, r, angle)
                xs, ys = [p[0] for p in poly], [p[1] for p in poly]
                if min(xs) < 1 or min(ys) < 1 or max(xs) > w - 1 or max(ys) > h - 1:
                    continue
                approx = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                if not _overlaps(approx, boxes):
                    placed = poly
                    break
            if placed is None:
                continue
            flat = [c for p in placed for c in p]
            # The object is drawn with exactly the mask pycocotools decodes from the annotation.
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
            m = mask_utils.decode(rle).astype(bool)
            if not m.any():
                continue
            colour = _hsv(hue + rng.uniform(-12, 12), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
            tex = _texture(rng, "solid", h, w, colour)
            img[m] = tex[m]
            box = _mask_bbox(m)
            boxes.append(box)
            if rng.random() < 0.2:  # some objects carry a compressed RLE instead of a polygon
                enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                seg: Any = {"size": [h, w], "counts": enc["counts"].decode("ascii")}
                stats["rle"] += 1
            else:
                seg = [flat]
            ann_id += 1
            anns.append(
                {
                    "segmentation": seg,
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "image_id": image_id,
                    "bbox": box,
                    "category_id": cat,
                    "id": ann_id,
                }
            )
        if len(anns) == n_before:
            stats["empty_images"] += 1
        _save_jpeg(img, img_dir / file_name)
    stats["images"] = len(images)
    stats["annotations"] = len(anns)
    return images, anns, stats


def make_mini_coco(root: str | Path, seed: int = 0, *, num_train: int = 200, num_val: int = 50) -> dict[str, Any]:
    """Write the COCO-format mini set into ``root`` (``annotations/``, ``{train,val}2017/``, ``mini.json``).

    Returns:
        The contents of ``mini.json``.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": "shape", "id": cid, "name": v[0]} for cid, v in COCO_MINI_CATEGORIES.items()]
    split_stats = {}
    for s, (split, n, first_img, first_ann) in enumerate(
        [("train", num_train, 1000, 0), ("val", num_val, 500000, 900000)]
    ):
        img_dir = root / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 1, s])
        images, anns, stats = _coco_split(rng, split, n, first_img, first_ann, img_dir)
        doc = {
            "info": {
                "description": "anchorformer mini COCO-format set (synthetic shapes)",
                "url": "",
                "version": str(GENERATOR_VERSION),
                "year": 2024,
                "contributor": "anchorformer.data.synthetic",
                "date_created": "2024/01/01",
            },
            "licenses": [{"url": "https://www.apache.org/licenses/LICENSE-2.0", "id": 1, "name": "Apache-2.0"}],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        _write_json(doc, root / "annotations" / f"instances_{split}2017.json")
        split_stats[split] = stats
    manifest = {
        "format": "coco",
        "generator": "anchorformer.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
        "splits": split_stats,
    }
    _write_json(manifest, root / MINI_MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------------
# ADE20K format


def _ade_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A street-like scene and its label map (0 = other, else ADE20K class indices)."""
    yy, xx = _grid(h, w)
    img = _background(rng, h, w)  # whatever is left unlabelled is "other"
    label = np.zeros((h, w), dtype=np.uint8)

    def paint(m: np.ndarray, tex: np.ndarray, cls: int) -> None:
        img[m] = tex[m]
        label[m] = cls

    horizon = float(rng.uniform(0.35, 0.6) * h)
    if rng.random() < 0.9:  # sky: blue vertical gradient with a few pale clouds
        top, bottom = (
            _hsv(rng.uniform(200, 225), rng.uniform(0.45, 0.8), rng.uniform(0.7, 0.95)),
            _hsv(rng.uniform(195, 215), rng.uniform(0.15, 0.4), rng.uniform(0.85, 1.0)),
        )
        t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
        sky = top * (1 - t) + bottom * t + _noise(rng, h, w, 4.0)
        for _ in range(int(rng.integers(0, 3))):
            cm = _polygon_mask(h, w, _blob(rng, rng.uniform(0, w), rng.uniform(0, horizon * 0.7), rng.uniform(6, 16)))
            sky[cm] = 240 + _noise(rng, h, w, 6.0)[cm]
        sky_bottom = horizon - float(rng.uniform(0, 0.12) * h)
        paint(yy < sky_bottom, sky, 3)
    ground_top = horizon + float(rng.uniform(0, 0.1) * h)
    ground = yy >= ground_top
    kind = int(rng.integers(3))  # grass, road, or a road across grass
    grass = _hsv(rng.uniform(85, 125), rng.uniform(0.5, 0.85), rng.uniform(0.45, 0.75)) * (
        1 - 0.35 * _pattern(rng, "dots", h, w)[..., None]
    ) + _noise(rng, h, w, 22.0)
    grey = float(rng.uniform(55, 95))
    road = np.full((h, w, 3), grey, dtype=np.float32) + _noise(rng, h, w, 6.0)
    if kind == 0:
        paint(ground, grass, 10)
    else:
        if kind == 2:
            paint(ground, grass, 10)
            x_mid = float(rng.uniform(0.3, 0.7) * w)
            half_top, half_bot = float(rng.uniform(0.03, 0.08) * w), float(rng.uniform(0.25, 0.45) * w)
            road_m = _polygon_mask(
                h,
                w,
                [
                    (x_mid - half_top, ground_top),
                    (x_mid + half_top, ground_top),
                    (x_mid + half_bot, h),
                    (x_mid - half_bot, h),
                ],
            )
            road_m &= ground
        else:
            road_m = ground
            x_mid = w / 2
        dashes = (np.abs(xx - x_mid) < 1.6) & ((np.floor(yy / 6) % 2) == 0) & road_m
        road[dashes] = 225
        paint(road_m, road, 7)
    for _ in range(int(rng.integers(0, 3))):  # buildings standing on the horizon, with windows
        bw, bh = float(rng.uniform(0.15, 0.35) * w), float(rng.uniform(0.3, 0.8) * horizon)
        x0 = float(rng.uniform(-0.05 * w, w - 0.5 * bw))
        m = (xx >= x0) & (xx < x0 + bw) & (yy >= ground_top - bh) & (yy < ground_top + 1)
        base = np.full(3, rng.uniform(110, 190), dtype=np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
        tex = np.broadcast_to(base, (h, w, 3)).copy() + _noise(rng, h, w, 5.0)
        p = float(rng.integers(5, 8))
        win = ((xx - x0) % p < p * 0.5) & ((yy - ground_top) % p < p * 0.5)
        tex[win] = tex[win] * 0.45 + np.array([40, 50, 80], dtype=np.float32)
        paint(m, tex, 2)
    for _ in range(int(rng.integers(0, 3))):  # trees: trunk and a dark, mottled canopy
        cx = float(rng.uniform(0, w))
        r = float(rng.uniform(0.07, 0.15) * w)
        foot = ground_top + float(rng.uniform(0, 0.15) * h)
        trunk = (np.abs(xx - cx) < max(1.5, 0.18 * r)) & (yy >= foot - 1.6 * r) & (yy < foot)
        canopy = _polygon_mask(h, w, _regular(cx, foot - 1.9 * r, [r, 0.85 * r], float(rng.uniform(0, math.pi)), 14))
        tex = _hsv(rng.uniform(95, 140), rng.uniform(0.6, 0.9), rng.uniform(0.25, 0.45)) * (
            1 - 0.4 * _pattern(rng, "checker", h, w)[..., None]
        ) + _noise(rng, h, w, 10.0)
        tex[trunk] = np.array([95, 65, 40], dtype=np.float32)
        paint(trunk | canopy, tex, 5)
    for _ in range(int(rng.integers(0, 3))):  # cars on the ground: body, cabin, black wheels
        cw = float(rng.uniform(0.18, 0.3) * w)
        ch = 0.38 * cw
        x0 = float(rng.uniform(0, w - cw))
        y1 = float(rng.uniform(ground_top + ch, h))
        body = (xx >= x0) & (xx < x0 + cw) & (yy >= y1 - ch * 0.6) & (yy < y1 - ch * 0.15)
        cabin = _polygon_mask(
            h,
            w,
            [
                (x0 + 0.2 * cw, y1 - ch * 0.6),
                (x0 + 0.3 * cw, y1 - ch),
                (x0 + 0.7 * cw, y1 - ch),
                (x0 + 0.82 * cw, y1 - ch * 0.6),
            ],
        )
        wr = 0.12 * cw
        wheels = ((xx - (x0 + 0.22 * cw)) ** 2 + (yy - (y1 - wr)) ** 2 < wr * wr) | (
            (xx - (x0 + 0.78 * cw)) ** 2 + (yy - (y1 - wr)) ** 2 < wr * wr
        )
        tex = np.broadcast_to(
            _hsv(rng.uniform(0, 360), rng.uniform(0.7, 1.0), rng.uniform(0.6, 0.95)), (h, w, 3)
        ).copy()
        tex += _noise(rng, h, w, 5.0)
        tex[cabin] = np.array([150, 190, 215], dtype=np.float32)
        tex[wheels] = 25.0
        paint(body | cabin | wheels, tex, 21)
    for _ in range(int(rng.integers(0, 3))):  # unlabelled things ("other") in front of anything
        m = _polygon_mask(h, w, _blob(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 0.15 * w)))
        tex = _texture(
            rng, ["solid", "stripes", "dots"][int(rng.integers(3))], h, w, _hsv(rng.uniform(0, 360), 0.8, 0.8)
        )
        paint(m, tex, 0)
    return img, label


def make_mini_ade20k(root: str | Path, seed: int = 0, *, num_train: int = 200, num_val: int = 50) -> dict[str, Any]:
    """Write the ADE20K-format mini set into ``root`` (the ``ADEChallengeData2016`` folder).

    Returns:
        The contents of ``mini.json``.
    """
    root = Path(root)
    split_stats = {}
    for s, (split, prefix, n) in enumerate([("training", "ADE_train", num_train), ("validation", "ADE_val", num_val)]):
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 2, s])
        pixels = np.zeros(256, dtype=np.int64)
        for i in range(1, n + 1):
            w, h = ADE_SIZES[int(rng.integers(len(ADE_SIZES)))]
            img, label = _ade_scene(rng, h, w)
            stem = f"{prefix}_{i:08d}"
            _save_jpeg(img, img_dir / f"{stem}.jpg")
            _save_png_l(label, ann_dir / f"{stem}.png")
            pixels += np.bincount(label.ravel(), minlength=256)
        split_stats[split] = {
            "images": n,
            "annotations": n,
            "pixels_per_class": {str(k): int(pixels[k]) for k in [0, *ADE_MINI_CLASSES]},
        }
    manifest = {
        "format": "ade20k",
        "generator": "anchorformer.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "classes": {str(k): v for k, v in ADE_MINI_CLASSES.items()},
        "splits": split_stats,
    }
    _write_json(manifest, root / MINI_MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------------


def _check_replaceable(name: str, dest: Path) -> None:
    """Raise ValueError unless ``dest`` is absent or holds a mini set this generator wrote."""
    if not dest.exists() and not dest.is_symlink():
        return
    what = f"data make-mini: {dest} exists and does not hold a mini set written by make-mini"
    if dest.is_symlink() or not dest.is_dir():
        raise ValueError(f"{what} (not a folder); move it away or choose another --out")
    try:
        manifest = read_mini_manifest(dest)
    except ValueError:
        manifest = None
    if not (
        isinstance(manifest, dict)
        and manifest.get("generator") == "anchorformer.data.synthetic"
        and manifest.get("format") == name
    ):
        raise ValueError(f"{what} (no {MINI_MANIFEST} of the {name} mini set); move it away or choose another --out")


def make_mini_datasets(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the three mini datasets into ``out_dir``.

    Each set is written into a temporary folder beside its destination and moved into place
    when complete, so an interrupted run never leaves a set that looks finished.

    Returns:
        ``{"imagenet": out/imagenet, "coco": out/coco, "ade20k": out/ade20k/ADEChallengeData2016}``.
    """
    out = Path(out_dir)
    jobs = [
        ("imagenet", out / "imagenet", make_mini_imagenet),
        ("coco", out / "coco", make_mini_coco),
        ("ade20k", out / "ade20k" / "ADEChallengeData2016", make_mini_ade20k),
    ]
    # Only a folder this generator wrote is replaced: anything else there (a real dataset, a
    # user's file) is refused, by name, before anything is written or removed.
    for name, dest, _ in jobs:
        _check_replaceable(name, dest)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, dest, fn in jobs:
        t0 = time.perf_counter()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        fn(tmp, seed)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        paths[name] = dest
        log.info("wrote the mini %s set to %s in %.1f s", name, dest, time.perf_counter() - t0)
    return paths
