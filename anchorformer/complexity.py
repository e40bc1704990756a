"""``anchorformer complexity``: params and GMACs of AnchorFormer and DeiT (experiment E4, counted).

Two tables, as markdown and JSON:

- ``models``: AnchorFormer-T/S/B for each anchor count M, and DeiT-T/S/B, at each image size;
- ``resolution``: GMACs against resolution for AnchorFormer (default M) and DeiT at each size.

All counts come from :func:`count_macs` (:mod:`anchorformer.ops.counting`, re-exported here) on
models built on the meta device, so the tables take seconds even for ViT-B at 1024².
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_text, write_json_atomic
from .models import create_model
from .ops.counting import count_macs, count_params

__all__ = [
    "complexity_tables",
    "count_macs",
    "count_params",
    "model_complexity",
    "register",
    "tables_markdown",
    "write_complexity",
]

SIZES = ("tiny", "small", "base")


def model_complexity(name: str, img_size: int = 224, *, fused: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Params and GMACs of a registered model at ``img_size``, built on the meta device (fast).

    Args:
        fused: count the exact inference form (``model.fuse_for_inference()``; AnchorFormer only);
            ``params`` then counts the folded weights.

    Returns:
        ``{"model", "img_size", "params", "params_m", "macs", "gmacs", **kwargs}``, with
        ``"fused": True`` when fused.
    """
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **kwargs)
        if fused:
            if not hasattr(model, "fuse_for_inference"):
                raise ValueError(f"model_complexity: {name} has no anchor attention to fuse")
            model.fuse_for_inference()
    macs = count_macs(model, img_size)
    params = count_params(model) + sum(b.numel() for b in model.buffers()) * fused  # folded weights are buffers
    return {
        "model": name,
        "img_size": img_size,
        **kwargs,
        **({"fused": True} if fused else {}),
        "params": params,
        "params_m": round(params / 1e6, 3),
        "macs": macs,
        "gmacs": round(macs / 1e9, 4),
    }


LETTER = {"tiny": "T", "small": "S", "base": "B"}


def complexity_tables(
    sizes: Sequence[str] = SIZES,
    anchors: Sequence[int] = (8, 16, 30, 49, 64),
    img_sizes: Sequence[int] = (224, 384),
    resolutions: Sequence[int] = (224, 384, 512, 768, 1024),
    default_anchors: int = 30,
) -> dict[str, list[dict[str, Any]]]:
    """Compute both tables.

    Returns:
        ``{"models": rows, "resolution": rows}``; each row a dict with ``family`` ("AnchorFormer"
        or "DeiT"), ``size``, ``num_anchors`` (None for DeiT), ``img_size``, ``params``,
        ``params_m``, ``macs``, ``gmacs``; resolution rows also carry ``ratio`` (DeiT / AnchorFormer),
        ``anchorformer_fused_gmacs`` and ``fused_ratio`` (the exact inference form,
        ``model.fuse_for_inference()``: the projections folded into the anchors).
    """
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"unknown size {s!r}; expected one of {SIZES}")
    models: list[dict[str, Any]] = []
    for img in img_sizes:
        for s in sizes:
            row = model_complexity(f"deit_{s}_patch16_224", img_size=img)
            models.append({"family": "DeiT", "size": LETTER[s], "num_anchors": None, **row})
            for m in anchors:
                row = model_complexity(f"anchorformer_{s}_patch16_224", img_size=img, num_anchors=m)
                models.append({"family": "AnchorFormer", "size": LETTER[s], **row})
    resolution: list[dict[str, Any]] = []
    for s in sizes:
        for img in resolutions:
            deit = model_complexity(f"deit_{s}_patch16_224", img_size=img)
            anchor = model_complexity(f"anchorformer_{s}_patch16_224", img_size=img, num_anchors=default_anchors)
            fused = model_complexity(
                f"anchorformer_{s}_patch16_224", img_size=img, num_anchors=default_anchors, fused=True
            )
            resolution.append(
                {
                    "size": LETTER[s],
                    "img_size": img,
                    "tokens": (img // 16) ** 2,
                    "num_anchors": default_anchors,
                    "deit_gmacs": deit["gmacs"],
                    "anchorformer_gmacs": anchor["gmacs"],
                    "ratio": round(deit["macs"] / anchor["macs"], 3),
                    "anchorformer_fused_gmacs": fused["gmacs"],
                    "fused_ratio": round(deit["macs"] / fused["macs"], 3),
                }
            )
    return {"models": models, "resolution": resolution}


def tables_markdown(tables: dict[str, list[dict[str, Any]]]) -> str:
    """Render :func:`complexity_tables` as two markdown tables."""
    lines = [
        "| model | size | M | image | params (M) | GMACs |",
        "|---|---|---|---|---|---|",
    ]
    for r in tables["models"]:
        m = "—" if r["num_anchors"] is None else str(r["num_anchors"])
        lines.append(
            f"| {r['family']} | {r['size']} | {m} | {r['img_size']}² | {r['params_m']:.2f} | {r['gmacs']:.3f} |"
        )
    lines += [
        "",
        "| size | image | tokens | M | DeiT GMACs | AnchorFormer GMACs | DeiT / AnchorFormer | fused GMACs | DeiT / fused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tables["resolution"]:
        lines.append(
            f"| {r['size']} | {r['img_size']}² | {r['tokens']} | {r['num_anchors']} | {r['deit_gmacs']:.3f} "
            f"| {r['anchorformer_gmacs']:.3f} | {r['ratio']:.2f}× | {r['anchorformer_fused_gmacs']:.3f} "
            f"| {r['fused_ratio']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def write_complexity(out_dir: str | Path, tables: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """Write ``complexity.json`` and ``complexity.md`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "complexity.json", "markdown": out / "complexity.md"}
    write_json_atomic(paths["json"], tables)
    atomic_write_text(paths["markdown"], tables_markdown(tables))
    return paths


def _run(args: argparse.Namespace) -> int:
    tables = complexity_tables(args.sizes, args.anchors, args.img_sizes, args.resolutions, args.default_anchors)
    if args.format == "json":
        print(json.dumps(tables, indent=2))
    else:
        print(tables_markdown(tables), end="")
    if args.out:
        write_complexity(args.out, tables)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("complexity", help="params and GMACs tables of AnchorFormer vs DeiT")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--anchors", nargs="+", type=int, default=[8, 16, 30, 49, 64], help="anchor counts M")
    p.add_argument("--img-sizes", nargs="+", type=int, default=[224, 384], help="sides of the models table")
    p.add_argument("--resolutions", nargs="+", type=int, default=[224, 384, 512, 768, 1024])
    p.add_argument("--default-anchors", type=int, default=30, help="M of the resolution table")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="what to print")
    p.add_argument("--out", help="also write complexity.json and complexity.md into this folder")
    p.set_defaults(func=_run)
