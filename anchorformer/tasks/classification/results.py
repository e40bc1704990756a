"""The classification tables and figures (experiments E1, E2, E3) from the runs' metrics.

Each run folder written by :func:`anchorformer.tasks.classification.train.train`
holds ``metrics.json`` (top-1, top-5, params, GMACs, the recipe) and ``history.json`` (per-epoch
values). This module reads them and builds (measured speed is the benchmark's, apart from results:
``timings.json`` of each run, :mod:`anchorformer.bench`):

- E1: AnchorFormer vs DeiT by size, without and with distillation (⚗), next to the DeiT paper's
  ImageNet-1k numbers (Touvron et al., ICML 2021; :data:`DEIT_PAPER`, the project's one copy of
  them). The AnchorFormer paper's tables are not public: its column reads "paper value: not public".
- E2: top-1 and GMACs against the number of anchors M.
- E3: the design ablations: learned vs fixed (pooled, detached) anchors, with vs without Λ⁻¹,
  shared vs per-head anchors.

Runs that serve two tables (the AnchorFormer-T baseline of E1 is also the default point of E2
and the reference row of E3) are trained once and read from E1.

The ``*_markdown`` functions render one table each, without a heading, from the rows (as built
here or as read back from ``classification.json``): the report puts them under its own headings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

from ...io import atomic_write_text, write_json_atomic
from ...tables import markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "DEIT_PAPER",
    "NOT_PUBLIC",
    "UNVERIFIED_EXTRACTION",
    "deit_reference_markdown",
    "describe_run",
    "e1_markdown",
    "e1_table",
    "e2_markdown",
    "e2_table",
    "e3_markdown",
    "e3_table",
    "load_runs",
    "plot_accuracy_vs_gmacs",
    "plot_anchor_ablation",
    "plot_design_ablation",
    "plot_training_curves",
    "tables_markdown",
    "write_results",
]

NOT_PUBLIC = "paper value: not public"

# The DeiT paper (Touvron et al., ICML 2021; REFERENCE §4): ImageNet-1k, 224² (B↑384 at 384²),
# 300 epochs. GFLOPs are multiply-accumulates, as the field counts them. By size letter.
DEIT_PAPER: dict[str, dict[str, Any]] = {
    "T": {"model": "DeiT-Ti", "params": "5M", "gflops": 1.3, "top1": 72.2, "top1_distilled": 74.5},
    "S": {"model": "DeiT-S", "params": "22M", "gflops": 4.6, "top1": 79.8, "top1_distilled": 81.2},
    "B": {"model": "DeiT-B", "params": "86M", "gflops": 17.6, "top1": 81.8, "top1_distilled": 83.4},
    "B↑384": {"model": "DeiT-B ↑384", "params": "86M", "gflops": 55.5, "top1": 83.1, "top1_distilled": 85.2},
}
UNVERIFIED_EXTRACTION = (
    "An unverified third-party extraction of the paper lists AnchorFormer-T/S/B at 4.2/18.6/63.5 M "
    "params, 0.7/2.7/9.2 GFLOPs, 81.12/84.69/86.62 top-1, and ADE20K mIoU 43.81 (T, Semantic FPN, "
    "193.7 GFLOPs) and 46.28 (S, UPerNet, 928.1 GFLOPs). These counts do not match the official code "
    "(our count of the standard AnchorFormer-T is in the complexity tables); they are claimed, "
    "unverified, and were never used as targets."
)
_SIZE_LETTER = {"tiny": "T", "small": "S", "base": "B"}
_SIZE_ORDER = ["T", "S", "B", "B↑384"]


def load_runs(folders: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """The finished runs under each folder (a run folder itself, or a folder of run folders).

    A run is a folder with ``metrics.json``; its ``history.json`` is attached as ``history``.
    Folders that do not exist are skipped; a metrics file that is not JSON raises ``ValueError``
    naming it.
    """
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        candidates = (
            [folder] if (folder / "metrics.json").is_file() else sorted(p for p in folder.iterdir() if p.is_dir())
        )
        for run in candidates:
            path = run / "metrics.json"
            if not path.is_file():
                continue
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            history_path = run / "history.json"
            history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
            runs.append({**metrics, "run": str(run), "history": history})
    return runs


def describe_run(run: dict[str, Any]) -> dict[str, Any]:
    """Family, size, distillation and anchor settings of a run, from its model name and recipe."""
    name = str(run.get("model", ""))
    cfg = run.get("config", {}) or {}
    parts = name.split("_")
    family = (
        "AnchorFormer"
        if name.startswith(("anchorformer", "anchor_deit"))
        else "DeiT"
        if name.startswith("deit")
        else name
    )
    size = next((_SIZE_LETTER[p] for p in parts if p in _SIZE_LETTER), "?")
    if size == "B" and name.endswith("384"):
        size = "B↑384"
    anchor = family == "AnchorFormer"
    profile = cfg.get("profile", "")
    return {
        "family": family,
        "size": size,
        "label": f"{family}-{size}" + (f" ({profile})" if profile == "mini" else ""),
        "distilled": "distilled" in parts,
        "num_anchors": run.get("num_anchors") if anchor else None,
        "anchor_mode": cfg.get("anchor_mode") if anchor else None,
        "normalize": cfg.get("normalize") if anchor else None,
        "per_head_anchors": cfg.get("per_head_anchors") if anchor else None,
    }


def _row(run: dict[str, Any]) -> dict[str, Any]:
    d = describe_run(run)
    return {
        **d,
        "run": run.get("run"),
        "params_m": run.get("params_m"),
        "gmacs": run.get("gmacs"),
        "top1": run.get("top1"),
        "top5": run.get("top5"),
        "epochs": run.get("epochs"),
        "img_size": run.get("img_size"),
    }


def _is_baseline_anchor(d: dict[str, Any]) -> bool:
    return (
        d["family"] == "AnchorFormer" and d["anchor_mode"] == "learned" and d["normalize"] and not d["per_head_anchors"]
    )


def e1_table(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """E1 rows: one per run, sorted by size, distillation and family, with the paper's top-1."""
    rows = []
    for run in runs:
        r = _row(run)
        if r["family"] == "DeiT" and r["size"] in DEIT_PAPER:
            ref = DEIT_PAPER[r["size"]]
            r["paper_top1"] = ref["top1_distilled"] if r["distilled"] else ref["top1"]
        else:
            r["paper_top1"] = NOT_PUBLIC
        r["distill"] = "⚗" if r["distilled"] else ""
        rows.append(r)
    order = {s: i for i, s in enumerate(_SIZE_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["size"], 9), r["distilled"], r["family"] != "DeiT", r["run"] or ""))


