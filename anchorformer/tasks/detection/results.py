"""The E5 results table: box and mask AP per backbone, and AP gains under comparable FLOPs.

The abstract of Shan et al. (arXiv 2505.16463) claims "81.3% higher mAP on COCO detection under
comparable FLOPs". Its form is a relative gain, (AP_AnchorFormer - AP_DeiT) / AP_DeiT, between
an AnchorFormer detector and a DeiT detector whose backbones cost about the same MACs. Here the
DeiT partner of an AnchorFormer run is the DeiT run trained with ``match_macs_of`` naming that
AnchorFormer backbone (its input scaled down until its backbone MACs at 1333x800 x scale match,
:func:`anchorformer.models.detection.comparable_input_scale`).

Each run folder written by :func:`anchorformer.tasks.detection.train` holds
``metrics.json`` (AP numbers in percent, backbone GMACs, times) and ``run.json`` (the recipe,
the detector config, the matched backbone).

Two kinds of backbone GMACs are kept apart. A run's backbone is counted at the input it ran at
(the detector's ``min_size`` x ``max_size``, input scale applied) with the shape it was trained
with (``input_gmacs``, ``input_size``, ``backbone_label``): in the mini profile that is a small
backbone on ~128x160 images. The standard T/S/B backbones of the full recipe are counted
separately at 1333x800 (:func:`standard_backbones`), without training anything: DeiT with global
attention, DeiT with ViTDet's windows (14x14, global blocks 2, 5, 8, 11; the baseline the field
puts under Mask R-CNN) and AnchorFormer (anchor attention in every block, global and linear in N).
Every row says which attention its backbone runs (``attention``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...io import atomic_write_text, write_json_atomic
from ...tables import markdown_table

__all__ = [
    "COCO_SIZE",
    "STANDARD_WINDOW",
    "at_input",
    "attention_label",
    "backbone_label",
    "comparable_flops_pairs",
    "input_backbone_gmacs",
    "load_runs",
    "pairs_markdown",
    "relative_gain",
    "results_markdown",
    "runs_markdown",
    "standard_backbones",
    "standard_backbones_markdown",
    "write_summary",
]

COCO_SIZE = (800, 1333)  # (H, W): the COCO protocol's input, at which standard backbones are compared
_LETTER = {"tiny": "T", "small": "S", "base": "B"}
STANDARD_WINDOW = 14  # ViTDet's window side at patch 16 (global blocks: its default, 2, 5, 8, 11 of 12)

_ROW_KEYS = (
    "bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl",
    "segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl",
    "backbone_gmacs", "backbone_gmacs_full", "backbone_gmacs_match", "match_size", "input_scale", "min_size", "epochs",
)  # fmt: skip


def load_runs(det_dir: str | os.PathLike, runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run folder ``det_dir/<run>`` from its ``metrics.json`` and ``run.json``.

    Raises:
        FileNotFoundError: a run folder lacks either file (the run has not finished).
    """
    rows = []
    for run in runs:
        folder = Path(det_dir) / run
        files = {}
        for name in ("metrics.json", "run.json"):
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: run {run!r} has not finished (train det --out {folder})")
            files[name] = json.loads(path.read_text())
        metrics, info = files["metrics.json"], files["run.json"]
        row: dict[str, Any] = {
            "run": run,
            "backbone": info["backbone"],
            "detector": info["detector_config"]["detector"],
            "matched_to": info.get("matched_to"),
        }
        row.update({k: metrics[k] for k in _ROW_KEYS if k in metrics})
        row.update(input_backbone_gmacs(info["detector_config"]))
        rows.append(row)
    return rows


def _family_size(name: str) -> tuple[str, str]:
    family = "AnchorFormer" if name.startswith("anchor") else "DeiT" if name.startswith("deit") else name
    size = next((_LETTER[p] for p in name.split("_") if p in _LETTER), "?")
    return family, size


