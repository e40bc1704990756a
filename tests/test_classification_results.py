"""The E1/E2/E3 tables: run description, paper references, baseline reuse, files and figures."""

from __future__ import annotations

import json
import math

import pytest

from anchorformer.tasks.classification.results import (
    NOT_PUBLIC,
    describe_run,
    e1_table,
    e2_table,
    e3_table,
    e9_curve_runs,
    e9_markdown,
    e9_table,
    e9_verdict,
    load_runs,
    plot_accuracy_vs_gmacs,
    plot_anchor_ablation,
    plot_design_ablation,
    plot_e9_top1,
    plot_entropy_curves,
    plot_training_curves,
    tables_markdown,
    write_results,
)
from anchorformer.viz import save_figure


def _run(folder, model, top1, m=None, entropy=None, **cfg):
    folder.mkdir(parents=True)
    config = {"profile": "mini", "anchor_mode": "learned", "normalize": True, "per_head_anchors": False, **cfg}
    metrics = {"model": model, "top1": top1, "top5": 99.0, "params_m": 0.4, "gmacs": 0.03}
    metrics.update(num_anchors=m, num_classes=10, config=config)
    if entropy is not None:
        metrics["entropy"] = entropy
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 2.0, "top1": top1}]))


@pytest.fixture()
def runs(tmp_path):
    _run(tmp_path / "e1" / "af_t", "anchorformer_tiny_patch16_224", 80.0, m=16)
    _run(tmp_path / "e1" / "deit_t", "deit_tiny_patch16_224", 70.0)
    _run(tmp_path / "e1" / "deit_t_d", "deit_tiny_distilled_patch16_224", 75.0)
    _run(tmp_path / "e1" / "af_s_d", "anchorformer_small_distilled_patch16_224", 85.0, m=16)
    _run(tmp_path / "e2" / "m4", "anchorformer_tiny_patch16_224", 60.0, m=4)
    _run(tmp_path / "e2" / "m32", "anchorformer_tiny_patch16_224", 82.0, m=32)
    _run(tmp_path / "e3" / "pooled", "anchorformer_tiny_patch16_224", 50.0, m=16, anchor_mode="pooled")
    _run(tmp_path / "e3" / "per_head", "anchorformer_tiny_patch16_224", 79.0, m=16, per_head_anchors=True)
    (tmp_path / "e2" / "unfinished").mkdir()  # a run without metrics.json is not a row
    return tmp_path


def test_describe_run():
    d = describe_run(
        {"model": "anchorformer_base_distilled_patch16_384", "num_anchors": 30, "config": {"profile": "full"}}
    )
    assert (d["family"], d["size"], d["distilled"], d["label"]) == ("AnchorFormer", "B↑384", True, "AnchorFormer-B↑384")
    d = describe_run({"model": "deit_small_patch16_224", "num_anchors": None, "config": {"profile": "mini"}})
    assert (d["family"], d["size"], d["distilled"], d["label"], d["num_anchors"]) == (
        "DeiT",
        "S",
        False,
        "DeiT-S (mini)",
        None,
    )


def test_tables(runs, tmp_path):
    e1_runs = load_runs([runs / "e1"])
    assert len(e1_runs) == 4 and all(r["history"] for r in e1_runs)
    e1 = e1_table(e1_runs)
    assert [(r["label"], r["distill"]) for r in e1] == [
        ("DeiT-T (mini)", ""),
        ("AnchorFormer-T (mini)", ""),
        ("DeiT-T (mini)", "⚗"),
        ("AnchorFormer-S (mini)", "⚗"),
    ]
    assert [r["paper_top1"] for r in e1] == [72.2, NOT_PUBLIC, 74.5, NOT_PUBLIC]

    e2 = e2_table(load_runs([runs / "e2"]), baseline=e1_runs)
    assert [(r["num_anchors"], r["top1"]) for r in e2] == [(4, 60.0), (16, 80.0), (32, 82.0)]

    e3 = e3_table(load_runs([runs / "e3"]), baseline=e1_runs)
    assert [r["variant"] for r in e3] == [
        "AnchorFormer (learned anchors, with Λ⁻¹, shared across heads)",
        "fixed anchors (pooled, detached), with Λ⁻¹, shared across heads",
        "learned anchors, with Λ⁻¹, per-head",
    ]
    tables = {"e1": e1, "e2": e2, "e3": e3}
    md = tables_markdown(tables)
    assert "| DeiT-T (mini) | ⚗ | — | 0.400 | 0.03 | 75.0 | 1 | — | 99.0 | 74.5 |" in md
    assert md.count(NOT_PUBLIC) >= 7
    paths = write_results(tmp_path / "out", tables)
    saved = json.loads(paths["json"].read_text())
    assert saved["e2"][1]["num_anchors"] == 16 and "history" not in saved["e1"][0]
    for name, fig in (
        ("acc", plot_accuracy_vs_gmacs(e1)),
        ("m", plot_anchor_ablation(e2)),
        ("e3", plot_design_ablation(e3)),
        ("curves", plot_training_curves(e1_runs)),
    ):
        (png, _svg) = save_figure(fig, tmp_path / "figs" / name)
        assert png.stat().st_size > 1000


