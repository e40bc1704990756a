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
- E9: do the anchors learn? The anchors' initialisation (official U(-1/sqrt(D), 1/sqrt(D)),
  unit-norm rows, rows at the typical norm of qk, k-means of the first batch's qk), a learned
  temperature and a learning-rate multiplier for the anchors, each with its top-1, GMACs and the
  attention entropies (mean over layers) at the start and the end of training against the uniform
  values ln N and ln M, next to DeiT-T's top-1; :func:`e9_verdict` says which, if any, closes the
  gap to DeiT-T. :func:`plot_entropy_curves` draws the entropies per epoch.

Runs that serve two tables (the AnchorFormer-T baseline of E1 is also the default point of E2
and the reference row of E3 and E9) are trained once and read from E1.

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
from . import intervals

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "DEIT_PAPER",
    "PEER_FAMILIES",
    "attach_intervals",
    "diff_cell",
    "e10_markdown",
    "e10_table",
    "e10_verdict",
    "plot_e10_top1",
    "run_signature",
    "seeds_cell",
    "top1_cell",
    "ENTROPY_KEYS",
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
    "e9_curve_runs",
    "e9_markdown",
    "e9_table",
    "e9_verdict",
    "load_runs",
    "plot_accuracy_vs_gmacs",
    "plot_anchor_ablation",
    "plot_design_ablation",
    "plot_e9_top1",
    "plot_entropy_curves",
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
# E10's peers, by the prefix of their timm names (``agent_deit_tiny_patch16_224``, ...): the family shown.
PEER_FAMILIES = {"agent_deit": "Agent", "nystrom_deit": "Nyström", "flatten_deit": "FLatten", "isab_deit": "ISAB"}
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
    peer = next((label for prefix, label in PEER_FAMILIES.items() if name.startswith(prefix + "_")), None)
    family = (
        "AnchorFormer"
        if name.startswith(("anchorformer", "anchor_deit"))
        else "DeiT"
        if name.startswith("deit")
        else peer or name
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
        "anchor_init": cfg.get("anchor_init", "official") if anchor else None,
        "learn_temperature": bool(cfg.get("learn_temperature", False)) if anchor else None,
        "anchor_lr_mult": float(cfg.get("anchor_lr_mult", 1.0)) if anchor else None,
    }


def _entropy_fields(run: dict[str, Any]) -> dict[str, Any]:
    """Mean entropies over layers at the start and the end of training, and the uniform values
    (``metrics.json`` ``entropy``; ``None`` for runs without it). p(token | ·) is p(token | anchor)
    for AnchorFormer and p(token | token) for softmax attention."""
    e = run.get("entropy") or {}
    uniform, init, final = e.get("uniform") or {}, e.get("init") or {}, e.get("final") or {}
    token = "token_given_anchor" if "token_given_anchor" in uniform else "token_given_token"
    return {
        "entropy_token_init": init.get(f"{token}/mean"),
        "entropy_token": final.get(f"{token}/mean"),
        "uniform_token": uniform.get(token),
        "entropy_anchor_init": init.get("anchor_given_token/mean"),
        "entropy_anchor": final.get("anchor_given_token/mean"),
        "uniform_anchor": uniform.get("anchor_given_token"),
    }


def _row(run: dict[str, Any]) -> dict[str, Any]:
    d = describe_run(run)
    return {
        **d,
        "run": run.get("run"),
        "model_name": run.get("model"),
        "signature": run_signature(run),
        "val_images": run.get("val_images"),
        "params_m": run.get("params_m"),
        "gmacs": run.get("gmacs"),
        "top1": run.get("top1"),
        "top5": run.get("top5"),
        "epochs": run.get("epochs"),
        "img_size": run.get("img_size"),
        **_entropy_fields(run),
    }