def backbone_label(name: str, vit: Any) -> str:
    """What a backbone is, from its module: ``AnchorFormer-T (96 ch, 4 blocks, 3 heads, patch 8, M 16)``.

    Args:
        name: the registered model name (gives the family and the size letter).
        vit: the built ViT (on any device, the meta device included).
    """
    family, size = _family_size(name)
    parts = [f"{vit.embed_dim} ch", f"{len(vit.blocks)} blocks", f"{vit.blocks[0].attn.num_heads} heads"]
    parts.append(f"patch {vit.patch_embed.patch_size[0]}")
    anchors = _num_anchors(vit)
    if anchors is not None:
        parts.append(f"M {anchors}")
    return f"{family}-{size} ({', '.join(parts)})"


def attention_label(vit: Any) -> str:
    """Which attention a backbone runs: ``global``, ``windowed 14×14, global blocks 2, 5, 8, 11``,
    ``anchor (global), M 30`` (or ``anchor in 8×8 windows, ...`` for the windowed ablation)."""
    from ...models.windowed import window_config

    anchors = _num_anchors(vit)
    windows = window_config(vit)
    if windows is None:
        return "global" if anchors is None else f"anchor (global), M {anchors}"
    size, glob = windows
    where = f"{size}×{size}, global blocks {', '.join(str(i) for i in glob)}"
    return f"windowed {where}" if anchors is None else f"anchor in windows {where}, M {anchors}"


def _num_anchors(vit: Any) -> int | None:
    return next((int(m.num_anchors) for m in vit.modules() if hasattr(m, "num_anchors")), None)


def _meta_pyramid(name: str, kwargs: dict[str, Any]) -> Any:
    import torch

    from ...models.pyramid import SimpleFeaturePyramid

    with torch.device("meta"):
        return SimpleFeaturePyramid(name, 8, (1.0,), backbone_kwargs=dict(kwargs))


def input_backbone_gmacs(detector_config: dict[str, Any]) -> dict[str, Any]:
    """The backbone of a run at the input it ran at, from its recorded detector config.

    Counted with :func:`anchorformer.count_macs` on the meta device at (``min_size``,
    ``max_size``) of the config (input scale applied), the shorter and longer sides the detector
    resizes images to.

    Returns:
        ``input_size`` ("HxW"), ``input_gmacs``, ``backbone_label`` (see :func:`backbone_label`);
        empty when the config lacks the backbone's arguments or the sizes.
    """
    from ...models.pyramid import backbone_macs

    name, kw = detector_config.get("backbone"), detector_config.get("backbone_kwargs")
    h, w = detector_config.get("min_size"), detector_config.get("max_size")
    if not name or kw is None or not h or not w:
        return {}
    pyramid = _meta_pyramid(name, kw)
    return {
        "input_size": f"{int(h)}x{int(w)}",
        "input_gmacs": float(f"{backbone_macs(pyramid, (int(h), int(w))) / 1e9:.6g}"),
        "backbone_label": backbone_label(name, pyramid.backbone),
        "attention": attention_label(pyramid.backbone),
    }


def standard_backbones(
    sizes: Sequence[str] = ("tiny", "small", "base"), img_size: tuple[int, int] = COCO_SIZE
) -> list[dict[str, Any]]:
    """Params and GMACs at ``img_size`` (default 1333x800) of the full recipe's DeiT and AnchorFormer backbones.

    Built on the meta device from the ``full`` preset of ``configs/det.yaml`` (the standard
    T/S/B shapes, M = the preset's or the model's 30): counted, never trained. Per size: DeiT with
    global attention, DeiT with ViTDet's windows (:data:`STANDARD_WINDOW`, global blocks 2, 5, 8,
    11), AnchorFormer; ``attention`` says which.
    """
    from ...models.factory import backbone_kwargs
    from ...models.pyramid import backbone_macs
    from .train import resolve_recipe

    cfg = resolve_recipe(profile="full")
    rows = []
    for size in sizes:
        for family, window in (("DeiT", 0), ("DeiT", STANDARD_WINDOW), ("AnchorFormer", 0)):
            name = f"{'deit' if family == 'DeiT' else 'anchorformer'}_{size}_patch16_224"
            pyramid = _meta_pyramid(name, backbone_kwargs(name, cfg.replace(window_size=window)))
            rows.append(
                {
                    "model": name,
                    "label": backbone_label(name, pyramid.backbone),
                    "attention": attention_label(pyramid.backbone),
                    "family": family,
                    "size": _LETTER[size],
                    "num_anchors": _num_anchors(pyramid.backbone),
                    "input_size": f"{img_size[0]}x{img_size[1]}",  # HxW, as the runs' input_size
                    "params_m": round(sum(p.numel() for p in pyramid.backbone.parameters()) / 1e6, 3),
                    "gmacs": round(backbone_macs(pyramid, img_size) / 1e9, 3),
                }
            )
    return rows


