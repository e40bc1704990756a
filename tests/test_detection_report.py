"""The E5 tables: rows from run folders, the backbones at their input, comparable-FLOPs pairs, AP gains."""

from __future__ import annotations

import json

import pytest

import anchorformer
from anchorformer.models.pyramid import SimpleFeaturePyramid
from anchorformer.tasks.detection.results import (
    at_input,
    comparable_flops_pairs,
    load_runs,
    relative_gain,
    results_markdown,
    standard_backbones,
    write_summary,
)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


def _run(folder, backbone, *, box, mask, gmacs, scale=1.0, matched=None, detector="mask_rcnn") -> None:
    folder.mkdir(parents=True)
    metrics = {"bbox_AP": box, "bbox_AP50": box + 10, "bbox_AP75": box - 5, "segm_AP": mask}
    metrics |= {"backbone_gmacs": gmacs, "input_scale": scale, "train_seconds": 12.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    kwargs = {**TINY, **({"num_anchors": 4} if backbone.startswith("anchor") else {})}
    det = {"detector": detector, "backbone": backbone, "backbone_kwargs": kwargs}
    det |= {"min_size": round(64 * scale), "max_size": round(80 * scale)}
    info = {"backbone": backbone, "detector_config": det, "input_scale": scale}
    if matched:
        info["matched_to"] = matched
    (folder / "run.json").write_text(json.dumps(info))


def test_pairs_and_gains(tmp_path) -> None:
    a, d = "anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"
    _run(tmp_path / "af", a, box=30.0, mask=28.0, gmacs=7.4)
    _run(tmp_path / "deit_matched", d, box=12.0, mask=14.0, gmacs=7.3, scale=0.41, matched=a)
    _run(tmp_path / "deit", d, box=33.0, mask=31.0, gmacs=221.0)
    _run(tmp_path / "retina_matched", d, box=5.0, mask=0.0, gmacs=7.0, scale=0.4, matched=a, detector="retinanet")
    rows = load_runs(tmp_path, ["af", "deit_matched", "deit", "retina_matched"])
    assert [r["run"] for r in rows] == ["af", "deit_matched", "deit", "retina_matched"]
    pairs = comparable_flops_pairs(rows)
    assert len(pairs) == 1  # the RetinaNet run has no RetinaNet AnchorFormer partner; the full-size DeiT is no pair
    (p,) = pairs
    assert (p["anchorformer_run"], p["deit_run"]) == ("af", "deit_matched")
    assert p["bbox_AP_gain_pct"] == pytest.approx(150.0)  # (30 - 12) / 12
    assert p["segm_AP_gain_pct"] == pytest.approx(100.0)  # (28 - 14) / 14
    # each backbone is labelled and counted as it was trained, at the input it ran at
    af, deit = rows[0], rows[2]
    assert af["backbone_label"] == "AnchorFormer-T (48 ch, 2 blocks, 3 heads, patch 8, M 4)"
    assert deit["backbone_label"] == "DeiT-T (48 ch, 2 blocks, 3 heads, patch 8)"
    assert (af["input_size"], rows[1]["input_size"]) == ("64x80", "26x33")
    vit = anchorformer.create_model("anchorformer_tiny_patch16_224", **TINY, num_anchors=4, num_classes=0)
    direct = anchorformer.count_macs(SimpleFeaturePyramid(vit, 8, (1.0,)).backbone, (64, 80)) / 1e9
    assert af["input_gmacs"] == pytest.approx(direct, rel=1e-3)
    assert at_input(af) == ("64x80", af["input_gmacs"])
    md = results_markdown(rows, pairs, standard=[])
    assert "+150.0%" in md and "+100.0%" in md
    assert (
        f"| deit | DeiT-T (48 ch, 2 blocks, 3 heads, patch 8) | global | 64×80 | 1.000 | {deit['input_gmacs']:.3f} |"
        in md
    )
    assert af["attention"] == "anchor (global), M 4"
    assert "1333" not in md  # nothing here ran at 1333x800
    paths = write_summary(tmp_path / "summary", rows, pairs, standard=[])
    saved = json.loads(paths["json"].read_text())
    assert saved["comparable_flops"][0]["bbox_AP_gain_pct"] == pytest.approx(150.0)
    assert saved["runs"][0]["input_gmacs"] == af["input_gmacs"] and saved["standard_backbones"] == []


def test_at_input_of_a_summary_without_input_gmacs() -> None:
    row = {"match_size": "128x160", "input_scale": 0.8164, "backbone_gmacs_match": 0.14, "backbone_gmacs": 100.7}
    assert at_input(row) == ("104x131", 0.14)
    assert at_input({"backbone_gmacs": 7.0}) == (None, None)


def test_standard_backbones_at_1333x800() -> None:
    rows = standard_backbones(("tiny",))
    deit, windowed, af = rows
    assert (deit["attention"], windowed["attention"]) == ("global", "windowed 14×14, global blocks 2, 5, 8, 11")
    assert windowed["gmacs"] == pytest.approx(53.45, abs=0.01) and windowed["params_m"] == deit["params_m"]
    assert (deit["label"], af["label"]) == (
        "DeiT-T (192 ch, 12 blocks, 3 heads, patch 16)",
        "AnchorFormer-T (192 ch, 12 blocks, 3 heads, patch 16, M 30)",
    )
    assert deit["input_size"] == af["input_size"] == "800x1333"
    assert deit["gmacs"] == pytest.approx(104.24, abs=0.01) and af["gmacs"] == pytest.approx(21.93, abs=0.01)
    assert 5.0 < deit["params_m"] < 6.0


def test_relative_gain_edge_cases() -> None:
    assert relative_gain(10.0, 8.0) == pytest.approx(25.0)
    assert relative_gain(6.0, 8.0) == pytest.approx(-25.0)
    assert relative_gain(5.0, 0.0) is None
    assert relative_gain(5.0, -1.0) is None


def test_unfinished_run_is_named(tmp_path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="half.*metrics.json|metrics.json.*half"):
        load_runs(tmp_path, ["half"])
