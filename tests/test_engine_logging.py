"""dvclive metric logging and quiet progress bars."""

from __future__ import annotations

import csv
import json

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