def relative_gain(ap: float, baseline: float) -> float | None:
    """``(ap - baseline) / baseline`` in percent; None when the baseline is not positive."""
    if baseline is None or ap is None or baseline <= 0:
        return None
    return (ap - baseline) / baseline * 100.0


def comparable_flops_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair each DeiT run matched to an AnchorFormer backbone with that backbone's full-size run.

    A run with ``matched_to = X`` is paired with the run of backbone X at input scale 1 and the
    same detector. Runs without a partner are left out.

    Returns:
        One dict per pair: the two runs, their backbone GMACs, box / mask AP and the relative
        gains (percent) of AnchorFormer over DeiT.
    """
    pairs = []
    for d in rows:
        if not d.get("matched_to"):
            continue
        partners = [
            a
            for a in rows
            if a["backbone"] == d["matched_to"]
            and not a.get("matched_to")
            and abs(float(a.get("input_scale", 1.0)) - 1.0) < 1e-9
            and a["detector"] == d["detector"]
        ]
        for a in partners:
            pair = {
                "anchorformer_run": a["run"],
                "deit_run": d["run"],
                "anchorformer_gmacs": a["backbone_gmacs"],
                "deit_gmacs": d["backbone_gmacs"],
                # the GMACs the pairing matched: at the size the runs train on (x scale)
                "match_size": d.get("match_size"),
                "anchorformer_gmacs_match": a.get("backbone_gmacs_match"),
                "deit_gmacs_match": d.get("backbone_gmacs_match"),
                "deit_input_scale": d["input_scale"],
            }
            for kind in ("bbox", "segm"):
                if f"{kind}_AP" in a and f"{kind}_AP" in d:
                    pair[f"anchorformer_{kind}_AP"] = a[f"{kind}_AP"]
                    pair[f"deit_{kind}_AP"] = d[f"{kind}_AP"]
                    pair[f"{kind}_AP_gain_pct"] = relative_gain(a[f"{kind}_AP"], d[f"{kind}_AP"])
            pairs.append(pair)
    return pairs


def at_input(row: dict[str, Any]) -> tuple[str | None, float | None]:
    """``(input_size, input_gmacs)`` of a run row.

    Rows written before the summary counted ``input_gmacs`` carry the same number as
    ``backbone_gmacs_match`` at ``match_size`` x ``input_scale`` (the recipes match at the input
    they train on), which is used then.
    """
    if row.get("input_gmacs") is not None:
        return row.get("input_size"), row["input_gmacs"]
    size, scale = row.get("match_size"), row.get("input_scale")
    if not size or scale is None or row.get("backbone_gmacs_match") is None:
        return None, None
    h, w = (int(v) for v in str(size).split("x"))
    return f"{max(1, round(h * scale))}x{max(1, round(w * scale))}", row["backbone_gmacs_match"]


def _gain(v: float | None) -> str:
    return "—" if v is None else f"{v:+.1f}%"


def runs_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The runs (no heading): backbone as trained, its input and GMACs there, box and mask AP."""
    shown = []
    for r in rows:
        size, gmacs = at_input(r)
        shown.append(
            {
                **r,
                "label": r.get("backbone_label") or r["backbone"],
                "input": None if size is None else size.replace("x", "×"),
                "gmacs_input": gmacs,
                "scale": r.get("input_scale"),
            }
        )
    return markdown_table(
        shown,
        ["run", "label", "attention", "input", "scale", "gmacs_input", "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP"],
        ["run", "backbone (as trained)", "attention", "input H×W", "input scale", "backbone GMACs at that input",
         "box AP", "AP50", "AP75", "mask AP"],
        digits={"scale": 3, "gmacs_input": 3, "bbox_AP": 1, "bbox_AP50": 1, "bbox_AP75": 1, "segm_AP": 1},
    )  # fmt: skip


