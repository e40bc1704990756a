"""The E5 table: rows from run folders, comparable-FLOPs pairs, relative AP gains."""

from __future__ import annotations

import json

import pytest

from anchorformer.tasks.detection.results import (
    comparable_flops_pairs,
    load_runs,
    relative_gain,
    results_markdown,
    write_summary,
)


def _run(folder, backbone, *, box, mask, gmacs, scale=1.0, matched=None, detector="mask_rcnn") -> None:
    folder.mkdir(parents=True)
    metrics = {"bbox_AP": box, "bbox_AP50": box + 10, "bbox_AP75": box - 5, "segm_AP": mask}
    metrics |= {"backbone_gmacs": gmacs, "input_scale": scale, "train_seconds": 12.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    info = {"backbone": backbone, "detector_config": {"detector": detector}, "input_scale": scale}
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
    md = results_markdown(rows, pairs)
    assert "+150.0%" in md and "+100.0%" in md and "| deit | deit_tiny_patch16_224 | 1.000 | 221.00 |" in md
    paths = write_summary(tmp_path / "summary", rows, pairs)
    saved = json.loads(paths["json"].read_text())
    assert saved["comparable_flops"][0]["bbox_AP_gain_pct"] == pytest.approx(150.0)


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
