"""The report: tables from the stages' metrics, the environment, and the headline check (E8).

The abstract of Shan et al. (2025) claims "up to 9.0% higher accuracy or 46.7% FLOPs reduction
on ImageNet classification, 81.3% higher mAP on COCO detection under comparable FLOPs, as
compared to the current baselines". :func:`headline_checks` recomputes each of these in the
same form from our own tables: relative gains ``(ours - baseline) / baseline`` for accuracy and
mAP, and ``1 - GMACs_ours / GMACs_baseline`` for FLOPs. The paper's own tables are not public;
its values appear only as the claims of the abstract.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CLAIMS",
    "collect_metrics",
    "environment_info",
    "headline_checks",
    "markdown_table",
    "write_report",
]

# The abstract's claims, in the form they are stated.
CLAIMS = {
    "accuracy": {"claim": "up to 9.0% higher accuracy (ImageNet)", "value": 9.0},
    "flops": {"claim": "46.7% FLOPs reduction (ImageNet)", "value": 46.7},
    "map": {"claim": "81.3% higher mAP under comparable FLOPs (COCO)", "value": 81.3},
}


def collect_metrics(root: str | Path, filename: str = "metrics.json") -> list[dict[str, Any]]:
    """Every ``filename`` under ``root`` (recursively), each with its folder as ``run``.

    A file that is not valid JSON raises a ``ValueError`` naming it.
    """
    rows = []
    root = Path(root)
    for path in sorted(root.rglob(filename)):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, dict):
            rows.append({"run": str(path.parent.relative_to(root)), **data})
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (missing values shown as —)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _verdict(ours: float | None, claimed: float) -> str:
    if ours is None:
        return "not measured"
    if ours >= claimed:
        return "supported"
    if ours > 0:
        return "same direction, smaller"
    return "not supported"


def headline_checks(
    cls_pairs: Iterable[dict[str, Any]] = (),
    det_pairs: Iterable[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Recompute the abstract's three claims from our own results.

    Args:
        cls_pairs: one dict per AnchorFormer/DeiT pair on ImageNet (same size and recipe), with
            ``pair`` (a label), ``top1_anchor``, ``top1_deit``, ``gmacs_anchor``, ``gmacs_deit``.
        det_pairs: one dict per comparable-FLOPs pair on COCO, with ``pair``, ``ap_anchor``,
            ``ap_deit``, ``gmacs_anchor``, ``gmacs_deit``.

    Returns:
        One row per claim: ``claim``, ``claimed`` (percent), ``ours`` (the best of our pairs, in
        the same form; None if no pair), ``best_pair``, ``verdict``, and ``pairs`` (each pair's
        value).
    """
    cls_pairs, det_pairs = list(cls_pairs), list(det_pairs)
    rows = []

    def best(pairs: list[dict[str, Any]], value) -> tuple[float | None, str | None, list[tuple[str, float]]]:
        vals = [(p["pair"], value(p)) for p in pairs]
        vals = [(k, v) for k, v in vals if v is not None]
        if not vals:
            return None, None, []
        k, v = max(vals, key=lambda kv: kv[1])
        return v, k, vals

    def rel(a: float | None, b: float | None) -> float | None:
        if a is None or b is None or b == 0:
            return None
        return 100.0 * (a - b) / b

    acc, acc_pair, acc_vals = best(cls_pairs, lambda p: rel(p.get("top1_anchor"), p.get("top1_deit")))
    flops, flops_pair, flops_vals = best(
        cls_pairs,
        lambda p: None if not p.get("gmacs_deit") else 100.0 * (1 - p["gmacs_anchor"] / p["gmacs_deit"]),
    )
    mp, mp_pair, mp_vals = best(det_pairs, lambda p: rel(p.get("ap_anchor"), p.get("ap_deit")))
    for key, ours, pair, vals in (
        ("accuracy", acc, acc_pair, acc_vals),
        ("flops", flops, flops_pair, flops_vals),
        ("map", mp, mp_pair, mp_vals),
    ):
        claimed = CLAIMS[key]["value"]
        rows.append(
            {
                "claim": CLAIMS[key]["claim"],
                "claimed": claimed,
                "ours": None if ours is None else round(ours, 2),
                "best_pair": pair,
                "verdict": _verdict(ours, claimed),
                "pairs": [(k, round(v, 2)) for k, v in vals],
            }
        )
    return rows


def environment_info() -> dict[str, Any]:
    """Versions and device of the machine that writes the report."""
    import timm
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    from . import __version__

    info["anchorformer"] = __version__
    return info


def write_report(out_md: str | Path, markdown: str, title: str = "AnchorFormer report") -> dict[str, Path]:
    """Write ``markdown`` to ``out_md`` and an HTML copy beside it (atomically, both).

    Image links in the markdown are kept relative, so the HTML shows the same figures when it
    sits beside the markdown.
    """
    from nbconvert.filters.markdown import markdown2html

    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    html = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}</style></head><body>\n" + markdown2html(markdown) + "\n</body></html>\n"
    )
    out_html = out_md.with_suffix(".html")
    for path, text in ((out_md, markdown), (out_html, html)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return {"markdown": out_md, "html": out_html}
