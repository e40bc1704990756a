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

Preemption (:mod:`.preempt`): :meth:`TrainingRun.preemption` gives the task's loop the SIGTERM/
SIGUSR1 flag and the ``checkpoint_minutes`` clock. Code versions: :meth:`TrainingRun.code_versions`
is the list ``[{version, from_step, to_step}]`` of the code that trained each segment of the run
(steps are optimizer steps), stored in every checkpoint and in ``metrics.json``.
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

from ..data.files import BadFileError, BadFilePolicy, check_dataset_files, read_bad_file_log, unwrap_dataset
from ..io import write_json_atomic
from ..models.checkpoint import safetensors_beside
from .checkpoint import (
    capture_rng_state,
    code_version,
    find_latest_checkpoint,
    load_training_checkpoint,
    save_checkpoint,
)
from .distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from .divergence import DivergenceError
from .numerics import numeric_settings
from .preempt import Preemption
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
    start_step: int = 0  # the optimizer step this segment starts from (set by the task on resume)

    def preemption(self) -> Preemption:
        """The signal flag and wall-time clock for the task's loop (use it as a context manager)."""
        return Preemption(self.recipe.get("checkpoint_minutes"), self.dist.device, self.dist.is_main)

    def rng_state(self) -> dict[str, Any]:
        """The generators' states for a checkpoint: this process's, and under torchrun every
        rank's (``ranks``), so that each rank resumes its own. Call it on every rank."""
        mine = capture_rng_state()
        if not self.dist.is_distributed:
            return mine
        states: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(states, mine)
        return {**mine, "ranks": states}

    def own_rng(self, rng: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of :meth:`rng_state` (rank 0's when the world size changed)."""
        ranks = rng.get("ranks")
        if ranks and len(ranks) == self.dist.world_size:
            return ranks[self.dist.rank]
        return rng

    def resumed_at(self, step: int) -> None:
        """The task resumed at optimizer step ``step``: log the code versions of the run so far."""
        self.start_step = int(step)
        earlier = self.code_versions(step)[:-1]
        if any(seg["version"] != code_version() for seg in earlier):
            _logger.warning(
                "resuming at step %d with code version %s; earlier segments: %s",
                step,
                code_version(),
                ", ".join(f"{seg['version']} (steps {seg['from_step']}-{seg['to_step']})" for seg in earlier),
            )

    def code_versions(self, step: int) -> list[dict[str, Any]]:
        """``[{version, from_step, to_step}]``: the code version of each segment of the run up to
        optimizer step ``step``, this process's code last (consecutive equal versions merged)."""
        state = self.state or {}
        earlier = [dict(seg) for seg in state.get("code_versions") or []]
        if self.state is not None and not earlier:  # a checkpoint from before the list was kept
            earlier = [{"version": state.get("code_version"), "from_step": 0, "to_step": self.start_step}]
        segments = [seg for seg in earlier if seg["from_step"] < self.start_step]
        if segments:
            segments[-1]["to_step"] = min(segments[-1]["to_step"], self.start_step)
        now = code_version()
        if segments and segments[-1]["version"] == now:
            segments[-1]["to_step"] = int(step)
        else:
            segments.append({"version": now, "from_step": self.start_step, "to_step": int(step)})
        return segments

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
        base, _ = unwrap_dataset(dataset)
        if isinstance(base, BadFilePolicy):
            base.record_bad_files_in(self.bad_file_log)

    def check_files(self, train: Any, val: Any | None) -> None:
        """Decode every file the run reads before it trains (the recipe's ``check_files``).

        ``train`` (checked with ``check_files: all`` when the run starts afresh; a resumed run
        checked it then) and ``val`` (the evaluation set, or None when the run does not evaluate;
        checked at every start with ``all`` or ``val``) are datasets of :mod:`anchorformer.data`,
        or ``Subset`` of them. A bad validation file raises a :class:`BadFileError` naming it,
        whatever ``on_bad`` says: evaluation must cover its whole split. A bad training file
        raises with ``on_bad: fail``; with ``skip`` every bad one is recorded in
        :attr:`bad_file_log` now, and training skips it. Under torchrun each rank checks its share.
        """
        mode = self.recipe.get("check_files") or "all"
        splits = [("validation", val)] if val is not None and mode != "none" else []
        if mode == "all" and not self.start.resumed:
            splits.insert(0, ("training", train))
        workers = int(self.recipe.get("num_workers") or 0)
        for split, dataset in splits:
            bad, total = check_dataset_files(
                dataset, workers=workers, rank=self.dist.rank, world_size=self.dist.world_size
            )
            if self.dist.is_distributed:
                found: list[Any] = [None] * self.dist.world_size
                dist.all_gather_object(found, bad)
                bad = {path: reason for part in found for path, reason in part.items()}
            if not bad:
                _logger.info("%s files: all %d samples decode", split, total)
                continue
            bad = dict(sorted(bad.items()))
            path, reason = next(iter(bad.items()))
            count = f"{len(bad)} bad file(s) among the {total} {split} samples"
            if split == "validation":
                raise BadFileError(
                    path,
                    f"{reason}; {count}, found before training: evaluation needs every file of its "
                    "split, so on_bad=skip (training files only) does not cover it; repair or remove "
                    "them (`anchorformer data verify` lists them all)",
                )
            if self.recipe.get("on_bad") != "skip":
                raise BadFileError(
                    path,
                    f"{reason}; {count}, found before training; `--set on_bad=skip` trains without "
                    "them (`anchorformer data verify` lists them all)",
                )
            _logger.warning("%s; on_bad=skip: training skips them (listed in %s)", count, self.bad_file_log)
            if self.dist.is_main:
                base, _ = unwrap_dataset(dataset)
                for p, r in bad.items():
                    base.skip_file(p, r)

    def bad_files(self) -> dict[str, str]:
        """The training files skipped so far in this run (resumptions included): ``{path: reason}``."""
        found = read_bad_file_log(self.bad_file_log)
        if found:
            _logger.warning("%d bad training file(s) skipped; listed in %s", len(found), self.bad_file_log)
        return found


def _kept(out: Path) -> str:
    """Which checkpoint a run stopped by divergence leaves, in words."""
    latest = find_latest_checkpoint(out)
    where = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint had been written"
    return f"{where}; lower lr (or raise warmup), then start afresh with --resume never --overwrite"


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
        kwargs = dict(
            resume=resume,
            overwrite=overwrite,
            results=results,
            differences=diff,
            if_different=if_different,
            lock_stale_minutes=float(recipe.get("lock_stale_minutes") or 10.0),
            restart_on_code_change=bool(recipe.get("restart_on_code_change")),
        )
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
        try:
            yield TrainingRun(recipe, out, info, start)
        except DivergenceError as e:
            raise DivergenceError(f"{e}; {_kept(out)}") from e
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
