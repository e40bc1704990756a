"""Metric logging with dvclive and progress bars with tqdm.

:class:`MetricLogger` writes dvclive's layout under ``OUT/dvclive``: one TSV per metric in
``plots/metrics/`` (``step`` column plus the value), read by ``dvc plots``, and ``metrics.json``
with the latest values and the summary, read by ``dvc metrics`` / ``dvc exp show``. The stage
in ``dvc.yaml`` declares those files; dvclive itself writes no ``dvc.yaml`` and saves no
experiment. On processes other than rank 0 it does nothing.

The logger keeps what it logged (:attr:`MetricLogger.rows`); a task stores those rows in its
training checkpoint and hands them back on resume, and the curves are rewritten from them: a
resumed run (also one whose ``dvclive/`` folder DVC removed before rerunning the stage, or a
finished run resumed to evaluate) leaves the same files as an uninterrupted run. Without stored
rows (older checkpoints), rows with a step at or after the resumed step are dropped.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..console import show_progress

__all__ = ["MetricLogger", "progress"]

_logger = logging.getLogger(__name__)


def progress(iterable: Iterable[Any], **kw: Any) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kw)``: a bar in a terminal, a widget in an interactive kernel.

    Off where nobody watches it (logs, CI, a pipeline stage's kernel: see
    :mod:`anchorformer.console`). The tasks' loops call ``set_postfix`` on it with the loss and
    the learning rate; ``unit="img", unit_scale=BATCH`` makes its rate images per second.
    """
    kw.setdefault("disable", not show_progress())
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


def _truncate_tsv(folder: Path, start_step: int) -> None:
    """Drop rows with ``step >= start_step`` from every TSV under ``folder``."""
    for tsv in folder.rglob("*.tsv"):
        with tsv.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and int(float(r[col])) < start_step]
        with tsv.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(kept)


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _local_live_class() -> type:
    """dvclive's ``Live`` restricted to its own folder.

    ``Live`` normally opens the DVC repository around the working directory (and runs
    ``dvc init`` in a bare Git repository), names an experiment and may post to DVC Studio. A
    training run needs none of that: the stage in ``dvc.yaml`` declares the files. This
    subclass skips those steps (dvclive is pinned in pyproject.toml; the overridden hooks are
    ``_init_dvc`` and ``_init_studio``), which also saves seconds per run.
    """
    from dvclive import Live

    class LocalLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_repo = None
            self._save_dvc_exp = False

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update({"start", "data", "done"})

    return LocalLive


class _PlainLive:
    """dvclive's file layout without dvclive (a bare install): ``plots/metrics/<name>.tsv`` with a
    ``step`` column and the metric's last name component, and ``metrics.json`` nested at ``/``."""

    def __init__(self, dir: str, resume: bool = False, **_: Any) -> None:
        self.dir = Path(dir)
        self.step = 0
        self.summary: dict[str, Any] = {}
        self._latest: dict[str, Any] = {}
        if not resume:
            import shutil

            shutil.rmtree(self.dir / "plots", ignore_errors=True)
        (self.dir / "plots" / "metrics").mkdir(parents=True, exist_ok=True)

    def log_metric(self, name: str, value: float) -> None:
        path = self.dir / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", encoding="utf-8", newline="") as f:
            if new:
                f.write(f"step\t{name.split('/')[-1]}\n")
            f.write(f"{self.step}\t{value}\n")
        self._latest[name] = value

    def make_summary(self) -> None:
        import json

        out: dict[str, Any] = {}

        def put(name: str, value: Any) -> None:
            node = out
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value

        for name, value in self._latest.items():
            put(name, value)
        out["step"] = self.step  # where dvclive puts it: after the curves' latest values
        for name, value in self.summary.items():
            put(name, value)
        (self.dir / "metrics.json").write_text(json.dumps(out, indent=4) + "\n", encoding="utf-8")


class MetricLogger:
    """dvclive logging of per-step (per-epoch) metrics and a summary, on the main process only.

    Args:
        out_dir: the run's folder; dvclive writes to ``out_dir/dvclive``.
        enabled: ``False`` on non-main processes (every method is then a no-op).
        resume_step: continue an earlier run: keep its rows with ``step < resume_step``.
            ``None`` starts afresh (the folder's earlier curves are removed).
        rows: what the resumed run had logged (its checkpoint's copy of :attr:`rows`): the curves
            are rewritten from them, whatever the folder holds.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool = True,
        resume_step: int | None = None,
        rows: Iterable[Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.dir = Path(out_dir) / "dvclive"
        self._live = None
        self.rows: list[list[Any]] = []
        if not enabled:
            return
        replay = [[int(step), dict(values)] for step, values in rows] if rows is not None else None
        resume = replay is None and resume_step is not None and (self.dir / "plots").is_dir()
        if resume:
            _truncate_tsv(self.dir / "plots", int(resume_step))  # type: ignore[arg-type]
        try:
            live_class = _local_live_class()
        except ImportError:  # a bare install (no pipeline extras): the same files, written here
            live_class = _PlainLive
        self._live = live_class(
            dir=str(self.dir),
            resume=resume,
            save_dvc_exp=False,
            dvcyaml=None,
            report=None,
            monitor_system=False,
        )
        for step, values in replay or []:
            self._record(values, step)
            if not isinstance(self._live, _PlainLive):  # the key order of logging them one by one
                self._live.summary["step"] = self._live.step
        if replay:
            self._live.make_summary()

    @classmethod
    def for_run(
        cls, out_dir: str | os.PathLike, enabled: bool, state: Mapping[str, Any] | None, step: int
    ) -> MetricLogger:
        """The logger of a training run: fresh when ``state`` is None, else resumed at ``step`` with
        the rows the training checkpoint ``state`` stored (``state["logged"]``, from :attr:`rows`)."""
        if state is None:
            return cls(out_dir, enabled=enabled)
        return cls(out_dir, enabled=enabled, resume_step=step, rows=state.get("logged"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log ``metrics`` (name -> number) at ``step`` and refresh ``metrics.json``."""
        if self._live is None:
            return
        self._record(metrics, step)
        self._live.make_summary()

    def _record(self, metrics: dict[str, Any], step: int) -> None:
        """Add ``metrics`` to the curves at ``step`` and to :attr:`rows` (``metrics.json`` unchanged)."""
        self._live.step = int(step)
        logged = {}
        for name, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._live.log_metric(name, value)
                logged[name] = value
        self.rows.append([int(step), logged])

    def summary(self, values: dict[str, Any]) -> None:
        """Add ``values`` to ``metrics.json`` without adding points to the curves."""
        if self._live is None:
            return
        for name, value in values.items():
            value = _plain(value)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                self._live.summary[name] = value
        self._live.make_summary()

    def close(self) -> None:
        """Flush and close (writes nothing outside ``out_dir/dvclive``)."""
        if self._live is None:
            return
        self._live.make_summary()
        self._live = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
