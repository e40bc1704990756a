"""The report: tables from the stages' metrics, the environment, and the headline check (E8).

Every table is rendered here from the stages' JSON (metrics, summaries, manifests), under the
report's own headings; no stage's markdown is pasted. Values the report needs beyond the outputs
(the profile) are arguments: the report never reads ``params.yaml``.

The abstract of Shan et al. (2025) claims "up to 9.0% higher accuracy or 46.7% FLOPs reduction
on ImageNet classification, 81.3% higher mAP on COCO detection under comparable FLOPs, as
compared to the current baselines". :func:`headline_checks` recomputes each of these in the
same form from our own tables: relative gains ``(ours - baseline) / baseline`` for accuracy and
mAP, and ``1 - GMACs_ours / GMACs_baseline`` for FLOPs. The paper's own tables are not public;
its values appear only as the claims of the abstract. The check is made twice, never mixed: on
the pairs this pipeline trained (in the mini profile, small models on the embedded data), and,
for the FLOPs claim only, on the standard T/S/B models counted at 224² and 384² without training.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import cross_host
from .io import atomic_write_text, write_json_atomic
from .tables import markdown_table
from .tasks.classification import results as cls_results
from .tasks.detection import results as det_results
from .tasks.segmentation import results as seg_results

__all__ = [
    "CLAIMS",
    "build_report",
    "cls_pairs_from_e1",
    "collect_metrics",
    "counted_flops_pairs",
    "deviation_tables",
    "det_pairs_from_summary",
    "environment_info",
    "headline_checks",
    "headline_markdown",
    "interval_verdict",
    "markdown_seen_from",
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
        data = _read_json(path)
        if isinstance(data, dict):
            rows.append({"run": str(path.parent.relative_to(root)), **data})
    return rows


def _verdict(ours: float | None, claimed: float) -> str:
    if ours is None:
        return "not measured"
    if ours >= claimed:
        return "supported"
    if ours > 0:
        return "same direction, smaller"
    return "not supported"


def interval_verdict(lo: float, hi: float, claimed: float) -> str:
    """A claim against the 95% interval [lo, hi] of our value (the report's rule, ``intervals.RULE``):
    ``supported`` (the interval at or above the claim), ``same direction`` (above zero, not reaching the
    claim), ``not supported`` (below zero) or ``not distinguishable`` (the interval contains zero)."""
    if lo >= claimed:
        return "supported"
    if lo > 0:
        return "same direction"
    if hi < 0:
        return "not supported"
    return "not distinguishable"


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
    acc_interval = next(
        ((p.get("accuracy_lo"), p.get("accuracy_hi")) for p in cls_pairs if p["pair"] == acc_pair), (None, None)
    )
    flops, flops_pair, flops_vals = best(
        cls_pairs,
        lambda p: None if not p.get("gmacs_deit") else 100.0 * (1 - p["gmacs_anchor"] / p["gmacs_deit"]),
    )
    mp, mp_pair, mp_vals = best(det_pairs, lambda p: rel(p.get("ap_anchor"), p.get("ap_deit")))
    for key, ours, pair, vals, (lo, hi) in (
        ("accuracy", acc, acc_pair, acc_vals, acc_interval),
        ("flops", flops, flops_pair, flops_vals, (None, None)),
        ("map", mp, mp_pair, mp_vals, (None, None)),
    ):
        claimed = CLAIMS[key]["value"]
        rows.append(
            {
                "claim": CLAIMS[key]["claim"],
                "claimed": claimed,
                "ours": None if ours is None else round(ours, 2),
                "ours_lo": None if lo is None else round(lo, 2),
                "ours_hi": None if hi is None else round(hi, 2),
                "best_pair": pair,
                "verdict": _verdict(ours, claimed) if lo is None or hi is None else interval_verdict(lo, hi, claimed),
                "pairs": [(k, round(v, 2)) for k, v in vals],
            }
        )
    return rows


def environment_info() -> dict[str, Any]:
    """The Python and package versions the report is built with: fixed by the lock file.

    Nothing of the machine (processor, platform, threads, GPU): those change from one machine to
    the next under the same lock file, so they would make the report differ between reruns; the
    benchmark's page describes the machine it measured on (:func:`anchorformer.bench.environment`).
    """
    import timm
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
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
    atomic_write_text(out_md, markdown)
    atomic_write_text(out_html, html)
    return {"markdown": out_md, "html": out_html}


# ---------------------------------------------------------------------------------------------
# The headline metrics: one small file for `dvc metrics` and `dvc exp show`
# ---------------------------------------------------------------------------------------------

HEADLINE = "headline.json"  # beside the report; the pipeline's only declared metrics file
_FAMILIES = {"anchorformer": "AF", "deit": "DeiT"}  # short, for column names (the tables: _FAMILY)


def short_model_name(model: str) -> str:
    """``anchorformer_tiny_patch16_224`` → ``AF-T``; ``deit_small_distilled_patch16_224`` →
    ``DeiT-S-dist``; other names unchanged."""
    family, _, rest = model.partition("_")
    label = _FAMILIES.get(family)
    size = next((v for k, v in _LETTER.items() if rest.startswith(k)), None)
    if label is None or size is None:
        return model
    return f"{label}-{size}" + ("-dist" if "_distilled" in rest else "")


def short_run_name(run: str) -> str:
    """A run folder's name, shortened for a column: ``deit_t_matched`` → ``DeiT-T-matched``,
    ``anchorformer_s_upernet`` → ``AF-S-upernet``; other names unchanged."""
    family, *rest = run.split("_")
    label = _FAMILIES.get(family)
    if label is None or not rest or rest[0] not in ("t", "s", "b"):
        return run
    return "-".join([label, rest[0].upper(), *rest[1:]])


def headline_metrics(outputs_dir: str | Path = "outputs") -> dict[str, dict[str, Any]]:
    """The headline numbers of every run found under ``outputs_dir``, by experiment.

    ``{"e1": {"AF-T": top-1, ...}, "e2": {"M4": ...}, "e3": {variant: ...}, "e9": {...},
    "e5": {run: {"box": AP, "mask": AP}}, "e6": {run: mIoU}}``: what ``dvc exp show`` shows in a
    terminal (column names such as ``e1.AF-T`` and ``e5.DeiT-T.box``). Runs not finished are left out.
    """
    out = Path(outputs_dir)
    found: dict[str, dict[str, Any]] = {}

    def runs(folder: Path):
        for metrics in sorted(folder.glob("*/metrics.json")):
            data = _read_json(metrics)
            if isinstance(data, dict):
                yield metrics.parent.name, data

    for exp in ("e1", "e2", "e3", "e9"):
        for name, m in runs(out / "cls" / exp):
            key = short_model_name(str(m.get("model", name))) if exp == "e1" else name.upper() if exp == "e2" else name
            if m.get("top1") is not None:
                found.setdefault(exp, {})[key] = round(float(m["top1"]), 2)
    for name, m in runs(out / "det"):
        if m.get("bbox_AP") is not None:
            found.setdefault("e5", {})[short_run_name(name)] = {
                "box": round(float(m["bbox_AP"]), 2),
                **({"mask": round(float(m["segm_AP"]), 2)} if m.get("segm_AP") is not None else {}),
            }
    for name, m in runs(out / "seg"):
        if m.get("mIoU") is not None:
            found.setdefault("e6", {})[short_run_name(name)] = round(float(m["mIoU"]), 2)
    return found


# ---------------------------------------------------------------------------------------------
# The pairs of the headline check
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def cls_pairs_from_e1(e1_rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """AnchorFormer/DeiT pairs of the E1 table: same size, same distillation."""
    rows = list(e1_rows)
    pairs = []
    for a in rows:
        if a.get("family") != "AnchorFormer":
            continue
        for d in rows:
            if (
                d.get("family") == "DeiT"
                and d.get("size") == a.get("size")
                and d.get("distilled") == a.get("distilled")
            ):
                gain = a.get("vs_deit") or {}
                pairs.append(
                    {
                        "pair": f"{a.get('size')}{' ⚗' if a.get('distilled') else ''}",
                        "top1_anchor": a.get("top1"),
                        "top1_deit": d.get("top1"),
                        "gmacs_anchor": a.get("gmacs"),
                        "gmacs_deit": d.get("gmacs"),
                        # the paired 95% interval of the relative gain (cls_results.attach_intervals), if any
                        "accuracy_lo": gain.get("rel_lo"),
                        "accuracy_hi": gain.get("rel_hi"),
                    }
                )
    return pairs


def det_pairs_from_summary(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Comparable-FLOPs pairs of the detection summary: box AP, backbone GMACs at the runs' input."""
    pairs = []
    for p in (summary or {}).get("comparable_flops", []):
        if p.get("anchorformer_bbox_AP") is None:
            continue
        pairs.append(
            {
                "pair": f"{p['anchorformer_run']} vs {p['deit_run']}",
                "ap_anchor": p["anchorformer_bbox_AP"],
                "ap_deit": p["deit_bbox_AP"],
                "gmacs_anchor": p.get("anchorformer_gmacs_match", p.get("anchorformer_gmacs")),
                "gmacs_deit": p.get("deit_gmacs_match", p.get("deit_gmacs")),
            }
        )
    return pairs


def counted_flops_pairs(
    complexity: dict[str, Any] | None, img_sizes: Sequence[int] = (224, 384)
) -> list[dict[str, Any]]:
    """The standard models of the complexity table at the ImageNet resolutions, as FLOPs-only pairs."""
    return [
        {
            "pair": f"{r['size']}@{r['img_size']}² (M={r['num_anchors']})",
            "gmacs_anchor": r["anchorformer_gmacs"],
            "gmacs_deit": r["deit_gmacs"],
        }
        for r in (complexity or {}).get("resolution", [])
        if r.get("img_size") in img_sizes
    ]


def headline_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`headline_checks` as a table (no heading)."""
    lines = [
        "| claim (abstract) | claimed | ours (best pair) [95% CI] | pair | verdict | all pairs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = "—" if r["ours"] is None else f"{r['ours']:+.2f}%"
        if r.get("ours_lo") is not None:
            ours += f" [{r['ours_lo']:+.2f}, {r['ours_hi']:+.2f}]"
        pairs = "; ".join(f"{k}: {v:+.2f}%" for k, v in r["pairs"]) or "—"
        lines.append(
            f"| {r['claim']} | {r['claimed']:.1f}% | {ours} | {r['best_pair'] or '—'} | {r['verdict']} | {pairs} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Sections: each renders its tables from JSON under the report's headings
# ---------------------------------------------------------------------------------------------

_FAMILY = {"anchorformer": "AnchorFormer", "deit": "DeiT"}
_LETTER = {"tiny": "T", "small": "S", "base": "B"}


FIGURE_MAX_WIDTH = 1000  # px: the report's PNGs, read on a repository page (the stage's own stay full size)
SVG_MAX_BYTES = 300_000  # charts get their SVG beside the PNG; image grids (an SVG of pixels) do not


def _copy_png_for_reading(src: Path, dst: Path) -> None:
    """Copy the PNG ``src`` to ``dst``, scaled down to :data:`FIGURE_MAX_WIDTH` if wider.

    The scaled file is a function of the source's pixels only (no date or software chunks), so
    the same figure gives the same bytes.
    """
    import shutil

    from PIL import Image

    with Image.open(src) as im:
        if im.width <= FIGURE_MAX_WIDTH:
            shutil.copyfile(src, dst)
            return
        height = round(im.height * FIGURE_MAX_WIDTH / im.width)
        im.convert("RGBA" if "A" in im.getbands() else "RGB").resize(
            (FIGURE_MAX_WIDTH, height), Image.Resampling.LANCZOS
        ).save(dst, format="PNG", optimize=True)


class _Doc:
    """The report's markdown, its figures (copied beside it) and which stages' outputs were found."""

    def __init__(self, out_dir: Path, out_md: Path) -> None:
        import shutil

        self.out_dir, self.out_md = out_dir, out_md
        self.fig_dir = out_md.parent / "figures"
        if self.fig_dir.exists():
            shutil.rmtree(self.fig_dir)
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = []
        self.present: dict[str, bool] = {}
        self.copied: set[str] = set()  # figures already beside the report (two sections may show one)

    def add(self, *texts: str) -> None:
        self.parts.extend(t if t.endswith("\n") else t + "\n" for t in texts)

    def heading(self, level: int, title: str) -> None:
        self.add("#" * level + " " + title + "\n")

    def json(self, rel: str, stage: str) -> Any | None:
        """The JSON output ``rel`` of ``stage`` (None, and noted as absent, if it is missing)."""
        data = _read_json(self.out_dir / rel)
        self.present[stage] = self.present.get(stage, False) or data is not None
        return data

    def not_run(self, stage: str, what: str | None = None) -> None:
        self.add(f"_{what or 'Not run yet'}: `dvc repro {stage}`._\n")

    def figures(self, items: Sequence[tuple[str, str]]) -> None:
        """Each (path under outputs, caption) that exists, as an image; the missing ones in one line."""
        import shutil

        missing = []
        for rel, caption in items:
            src = self.out_dir / rel
            if not src.is_file():
                missing.append(rel)
                continue
            dst = self.fig_dir / rel.replace("/", "__")
            shown = dst.relative_to(self.out_md.parent).as_posix()
            svg = src.with_suffix(".svg")
            with_svg = svg.is_file() and svg.stat().st_size <= SVG_MAX_BYTES
            if rel not in self.copied:
                _copy_png_for_reading(src, dst)
                if with_svg:
                    shutil.copyfile(svg, dst.with_suffix(".svg"))
                self.copied.add(rel)
            if with_svg:
                self.add(f"[![{caption}]({shown})]({Path(shown).with_suffix('.svg').as_posix()})\n\n*{caption}*\n")
            else:
                self.add(f"![{caption}]({shown})\n\n*{caption}*\n")
        if missing:
            listed = ", ".join(f"`{m}`" for m in missing)
            self.add(f"_Figures not in this checkout (DVC-cached: `dvc pull`, or `dvc repro`): {listed}._\n")

    def text(self) -> str:
        return "\n".join(self.parts)


def _profile_section(doc: _Doc, profile: str | None, recorded: set[str]) -> None:
    if profile == "mini":
        doc.add(
            "**Profile: mini.** Small models trained for minutes on the CPU on the embedded synthetic datasets "
            "(ImageNet, COCO and ADE20K formats). These runs test the pipeline end to end and compare the methods "
            "at a small scale; they are not the paper's protocol, and their numbers are not comparable to "
            "ImageNet/COCO/ADE20K results. Tables of standard (full-size) models are counted, never trained, and "
            "say so.\n"
        )
    elif profile:
        doc.add(f"**Profile: {profile}.**\n")
    else:
        doc.add("**Profile: not given** (pass `profile` to `build_report`).\n")
    other = sorted(recorded - {profile}) if profile else []
    if other:
        doc.add(
            f"**Warning:** the outputs record profile(s) {', '.join(other)}, not {profile}: some stages ran "
            "under another profile than the one this report was built for.\n"
        )


def _uncertainty_section(doc: _Doc) -> None:
    """The one statement of how every interval is computed and every verdict decided."""
    doc.heading(2, "Reading the numbers: intervals and verdicts")
    doc.add(cls_results.intervals.RULE + "\n")


def _headline_section(doc: _Doc, profile: str | None, e1: list[dict], det: dict | None, complexity: dict | None):
    trained = headline_checks(cls_pairs_from_e1(e1), det_pairs_from_summary(det))
    counted = headline_checks(counted_flops_pairs(complexity), ())
    doc.heading(2, "E8 · The abstract's claims, recomputed from our tables")
    doc.add(
        "Accuracy and mAP as relative gains `(AnchorFormer − DeiT) / DeiT` of each AnchorFormer/DeiT pair (same size "
        "and recipe; for detection, the comparable-FLOPs pairs of E5), FLOPs as `1 − GMACs(AnchorFormer) / "
        "GMACs(DeiT)`. The accuracy verdict follows the rule above on the paired 95% interval of the best pair's "
        "relative gain (mean over seeds where the pair ran with several); FLOPs are counted, exact, and mAP has no "
        'interval (one COCO evaluation of the mini set): there "supported" means our best pair reaches the claimed '
        "value in the claimed form.\n"
    )
    doc.heading(3, f"Trained pairs (profile {profile or 'not given'})")
    doc.add(
        "The pairs this pipeline trained and evaluated (E1 for accuracy and FLOPs, at the input they ran at; E5 for "
        "mAP).\n"
    )
    doc.add(headline_markdown(trained))
    doc.heading(3, "Counted pairs: the standard models, untrained")
    doc.add(
        "The FLOPs claim only, on the standard T/S/B models (M = 30) counted at the ImageNet resolutions 224² and "
        "384² (E4); nothing here is trained, so the accuracy and mAP claims do not apply.\n"
    )
    doc.add(headline_markdown([counted[1]]))
    doc.heading(3, "Across machines")
    runs = [m for root in RUN_ROOTS for m in collect_metrics(doc.out_dir / root) if _is_run(m["run"])]
    text, machines = cross_host.machines_markdown(trained, CLAIMS, cross_host.numeric_paths(runs), _verdict)
    doc.add(text)
    return {"trained": trained, "counted": [counted[1]], "machines": machines}


def _is_run(rel: str) -> bool:
    """Whether a ``metrics.json`` folder under a run root is a run (not dvclive's copy, not an earlier training)."""
    parts = Path(rel).parts
    return "dvclive" not in parts and not any(p.startswith("previous-") for p in parts)


def _bench_page(doc: _Doc) -> str:
    """The benchmark's page, ``bench/bench.md`` under the outputs, as a link relative to the report."""
    return Path(os.path.relpath(doc.out_dir / "bench" / "bench.md", doc.out_md.parent)).as_posix()


def _environment_section(doc: _Doc) -> None:
    env = environment_info()
    doc.heading(2, "Environment")
    doc.add(
        "The versions this report was built with (those of `requirements.lock`); the machine the benchmarks ran on "
        f"is described with their measurements, [{_bench_page(doc)}]({_bench_page(doc)}).\n"
    )
    doc.add(markdown_table([{"key": k, "value": v} for k, v in env.items()], ["key", "value"], ["", "value"]))


def _data_section(doc: _Doc) -> None:
    doc.heading(2, "Data")
    manifests = [m for m in (doc.json(f"data/manifest_{n}.json", "data") for n in ("imagenet", "coco", "ade20k")) if m]
    if manifests:
        rows = [
            {
                "dataset": m.get("dataset"),
                "expect": m.get("expect"),
                "splits": "; ".join(
                    f"{s}: " + ", ".join(f"{v} {k}" for k, v in c.items()) for s, c in (m.get("splits") or {}).items()
                ),
                "files": m.get("files"),
            }
            for m in manifests
        ]
        doc.add(markdown_table(rows, ["dataset", "expect", "splits", "files"], ["dataset", "set", "splits", "files"]))
    else:
        doc.not_run("data")
    doc.figures([(f"data/figures/{n}_samples.png", f"{n} samples") for n in ("imagenet", "coco", "ade20k")])


def _complexity_section(doc: _Doc, complexity: dict | None) -> None:
    doc.heading(2, "E4 · Complexity: counted (GMACs) and measured (time, memory)")
    doc.add(
        "Counted: every matmul, attention included (`anchorformer.count_macs`), on the standard models (patch 16) "
        "built on the meta device; GMACs are multiply–accumulates, which the field reports as FLOPs.\n"
    )
    doc.heading(3, "Counted: params and GMACs against the number of anchors M")
    if complexity and complexity.get("models"):
        grid: dict[tuple[str, int], dict[str, Any]] = {}
        anchors = sorted({r["num_anchors"] for r in complexity["models"] if r.get("num_anchors") is not None})
        for r in complexity["models"]:
            row = grid.setdefault((r["size"], r["img_size"]), {"size": r["size"], "image": f"{r['img_size']}²"})
            if r["family"] == "DeiT":
                row.update(deit_params=r["params_m"], deit_gmacs=r["gmacs"])
            else:
                row[f"m{r['num_anchors']}"] = r["gmacs"]
                row.setdefault("anchor_params", r["params_m"])
        order = {"T": 0, "S": 1, "B": 2}
        rows = sorted(grid.values(), key=lambda r: (r["image"], order.get(r["size"], 9)))
        doc.add(
            markdown_table(
                rows,
                ["size", "image", "deit_params", "deit_gmacs", "anchor_params", *[f"m{m}" for m in anchors]],
                [
                    "size",
                    "image",
                    "DeiT params (M)",
                    "DeiT GMACs",
                    "AnchorFormer params (M)",
                    *[f"AnchorFormer GMACs, M = {m}" for m in anchors],
                ],
                digits=3,
            )  # fmt: skip
        )
    else:
        doc.not_run("complexity")
    doc.heading(3, "Counted: GMACs against resolution")
    if complexity and complexity.get("resolution"):
        rows = [
            {
                **r,
                "image": f"{r['img_size']}²",
                "ratio_x": f"{r['deit_gmacs'] / r['anchorformer_gmacs']:.2f}×",
                "fused_x": f"{r['deit_gmacs'] / r['anchorformer_fused_gmacs']:.2f}×"
                if r.get("anchorformer_fused_gmacs")
                else None,
            }
            for r in complexity["resolution"]
        ]
        fused = any(r["fused_x"] for r in rows)  # complexity.json of an earlier version has no fused counts
        doc.add(
            markdown_table(
                rows,
                ["size", "image", "tokens", "num_anchors", "deit_gmacs", "anchorformer_gmacs", "ratio_x"]
                + (["anchorformer_fused_gmacs", "fused_x"] if fused else []),
                ["size", "image", "tokens N", "M", "DeiT GMACs", "AnchorFormer GMACs", "DeiT / AnchorFormer"]
                + (["AnchorFormer fused GMACs", "DeiT / fused"] if fused else []),
                digits=3,
            )
        )
        if fused:
            doc.add(
                "AnchorFormer fused: the exact inference form (`model.fuse_for_inference()`): the qk projection folded "
                "into the anchors and the value and output projections around the anchor side; the same outputs up to "
                "rounding. Its measured speed-ups over DeiT, beside the unfused model's, are in the benchmark's table "
                "(linked below).\n"
            )
    else:
        doc.not_run("complexity")
    doc.figures([("complexity/gmacs_vs_resolution.png", "GMACs against resolution")])

    doc.heading(3, "Measured: time and memory")
    doc.add(
        "The operator's time and peak memory against N and the whole models' images/s (DeiT vs AnchorFormer), with "
        f"the speed-up targets, are on their own page: [{_bench_page(doc)}]({_bench_page(doc)}). Those measurements "
        "depend on the machine and on its load, so they are not part of this report: each run of the `bench` stage "
        "rewrites that page with the machine's description and flags each figure its spread or the other figures "
        "make unreliable.\n"
    )


def _classification_tables(doc: _Doc) -> tuple[dict[str, list[dict]], str | None]:
    """The E1–E3, E9 and E10 rows: ``classification.json``, or rebuilt from the runs' ``metrics.json`` (and
    ``predictions.json``: the intervals) without it."""
    saved = doc.json("cls/results/classification.json", "cls-results")
    if saved is not None:
        return saved, None
    cls_dir = doc.out_dir / "cls"
    e1_runs = cls_results.load_runs([cls_dir / "e1"])
    if not e1_runs:
        return {}, None
    tables = {
        "e1": cls_results.e1_table(e1_runs),
        "e2": cls_results.e2_table(cls_results.load_runs([cls_dir / "e2"]), baseline=e1_runs),
        "e3": cls_results.e3_table(cls_results.load_runs([cls_dir / "e3"]), baseline=e1_runs),
        "e9": cls_results.e9_table(cls_results.load_runs([cls_dir / "e9"]), baseline=e1_runs),
        "e10": cls_results.e10_table(
            cls_results.load_runs([cls_dir / "e10"]), baseline=e1_runs, e9_runs=cls_results.load_runs([cls_dir / "e9"])
        ),
    }
    cls_results.attach_intervals(tables, cls_results.load_runs([cls_dir / "seeds"]))
    note = (
        "_Rows rebuilt from the runs' `cls/e*/*/metrics.json`: `cls/results/classification.json` (DVC-cached) is "
        "not in this checkout._\n"
    )
    return tables, note


def _classification_section(doc: _Doc, tables: dict[str, list[dict]], note: str | None) -> None:
    doc.heading(2, "E1–E3 · ImageNet classification")
    if note:
        doc.add(note)
    for key, title, render in (
        ("e1", "E1 · AnchorFormer vs DeiT, without and with distillation (⚗)", cls_results.e1_markdown),
        ("e2", "E2 · The number of anchors M (AnchorFormer-T)", cls_results.e2_markdown),
        ("e3", "E3 · Design ablations (AnchorFormer-T)", cls_results.e3_markdown),
    ):
        doc.heading(3, title)
        if tables.get(key):
            doc.add(render(tables[key]))
        else:
            doc.not_run("cls-results")
    doc.heading(3, "Reference: the DeiT paper (ImageNet-1k, 224², 300 epochs; B ↑384 at 384²)")
    doc.add(cls_results.deit_reference_markdown())
    doc.add(f"AnchorFormer's own tables: not public. {cls_results.UNVERIFIED_EXTRACTION}\n")
    doc.figures(
        [
            ("cls/results/accuracy_vs_gmacs.png", "E1/E2: top-1 against GMACs"),
            ("cls/results/anchors.png", "E2: the number of anchors"),
            ("cls/results/ablations.png", "E3: design ablations"),
            ("cls/results/training_curves.png", "Training curves"),
        ]
    )


def _e9_section(doc: _Doc, tables: dict[str, list[dict]]) -> None:
    doc.heading(2, "E9 · Do the anchors learn? Initialisation, temperature, learning rate (AnchorFormer-T)")
    rows = tables.get("e9") or []
    if not any(r.get("role") == "ablation" for r in rows):
        doc.not_run("cls-e9")
        return
    doc.add(
        "The E1 recipe on AnchorFormer-T with one change each: the anchors' initial scale (the official "
        "U(-1/√D, 1/√D); unit-norm rows; rows at the typical norm of qk), anchors from k-means of the first "
        "training batch's qk, a learned temperature per layer on the token–anchor logits, a learning-rate "
        "multiplier for the anchors (`anchor_lr_mult`). The official rows are the E1 runs. Entropies are means over layers on a fixed batch "
        "of validation images, at initialisation → after training; ln N and ln M are uniform attention.\n"
    )
    doc.add(cls_results.e9_markdown(rows))
    doc.add("**Verdict.** " + cls_results.e9_verdict(rows) + "\n")
    doc.figures([("cls/results/entropy_curves.png", "E9: attention entropy per epoch (E1 T runs and E9 variants)")])


def _e10_section(doc: _Doc, tables: dict[str, list[dict]]) -> None:
    doc.heading(2, "E10 · AnchorFormer among its peers (T size, the E1 recipe)")
    rows = tables.get("e10") or []
    if not any(r.get("role") == "peer" for r in rows):
        doc.not_run("cls-e10")
        return
    doc.add(
        "The attentions a user would pick instead, each in the DeiT-T body under the E1 recipe (`cls-e10`): Agent "
        "Attention (agents pooled from Q), Nyströmformer (segment-mean landmarks, pseudo-inverse), FLatten (focused "
        "linear attention), ISAB (learned inducing points), their summary-token count the recipe's M; AnchorFormer-T "
        "as E1 trains it and with E9's best variant (anchor learning rate ×10); DeiT-T. Top-1 is the mean over the "
        "seeds (the `seeds: top-1 each` column) with its 95% interval; the differences are paired over the images. "
        "Params and GMACs are counted by the one tool (`count_macs`) on the trained mini models; the entropy is the "
        "mean over layers of p(token | anchor) (AnchorFormer) or p(token | token) (softmax), — where the method keeps "
        "no attention map. CPU time per image at 224² and 1024², peers included, is a timing, not a result: the "
        f"benchmark's page [{_bench_page(doc)}]({_bench_page(doc)}) gives it with the machine it ran on.\n"
    )
    doc.add(cls_results.e10_markdown(rows))
    doc.add("**Verdict.** " + cls_results.e10_verdict(rows) + "\n")
    doc.figures([("cls/results/e10_top1.png", "E10: top-1 per method, mean over seeds, 95% intervals")])


def _entropy_curves_section(doc: _Doc, tables: dict[str, list[dict]]) -> None:
    """E7's curves: how selective the attention of each E1 run became through training."""
    rows = [r for r in tables.get("e1") or [] if r.get("entropy_token") is not None]
    doc.heading(3, "Attention entropy through training (E1 runs)")
    if not rows:
        doc.add("_The E1 runs of this checkout predate the per-epoch entropies: `dvc repro cls-results`._\n")
        return
    shown = []
    for r in rows:
        d = dict(r)
        d["distill"] = "⚗" if r.get("distilled") else ""
        d["kind"] = "p(token \\| anchor)" if r.get("entropy_anchor") is not None else "p(token \\| token)"
        shown.append(d)
    doc.add(
        "Mean over layers of each run's attention entropy (nats) on a fixed batch of validation images, at "
        "initialisation and after training, against uniform attention (ln N over tokens, ln M over anchors).\n"
    )
    doc.add(
        markdown_table(
            shown,
            ["label", "distill", "kind", *cls_results.ENTROPY_KEYS],
            ["model", "⚗", "over tokens", "start", "end", "ln N", "p(anchor \\| token) start", "end", "ln M"],
            digits=3,
        )
    )
    doc.figures([("cls/results/entropy_curves.png", "Attention entropy per epoch: AnchorFormer vs DeiT (T)")])


def _shape_label(backbone: str, profile: str | None) -> str:
    parts = backbone.split("_")
    family = _FAMILY.get(parts[0], backbone)
    size = next((_LETTER[p] for p in parts if p in _LETTER), "?")
    return f"{family}-{size}" + (f" ({profile} shape)" if profile else "")


def _detection_section(doc: _Doc, det: dict | None, profile: str | None) -> None:
    doc.heading(2, "E5 · COCO detection and instance segmentation")
    doc.heading(3, f"Trained detectors (profile {profile or 'not given'})")
    if det and det.get("runs"):
        doc.add(
            "Mask R-CNN over each backbone as it was trained (its shape in brackets, the attention it runs: global, "
            "ViTDet-windowed or anchor), with the backbone's GMACs at the input the run trained and evaluated on "
            "(shorter × longer side, after the input scale).\n"
        )
        rows = [
            {**r, "backbone_label": r.get("backbone_label") or _shape_label(r["backbone"], profile)}
            for r in det["runs"]
        ]
        doc.add(det_results.runs_markdown(rows))
    else:
        doc.not_run("det-summary")
    doc.heading(3, "Comparable FLOPs: AnchorFormer vs DeiT at matched backbone GMACs")
    if det and det.get("comparable_flops"):
        doc.add(
            "DeiT's input is scaled until its backbone's GMACs equal the AnchorFormer backbone's at the input the "
            "runs train on; gain = (AP_AnchorFormer − AP_DeiT) / AP_DeiT, the abstract's form.\n"
        )
        doc.add(det_results.pairs_markdown(det["comparable_flops"]))
    elif det:
        doc.add("_No DeiT run was matched to an AnchorFormer run (`match_macs_of` in `params.yaml`)._\n")
    else:
        doc.not_run("det-summary")
    doc.heading(3, "Standard backbones at 1333×800 (counted, untrained)")
    if det and det.get("standard_backbones"):
        doc.add(
            "The full recipe's backbones (standard T/S/B shapes, patch 16, M = 30) at the COCO input 1333×800, "
            "where the full protocol compares them: DeiT with global attention, DeiT with ViTDet's windowed "
            "attention (14×14 windows, global blocks 2, 5, 8, 11) and AnchorFormer; none of these was trained here.\n"
        )
        doc.add(det_results.standard_backbones_markdown(det["standard_backbones"]))
    elif det:
        doc.not_run("det-summary", "Not in this summary (written by the detection summary from this version on)")
    else:
        doc.not_run("det-summary")
    doc.figures(
        [("det/summary/ap_vs_gmacs.png", "Box AP against backbone GMACs at the run's input")]
        + [
            (f"det/{run}/predictions.png", f"Predicted boxes and masks ({run})")
            for run in (r["run"] for r in (det or {}).get("runs", []))
        ]
    )


def _segmentation_section(doc: _Doc, seg: dict | None, seg_complexity: list | None, profile: str | None) -> None:
    doc.heading(2, "E6 · ADE20K semantic segmentation")
    doc.heading(3, f"Trained models (profile {profile or 'not given'})")
    if seg and seg.get("runs"):
        doc.add(
            "Single-scale mIoU / mAcc / aAcc (percent) on the validation split; params and GMACs of backbone, neck "
            "(multilevel: blocks 2, 5, 8, 11, or 0–3 of the mini backbones, as mmsegmentation) and decode head as "
            "trained, GMACs counted at 512² (the protocol's crop) whatever crop the run trained on (the crop column).\n"
        )
        doc.add(seg_results.results_markdown(seg["runs"]))
    else:
        doc.not_run("seg-summary")
    doc.heading(3, "Standard models at 512² (counted, untrained)")
    if seg_complexity:
        doc.add("The full recipe's models (standard backbone shapes): backbone + pyramid + decode head at 512².\n")
        doc.add(seg_results.complexity_markdown(seg_complexity))
    else:
        doc.not_run("seg-summary")
    doc.add("Paper values: not public (the unverified extraction is quoted under E1–E3).\n")
    doc.figures(
        [
            (f"seg/{run}/label_maps.png", f"Predicted label maps ({run})")
            for run in (r["run"] for r in (seg or {}).get("runs", []))
        ]
    )


def _anchor_maps_section(doc: _Doc, maps: dict | None, cls_tables: dict[str, list[dict]]) -> None:
    doc.heading(2, "E7 · What the anchors gather")
    if maps is None:
        doc.not_run("anchor-maps")
    else:
        doc.add(
            f"Model: {maps.get('source')}; images: {', '.join(maps.get('images', []))}. For each anchor, p(token | "
            "anchor) over the N patch tokens; its entropy (nats) is ln N when the anchor gathers uniformly from the "
            "whole image and 0 when it gathers from one patch. Mean, least and most over images and anchors.\n"
        )
        rows = maps.get("entropy")
        if rows is None:  # written before the per-layer table: mean entropies only
            rows = _legacy_entropy_rows(doc.out_dir, maps)
        for r in rows:
            n = r.get("tokens")
            r["ln_n"] = math.log(n) if n else None
            r["of_uniform"] = None if not n else f"{100 * r['mean_entropy'] / r['ln_n']:.1f}%"
        doc.add(
            markdown_table(
                rows,
                ["layer", "tokens", "ln_n", "mean_entropy", "min_entropy", "max_entropy", "of_uniform"],
                ["layer", "patch tokens N", "uniform: ln N", "mean entropy", "least", "most", "mean / ln N"],
                digits=3,
            )
        )
        if "entropy" not in maps:
            doc.add(
                "_This `anchor_maps.json` records the mean entropy per layer only; N is the patch grid of the model "
                "(input and patch size from its training run's `metrics.json`). `dvc repro anchor-maps` records N and "
                "the least and most entropy per layer._\n"
            )
    doc.figures([("anchor_maps/anchor_maps.png", "p(token | anchor) over images, anchors of largest degree")])
    _entropy_curves_section(doc, cls_tables)


DEVIATIONS = Path(__file__).resolve().parent / "configs" / "deviations.yaml"


RUN_ROOTS = ("cls", "det", "seg")  # the pipeline's training runs live under outputs/<task>/


def batch_rows(outputs: Path) -> list[dict[str, Any]]:
    """Each training run's global batch, processes and accumulation, from its ``metrics.json``.

    Only the pipeline's run folders (``outputs/cls``, ``det``, ``seg``) count: a smoke run of a
    notebook elsewhere under ``outputs/`` is not one of the report's runs.
    """
    rows = []
    found = [{**m, "run": f"{root}/{m['run']}"} for root in RUN_ROOTS for m in collect_metrics(Path(outputs) / root)]
    for m in found:
        parts = Path(m["run"]).parts
        if "global_batch" not in m or "recipe_global_batch" not in m or parts[-1] == "dvclive":
            continue  # dvclive's copy of a run's summary is the same run
        if any(p.startswith("previous-") for p in parts):
            continue  # a run's earlier training, kept aside when its recipe changed
        row = {k: m.get(k) for k in ("run", "global_batch", "recipe_global_batch", "world_size", "accum_steps")}
        row["per_device_batch"] = m.get("per_device_batch")
        row["matches"] = "yes" if m["global_batch"] == m["recipe_global_batch"] else "**NO**"
        rows.append(row)
    return rows


def _preset_value(value: Any) -> str:
    """A recipe value as the deviations table writes it: none, true/false, 1e-05, [0.5, 2]."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_preset_value(v) for v in value) + "]"
    return str(value)


def deviation_tables(path: str | Path = DEVIATIONS) -> dict[str, dict[str, Any]]:
    """The deviations tables with their "ours" cells read from the full presets.

    Each entry of ``deviations.yaml`` names its ``preset`` (``TASK`` or ``TASK:ENTRY``, an entry of the
    preset's ``recipes``); every ``{key}`` (dotted for nested keys) in an "ours" cell is replaced by that
    preset's value, so the table cannot drift from what the full profile runs.

    Returns:
        ``{name: {"title", "preset", "rows": [{"what", "anchor", "ours", "why", "same", "keys"}]}}``, ``keys``
        being the recipe keys a row states.

    Raises:
        ValueError: naming the file, the entry and the key, for a missing ``preset`` or an unknown key.
    """
    import re

    import yaml

    from .engine.recipe import load_preset

    path = Path(path)
    tables = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tables.items():
        spec = entry.get("preset")
        if not spec:
            raise ValueError(f"{path}: entry {name!r} has no preset (TASK or TASK:ENTRY)")
        task, _, recipe = str(spec).partition(":")
        preset, _ = load_preset(task, "full")
        if recipe:
            if recipe not in (preset.get("recipes") or {}):
                raise ValueError(f"{path}: entry {name!r}: {task}.yaml [full] has no recipes.{recipe}")
            preset = {**preset, **preset["recipes"][recipe]}

        def value(match: re.Match[str], name: str = name, spec: str = str(spec), preset: dict = preset) -> str:
            node: Any = preset
            for part in match.group(1).split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"{path}: entry {name!r}: no key {match.group(1)!r} in the {spec} preset [full]")
                node = node[part]
            return _preset_value(node)

        rows = []
        for what, anchor, ours, why, same in entry["rows"]:
            keys = re.findall(r"\{([A-Za-z_][\w.]*)\}", str(ours))
            rendered = re.sub(r"\{([A-Za-z_][\w.]*)\}", value, str(ours))
            rows.append({"what": what, "anchor": anchor, "ours": rendered, "why": why, "same": same, "keys": keys})
        out[name] = {"title": entry["title"], "preset": spec, "rows": rows}
    return out


def _deviations_section(doc: _Doc, outputs: Path) -> None:
    doc.heading(2, "Deviations from the anchors' recipes")
    doc.add(
        "Recipe by recipe, what the anchor uses, what the full profile uses and why "
        '(`anchorformer/configs/deviations.yaml`; the README\'s "Running the full profile" has the same tables). '
        "Rows marked **deviates** differ from the anchor. The ours column is read from the full presets "
        "(`anchorformer/configs/{cls,det,seg}.yaml`), so it states what the full profile runs.\n"
    )
    for entry in deviation_tables().values():
        doc.heading(3, entry["title"])
        rows = [{**r, "": "" if r["same"] else "**deviates**"} for r in entry["rows"]]
        doc.add(markdown_table(rows, ["what", "anchor", "ours", "", "why"]) + "\n")
    runs = batch_rows(outputs)
    doc.heading(3, "Global batch of each run")
    if not runs:
        doc.add("_No run recorded its global batch._\n")
        return
    off = [r["run"] for r in runs if r["matches"] != "yes"]
    doc.add(
        (
            f"**{len(off)} run(s) trained with another global batch than their recipe's** (no exact split over "
            f"their processes; the learning rate followed the effective batch): {', '.join(off)}.\n"
            if off
            else "Every run trained with its recipe's global batch.\n"
        ),
        markdown_table(
            runs,
            ["run", "global_batch", "recipe_global_batch", "world_size", "per_device_batch", "accum_steps", "matches"],
            ["run", "global batch", "recipe's", "processes", "per device", "accumulation", "as the recipe"],
        )
        + "\n",
    )


def _legacy_entropy_rows(outputs: Path, maps: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows from an ``anchor_maps.json`` that has ``mean_entropy`` only.

    N is taken from the metrics of the classification run whose checkpoint the maps name
    (``source``: "<model> from <folder>/model.pth"), as (img_size / patch_size)².
    """
    tokens = None
    checkpoint = str(maps.get("source", "")).rpartition(" from ")[2]
    if checkpoint:
        path = Path(checkpoint).parent / "metrics.json"
        if not path.is_absolute() and path.parts[:1] == ("outputs",):
            path = outputs / Path(*path.parts[1:])
        run = _read_json(path) or {}
        img, patch = run.get("img_size"), (run.get("config") or {}).get("patch_size")
        if img and patch:
            tokens = (int(img) // int(patch)) ** 2
    return [{"layer": int(k), "tokens": tokens, "mean_entropy": v} for k, v in (maps.get("mean_entropy") or {}).items()]


def _recorded_profiles(cls_tables: dict, seg: dict | None, outputs: Path) -> set[str]:
    found = {r.get("profile") for r in (seg or {}).get("runs", [])}
    found |= {r["label"].rsplit("(", 1)[1].rstrip(")") for r in cls_tables.get("e1", []) if "(" in str(r.get("label"))}
    for name in ("imagenet", "coco", "ade20k"):
        m = _read_json(outputs / f"data/manifest_{name}.json")
        if m and m.get("expect") in ("mini", "full"):
            found.add(m["expect"])
    return {p for p in found if p}


def build_report(
    outputs_dir: str | Path = "outputs", out_md: str | Path = "reports/report.md", *, profile: str | None = None
) -> dict[str, Any]:
    """Assemble ``out_md`` (and its HTML copy) from the stages' JSON outputs under ``outputs_dir``.

    Every table is rendered from JSON under the report's own headings; figures are copied beside
    the report (``figures/``) so that the report folder stands alone. A stage that has not run
    shows as such; nothing is invented.

    Args:
        outputs_dir: the stages' outputs (``outputs/``).
        out_md: the report's markdown; the HTML goes beside it.
        profile: the profile the stages ran with (``mini`` or ``full``), as the pipeline passes it.

    Returns:
        ``{"markdown": path, "html": path, "metrics": headline.json, "headline": {"trained": rows, "counted": rows,
        "machines": rows (:func:`anchorformer.cross_host.machines_markdown`)},
        "sections": {stage: outputs found}}``.
    """
    out_dir = Path(outputs_dir)
    doc = _Doc(out_dir, Path(out_md))
    complexity = doc.json("complexity/complexity.json", "complexity")
    cls_tables, cls_note = _classification_tables(doc)
    det = doc.json("det/summary/summary.json", "det-summary")
    seg = doc.json("seg/summary/summary.json", "seg-summary")
    seg_complexity = _read_json(out_dir / "seg/summary/complexity.json")
    maps = doc.json("anchor_maps/anchor_maps.json", "anchor-maps")
    doc.present["cls-results"] = bool(cls_tables)

    doc.heading(1, "AnchorFormer: reproduction report")
    doc.add(
        "Shan et al., *AnchorFormer: Differentiable anchor attention for efficient vision transformer*, "
        "Pattern Recognition Letters 197 (2025), arXiv 2505.16463. Every number below was measured or counted by "
        "this pipeline (`dvc repro`) unless it is labelled as a reference; the paper's tables are not public, so "
        'paper values read "not public".\n'
    )
    _profile_section(doc, profile, _recorded_profiles(cls_tables, seg, out_dir))
    _uncertainty_section(doc)
    headline = _headline_section(doc, profile, cls_tables.get("e1", []), det, complexity)
    _environment_section(doc)
    _data_section(doc)
    _complexity_section(doc, complexity)
    _classification_section(doc, cls_tables, cls_note)
    _e9_section(doc, cls_tables)
    _e10_section(doc, cls_tables)
    _detection_section(doc, det, profile)
    _segmentation_section(doc, seg, seg_complexity, profile)
    _anchor_maps_section(doc, maps, cls_tables)
    _deviations_section(doc, out_dir)

    paths = write_report(doc.out_md, doc.text())
    paths["metrics"] = write_json_atomic(doc.out_md.parent / HEADLINE, headline_metrics(out_dir))
    return {**paths, "headline": headline, "sections": doc.present}


_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def markdown_seen_from(markdown_file: str | Path, folder: str | Path = "notebooks") -> str:
    """The text of ``markdown_file`` with its relative links rewritten to resolve from ``folder``.

    A notebook shows the report with ``display(Markdown(...))``; JupyterLab resolves the links of
    a cell's output from the notebook's folder (``notebooks/``), not from the report's. Absolute
    URLs, anchors (``#...``) and absolute paths are left as they are. Both paths are taken from the
    working directory (the repository root in the notebooks).
    """
    markdown_file = Path(markdown_file)
    base = Path(os.path.relpath(markdown_file.parent.resolve(), Path(folder).resolve()))

    def rebase(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target):
            return match.group(0)
        return f"{match.group(1)}{Path(os.path.normpath(base / target)).as_posix()}{match.group(3)}"

    return _LINK.sub(rebase, markdown_file.read_text(encoding="utf-8"))
