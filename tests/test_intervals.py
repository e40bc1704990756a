"""Top-1 intervals: the bootstrap against closed forms, the verdict rule, predictions.json, seeds and pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cls_helpers import TINY, make_tiny_imagefolder

from anchorformer.tasks.classification import intervals
from anchorformer.tasks.classification.results import (
    attach_intervals,
    e1_table,
    e9_table,
    e9_verdict,
    e10_markdown,
    e10_table,
    e10_verdict,
    load_runs,
    plot_e10_top1,
)


def _flags(n: int, k: int, seed: int = 0) -> np.ndarray:
    """n flags with exactly k ones, shuffled."""
    flags = np.zeros(n, dtype=bool)
    flags[:k] = True
    return np.random.default_rng(seed).permutation(flags)


def test_one_run_matches_the_binomial_interval():
    n, k = 400, 320  # 80%
    ci = intervals.bootstrap_top1([_flags(n, k)])
    half = 1.959964 * math.sqrt(0.8 * 0.2 / n) * 100  # Wald: 3.92 points
    assert ci["top1"] == pytest.approx(80.0)
    assert ci["seeds"] == 1 and ci["spread"] is None
    assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(half, rel=0.1)
    assert ci["lo"] < 80.0 < ci["hi"]
    lo, hi = intervals.wilson_interval(80.0, n)
    assert (ci["lo"], ci["hi"]) == pytest.approx((lo, hi), abs=1.0)


def test_wilson_closed_form():
    # 180 of 200 correct: the Wilson score interval, written out here with z = 1.959964
    z, n, p = 1.959964, 200, 0.9
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert intervals.wilson_interval(90.0, n) == pytest.approx((100 * (centre - half), 100 * (centre + half)), abs=1e-4)
    with pytest.raises(ValueError, match="n must be positive"):
        intervals.wilson_interval(90.0, 0)


def test_paired_difference_matches_the_closed_form():
    # a and b agree on most images: the paired SD is sqrt(var(d) / N), d = a - b per image
    n = 500
    rng = np.random.default_rng(1)
    b = rng.random(n) < 0.8
    a = b.copy()
    flip = rng.choice(n, 60, replace=False)
    a[flip[:45]] = True
    a[flip[45:]] = False
    d = a.astype(float) - b.astype(float)
    sd = math.sqrt(d.var() / n) * 100
    out = intervals.paired_difference([a], [b])
    assert out["diff"] == pytest.approx(100 * d.mean())
    assert (out["hi"] - out["lo"]) / 2 == pytest.approx(1.959964 * sd, rel=0.12)
    # pairing matters: the unpaired intervals of a and b are much wider than the paired one
    ca, cb = intervals.bootstrap_top1([a]), intervals.bootstrap_top1([b])
    assert (out["hi"] - out["lo"]) < 0.6 * ((ca["hi"] - ca["lo"]) + (cb["hi"] - cb["lo"])) / 2
    assert out["rel"] == pytest.approx(100 * (a.mean() - b.mean()) / b.mean())
    assert out["rel_lo"] < out["rel"] < out["rel_hi"]


def test_verdict_rule():
    assert intervals.decide(0.5, 3.0) == "higher"
    assert intervals.decide(-3.0, -0.1) == "lower"
    assert intervals.decide(-1.0, 2.0) == "not distinguishable"
    assert intervals.decide(None, None) == "no interval"
    same = _flags(200, 150)
    assert intervals.paired_difference([same], [same])["verdict"] == "not distinguishable"
    better = same | _flags(200, 120, seed=3)
    assert intervals.paired_difference([better], [same])["verdict"] == "higher"


def test_seeds_widen_the_interval_and_agreeing_seeds_do_not():
    one = _flags(300, 240)
    single = intervals.bootstrap_top1([one])
    same = intervals.bootstrap_top1([one, one, one])
    assert (same["lo"], same["hi"]) == pytest.approx((single["lo"], single["hi"]))
    assert same["spread"] == 0.0
    apart = intervals.bootstrap_top1([_flags(300, 210, 1), _flags(300, 240, 2), _flags(300, 270, 3)])
    assert apart["top1"] == pytest.approx(80.0)
    assert apart["per_seed"] == pytest.approx([70.0, 80.0, 90.0])
    assert apart["spread"] == pytest.approx(10.0)
    assert apart["hi"] - apart["lo"] > 1.5 * (single["hi"] - single["lo"])
    assert intervals.bootstrap_top1([one], seed=5) == intervals.bootstrap_top1([one], seed=5)  # deterministic
    with pytest.raises(ValueError, match="different numbers of images"):
        intervals.bootstrap_top1([one, one[:-1]])


def test_predictions_file_round_trip_and_errors(tmp_path):
    rec = intervals.predictions_record([True, False, True], ["a/1.png", "a/2.png", "b/1.png"])
    assert rec["correct"] == "101" and rec["images"] == 3
    (tmp_path / "predictions.json").write_text(json.dumps(rec))
    back = intervals.read_predictions(tmp_path)
    assert back["correct"].tolist() == [True, False, True]
    assert back["files_sha256"] == intervals.file_list_sha256(["a/1.png", "a/2.png", "b/1.png"])
    assert intervals.read_predictions(tmp_path / "none") is None
    with pytest.raises(ValueError, match="3 correctness flags for 2 evaluated files"):
        intervals.predictions_record([True, False, True], ["a", "b"])
    (tmp_path / "predictions.json").write_text(json.dumps({**rec, "correct": "10"}))
    with pytest.raises(ValueError, match=r"predictions.json: 'correct' must be 3 characters"):
        intervals.read_predictions(tmp_path)


def test_training_writes_per_image_predictions(tmp_path):
    from anchorformer.tasks.classification.train import train

    root = make_tiny_imagefolder(tmp_path / "data")
    metrics = train(root, tmp_path / "run", "anchorformer_tiny_patch16_224", profile="mini", overrides=TINY, epochs=1)
    pred = intervals.read_predictions(tmp_path / "run")
    assert len(pred["correct"]) == metrics["val_images"] == 12
    assert 100.0 * pred["correct"].mean() == pytest.approx(metrics["top1"])
    files = sorted(p.relative_to(root / "val").as_posix() for p in (root / "val").rglob("*.png"))
    assert pred["files_sha256"] == intervals.file_list_sha256(files)


# --- tables: seeds found by configuration, paired differences, E9 and E10 verdicts -------------------------


def _run(folder, model, flags, seed=0, files="v1", **cfg):
    folder.mkdir(parents=True)
    config = {"profile": "mini", "anchor_mode": "learned", "normalize": True, "per_head_anchors": False, "seed": seed}
    config.update(cfg)
    top1 = 100.0 * float(np.mean(flags))
    m = 16 if model.startswith("anchorformer") else None
    metrics = {"model": model, "top1": top1, "top5": 99.0, "params_m": 0.4, "gmacs": 0.03, "num_anchors": m}
    metrics.update(num_classes=10, val_images=len(flags), config=config)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rec = intervals.predictions_record(flags, [f"{files}/{i}" for i in range(len(flags))])
    (folder / "predictions.json").write_text(json.dumps(rec))


@pytest.fixture()
def outputs(tmp_path):
    n = 200
    af, deit = "anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"
    _run(tmp_path / "e1" / af, af, _flags(n, 170, 0))
    _run(tmp_path / "e1" / deit, deit, _flags(n, 196, 1))
    _run(tmp_path / "e9" / "anchor_lr_x10", af, _flags(n, 186, 2), anchor_lr_mult=10.0)
    _run(tmp_path / "e9" / "unit_init", af, _flags(n, 172, 3), anchor_init="unit")
    _run(tmp_path / "e10" / "agent_deit_tiny_patch16_224", "agent_deit_tiny_patch16_224", _flags(n, 180, 4))
    for seed, (a, d, x) in ((1, (171, 197, 181)), (2, (173, 199, 185))):
        _run(tmp_path / "seeds" / "af" / f"seed{seed}", af, _flags(n, a, 10 + seed), seed=seed)
        _run(tmp_path / "seeds" / "deit" / f"seed{seed}", deit, _flags(n, d, 20 + seed), seed=seed)
        _run(tmp_path / "seeds" / "x10" / f"seed{seed}", af, _flags(n, x, 30 + seed), seed=seed, anchor_lr_mult=10.0)
    return tmp_path


def _tables(out):
    e1 = load_runs([out / "e1"])
    e9 = load_runs([out / "e9"])
    return {
        "e1": e1_table(e1),
        "e9": e9_table(e9, baseline=e1),
        "e10": e10_table(load_runs([out / "e10"]), baseline=e1, e9_runs=e9),
    }


def test_attach_intervals_pairs_seeds_and_rows(outputs):
    tables = attach_intervals(_tables(outputs), load_runs([outputs / "seeds" / k for k in ("af", "deit", "x10")]))
    af = next(r for r in tables["e1"] if r["family"] == "AnchorFormer")
    assert af["seeds"] == 3 and af["per_seed"] == pytest.approx([85.0, 85.5, 86.5])
    assert af["top1"] == pytest.approx(np.mean([85.0, 85.5, 86.5]))
    assert af["top1_lo"] < af["top1"] < af["top1_hi"]
    assert af["vs_deit"]["verdict"] == "lower" and af["vs_deit"]["diff"] == pytest.approx(85.667 - 98.667, abs=0.01)
    unit = next(r for r in tables["e9"] if r["anchor_init"] == "unit")
    assert unit["seeds"] == 1 and unit["vs_ref"]["verdict"] == "not distinguishable"
    assert [r["role"] for r in tables["e10"]] == ["reference", "official", "anchorformer", "peer"]
    x10 = tables["e10"][2]
    assert x10["seeds"] == 3 and x10["vs_ref"]["verdict"] == "higher"
    verdict = e9_verdict(tables["e9"])
    assert "Above the official initialisation by the rule: official anchors U(-1/√D, 1/√D), anchor lr ×10" in verdict
    assert "Every variant stays below DeiT-T by the rule" in verdict
    table = e10_markdown(tables["e10"])
    assert "| Agent-T | 90.0 [" in table
    assert "3: 93.0 / 90.5 / 92.5" in table
    assert "Agent-T +4.3 [" in e10_verdict(tables["e10"])
    plot_e10_top1(tables["e10"])


def test_attach_intervals_refuses_other_images(outputs):
    af = "anchorformer_tiny_patch16_224"
    _run(outputs / "seeds" / "bad" / "seed1", af, _flags(200, 170, 9), seed=1, files="other")
    with pytest.raises(ValueError, match="evaluated on different validation images"):
        attach_intervals(_tables(outputs), load_runs([outputs / "seeds" / "bad"]))


def test_runs_without_predictions_get_wilson_and_no_paired_interval(outputs):
    for p in outputs.rglob("predictions.json"):
        p.unlink()
    tables = attach_intervals(_tables(outputs))
    af = next(r for r in tables["e1"] if r["family"] == "AnchorFormer")
    assert (af["top1_lo"], af["top1_hi"]) == pytest.approx(intervals.wilson_interval(85.0, 200))
    assert af["interval"] == "wilson" and af["vs_deit"]["verdict"] == "no interval"
    assert "no paired interval" in e9_verdict(tables["e9"])


def test_the_seeded_rows_are_those_a_verdict_rests_on():
    """params.yaml: E1's T pair, E9's official and best (anchor_lr_x10) rows and every E10 model run with
    every extra seed; seed 0 is each experiment's own run, so no seed list repeats it."""
    from pathlib import Path

    import yaml

    from anchorformer.engine.recipe import split_overrides

    cls = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text(encoding="utf-8"))["cls"]
    assert cls["seeds"] and 0 not in cls["seeds"] and len(set(cls["seeds"])) == len(cls["seeds"]) == 2
    seeded = {(r["model"], tuple(split_overrides(r["overrides"]))) for r in cls["seeded"]}
    names = [r["name"] for r in cls["seeded"]]
    assert len(set(names)) == len(names)
    want = {("anchorformer_tiny_patch16_224", ()), ("deit_tiny_patch16_224", ())}
    want.add((cls["e9"]["model"], tuple(split_overrides(cls["e9"]["variants"]["anchor_lr_x10"]))))
    want |= {(m, ()) for m in cls["e10"]["models"]}
    assert seeded == want
    assert all("_tiny_" in m for m in cls["e10"]["models"]) and len(cls["e10"]["models"]) == 4


