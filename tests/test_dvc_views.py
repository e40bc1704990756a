"""What `dvc exp show` and `dvc plots show` present: the headline metrics, a few comparison charts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anchorformer.report import short_model_name, short_run_name

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("exp_table", ROOT / "scripts" / "exp_table.py")
exp_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exp_table)


def test_top_level_plots_are_a_few_figures_some_stage_writes():
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    plots = raw["plots"]
    outs = {
        next(iter(o)) if isinstance(o, dict) else o
        for st in raw["stages"].values()
        for o in st.get("do", st).get("outs", [])
    }
    assert 4 <= len(plots) <= 8
    for path in plots:  # images: `dvc plots show` renders them without vega (offline)
        assert isinstance(path, str) and path.endswith(".png") and path in outs, path


def test_dvc_plots_output_is_ignored():
    for name in (".gitignore", ".dvcignore"):
        assert "/dvc_plots/" in (ROOT / name).read_text().splitlines(), name


def _exp_show(*args: str, columns: int = 200) -> str:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--no-pager", *args]
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True, env=env).stdout


def test_the_headline_is_the_one_metrics_file_and_lists_every_run():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    declared = [(name, m) for name, st in stages.items() for m in st.get("do", st).get("metrics", [])]
    assert declared == [("report", {"reports/headline.json": {"cache": False}})]
    assert not [name for name, st in stages.items() if st.get("do", st).get("plots")]  # top-level plots only

    header = _exp_show("--csv", "--drop", ".*", "--keep", exp_table.KEEP).splitlines()[0].split(",")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    cls = params["cls"]
    models = cls["e1"]["models"] + cls["e1"]["distilled_models"]
    want = {f"e1.{short_model_name(m)}" for m in models}
    want |= {f"e2.M{m}" for m in cls["e2"]["anchors"]} | {f"e3.{k}" for k in cls["e3"]["variants"]}
    # a stage that has not run yet (E9 before its first `dvc repro`) has no column
    e9 = cls.get("e9", {}).get("variants", {})
    want |= {f"e9.{k}" for k in e9 if (ROOT / "outputs" / "cls" / "e9" / k / "metrics.json").is_file()}
    want |= {f"e5.{short_run_name(k)}.{m}" for k in params["det"]["runs"] for m in ("box", "mask")}
    want |= {f"e6.{short_run_name(k)}" for k in params["seg"]["runs"]}
    assert header[0] == "Experiment" and set(header[1:]) == want


@pytest.mark.parametrize("experiments, first", [("1", "e1."), ("[239]", "e2."), ("5", "e5."), ("6", "e6.")])
def test_each_experiments_filter_fits_a_200_column_terminal(experiments, first):
    text = _exp_show("--drop", ".*", "--keep", exp_table.keep(experiments))
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    assert lines and max(map(len, lines)) <= 200 and "…" not in text, text
    assert lines[1].split()[:2] == ["Experiment", lines[1].split()[1]] and lines[1].split()[1].startswith(first)
    assert any(line.lstrip().startswith("workspace") for line in lines)


def test_exp_table_puts_metrics_in_rows():
    text = "Experiment,rev,e1.DeiT-T,e6.AF-T-fpn\n,workspace,97.5,72.71\nexp-1,abc1234,96.0,\n"
    lines = exp_table.transpose(text).splitlines()
    assert lines[0].split() == ["metric", "workspace", "exp-1"]
    assert lines[2].split() == ["e1", "DeiT-T", "97.5", "96.0"]
    assert lines[3].split() == ["e6", "AF-T-fpn", "72.7", "-"]
