"""What `dvc exp show` and `dvc plots show` present: the headline metrics, a few comparison charts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("exp_table", ROOT / "scripts" / "exp_table.py")
exp_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exp_table)


def _stage_plot_dirs() -> set[str]:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {str(Path(o.def_path)) for s in repo.index.stages for o in s.outs if o.plot}


def test_top_level_plots_draw_curves_the_stages_write():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    dirs = _stage_plot_dirs()
    assert 4 <= len(plots) <= 8
    for entry in plots:
        ((pid, spec),) = entry.items()
        assert spec["x"] == "step" and len(spec["y"]) >= 2, pid
        for path in spec["y"]:
            assert any(Path(d) in Path(path).parents for d in dirs), f"plot {pid}: {path} is no stage's curve"


def test_dvc_plots_output_is_ignored():
    for name in (".gitignore", ".dvcignore"):
        assert "/dvc_plots/" in (ROOT / name).read_text().splitlines(), name


def test_headline_filter_keeps_one_column_per_run_and_metric():
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--csv", "--no-pager", "--drop", ".*", "--keep", exp_table.KEEP]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    header = done.stdout.splitlines()[0].split(",")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    cls = params["cls"]
    runs = (
        [f"e1/{m}" for m in cls["e1"]["models"] + cls["e1"]["distilled_models"]]
        + [f"e2/m{m}" for m in cls["e2"]["anchors"]]
        + [f"e3/{k}" for k in cls["e3"]["variants"]]
        + [f"e9/{k}" for k in cls["e9"]["variants"]]
    )
    # a stage that has not run yet (a new experiment before its first `dvc repro`) has no column
    want = {f"outputs/cls/{r}/metrics.json:top1" for r in runs if (ROOT / f"outputs/cls/{r}/metrics.json").is_file()}
    assert {f"outputs/cls/e1/{m}/metrics.json:top1" for m in cls["e1"]["models"]} <= want
    want |= {f"outputs/det/{k}/metrics.json:{m}" for k in params["det"]["runs"] for m in ("bbox_AP", "segm_AP")}
    want |= {f"outputs/seg/{k}/metrics.json:mIoU" for k in params["seg"]["runs"]}
    assert header[0] == "Experiment" and set(header[1:]) == want


def test_exp_table_puts_metrics_in_rows():
    text = (
        "Experiment,rev,outputs/cls/e1/deit_tiny_patch16_224/metrics.json:top1,outputs/seg/a/metrics.json:mIoU\n"
        ",workspace,97.5,72.71\n"
        "exp-1,abc1234,96.0,\n"
    )
    lines = exp_table.transpose(text).splitlines()
    assert lines[0].split() == ["metric", "workspace", "exp-1"]
    assert lines[2].split() == ["cls/e1/deit_tiny_patch16_224", "top1", "97.5", "96.0"]
    assert lines[3].split() == ["seg/a", "mIoU", "72.7", "-"]
