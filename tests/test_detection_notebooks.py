"""Notebooks 20 and 21 run with their smoke defaults (into a temporary folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anchorformer.tasks.detection.coco_eval import metric_keys

ROOT = Path(__file__).resolve().parents[1]


def _papermill(notebook: str, out: Path, **params: str) -> None:
    argv = [sys.executable, "-m", "papermill", notebook, str(out), "--cwd", "."]
    for k, v in params.items():
        argv += ["-p", k, v]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_detection_notebooks_smoke(tmp_path) -> None:
    data = tmp_path / "mini" / "coco"
    det = tmp_path / "det"
    _papermill(
        "notebooks/20_coco_detection.ipynb", tmp_path / "20.ipynb", data=str(data), out_dir=str(det / "anchorformer_t")
    )
    metrics = json.loads((det / "anchorformer_t" / "metrics.json").read_text())
    assert set(metric_keys()) <= set(metrics)
    assert (det / "anchorformer_t" / "predictions.png").stat().st_size > 1000
    # 21 trains the missing DeiT smoke run, then tabulates the pair
    _papermill(
        "notebooks/21_coco_detection_summary.ipynb",
        tmp_path / "21.ipynb",
        data=str(data),
        det_dir=str(det),
        out_dir=str(det / "summary"),
    )
    summary = json.loads((det / "summary" / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["anchorformer_t", "deit_t_matched"]
    (pair,) = summary["comparable_flops"]
    assert pair["deit_input_scale"] < 1.0
    assert abs(pair["deit_gmacs_match"] - pair["anchorformer_gmacs_match"]) / pair["anchorformer_gmacs_match"] < 0.05
    assert (det / "summary" / "ap_vs_gmacs.png").is_file()