def test_gather_puts_each_shard_back_in_dataset_order():
    """Rank r evaluates images r, r + world, ...: its flags land there (the other ranks' add up by all-reduce)."""
    import torch

    from anchorformer.engine.distributed import DistInfo
    from anchorformer.tasks.classification.train import _gather_correct

    cpu = torch.device("cpu")
    shards = {0: [True, False, True], 1: [False, True, True]}  # 6 images over 2 processes
    parts = [
        _gather_correct(torch.tensor(flags), 6, DistInfo(rank, 2, rank, cpu, rank == 0, False)).tolist()
        for rank, flags in shards.items()
    ]
    assert parts[0] == [True, False, False, False, True, False]
    assert parts[1] == [False, False, False, True, False, True]
    assert [a or b for a, b in zip(*parts, strict=True)] == [True, False, False, True, True, True]


def test_report_e10_section_from_the_runs_without_timings(outputs, tmp_path_factory):
    """The report rebuilds E10 and the intervals from the runs (no classification.json) and reads no timing."""
    from anchorformer.report import build_report

    out = tmp_path_factory.mktemp("report") / "outputs"
    out.mkdir()
    (out / "cls").symlink_to(outputs, target_is_directory=True)
    (out / "bench").mkdir()
    row = {"model": "agent_deit_tiny_patch16_224", "img_size": 224, "mode": "infer", "median_ms": 777.125}
    (out / "bench" / "bench.json").write_text(json.dumps({"models": [row]}))
    text = build_report(out, out.parent / "reports" / "report.md", profile="mini")["markdown"].read_text()
    e10 = text.split("## E10 · AnchorFormer among its peers (T size, the E1 recipe)\n", 1)[1].split("\n## ", 1)[0]
    assert "| Agent-T | 90.0 [" in e10 and "**Verdict.**" in e10 and "777.1" not in text
    assert "../outputs/bench/bench.md" in e10
    assert text.count("**Rule:**") == 1
    trained = text.split("### Trained pairs (profile mini)\n", 1)[1].split("\n### ", 1)[0]
    assert "| T | lower" not in trained and "not supported" in trained  # AnchorFormer-T 85.7 vs DeiT-T 98.7
