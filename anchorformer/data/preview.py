"""Figures of dataset samples (notebook 00_data): classes, boxes and masks, label maps; manifest tables.

Samples are drawn with a seeded ``random.Random``, through the same loaders the training uses, so
what the figures show is what the models get (before augmentation).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .synthetic import read_mini_manifest  # noqa: E402

__all__ = ["ade20k_palette", "manifest_table", "plot_ade20k_samples", "plot_coco_samples", "plot_imagenet_samples"]


def ade20k_palette() -> np.ndarray:
    """(256, 3) uint8 colours: 0 ("other") black, 1..150 distinct fixed colours, 255 white."""
    pal = np.random.default_rng(7).integers(40, 256, size=(256, 3)).astype(np.uint8)
    pal[0] = 0
    pal[255] = 255
    return pal


def manifest_table(manifests: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the data stage's manifests: counts per split, files, size, hash."""
    lines = [
        "| dataset | counts | root | files | MiB | file-list sha256 | bad files |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in manifests.items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} | | | | | |")
            continue
        counts = "; ".join(f"{s}: " + ", ".join(f"{v} {k}" for k, v in c.items()) for s, c in m["splits"].items())
        lines.append(
            f"| {name} ({m['expect']}) | {counts} | `{m['root']}` | {m['files']} | {m['bytes'] / 2**20:.1f} "
            f"| `{m['file_list_sha256'][:16]}` | {len(m['bad_files'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_imagenet_samples(
    root: str | Path, split: str = "train", *, per_class: int = 4, max_classes: int = 10, seed: int = 0
) -> Any:
    """A grid: one row per class (up to ``max_classes``, evenly spaced), ``per_class`` images each."""
    from .imagenet import build_imagenet_dataset

    ds = build_imagenet_dataset(root, split)
    rng = random.Random(seed)
    classes = list(range(len(ds.classes)))
    if len(classes) > max_classes:
        classes = [classes[round(i * (len(classes) - 1) / (max_classes - 1))] for i in range(max_classes)]
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(ds.targets):
        by_class.setdefault(t, []).append(i)
    names = {c["wnid"]: c["name"] for c in (read_mini_manifest(root) or {}).get("classes", [])}
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(1.3 * per_class + 1.5, 1.3 * len(classes)), squeeze=False
    )
    for r, c in enumerate(classes):
        picks = rng.sample(by_class[c], min(per_class, len(by_class[c])))
        for j in range(per_class):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(picks):
                img, _ = ds[picks[j]]
                ax.imshow(img)
        wnid = ds.classes[c]
        axes[r][0].set_title(f"{c}: {wnid} {names.get(wnid, '')}", fontsize=7, loc="left")
    fig.suptitle(f"ImageNet format: {root} / {split}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_coco_samples(root: str | Path, split: str = "val", *, n: int = 8, cols: int = 4, seed: int = 0) -> Any:
    """Images with their masks (translucent) and boxes (dashed: crowd), labelled by category."""
    from .coco import CocoDetection

    ds = CocoDetection(root, split)
    picks = sorted(random.Random(seed).sample(range(len(ds)), min(n, len(ds))))
    rows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.7 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        image, t = ds[i]
        rgb = image.permute(1, 2, 0).numpy().copy()
        for k in range(len(t["labels"])):
            m = t["masks"][k].numpy().astype(bool)
            rgb[m] = 0.5 * rgb[m] + 0.5 * np.array(colours(int(t["labels"][k]) % 10)[:3])
        ax.imshow(rgb)
        for k, box in enumerate(t["boxes"].tolist()):
            label = int(t["labels"][k])
            crowd = bool(t["iscrowd"][k])
            x0, y0, x1, y1 = box
            ax.add_patch(
                Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ls="--" if crowd else "-", ec=colours(label % 10)
                )
            )
            ax.text(x0, y0, ds.class_names[label - 1] + (" (crowd)" if crowd else ""), fontsize=6, va="bottom", color="white",
                    bbox={"facecolor": colours(label % 10), "pad": 1, "lw": 0})  # fmt: skip
        ax.set_title(f"image {t['image_id']}: {len(t['labels'])} object{'s' * (len(t['labels']) != 1)}", fontsize=7)
    fig.suptitle(f"COCO format: {root} / {split}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_ade20k_samples(root: str | Path, split: str = "validation", *, n: int = 4, seed: int = 0) -> Any:
    """Image and label map side by side (0 "other" in black), with a legend of the classes shown."""
    from .ade20k import ADE20K_CLASSES, ADE20KSegmentation

    ds = ADE20KSegmentation(root, split, train=False)
    picks = sorted(random.Random(seed).sample(range(len(ds)), min(n, len(ds))))
    pal = ade20k_palette()
    fig, axes = plt.subplots(len(picks), 2, figsize=(6, 2.6 * len(picks)), squeeze=False)
    present: set[int] = set()
    for r, i in enumerate(picks):
        image, label = ds.load_raw(i)
        present |= set(np.unique(label).tolist())
        axes[r][0].imshow(image)
        axes[r][1].imshow(pal[label])
        axes[r][0].set_title(ds.samples[i][0].name, fontsize=7)
        axes[r][1].set_title(ds.samples[i][1].name, fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    handles = [
        Patch(color=pal[k] / 255, label=f"{k}: {ADE20K_CLASSES[k - 1] if k else 'other (ignored)'}")
        for k in sorted(present)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"ADE20K format: {root} / {split}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
