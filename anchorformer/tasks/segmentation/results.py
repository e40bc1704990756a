"""The E6 results table and the example label maps, from the run folders of ``train seg``.

Each run folder holds the ``metrics.json`` written by
:func:`anchorformer.tasks.segmentation.train.evaluate_segmentation` (mIoU, mAcc, aAcc, backbone, head,
params, GMACs at 512², crop size, iterations, times) and ``predictions/*.png``. The table has one
row per run. GMACs are counted at 512² (the protocol's crop) whatever crop a run trained on; the
``crop`` column says which (128² in the mini profile). The standard models are counted separately
(:func:`complexity_rows`, the full preset, never trained).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...io import atomic_write_text, write_json_atomic
from ...tables import markdown_table

__all__ = [
    "COLUMNS",
    "complexity_rows",
    "complexity_markdown",
    "load_examples",
    "load_runs",
    "results_markdown",
    "write_summary",
]

# (key in metrics.json, column header)
COLUMNS = (
    ("run", "run"),
    ("family", "backbone"),
    ("backbone", "model"),
    ("head", "head"),
    ("neck", "neck"),
    ("num_anchors", "M"),
    ("params_m", "params (M)"),
    ("crop_size", "crop"),
    ("gmacs", "GMACs at 512²"),
    ("mIoU", "mIoU"),
    ("mAcc", "mAcc"),
    ("aAcc", "aAcc"),
    ("iters", "iters"),
)


def load_runs(seg_dir: str | os.PathLike, runs: Sequence[str]) -> list[dict[str, Any]]:
    """``metrics.json`` of each run folder ``seg_dir/<run>``, with ``run`` added.

    Raises:
        FileNotFoundError: a run without ``metrics.json`` (named).
    """
    rows = []
    for run in runs:
        path = Path(seg_dir) / run / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"run {run!r} has no metrics: {path} is missing (train and evaluate it first)")
        rows.append({"run": run, **json.loads(path.read_text(encoding="utf-8"))})
    return rows


def results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E6 table as markdown (no heading): backbone, head, neck, params, crop, GMACs at 512², mIoU, ...

    Runs recorded before the neck was a choice used the simple pyramid, and say so."""
    shown = [
        {**r, "crop_size": f"{r['crop_size']}²" if r.get("crop_size") else None, "neck": r.get("neck") or "simple"}
        for r in rows
    ]
    return markdown_table(shown, [k for k, _ in COLUMNS], [h for _, h in COLUMNS])


def write_summary(out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write ``summary.json`` (the rows) and ``summary.md`` (the table) into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "markdown": out / "summary.md"}
    write_json_atomic(paths["json"], {"runs": list(rows)})
    atomic_write_text(paths["markdown"], results_markdown(rows))
    return paths


def complexity_rows(
    runs: Sequence[tuple[str, str]], profile: str = "full", img_size: int = 512
) -> list[dict[str, Any]]:
    """Params and GMACs at ``img_size``² of backbone + pyramid + decode head, for (backbone, head) pairs.

    Models are built with the profile's preset on the meta device (nothing is computed), so the
    full-size models of the standard recipes are counted in seconds.
    """
    import torch

    from .train import build_model, model_complexity, resolve_recipe

    rows = []
    for backbone, head in runs:
        cfg = resolve_recipe(profile, model=backbone, head=head)
        with torch.device("meta"):
            model = build_model(cfg, init_checkpoint="")
        rows.append(
            {
                "backbone": backbone,
                "head": head,
                "neck": cfg.neck,
                "profile": profile,
                **model_complexity(model, img_size),
            }
        )
    return rows


def complexity_markdown(rows: Sequence[dict[str, Any]], img_size: int = 512) -> str:
    """The rows of :func:`complexity_rows` as a markdown table (no heading)."""
    return markdown_table(
        [{**r, "neck": r.get("neck") or "simple"} for r in rows], ["backbone", "head", "neck", "profile", "params_m", "gmacs"],
        ["model", "head", "neck", "preset", "params (M)", f"GMACs at {img_size}²"],
    )  # fmt: skip


def load_examples(
    data_root: str | os.PathLike, predictions: str | os.PathLike, n: int = 4, split: str = "validation"
) -> dict[str, list[Any]]:
    """The first ``n`` images of ``split`` with their ground truth and predicted label maps.

    Args:
        data_root: the ``ADEChallengeData2016`` folder.
        predictions: the folder of predicted PNGs (named like the ground truth).
        n: how many.
        split: the split the predictions are of.

    Returns:
        ``{"images": [(H, W, 3) uint8], "ground_truths": [(H, W) uint8 0..150], "predictions":
        [(H, W) uint8 1..150], "names": [file name]}``.

    Raises:
        FileNotFoundError: a prediction is missing; ValueError: its size differs from the ground truth's.
    """
    from ...data.ade20k import ADE20KSegmentation

    dataset = ADE20KSegmentation(data_root, split, train=False)
    out: dict[str, list[Any]] = {"images": [], "ground_truths": [], "predictions": [], "names": []}
    for i in range(min(n, len(dataset))):
        image, gt = dataset.load_raw(i)
        name = dataset.samples[i][1].name
        path = Path(predictions) / name
        if not path.is_file():
            raise FileNotFoundError(f"no prediction for {name}: {path} is missing")
        pred = np.asarray(Image.open(path))
        if pred.shape != gt.shape:
            raise ValueError(f"{path}: prediction is {pred.shape} but the ground truth is {gt.shape}")
        out["images"].append(np.asarray(image))
        out["ground_truths"].append(gt)
        out["predictions"].append(pred)
        out["names"].append(name)
    return out