def _is_baseline_anchor(d: dict[str, Any]) -> bool:
    return (
        d["family"] == "AnchorFormer"
        and d["anchor_mode"] == "learned"
        and d["normalize"]
        and not d["per_head_anchors"]
        and d.get("anchor_init", "official") == "official"
        and not d.get("learn_temperature")
        and d.get("anchor_lr_mult", 1.0) == 1.0
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
                r["role"] = "default"
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


_E9_ORDER = {"unit": 0, "qk_norm": 1, "kmeans": 2}
_E9_INIT = {
    "official": "official anchors U(-1/√D, 1/√D)",
    "unit": "unit-norm anchors",
    "qk_norm": "anchors at the typical norm of qk",
    "kmeans": "k-means anchors (first batch's qk)",
}


def _e9_variant(d: dict[str, Any]) -> str:
    parts = [_E9_INIT.get(d.get("anchor_init") or "official", str(d.get("anchor_init")))]
    if d.get("learn_temperature"):
        parts.append("learned temperature")
    if (d.get("anchor_lr_mult") or 1.0) != 1.0:
        parts.append(f"anchor lr ×{d['anchor_lr_mult']:g}")
    return ", ".join(parts)


def _is_plain_t(r: dict[str, Any], family: str) -> bool:
    return r["family"] == family and r["size"] == "T" and not r["distilled"]


def e9_table(runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """E9 rows: DeiT-T and the official AnchorFormer-T (both from E1), then each E9 variant.

    Each row has ``variant``, ``role`` (``reference``, ``official`` or ``ablation``), top-1,
    GMACs, the entropy fields and ``gap_to_deit`` (top-1 minus DeiT-T's, points; ``None``
    without the DeiT-T run).
    """
    rows = []
    for family, role in (("DeiT", "reference"), ("AnchorFormer", "official")):
        for run in baseline:
            r = _row(run)
            if _is_plain_t(r, family) and (family == "DeiT" or _is_baseline_anchor(r)):
                r["variant"] = "DeiT-T (softmax attention, E1)" if family == "DeiT" else _e9_variant(r) + " (E1)"
                r["role"] = role
                rows.append(r)
                break
    ablations = []
    for run in runs:
        r = _row(run)
        r["variant"], r["role"] = _e9_variant(r), "ablation"
        ablations.append(r)
    ablations.sort(
        key=lambda r: (
            _E9_ORDER.get(r["anchor_init"], 3),
            r["anchor_lr_mult"] or 1.0,
            bool(r["learn_temperature"]),
            r["run"] or "",
        )
    )
    rows += ablations
    deit = next((r["top1"] for r in rows if r["role"] == "reference"), None)
    for r in rows:
        r["gap_to_deit"] = None if deit is None or r["top1"] is None else round(r["top1"] - deit, 2)
    return rows


def e9_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One paragraph from the E9 rows: the gap of the official AnchorFormer-T to DeiT-T, and which
    variants, if any, close it; every number read from ``rows``.

    With paired intervals (:func:`attach_intervals`), the verdict follows the report's rule: a variant closes
    the gap when its difference to DeiT-T is not *lower* (higher or not distinguishable), and improves on the
    official initialisation when its difference to it is *higher*. Without them (rows of runs that predate
    per-image predictions), a variant closes the gap when its top-1 is at least DeiT-T's.
    """
    deit = next((r for r in rows if r["role"] == "reference"), None)
    official = next((r for r in rows if r["role"] == "official"), None)
    ablations = [r for r in rows if r["role"] == "ablation" and r["top1"] is not None]
    tail = (
        "The full profile keeps the official initialisation (anchor_init=official, no temperature, anchor_lr_mult=1) "
        "unless a recipe key says otherwise."
    )
    if not ablations:
        return "No E9 variant has run. " + tail
    if deit is None or official is None:
        missing = "DeiT-T" if deit is None else "AnchorFormer-T (official initialisation)"
        return f"The E1 {missing} run is missing: no gap to compare. {tail}"
    gap = official.get("vs_deit")
    if gap and gap.get("lo") is not None:
        text = (
            f"DeiT-T reaches {top1_cell(deit)}% top-1 and the official AnchorFormer-T {top1_cell(official)}% "
            f"(difference {diff_cell(gap)}). "
        )
        closing = [r for r in ablations if (r.get("vs_deit") or {}).get("verdict") in ("higher", "not distinguishable")]
        gains = [r for r in ablations if (r.get("vs_ref") or {}).get("verdict") == "higher"]
        if closing:
            names = "; ".join(f"{r['variant']} ({diff_cell(r['vs_deit'])} against DeiT-T)" for r in closing)
            text += f"Not below DeiT-T by the rule (the gap closed or not distinguishable from closed): {names}. "
        else:
            text += "Every variant stays below DeiT-T by the rule. "
        if gains:
            names = "; ".join(f"{r['variant']} ({diff_cell(r['vs_ref'])})" for r in gains)
            text += f"Above the official initialisation by the rule: {names}. "
        else:
            text += "No variant is above the official initialisation by the rule. "
        return text + tail
    gap_points = official["top1"] - deit["top1"]
    text = (
        f"DeiT-T reaches {deit['top1']:.1f}% top-1 and the official AnchorFormer-T {official['top1']:.1f}% "
        f"({gap_points:+.1f} points; no paired interval: the runs have no per-image predictions). "
    )
    closing = [r for r in ablations if r["top1"] >= deit["top1"]]
    best = max(ablations, key=lambda r: r["top1"])
    if closing:
        names = "; ".join(f"{r['variant']} ({r['top1']:.1f}%)" for r in closing)
        text += f"Closing the gap to DeiT-T (top-1 at least DeiT-T's): {names}. "
    else:
        text += (
            f"No variant closes the gap to DeiT-T: the best, {best['variant']}, reaches {best['top1']:.1f}% "
            f"({best['top1'] - deit['top1']:+.1f} points against DeiT-T, {best['top1'] - official['top1']:+.1f} "
            "against the official initialisation). "
        )
    return text + tail


def e9_curve_runs(e1_runs: Sequence[dict[str, Any]], e9_runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose entropy curves E9 draws: the plain T runs of E1 (AnchorFormer and DeiT), then E9's."""
    described = [(r, describe_run(r)) for r in e1_runs]
    return [*(r for r, d in described if d["size"] == "T" and not d["distilled"]), *e9_runs]


# ---------------------------------------------------------------------------------------------
# E10 (AnchorFormer among its peers) and the intervals of every row
# ---------------------------------------------------------------------------------------------


def e10_table(
    runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = (), e9_runs: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """E10 rows: DeiT-T and the official AnchorFormer-T (E1), AnchorFormer-T with the anchors' learning rate
    ×10 (E9's best variant, its E9 run), then each peer at T size (E10's runs), all under the E1 recipe.

    Each row has ``variant`` and ``role`` (``reference``: DeiT-T, ``official``: AnchorFormer-T, ``anchorformer``:
    the ×10 variant, ``peer``), top-1, params, GMACs and the entropy fields.
    """
    rows = []
    for family, role in (("DeiT", "reference"), ("AnchorFormer", "official")):
        for run in baseline:
            r = _row(run)
            if _is_plain_t(r, family) and (family == "DeiT" or _is_baseline_anchor(r)):
                r["variant"] = "DeiT-T (softmax attention, E1)" if family == "DeiT" else "AnchorFormer-T (official, E1)"
                r["role"] = role
                rows.append(r)
                break
    for run in e9_runs:
        r = _row(run)
        if (
            _is_plain_t(r, "AnchorFormer")
            and (r["anchor_lr_mult"] or 1.0) != 1.0
            and r["anchor_init"] == "official"
            and not r["learn_temperature"]
        ):
            r["variant"] = f"AnchorFormer-T, anchor lr ×{r['anchor_lr_mult']:g} (E9)"
            r["role"] = "anchorformer"
            rows.append(r)
    peers = []
    for run in runs:
        r = _row(run)
        r["variant"] = f"{r['family']}-{r['size']}"
        r["role"] = "peer"
        peers.append(r)
    order = {label: i for i, label in enumerate(PEER_FAMILIES.values())}
    peers.sort(key=lambda r: (order.get(r["family"], 9), r["run"] or ""))
    return rows + peers


def run_signature(run: dict[str, Any]) -> str:
    """What makes two runs the same configuration but for the seed: the model and its anchor settings."""
    d = describe_run(run)
    keys = ("num_anchors", "anchor_mode", "normalize", "per_head_anchors", "anchor_init", "learn_temperature")
    return "|".join([str(run.get("model")), *(f"{k}={d[k]}" for k in keys), f"lr={d['anchor_lr_mult']}"])


def _seed_of(run: dict[str, Any]) -> int:
    return int((run.get("config") or {}).get("seed", 0))


def _run_flags(run_dir: str | None) -> dict[str, Any] | None:
    return intervals.read_predictions(run_dir) if run_dir else None


def attach_intervals(
    tables: dict[str, list[dict[str, Any]]], seed_runs: Sequence[dict[str, Any]] = (), *, n_boot: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Give every row its seeds and a 95% interval, and every compared row its paired differences (in place).

    A row's seeds are its own run and every run of ``seed_runs`` with the same :func:`run_signature` (another
    seed of the same configuration). With every seed's ``predictions.json``, ``top1`` becomes the mean over
    seeds and ``top1_lo``/``top1_hi`` the bootstrap interval (:func:`intervals.bootstrap_top1`); without, the
    Wilson interval of the first run's count. Differences (:func:`intervals.paired_difference`, None without
    per-image flags): E1's AnchorFormer rows ``vs_deit`` (same size and distillation); E2's rows ``vs_ref``
    (the default M, the E1 run); E3's ablations ``vs_ref`` (the method); E9's and E10's rows ``vs_ref`` (the
    official AnchorFormer-T) and ``vs_deit`` (DeiT-T).

    Raises:
        ValueError: when two seeds of a row, or two compared rows, were evaluated on different image lists.
    """
    boot = {"n_boot": n_boot} if n_boot else {}
    by_signature: dict[str, list[dict[str, Any]]] = {}
    for run in seed_runs:
        by_signature.setdefault(run_signature(run), []).append(run)
    flags_of: dict[int, tuple[list[Any], str | None] | None] = {}

    def row_flags(row: dict[str, Any]) -> tuple[list[Any], str | None] | None:
        return flags_of.get(id(row))

    for rows in tables.values():
        for row in rows:
            seeds = [row] + sorted(by_signature.get(row.get("signature") or "", []), key=_seed_of)
            preds = [_run_flags(s.get("run")) for s in seeds]
            row["seeds"] = len(seeds)
            row["per_seed"] = [s.get("top1") for s in seeds]
            if all(p is not None for p in preds):
                hashes = {p["files_sha256"] for p in preds}
                if len(hashes) > 1:
                    where = ", ".join(str(s.get("run")) for s in seeds)
                    raise ValueError(f"the seeds {where} were evaluated on different validation images")
                flags = [p["correct"] for p in preds]
                ci = intervals.bootstrap_top1(flags, **boot)
                row.update(top1=ci["top1"], top1_lo=ci["lo"], top1_hi=ci["hi"], spread=ci["spread"])
                row["interval"] = "bootstrap"
                flags_of[id(row)] = (flags, preds[0]["files_sha256"])
            elif row.get("top1") is not None and row.get("val_images"):
                top1s = [s.get("top1") for s in seeds if s.get("top1") is not None]
                row["top1"] = sum(top1s) / len(top1s)
                row["spread"] = _sample_std(top1s)
                row["top1_lo"], row["top1_hi"] = intervals.wilson_interval(row["top1"], int(row["val_images"]))
                row["interval"] = "wilson"

    def diff(a: dict[str, Any], b: dict[str, Any] | None, label: str) -> dict[str, Any] | None:
        if b is None or a is b:
            return None
        fa, fb = row_flags(a), row_flags(b)
        if fa is None or fb is None:
            top_a, top_b = a.get("top1"), b.get("top1")
            if top_a is None or top_b is None:
                return None
            return {"against": label, "diff": top_a - top_b, "lo": None, "hi": None, "verdict": "no interval"}
        if fa[1] != fb[1]:
            raise ValueError(f"{a.get('run')} and {b.get('run')} were evaluated on different validation images")
        return {"against": label, **intervals.paired_difference(fa[0], fb[0], **boot)}

    for a in tables.get("e1", []):
        if a.get("family") == "AnchorFormer":
            partner = next(
                (
                    d
                    for d in tables["e1"]
                    if d.get("family") == "DeiT"
                    and d.get("size") == a.get("size")
                    and d.get("distilled") == a.get("distilled")
                ),
                None,
            )
            a["vs_deit"] = diff(a, partner, "DeiT")
    e2 = tables.get("e2", [])
    default = next((r for r in e2 if r.get("role") == "default"), None)
    for r in e2:
        r["vs_ref"] = diff(r, default, "default M")
    e3 = tables.get("e3", [])
    for r in e3[1:]:
        r["vs_ref"] = diff(r, e3[0] if e3 and e3[0].get("variant", "").startswith("AnchorFormer (") else None, "method")
    for key in ("e9", "e10"):
        rows = tables.get(key, [])
        official = next((r for r in rows if r.get("role") == "official"), None)
        deit = next((r for r in rows if r.get("role") == "reference"), None)
        for r in rows:
            r["vs_ref"] = diff(r, official, "AnchorFormer-T")
            r["vs_deit"] = diff(r, deit, "DeiT-T")
    return tables


def _sample_std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def top1_cell(row: dict[str, Any]) -> str:
    """``87.2 [83.1, 90.9]``: the row's top-1 (mean over seeds) and its 95% interval."""
    if row.get("top1") is None:
        return "—"
    if row.get("top1_lo") is None:
        return f"{row['top1']:.1f}"
    return f"{row['top1']:.1f} [{row['top1_lo']:.1f}, {row['top1_hi']:.1f}]"


def seeds_cell(row: dict[str, Any]) -> str:
    """``3: 89.5 / 85.5 / 86.5 (sd 2.1)``, or ``1`` for one seed."""
    n = row.get("seeds") or 1
    if n < 2:
        return "1"
    values = " / ".join("—" if v is None else f"{v:.1f}" for v in row.get("per_seed") or [])
    sd = row.get("spread")
    return f"{n}: {values}" + (f" (sd {sd:.1f})" if sd is not None else "")


def diff_cell(d: dict[str, Any] | None) -> str:
    """``+5.0 [+2.1, +8.0] higher``: a paired difference in points, its interval and verdict."""
    if not d:
        return "—"
    if d.get("lo") is None:
        return f"{d['diff']:+.1f} (no interval)"
    return f"{d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] {d['verdict']}"


def e10_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E10 table (no heading): top-1 with its interval and seeds, the paired differences to AnchorFormer-T
    and DeiT-T, params, GMACs and the entropy of the attention at the end of training (p(token | ·), mean over
    layers; — for a method without attention maps). CPU time per image is a timing: the benchmark's page."""
    shown = _display(rows)
    return markdown_table(
        shown,
        [
            "variant",
            "top1_ci",
            "seeds_shown",
            "vs_ref_shown",
            "vs_deit_shown",
            "params_m",
            "gmacs",
            "entropy_token",
        ],
        [
            "model",
            "top-1 [95% CI]",
            "seeds: top-1 each",
            "− AnchorFormer-T",
            "− DeiT-T",
            "params (M)",
            "GMACs",
            "H p(token \\| ·) end",
        ],
        digits=1,
    )


def e10_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One paragraph from the E10 rows: each peer against AnchorFormer-T (official and ×10), by the intervals."""
    peers = [r for r in rows if r.get("role") == "peer" and r.get("top1") is not None]
    if not peers:
        return "No E10 peer has run."
    best_af = [r for r in rows if r.get("role") in ("official", "anchorformer") and r.get("top1") is not None]
    parts = []
    for p in peers:
        d = p.get("vs_ref")
        parts.append(f"{p['variant']} {diff_cell(d)} against the official AnchorFormer-T" if d else p["variant"])
    text = "Each peer minus the official AnchorFormer-T, points [95% interval] and verdict: " + "; ".join(parts) + ". "
    if best_af:
        af = max(best_af, key=lambda r: r["top1"])
        better = [p["variant"] for p in peers if (p.get("vs_ref") or {}).get("verdict") == "higher"]
        text += f"AnchorFormer-T's best row is {af['variant']} ({top1_cell(af)}). " + (
            f"Peers above the official AnchorFormer-T: {', '.join(better)}."
            if better
            else "No peer is above the official AnchorFormer-T by the rule."
        )
    return text


_FORMATS = {
    "params_m": "{:.3f}",
    "gmacs": "{:.4g}",
    "top1": "{:.1f}",
    "top5": "{:.1f}",
    "paper_top1": "{:.1f}",
    "gap_to_deit": "{:+.1f}",
}
# The entropy columns of a row (:func:`_entropy_fields`), in table order; nats to 3 decimals.
ENTROPY_KEYS = (
    "entropy_token_init",
    "entropy_token",
    "uniform_token",
    "entropy_anchor_init",
    "entropy_anchor",
    "uniform_anchor",
)
_FORMATS.update(dict.fromkeys(ENTROPY_KEYS, "{:.3f}"))


def _display(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numbers as the tables show them (params in M to 3 decimals, GMACs to 4 digits, ...), and the cells of
    the intervals: ``top1_ci`` (top-1 [95% interval]), ``seeds_shown``, ``vs_ref_shown``, ``vs_deit_shown``."""
    out = []
    for r in rows:
        shown = dict(r)
        for key, fmt in _FORMATS.items():
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
                shown[key] = fmt.format(r[key])
        shown["top1_ci"], shown["seeds_shown"] = top1_cell(r), seeds_cell(r)
        shown["vs_ref_shown"], shown["vs_deit_shown"] = diff_cell(r.get("vs_ref")), diff_cell(r.get("vs_deit"))
        out.append(shown)
    return out


def e1_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E1 table (no heading): model, ⚗, M, params, GMACs, top-1/5, the paper's top-1."""
    return markdown_table(
        _display(rows),
        [
            "label",
            "distill",
            "num_anchors",
            "params_m",
            "gmacs",
            "top1_ci",
            "seeds_shown",
            "vs_deit_shown",
            "top5",
            "paper_top1",
        ],
        [
            "model",
            "⚗",
            "M",
            "params (M)",
            "GMACs",
            "top-1 [95% CI]",
            "seeds: top-1 each",
            "− DeiT (paired)",
            "top-5",
            "paper top-1 (ImageNet-1k)",
        ],
    )


def e2_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E2 table (no heading): one row per anchor count M."""
    return markdown_table(
        _display(rows),
        ["num_anchors", "params_m", "gmacs", "top1_ci", "vs_ref_shown", "top5", "paper_top1"],
        ["M", "params (M)", "GMACs", "top-1 [95% CI]", "− default M (paired)", "top-5", "paper top-1"],
    )


def e3_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E3 table (no heading): the method, then each design ablation."""
    return markdown_table(
        _display(rows),
        ["variant", "num_anchors", "params_m", "gmacs", "top1_ci", "vs_ref_shown", "top5", "paper_top1"],
        ["variant", "M", "params (M)", "GMACs", "top-1 [95% CI]", "− the method (paired)", "top-5", "paper top-1"],
    )


def e9_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The E9 table (no heading): top-1, its difference to DeiT-T, GMACs, and the mean entropies over
    layers at the start → the end of training against uniform (ln N, ln M)."""
    shown = _display(rows)
    for r in shown:
        for kind in ("token", "anchor"):
            start, end = r.get(f"entropy_{kind}_init"), r.get(f"entropy_{kind}")
            r[f"h_{kind}"] = "—" if end is None else f"{start} → {end}"
    return markdown_table(
        shown,
        [
            "variant",
            "top1_ci",
            "seeds_shown",
            "vs_ref_shown",
            "vs_deit_shown",
            "gmacs",
            "h_token",
            "uniform_token",
            "h_anchor",
            "uniform_anchor",
        ],
        [
            "variant",
            "top-1 [95% CI]",
            "seeds: top-1 each",
            "− official (paired)",
            "− DeiT-T (paired)",
            "GMACs",
            "H p(token \\| anchor) start → end",
            "ln N",
            "H p(anchor \\| token) start → end",
            "ln M",
        ],
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
            "\n## E9: the anchors' initialisation, temperature and learning rate (AnchorFormer-T)\n\n",
            e9_markdown(tables.get("e9", [])),
            "\n" + e9_verdict(tables.get("e9", [])) + "\n",
            "\n## E10: AnchorFormer among its peers (T size, the E1 recipe)\n\n",
            e10_markdown(tables.get("e10", [])),
            "\n" + e10_verdict(tables.get("e10", [])) + "\n",
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


def _errors(rows: Sequence[dict[str, Any]]) -> Any:
    """(2, n) distances from each row's top-1 down to ``top1_lo`` and up to ``top1_hi`` (0 without an interval),
    for matplotlib's ``xerr``/``yerr``."""
    lower = [r["top1"] - r["top1_lo"] if r.get("top1_lo") is not None else 0.0 for r in rows]
    upper = [r["top1_hi"] - r["top1"] if r.get("top1_hi") is not None else 0.0 for r in rows]
    return [lower, upper]


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
            ax.errorbar(
                [r["gmacs"] for r in rows],
                [r["top1"] for r in rows],
                yerr=_errors(rows),
                capsize=3,
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
    ax.errorbar(m, [r["top1"] for r in rows], yerr=_errors(rows), fmt="o-", capsize=3, color="C0", label="top-1")
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
    ax.barh(
        range(len(values)),
        values,
        xerr=_errors([r for r in e3_rows]) if all(r.get("top1") is not None for r in e3_rows) else None,
        capsize=3,
        color=["C0"] + ["C7"] * (len(values) - 1),
    )
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title)
    return fig


def plot_e9_top1(
    e9_rows: Sequence[dict[str, Any]], title: str = "E9: the anchors' initialisation, temperature, lr"
) -> Any:
    """Horizontal bars of top-1 per E9 row: DeiT-T (orange, its top-1 also a dashed line), the
    official AnchorFormer-T (blue), the variants (grey)."""
    rows = [r for r in e9_rows if r.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(rows), 1) + 1.2))
    colors = {"reference": "C1", "official": "C0"}
    values = [r["top1"] for r in rows]
    ax.barh(
        range(len(rows)), values, xerr=_errors(rows), capsize=3, color=[colors.get(r.get("role"), "C7") for r in rows]
    )
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    deit = next((r["top1"] for r in rows if r.get("role") == "reference"), None)
    if deit is not None:
        ax.axvline(deit, color="C1", linestyle="--", linewidth=1)
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title)
    return fig


