"""dvclive metric logging and quiet progress bars."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from anchorformer.engine.logging import MetricLogger, progress


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_metric_logger_writes_dvclive_layout(tmp_path):
    log = MetricLogger(tmp_path, enabled=True)
    for epoch in range(3):
        log.log({"train_loss": 1.0 / (epoch + 1), "top1": 10.0 * epoch}, step=epoch)
    log.summary({"params": 123, "model": "m"})
    log.close()
    rows = _rows(tmp_path / "dvclive" / "plots" / "metrics" / "train_loss.tsv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert float(rows[1]["train_loss"]) == 0.5
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary["top1"] == 20.0 and summary["params"] == 123 and summary["step"] == 2
    assert not (tmp_path / "dvclive" / "dvc.yaml").exists()


def test_metric_logger_resume_drops_rows_after_the_resumed_step(tmp_path):
    log = MetricLogger(tmp_path)
    for epoch in range(4):
        log.log({"top1": float(epoch)}, step=epoch)
    log.close()
    log = MetricLogger(tmp_path, resume_step=2)  # epochs 0, 1 are in the checkpoint; 2, 3 are redone
    log.log({"top1": 20.0}, step=2)
    log.close()
    rows = _rows(tmp_path / "dvclive" / "plots" / "metrics" / "top1.tsv")
    assert [(int(r["step"]), float(r["top1"])) for r in rows] == [(0, 0.0), (1, 1.0), (2, 20.0)]
    MetricLogger(tmp_path).close()  # a fresh start removes the old curves
    assert not (tmp_path / "dvclive" / "plots" / "metrics" / "top1.tsv").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricLogger(tmp_path, enabled=False)
    log.log({"a": 1.0}, step=0)
    log.summary({"b": 2})
    log.close()
    assert not (tmp_path / "dvclive").exists()


def test_progress_is_quiet_without_a_terminal(capsys):
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal


def test_without_dvclive_the_same_files_are_written(tmp_path, monkeypatch):
    """A bare install (no dvclive) writes dvclive's layout itself: the same bytes as dvclive."""
    import anchorformer.engine.logging as logging_module

    def write(out):
        lg = logging_module.MetricLogger(out)
        for step in range(3):
            lg.log({"train/loss": 1.0 / (step + 1), "top1": 10.0 * step}, step=step)
        lg.summary({"params": 5})
        lg.close()

    write(tmp_path / "a")

    def no_dvclive():
        raise ImportError("No module named 'dvclive'")

    monkeypatch.setattr(logging_module, "_local_live_class", no_dvclive)
    write(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"dvclive/metrics.json", "dvclive/plots/metrics/train/loss.tsv"}
    for f in files:
        assert (tmp_path / "b" / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), f


def _run_in_a_kernel(source: str, env: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """Execute one cell in a fresh kernel of this interpreter, as JupyterLab does: its outputs, and
    the widgets' last state (what the browser would show) as JSON text."""
    import nbclient
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=300).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return nb.cells[0].outputs, json.dumps(state)


_CELL = """
import logging
import time
import anchorformer
from anchorformer.engine.logging import progress
bar = progress(range(4), desc="epoch 1", unit="img", unit_scale=8)
for i in bar:
    bar.set_postfix(loss=f"{1 / (i + 1):.4f}", lr="0.001", refresh=False)
    time.sleep(0.15)  # past tqdm's refresh interval: the bar redraws with the postfix
logging.getLogger("anchorformer.tasks.x").info("epoch 1/2: top1 50.0")
logging.getLogger("anchorformer.tasks.x").debug("not shown")
"""


@pytest.mark.slow
def test_in_an_interactive_kernel_training_shows_a_bar_and_its_log():
    outputs, widget_state = _run_in_a_kernel(_CELL)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    # the package's INFO log in the cell's output, once (one handler), not its DEBUG
    assert text.count("epoch 1/2: top1 50.0") == 1 and "not shown" not in text, text
    # tqdm.auto: a widget in a kernel with ipywidgets (a text bar without), with the loss and lr
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, outputs
    assert "loss=0.2500" in widget_state and "lr=0.001" in widget_state and "img/s" in widget_state, widget_state


@pytest.mark.slow
def test_in_a_stage_kernel_nothing_of_the_clock_enters_the_cell():
    outputs, widget_state = _run_in_a_kernel(_CELL, env={"ANCHORFORMER_LOG_TO_TERMINAL": "1"})
    assert outputs == [] and "loss=" not in widget_state, outputs


def test_the_stage_marker_is_the_one_kernel_startup_sets():
    from anchorformer.console import STAGE_ENV

    startup = (Path(__file__).resolve().parents[1] / "scripts" / "kernel_startup.py").read_text()
    assert f'os.environ["{STAGE_ENV}"] = "1"' in startup


def test_outside_a_kernel_bars_follow_the_terminal(monkeypatch):
    import io

    from anchorformer import console

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not console.in_interactive_kernel() and not console.show_progress()
    assert not console.show_log_in_kernel()
