"""The E1/E2/E3 tables: run description, paper references, baseline reuse, files and figures."""

from __future__ import annotations

import json

import pytest

from anchorformer.tasks.classification.results import (
    NOT_PUBLIC,
    describe_run,
    e1_table,
    e2_table,
    e3_table,
    load_runs,
    plot_accuracy_vs_gmacs,
    plot_anchor_ablation,
    plot_design_ablation,
    plot_training_curves,
    tables_markdown,
    write_results,
)
from anchorformer.viz import save_figure


def _run(folder, model, top1, m=None, **cfg):
    folder.mkdir(parents=True)
    config = {"profile": "mini", "anchor_mode": "learned", "normalize": True, "per_head_anchors": False, **cfg}
    metrics = {"model": model, "top1": top1, "top5": 99.0, "params_m": 0.4, "gmacs": 0.03}
    metrics.update(num_anchors=m, num_classes=10, config=config)
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
    assert "| DeiT-T (mini) | ⚗ | — | 0.400 | 0.03 | 75.0 | 99.0 | 74.5 |" in md
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