def plot_e10_top1(e10_rows: Sequence[dict[str, Any]], title: str = "E10: AnchorFormer among its peers (T)") -> Any:
    """Horizontal bars of top-1 (mean over seeds) per E10 row with its 95% interval as error bars: DeiT-T
    (orange), AnchorFormer-T (blue: official, then the ×10 anchor learning rate), the peers (grey)."""
    rows = [r for r in e10_rows if r.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(rows), 1) + 1.2))
    colors = {"reference": "C1", "official": "C0", "anchorformer": "C0"}
    values = [r["top1"] for r in rows]
    ax.barh(
        range(len(rows)), values, xerr=_errors(rows), capsize=3, color=[colors.get(r.get("role"), "C7") for r in rows]
    )
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ax.text(r.get("top1_hi") or r["top1"], i, f" {r['top1']:.1f}", va="center", fontsize=8)
    ax.set_xlabel("top-1 (%), mean over seeds; bars: 95% interval")
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
        losses = [h["train_loss"] for h in hist]
        ax1.plot([h["epoch"] for h in hist], losses, "o-", markersize=3, label=label, color=f"C{i % 10}")
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


def plot_entropy_curves(runs: Sequence[dict[str, Any]], title: str = "Attention entropy through training") -> Any:
    """Per epoch, the mean over layers of the entropy of p(token | anchor) (AnchorFormer; softmax
    attention: p(token | token), dashed) and of p(anchor | token), with the uniform values ln N and
    ln M as grey lines; epoch 0 is the initialisation. Runs without entropies are left out."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    uniform: dict[str, float] = {}
    for i, run in enumerate(r for r in runs if (r.get("entropy") or {}).get("final")):
        e = run["entropy"]
        hist = [h for h in run.get("history") or [] if any(k.startswith("entropy/") for k in h)]
        label = Path(str(run.get("run", i))).name
        color = f"C{i % 10}"
        uniform.update(e.get("uniform") or {})
        softmax = "token_given_token" in (e.get("uniform") or {})
        token = "token_given_token" if softmax else "token_given_anchor"
        epochs = [0] + [h["epoch"] for h in hist]
        init = e.get("init") or {}
        ys = [init.get(f"{token}/mean")] + [h.get(f"entropy/{token}/mean") for h in hist]
        ax1.plot(epochs, ys, "--" if softmax else "-", marker="o", markersize=3, color=color, label=label)
        if not softmax:
            ys = [init.get("anchor_given_token/mean")] + [h.get("entropy/anchor_given_token/mean") for h in hist]
            ax2.plot(epochs, ys, "-", marker="o", markersize=3, color=color, label=label)
    for ax, key, name in ((ax1, "token_given_anchor", "ln N"), (ax2, "anchor_given_token", "ln M")):
        value = uniform.get(key, uniform.get("token_given_token") if key == "token_given_anchor" else None)
        if value is not None:
            ax.axhline(value, color="0.5", linewidth=1, linestyle=":")
            ax.annotate(
                f"uniform: {name} = {value:.3f}", (0, value), textcoords="offset points", xytext=(2, 3), fontsize=7
            )
        ax.set_xlabel("epoch (0: initialisation)")
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("mean entropy over layers (nats)")
    ax1.set_title("p(token | anchor); DeiT (dashed): p(token | token)", fontsize=9)
    ax2.set_title("p(anchor | token)", fontsize=9)
    ax1.legend(fontsize=7)  # every run, DeiT included
    fig.suptitle(title)
    return fig