def test_bad_metrics_file_is_named(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json"):
        load_runs([tmp_path])
    assert load_runs([tmp_path / "missing"]) == []


def _entropy(token, anchor=None, n=65, m=16):
    """A metrics.json ``entropy`` entry: means at init (uniform) and at the end."""
    if anchor is None:  # softmax attention
        uniform = {"token_given_token": round(math.log(n), 5)}
        return {"uniform": uniform, "init": {"token_given_token/mean": 4.0}, "final": {"token_given_token/mean": token}}
    uniform = {"token_given_anchor": round(math.log(n), 5), "anchor_given_token": round(math.log(m), 5)}
    init = {"token_given_anchor/mean": uniform["token_given_anchor"], "anchor_given_token/mean": 2.77}
    return {
        "uniform": uniform,
        "init": init,
        "final": {"token_given_anchor/mean": token, "anchor_given_token/mean": anchor},
    }


def _e9_runs(tmp_path, variants):
    _run(tmp_path / "e1" / "af_t", "anchorformer_tiny_patch16_224", 89.5, m=16, entropy=_entropy(3.7, 2.1))
    _run(tmp_path / "e1" / "deit_t", "deit_tiny_patch16_224", 97.5, entropy=_entropy(3.0))
    _run(tmp_path / "e1" / "af_s", "anchorformer_small_patch16_224", 93.0, m=16)
    for name, (top1, cfg) in variants.items():
        _run(tmp_path / "e9" / name, "anchorformer_tiny_patch16_224", top1, m=16, entropy=_entropy(3.5, 1.9), **cfg)
    return load_runs([tmp_path / "e1"]), load_runs([tmp_path / "e9"])


def test_e9_table_verdict_and_curves(tmp_path):
    e1, e9 = _e9_runs(
        tmp_path,
        {
            "lr": (91.0, {"anchor_lr_mult": 10.0}),
            "temp": (98.0, {"learn_temperature": True}),
            "kmeans": (90.0, {"anchor_init": "kmeans"}),
            "unit": (97.5, {"anchor_init": "unit"}),
        },
    )
    rows = e9_table(e9, baseline=e1)
    assert [r["role"] for r in rows] == ["reference", "official", "ablation", "ablation", "ablation", "ablation"]
    assert [r["variant"] for r in rows[1:]] == [
        "official anchors U(-1/√D, 1/√D) (E1)",
        "unit-norm anchors",
        "k-means anchors (first batch's qk)",
        "official anchors U(-1/√D, 1/√D), learned temperature",
        "official anchors U(-1/√D, 1/√D), anchor lr ×10",
    ]
    assert [r["gap_to_deit"] for r in rows] == [0.0, -8.0, 0.0, -7.5, 0.5, -6.5]
    assert rows[1]["entropy_token"] == 3.7 and rows[1]["uniform_anchor"] == round(math.log(16), 5)
    assert rows[0]["entropy_token"] == 3.0 and rows[0]["entropy_anchor"] is None
    verdict = e9_verdict(rows)
    assert (
        "DeiT-T reaches 97.5% top-1 and the official AnchorFormer-T 89.5% (-8.0 points; no paired interval" in verdict
    )
    assert "unit-norm anchors (97.5%); official anchors U(-1/√D, 1/√D), learned temperature (98.0%)" in verdict
    assert "keeps the official initialisation" in verdict
    table = e9_markdown(rows)
    assert "| unit-norm anchors | 97.5 | 1 | — | — | 0.03 | 4.174 → 3.500 | 4.174 | 2.770 → 1.900 | 2.773 |" in table
    assert "E9" in tables_markdown({"e9": rows}) and verdict in tables_markdown({"e9": rows})
    curves = e9_curve_runs(e1, e9)
    assert [r["run"].split("/")[-1] for r in curves][:2] == ["af_t", "deit_t"] and len(curves) == 6
    png, _svg = save_figure(plot_entropy_curves(curves), tmp_path / "fig" / "entropy")
    assert png.is_file() and png.stat().st_size > 1000
    fig = plot_e9_top1(rows)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [r["variant"] for r in rows]
    assert [round(p.get_width(), 1) for p in fig.axes[0].patches] == [97.5, 89.5, 97.5, 90.0, 98.0, 91.0]


def test_e9_verdict_without_a_closing_variant_or_runs(tmp_path):
    e1, e9 = _e9_runs(tmp_path, {"qk": (92.0, {"anchor_init": "qk_norm"}), "kmeans": (90.0, {"anchor_init": "kmeans"})})
    rows = e9_table(e9, baseline=e1)
    verdict = e9_verdict(rows)
    assert "No variant closes the gap to DeiT-T: the best, anchors at the typical norm of qk, reaches 92.0%" in verdict
    assert "(-5.5 points against DeiT-T, +2.5 against the official initialisation)" in verdict
    assert e9_verdict(e9_table([], baseline=e1)).startswith("No E9 variant has run.")
    assert "DeiT-T run is missing" in e9_verdict(e9_table(e9, baseline=[r for r in e1 if "deit" not in r["model"]]))
    # an E9 run is never mistaken for the official baseline of E2/E3
    assert {r["run"] for r in e3_table([], baseline=e9)} == set()
