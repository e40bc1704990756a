"""The README's GPU-hours table of the full profile, computed from measurements so that it cannot drift.

Source of the per-image training times, in this order:

1. the newest ``benchmarks/results/step_costs_cuda_*.json`` (``benchmarks/dry_runs.sh cuda``):
   every standard model's training step at its recipe's per-device batch, measured; the table
   names that GPU;
2. otherwise an estimate from the newest CUDA model benchmark ``benchmarks/results/<GPU>_*.json``
   (``benchmarks/gpu.sh``: training steps of AnchorFormer and DeiT T/S at 224², 512² and 1024²),
   with the assumptions the table states: a recipe's per-device batch trains at the per-image
   time measured at the benchmark's batch; pyramids and heads run at the MAC rate of DeiT-T's
   training step at that size (the densest workload measured); DeiT's teacher forward runs at
   DeiT-S's MAC rate.

The workload is the full recipes' (``anchorformer/configs``) and the runs are ``params.yaml``'s:
classification epochs x 1,281,167 images; detection epochs x 118,287 images; segmentation
iterations x the global batch. Data loading is assumed to keep up (GPU compute only).

Usage: python benchmarks/cost_table.py [--check | --write]   (the README between its markers)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- cost-table: benchmarks/cost_table.py --write -->", "<!-- /cost-table -->"
NODE_GPUS = 8
TEACHER_GMACS = 15.9  # RegNetY-16GF at 224² (DeiT's teacher), forward
HEAD_GMACS_DET = 200.0  # Mask R-CNN pyramid, RPN and RoI heads per 1333x800 image (README's count)
SIZES = {"tiny": "T", "small": "S"}


def _family_size(model: str) -> tuple[str, str]:
    family = "AnchorFormer" if model.startswith("anchorformer") else "DeiT"
    return family, next(v for k, v in SIZES.items() if f"_{k}_" in model)


def newest(pattern: str, results: Path = RESULTS) -> Path | None:
    """The newest file of ``pattern`` in ``results`` by the date in its name (YYYYMMDD), then name."""
    files = sorted(results.glob(pattern), key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name))
    return files[-1] if files else None


def _gpu_benchmark(results: Path) -> Path:
    files = [p for p in results.glob("*_[0-9]*.json") if not p.name.startswith(("cpu_", "step_costs_", "dry_runs_"))]
    files = [p for p in files if json.loads(p.read_text()).get("environment", {}).get("device_type") == "cuda"]
    if not files:
        raise FileNotFoundError(f"no CUDA measurement in {results}: run benchmarks/dry_runs.sh cuda")
    return sorted(files, key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name))[-1]


def _workload(params: dict[str, Any]) -> dict[str, Any]:
    from anchorformer.data.verify import FULL_COUNTS
    from anchorformer.tasks.classification.train import resolve_recipe as cls_recipe
    from anchorformer.tasks.detection.train import detector_config
    from anchorformer.tasks.detection.train import resolve_recipe as det_recipe
    from anchorformer.tasks.segmentation.train import resolve_recipe as seg_recipe

    det_cfg = det_recipe(profile="full")
    det_runs = {}
    for run, spec in params["det"]["runs"].items():
        overrides = [f"match_macs_of={spec['match_macs_of']}"] if spec.get("match_macs_of") else []
        info = detector_config(det_recipe(profile="full", model=spec["backbone"], overrides=overrides), 80)[1]
        det_runs[run] = {
            "backbone": spec["backbone"],
            "scale": info["input_scale"],
            "gmacs": info["backbone_gmacs"],
            "gmacs_full": info["backbone_gmacs_full"],
            "windowed": "window" in str(spec.get("overrides", "")),
        }
    seg = {h: seg_recipe(profile="full", head=h) for h in ("fpn", "upernet")}
    return {
        "cls_images": int(cls_recipe(profile="full").epochs) * FULL_COUNTS["imagenet"]["train"],
        "cls_epochs": int(cls_recipe(profile="full").epochs),
        "det_images": int(det_cfg.epochs) * FULL_COUNTS["coco"]["train"],
        "det_epochs": int(det_cfg.epochs),
        "det_runs": det_runs,
        "seg_crops": {h: int(c.iters) * int(c.batch_size) for h, c in seg.items()},
        "seg_iters": {h: int(c.iters) for h, c in seg.items()},
    }


def _measured(path: Path) -> tuple[dict[Any, float], dict[Any, float | None], str]:
    doc = json.loads(path.read_text())
    if doc.get("tiny"):
        raise ValueError(f"{path}: the tiny form measures no cost")
    per, mem = {}, {}
    for r in doc["runs"]:
        if r["status"] != "ok":
            continue
        key = ("teacher",) if r["name"] == "teacher forward" else (r["task"], r["name"])
        per[key] = r["step_ms"] / 1e3 / r["batch"]
        mem[key] = r.get("peak_memory_gb")
    env = doc["environment"]
    note = (
        f"Measured on one {env['device']} ({path.relative_to(ROOT).as_posix()}, {doc['dtype']}, median of "
        f"{doc['steps']} steps at each recipe's per-device batch), data loading assumed to keep up."
    )
    return per, mem, note


def _estimated(path: Path) -> tuple[dict[Any, float], dict[Any, float | None], str]:
    """Per-image seconds from a model benchmark's train rows, with the assumptions stated in the note."""

    doc = json.loads(path.read_text())
    rows = {(m["family"], m["size"], m["img_size"]): m for m in doc["models"] if m["mode"] == "train" and m["status"] == "ok"}  # fmt: skip
    per: dict[Any, float] = {}

    def t(family: str, size: str, img: int) -> float:
        m = rows[(family, size, img)]
        return m["median_ms"] / 1e3 / m["batch"]

    def rate(family: str, size: str, img: int) -> float:  # MAC/s of a training step (3x the forward MACs)
        m = rows[(family, size, img)]
        return 3 * m["gmacs"] * 1e9 / t(family, size, img)

    for model in ("anchorformer_tiny_patch16_224", "deit_tiny_patch16_224", "anchorformer_small_patch16_224", "deit_small_patch16_224"):  # fmt: skip
        per[("cls", model)] = t(*_family_size(model), 224)
    per[("teacher",)] = TEACHER_GMACS * 1e9 / rate("DeiT", "S", 224)
    for model in ("anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"):
        family, size = _family_size(model)
        per[("det", model)] = (t(family, size, 1024), rows[(family, size, 1024)]["gmacs"], rate("DeiT", "T", 1024))
    complexity = json.loads((ROOT / "outputs" / "seg" / "summary" / "complexity.json").read_text())
    for row in complexity:
        family, size = _family_size(row["backbone"])
        heads = max(0.0, row["gmacs"] - rows[(family, size, 512)]["gmacs"])
        per[("seg", f"{row['backbone']}:{row['head']}")] = t(family, size, 512) + 3 * heads * 1e9 / rate(
            "DeiT", "T", 512
        )
    env = doc["environment"]
    fmt = lambda f, s, i: f"{rows[(f, s, i)]['median_ms']:.1f} ms"  # noqa: E731
    note = (
        f"**An estimate, not a measurement** (no `step_costs_cuda_*.json` yet: run `benchmarks/dry_runs.sh cuda`, then "
        f"`python benchmarks/cost_table.py --write`). Per-image training times from the {env['device']} model benchmark "
        f"({path.relative_to(ROOT).as_posix()}, {doc['config']['dtype']}, one training step at batch "
        f"{doc['config']['model_batch']} at 224²): AnchorFormer-T {fmt('AnchorFormer', 'T', 224)}, DeiT-T "
        f"{fmt('DeiT', 'T', 224)}, AnchorFormer-S {fmt('AnchorFormer', 'S', 224)}, DeiT-S {fmt('DeiT', 'S', 224)} "
        f"a step (the distilled variants, M {doc['config']['model_anchors']}). Assumed: the recipes' per-device batches "
        f"train at those per-image times; detection at 1333x800 as the backbone's 1024² training step (batch "
        f"{rows[('DeiT', 'T', 1024)]['batch']}) scaled by its GMACs at 1333x800, plus {HEAD_GMACS_DET:.0f} GMACs of "
        f"pyramid and heads per image (scaled by the input's area) at the MAC rate of DeiT-T's 1024² training step, "
        f"without the RoI operators' and Python's overhead; segmentation as the backbone's 512² step plus the "
        f"pyramid's and head's GMACs (outputs/seg/summary/complexity.json less the backbone's) at DeiT-T's 512² rate; "
        f"the teacher's forward ({TEACHER_GMACS} GMACs) at DeiT-S's 224² training MAC rate; the windowed DeiT-T as "
        f"the global one (an upper bound); data loading keeps up."
    )
    return per, {}, note


