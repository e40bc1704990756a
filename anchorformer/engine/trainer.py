"""What every training run shares, around the task's own loop.

:func:`training_run` is the scaffolding of ``train cls``, ``train det`` and ``train seg``: it joins
the process group (torchrun), sets the recipe's thread count, takes the run folder and decides
where the run starts (:mod:`.run`: lock, resume protocol, nothing of an earlier run lost), and
undoes all of it when the run ends. The task supplies its model, data, step and evaluation inside
the ``with`` block, saves its training state with :func:`~.checkpoint.save_training_state`, logs
with :class:`~.logging.MetricLogger` and ends with :func:`finish_run` (weights, then
``metrics.json`` last: its presence means the run finished).
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

from ..io import write_json_atomic
from ..models.checkpoint import safetensors_beside
from .checkpoint import load_training_checkpoint, save_checkpoint
from .distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from .recipe import Recipe
from .run import RunStart, open_run, release_run

__all__ = ["TrainingRun", "finish_run", "training_run"]

_logger = logging.getLogger(__name__)


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
        write_json_atomic(run.out / "metrics.json", dict(metrics))  # last: its presence means the run finished
    barrier()