def e2_table(runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """E2 rows sorted by M: the anchor-count runs plus the plain AnchorFormer-T baseline of E1."""
    rows = [_row(r) for r in runs]
    have = {r["num_anchors"] for r in rows}
    for run in baseline:
        r = _row(run)
        if r["family"] == "AnchorFormer" and r["size"] == "T" and not r["distilled"] and _is_baseline_anchor(r):
            if r["num_anchors"] not in have:
                rows.append(r)
                have.add(r["num_anchors"])
    for r in rows:
        r["paper_top1"] = NOT_PUBLIC
    return sorted(rows, key=lambda r: r["num_anchors"] or 0)


def _variant(d: dict[str, Any]) -> str:
    parts = []
    parts.append("fixed anchors (pooled, detached)" if d["anchor_mode"] == "pooled" else "learned anchors")
    parts.append("with Λ⁻¹" if d["normalize"] else "without Λ⁻¹")
    parts.append("per-head" if d["per_head_anchors"] else "shared across heads")
    return ", ".join(parts)


def e3_table(runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """E3 rows: the method (learned, Λ⁻¹, shared; from E1) first, then each ablation."""
    rows = []
    for run in baseline:
        r = _row(run)
        if r["family"] == "AnchorFormer" and r["size"] == "T" and not r["distilled"] and _is_baseline_anchor(r):
            r["variant"] = "AnchorFormer (" + _variant(r) + ")"
            rows.append(r)
            break
    ablations = []
    for run in runs:
        r = _row(run)
        r["variant"] = _variant(r)
        ablations.append(r)
    # fixed anchors, then without Λ⁻¹, then per-head anchors (then anything else)
    ablations.sort(
        key=lambda r: (0 if r["anchor_mode"] == "pooled" else 1 if not r["normalize"] else 2, r["run"] or "")
    )
    rows += ablations
    for r in rows:
        r["paper_top1"] = NOT_PUBLIC
    return rows


_FORMATS = {
    "params_m": "{:.3f}",
    "gmacs": "{:.4g}",
    "top1": "{:.1f}",
    "top5": "{:.1f}",
    "paper_top1": "{:.1f}",
}


def _display(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numbers as the tables show them (params in M to 3 decimals, GMACs to 4 digits, ...)."""
    out = []
    for r in rows:
        shown = dict(r)
        for key, fmt in _FORMATS.items():
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
                shown[key] = fmt.format(r[key])
        out.append(shown)
    return out


def e1_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E1 table (no heading): model, ⚗, M, params, GMACs, top-1/5, the paper's top-1."""
    return markdown_table(
        _display(rows),
        ["label", "distill", "num_anchors", "params_m", "gmacs", "top1", "top5", "paper_top1"],
        [
            "model",
            "⚗",
            "M",
            "params (M)",
            "GMACs",
            "top-1",
            "top-5",
            "paper top-1 (ImageNet-1k)",
        ],
    )


def e2_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E2 table (no heading): one row per anchor count M."""
    return markdown_table(
        _display(rows),
        ["num_anchors", "params_m", "gmacs", "top1", "top5", "paper_top1"],
        ["M", "params (M)", "GMACs", "top-1", "top-5", "paper top-1"],
    )


def e3_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E3 table (no heading): the method, then each design ablation."""
    return markdown_table(
        _display(rows),
        ["variant", "num_anchors", "params_m", "gmacs", "top1", "top5", "paper_top1"],
        ["variant", "M", "params (M)", "GMACs", "top-1", "top-5", "paper top-1"],
    )


def deit_reference_markdown() -> str:
    """:data:`DEIT_PAPER` as a table (no heading)."""
    return markdown_table(
        list(DEIT_PAPER.values()),
        ["model", "params", "gflops", "top1", "top1_distilled"],
        ["model", "params", "GFLOPs (MACs)", "top-1", "top-1 ⚗"],
        digits=1,
    )


def tables_markdown(tables: dict[str, list[dict[str, Any]]]) -> str:
    """The E1, E2 and E3 tables and the DeiT reference, with headings (``classification.md``)."""
    return "".join(
        [
            "## E1: AnchorFormer vs DeiT\n\n",
            e1_markdown(tables.get("e1", [])),
            "\n## E2: number of anchors M (AnchorFormer-T)\n\n",
            e2_markdown(tables.get("e2", [])),
            "\n## E3: design ablations (AnchorFormer-T)\n\n",
            e3_markdown(tables.get("e3", [])),
            "\n## Reference: DeiT paper (ImageNet-1k, 224², 300 epochs; B↑384 at 384²)\n\n",
            deit_reference_markdown(),
            f"\nAnchorFormer's own ImageNet numbers: {NOT_PUBLIC}. {UNVERIFIED_EXTRACTION}\n",
        ]
    )


def write_results(out_dir: str | os.PathLike, tables: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """Write ``classification.json`` (the tables' rows) and ``classification.md``; return their paths."""
    out = Path(out_dir)
    slim = {k: [{c: v for c, v in r.items() if c != "history"} for r in rows] for k, rows in tables.items()}
    return {
        "json": write_json_atomic(out / "classification.json", slim, ensure_ascii=False),
        "markdown": atomic_write_text(out / "classification.md", tables_markdown(tables)),
    }


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_accuracy_vs_gmacs(e1_rows: Sequence[dict[str, Any]], title: str = "E1: top-1 vs GMACs") -> Any:
    """Top-1 against GMACs, AnchorFormer (circles) and DeiT (squares); filled markers are distilled."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker, color in (("AnchorFormer", "o", "C0"), ("DeiT", "s", "C1")):
        for distilled in (False, True):
            rows = sorted(
                (r for r in e1_rows if r["family"] == family and r["distilled"] == distilled and r["top1"] is not None),
                key=lambda r: r["gmacs"],
            )
            if not rows:
                continue
            label = family + (" ⚗" if distilled else "")
            ax.plot(
                [r["gmacs"] for r in rows],
                [r["top1"] for r in rows],
                marker=marker,
                color=color,
                linestyle="-" if distilled else "--",
                markerfacecolor=color if distilled else "white",
                label=label,
            )
            for r in rows:
                ax.annotate(r["size"], (r["gmacs"], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_anchor_ablation(e2_rows: Sequence[dict[str, Any]], title: str = "E2: anchors M") -> Any:
    """Top-1 (left axis) and GMACs (right axis) against M."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in e2_rows if r["num_anchors"] is not None]
    m = [r["num_anchors"] for r in rows]
    ax.plot(m, [r["top1"] for r in rows], "o-", color="C0", label="top-1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("anchors M")
    ax.set_ylabel("top-1 (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(m, [r["gmacs"] for r in rows], "s--", color="C2", label="GMACs")
    ax2.set_ylabel("GMACs", color="C2")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig


def plot_design_ablation(e3_rows: Sequence[dict[str, Any]], title: str = "E3: design ablations") -> Any:
    """Horizontal bars of top-1 per variant."""
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(e3_rows), 1) + 1.2))
    labels = [r["variant"] for r in e3_rows]
    values = [r["top1"] or 0.0 for r in e3_rows]
    ax.barh(range(len(values)), values, color=["C0"] + ["C7"] * (len(values) - 1))
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title)
    return fig


def plot_training_curves(runs: Sequence[dict[str, Any]], title: str = "training curves") -> Any:
    """Training loss and validation top-1 per epoch for each run."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(runs):
        hist = run.get("history") or []
        if not hist:
            continue
        label = Path(str(run.get("run", i))).name
        ax1.plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], label=label, color=f"C{i % 10}")
        ev = [h for h in hist if "top1" in h]
        ax2.plot([h["epoch"] for h in ev], [h["top1"] for h in ev], "o-", markersize=3, label=label, color=f"C{i % 10}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation top-1 (%)")
    ax1.grid(True, alpha=0.3)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    return fig