def _det_seconds(per: dict[Any, Any], run: dict[str, Any], measured: bool) -> float:
    key = ("det", run["backbone"])
    if measured:  # measured at full size; a matched (scaled) input costs its share of the MACs
        full, heads = run["gmacs_full"], HEAD_GMACS_DET
        return per[key] * (run["gmacs"] + heads * run["scale"] ** 2) / (full + heads)
    t1024, g1024, rate = per[key]
    return t1024 * run["gmacs"] / g1024 + 3 * HEAD_GMACS_DET * run["scale"] ** 2 * 1e9 / rate


def build_table(results: Path = RESULTS, params_file: Path = ROOT / "params.yaml") -> str:
    """The Markdown block (note, table, total) the README holds between its markers."""
    params = yaml.safe_load(params_file.read_text())
    work = _workload(params)
    source = newest("step_costs_cuda_*.json", results)
    measured = source is not None
    per, mem, note = _measured(source) if measured else _estimated(_gpu_benchmark(results))
    t_cls = lambda m: per[("cls", m)] * work["cls_images"]  # noqa: E731
    teacher = per[("teacher",)] * work["cls_images"]
    c = params["cls"]
    t_tiny = "anchorformer_tiny_patch16_224"
    rows: list[tuple[str, int, str, float, Any]] = []  # stage, runs, workload, GPU-seconds per run, memory
    for m in c["e1"]["models"]:
        family, size = _family_size(m)
        rows.append((f"`cls-e1` {family}-{size}", 1, f"{work['cls_epochs']} epochs", t_cls(m), mem.get(("cls", m))))
    for m in c["e1"]["distilled_models"]:
        base = m.replace("_distilled", "")
        family, size = _family_size(base)
        rows.append((f"`cls-e1-distilled` {family}-{size} ⚗", 1, f"{work['cls_epochs']} epochs", t_cls(base) + teacher, None))  # fmt: skip
    n_t = len(c["e2"]["anchors"]) + len(c["e3"]["variants"]) + len(c["e9"]["variants"])
    rows.append(("`cls-e2`, `cls-e3`, `cls-e9` (AnchorFormer-T)", n_t, f"{work['cls_epochs']} epochs", t_cls(t_tiny), mem.get(("cls", t_tiny))))  # fmt: skip
    # E10's peers and the extra seeds: the peers have no measured rate of their own here; they are
    # counted at DeiT-T's (their MACs are within a few percent of it at 224²)
    deit_t = "deit_tiny_patch16_224"
    t_row = lambda m: t_cls(m) if ("cls", m) in per else t_cls(deit_t)  # noqa: E731
    peers = list((c.get("e10") or {}).get("models") or [])
    if peers:
        rows.append(("`cls-e10` (T peers, at DeiT-T's rate)", len(peers), f"{work['cls_epochs']} epochs", t_cls(deit_t), None))  # fmt: skip
    seeded, seeds = list(c.get("seeded") or []), list(c.get("seeds") or [])
    if seeded and seeds:
        mean = sum(t_row(r["model"]) for r in seeded) / len(seeded)
        rows.append(("`cls-seeds` (the seeded rows' other seeds, mean run)", len(seeded) * len(seeds), f"{work['cls_epochs']} epochs", mean, None))  # fmt: skip
    for run, spec in work["det_runs"].items():
        seconds = _det_seconds(per, spec, measured) * work["det_images"]
        rows.append((f"`det@{run}`", 1, f"{work['det_epochs']} epochs", seconds, mem.get(("det", spec["backbone"]))))
    for run, spec in params["seg"]["runs"].items():
        key = ("seg", f"{spec['backbone']}:{spec['head']}")
        seconds = per[key] * work["seg_crops"][spec["head"]]
        rows.append(
            (f"`seg@{run}`", 1, f"{work['seg_iters'][spec['head']] // 1000}k iterations", seconds, mem.get(key))
        )
    lines = [
        note,
        "",
        f"| stage | runs | schedule | GPU-hours per run | one {NODE_GPUS}-GPU node, hours per run | peak memory per GPU |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for stage, n, schedule, seconds, gb in rows:
        hours = seconds / 3600
        total += n * hours
        memory = f"{gb:.1f} GB" if gb is not None else "not measured"
        lines.append(f"| {stage} | {n} | {schedule} | {hours:,.0f} | {hours / NODE_GPUS:,.1f} | {memory} |")
    lines += [
        "",
        f"In all {total:,.0f} GPU-hours: {total / NODE_GPUS / 24:,.1f} days of one {NODE_GPUS}-GPU node"
        + (" (measured rates)." if measured else " (estimate)."),
    ]
    return "\n".join(lines)


def readme_block(readme: Path = README) -> str:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no cost table markers ({BEGIN} ... {END})")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 when the README's table differs")
    g.add_argument("--write", action="store_true", help="write the table into the README")
    args = p.parse_args(argv)
    table = build_table()
    if args.write:
        text = README.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        README.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    elif args.check:
        if readme_block() != table:
            print("README.md: the GPU-hours table differs: python benchmarks/cost_table.py --write", file=sys.stderr)
            return 1
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