def pairs_markdown(pairs: Sequence[dict[str, Any]]) -> str:
    """The comparable-FLOPs pairs (no heading): GMACs at the runs' input, AP and relative gains."""
    shown = [
        {
            "a": p["anchorformer_run"],
            "a_gmacs": p.get("anchorformer_gmacs_match"),
            "d": f"{p['deit_run']} (× {p['deit_input_scale']:.3f})",
            "d_gmacs": p.get("deit_gmacs_match"),
            "box": f"{p.get('anchorformer_bbox_AP', 0):.1f} / {p.get('deit_bbox_AP', 0):.1f}"
            if "anchorformer_bbox_AP" in p
            else None,
            "box_gain": _gain(p.get("bbox_AP_gain_pct")),
            "mask": f"{p.get('anchorformer_segm_AP', 0):.1f} / {p.get('deit_segm_AP', 0):.1f}"
            if "anchorformer_segm_AP" in p
            else None,
            "mask_gain": _gain(p.get("segm_AP_gain_pct")),
        }
        for p in pairs
    ]
    return markdown_table(
        shown,
        ["a", "a_gmacs", "d", "d_gmacs", "box", "box_gain", "mask", "mask_gain"],
        ["AnchorFormer run", "backbone GMACs", "DeiT run (input scale)", "backbone GMACs", "box AP A / D",
         "box AP gain", "mask AP A / D", "mask AP gain"],
        digits=3,
    )  # fmt: skip


def standard_backbones_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`standard_backbones` (no heading), with each DeiT's GMACs over AnchorFormer's of its size."""
    anchor = {r["size"]: r["gmacs"] for r in rows if r["family"] == "AnchorFormer"}
    shown = [
        {
            **r,
            "attention": r.get("attention", "global" if r["family"] == "DeiT" else "anchor (global)"),
            "input": str(r.get("input_size", "")).replace("x", "×"),
            "ratio": f"{r['gmacs'] / anchor[r['size']]:.2f}×"
            if r["family"] == "DeiT" and anchor.get(r["size"])
            else None,
        }
        for r in rows
    ]
    return markdown_table(
        shown,
        ["label", "attention", "input", "params_m", "gmacs", "ratio"],
        ["backbone (standard shape, untrained)", "attention", "input H×W", "params (M)", "GMACs",
         "GMACs / AnchorFormer's"],
        digits={"params_m": 2, "gmacs": 1},
    )  # fmt: skip


def results_markdown(
    rows: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]], standard: Sequence[dict[str, Any]] = ()
) -> str:
    """The E5 tables with short headings (the notebooks' view; the report uses its own headings)."""
    out = [runs_markdown(rows)]
    if pairs:
        out += [
            "\n**Comparable FLOPs**: DeiT's input scaled to the AnchorFormer backbone's GMACs at the input the "
            "runs train on; relative gain = (AP_AnchorFormer − AP_DeiT) / AP_DeiT, the abstract's form.\n\n",
            pairs_markdown(pairs),
        ]
    if standard:
        out += [
            "\n**Standard backbones at 1333×800** (counted, not trained):\n\n",
            standard_backbones_markdown(standard),
        ]
    return "".join(out)


def write_summary(
    out_dir: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    standard: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write ``summary.json`` and ``summary.md`` into ``out_dir``.

    Args:
        out_dir: created if missing.
        rows: :func:`load_runs`.
        pairs: :func:`comparable_flops_pairs`.
        standard: :func:`standard_backbones`; None counts them here (seconds, on the meta device).

    Returns:
        ``{"json": path, "markdown": path}``; the JSON holds ``runs``, ``comparable_flops`` and
        ``standard_backbones``.
    """
    standard = standard_backbones() if standard is None else list(standard)
    out = Path(out_dir)
    md = atomic_write_text(out / "summary.md", results_markdown(rows, pairs, standard))
    js = write_json_atomic(
        out / "summary.json", {"runs": list(rows), "comparable_flops": list(pairs), "standard_backbones": standard}
    )
    return {"json": js, "markdown": md}
