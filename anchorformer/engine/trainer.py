"""What every training run shares, around the task's own loop.

:func:`training_run` is the scaffolding of ``train cls``, ``train det`` and ``train seg``: it joins
the process group (torchrun), sets the recipe's thread count, takes the run folder and decides
where the run starts (:mod:`.run`: lock, resume protocol, nothing of an earlier run lost), and
undoes all of it when the run ends. The task supplies its model, data, step and evaluation inside
the ``with`` block, saves its training state with :func:`~.checkpoint.save_training_state`, logs
with :class:`~.logging.MetricLogger` and ends with :func:`finish_run` (weights, then
``metrics.json`` last: its presence means the run finished).

Bad training files (the recipe's ``on_bad``): the task hands its training set to
:meth:`TrainingRun.watch_bad_files`; with ``skip``, every process (DataLoader workers and torchrun
ranks included) appends what it skips to ``OUT/bad_files.jsonl``, and :meth:`TrainingRun.bad_files`
reads the count back for ``metrics.json``. The log belongs to the run: kept when it is resumed,
cleared when a run starts afresh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data.files import read_bad_file_log
from ..io import write_json_atomic
from ..models.checkpoint import safetensors_beside
from .checkpoint import load_training_checkpoint, save_checkpoint
from .distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from .numerics import numeric_settings
from .recipe import Recipe
from .run import RunStart, open_run, release_run

__all__ = ["BAD_FILES", "TrainingRun", "finish_run", "training_run"]

_logger = logging.getLogger(__name__)

BAD_FILES = "bad_files.jsonl"  # the training files skipped by on_bad=skip, one JSON line each


@dataclass
class TrainingRun:
    """A started run: where it is (``dist``), its folder and where it starts (``start``)."""

    recipe: Recipe
    out: Path
    dist: DistInfo
    start: RunStart

    @property
    def state(self) -> dict[str, Any] | None:
        """The checkpoint resumed from, or ``None`` for a fresh start."""
        return self.start.state

    @property
    def bad_file_log(self) -> Path:
        return self.out / BAD_FILES

    def watch_bad_files(self, dataset: Any) -> None:
        """Have ``dataset`` (a dataset with the ``on_bad`` policy, or a ``Subset`` or wrapper of
        one) record the files it skips in :attr:`bad_file_log`, from every process."""
        while not hasattr(dataset, "record_bad_files_in") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        if hasattr(dataset, "record_bad_files_in"):
            dataset.record_bad_files_in(self.bad_file_log)

    def bad_files(self) -> dict[str, str]:
        """The training files skipped so far in this run (resumptions included): ``{path: reason}``."""
        found = read_bad_file_log(self.bad_file_log)
        if found:
            _logger.warning("%d bad training file(s) skipped; listed in %s", len(found), self.bad_file_log)
        return found


@contextmanager
def training_run(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    resume: str = "auto",
    overwrite: bool = False,
    if_different: str = "refuse",
    results: Iterable[str] = ("metrics.json", "model.pth", "model.safetensors"),
    differences: Any = None,
) -> Iterator[TrainingRun]:
    """Start a run of ``recipe`` in ``out_dir`` (see the module docstring); undo everything at the end.

    ``differences(state) -> [reasons]`` says why a checkpoint cannot be resumed; the default
    compares the stored recipe with this one, apart from its resumable settings.
    """
    out = Path(out_dir)
    diff = differences or (lambda state: recipe.differences(state.get("config") or {}))
    info = init_distributed(recipe.get("device"))
    threads = torch.get_num_threads()
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe.get("threads")))
    start: RunStart | None = None
    try:
        kwargs = dict(resume=resume, overwrite=overwrite, results=results, differences=diff, if_different=if_different)
        if info.is_main:
            start = open_run(out, is_main=True, **kwargs)
        if info.is_distributed:  # the main process decides; the others read the same checkpoint
            chosen = [str(start.checkpoint) if start is not None and start.checkpoint else None]
            dist.broadcast_object_list(chosen, src=0)
            if not info.is_main:
                start = RunStart(out)
                if chosen[0] is not None:
                    start.checkpoint = Path(chosen[0])
                    start.state = load_training_checkpoint(chosen[0])
        assert start is not None
        if start.resumed:
            _logger.info("resuming from %s", start.checkpoint)
        elif info.is_main and (out / BAD_FILES).exists():  # left by an attempt that wrote no checkpoint
            (out / BAD_FILES).unlink()
        barrier()  # the log is cleared before any process records in it
        yield TrainingRun(recipe, out, info, start)
    finally:
        release_run(start)
        torch.set_num_threads(threads)
        cleanup_distributed()


def finish_run(run: TrainingRun, metrics: Mapping[str, Any], weights: Mapping[str, Any] | None = None) -> None:
    """Write the final ``model.pth`` (``weights``: model state and how to rebuild it) and
    ``model.safetensors`` beside it (the weights timm and safetensors users load), then ``metrics.json``."""
    if run.dist.is_main:
        if weights is not None:
            save_checkpoint(run.out / "model.pth", dict(weights))
            safetensors_beside(run.out / "model.pth")
        # last: its presence means the run finished; with the CPU numeric path the results followed
        write_json_atomic(run.out / "metrics.json", {**dict(metrics), "numerics": numeric_settings()})
    barrier()
