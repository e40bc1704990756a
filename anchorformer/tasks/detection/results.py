"""The E5 results table: box and mask AP per backbone, and AP gains under comparable FLOPs.

The abstract of Shan et al. (arXiv 2505.16463) claims "81.3% higher mAP on COCO detection under
comparable FLOPs". Its form is a relative gain, (AP_AnchorFormer - AP_DeiT) / AP_DeiT, between
an AnchorFormer detector and a DeiT detector whose backbones cost about the same MACs. Here the
DeiT partner of an AnchorFormer run is the DeiT run trained with ``match_macs_of`` naming that
AnchorFormer backbone (its input scaled down until its backbone MACs at 1333x800 x scale match,
:func:`anchorformer.models.detection.comparable_input_scale`).

Each run folder written by :func:`anchorformer.engine.detection.train_detection` holds
``metrics.json`` (AP numbers in percent, backbone GMACs, times) and ``run.json`` (the recipe,
the backbone, the matched backbone).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...io import atomic_write_text
from anchorformer.engine.coco_eval import write_json_atomic

__all__ = ["comparable_flops_pairs", "load_runs", "relative_gain", "results_markdown", "write_summary"]

_ROW_KEYS = (
    "bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl",
    "segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl",
    "backbone_gmacs", "backbone_gmacs_full", "backbone_gmacs_match", "match_size", "input_scale", "min_size", "epochs", "train_seconds", "total_seconds",
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
        rows.append(row)
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


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def results_markdown(rows: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]) -> str:
    """The E5 tables in markdown: per run, then the comparable-FLOPs pairs."""
    lines = [
        "| run | backbone | input scale | backbone GMACs (1333x800 x scale) | box AP | AP50 | AP75 | mask AP | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['backbone']} | {_fmt(r.get('input_scale'), 3)} | {_fmt(r.get('backbone_gmacs'), 2)} | "
            f"{_fmt(r.get('bbox_AP'))} | {_fmt(r.get('bbox_AP50'))} | {_fmt(r.get('bbox_AP75'))} | "
            f"{_fmt(r.get('segm_AP'))} | {_fmt(r.get('train_seconds'), 0)} |"
        )
    if pairs:
        lines += [
            "",
            "Comparable FLOPs: relative gain = (AP_AnchorFormer - AP_DeiT) / AP_DeiT (the abstract's form).",
            "",
            "GMACs: the backbones' at the size the pairing matched (the size the runs train on, x scale).",
            "",
            "| AnchorFormer run | GMACs | DeiT run (scale) | GMACs | matched at | box AP A / D | box AP gain | mask AP A / D | mask AP gain |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in pairs:
            box = f"{_fmt(p.get('anchorformer_bbox_AP'))} / {_fmt(p.get('deit_bbox_AP'))}"
            mask = f"{_fmt(p.get('anchorformer_segm_AP'))} / {_fmt(p.get('deit_segm_AP'))}"
            gain_b, gain_m = p.get("bbox_AP_gain_pct"), p.get("segm_AP_gain_pct")
            lines.append(
                f"| {p['anchorformer_run']} | {_fmt(p.get('anchorformer_gmacs_match', p['anchorformer_gmacs']), 3)} | {p['deit_run']} "
                f"({_fmt(p['deit_input_scale'], 3)}) | {_fmt(p.get('deit_gmacs_match', p['deit_gmacs']), 3)} | "
                f"{p.get('match_size') or '800x1333'} | {box} | "
                f"{'n/a' if gain_b is None else f'{gain_b:+.1f}%'} | {mask} | {'n/a' if gain_m is None else f'{gain_m:+.1f}%'} |"
            )
    return "\n".join(lines) + "\n"


def write_summary(
    out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]
) -> dict[str, Path]:
    """Write ``summary.json`` (rows and pairs) and ``summary.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(out / "summary.md", results_markdown(rows, pairs))
    js = write_json_atomic(out / "summary.json", {"runs": list(rows), "comparable_flops": list(pairs)})
    return {"json": js, "markdown": md}
