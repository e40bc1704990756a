"""Preemption is a pause: SIGTERM/SIGUSR1 and wall-time checkpoints for every task.

A cluster stops a job with SIGTERM (its time is up, or it is preempted) and SLURM warns ahead of
the end with a chosen signal (``--signal=B:USR1@120``). While a task trains, :class:`Preemption`
catches both: the handler only sets a flag; the task's loop calls :meth:`Preemption.poll` after
every optimizer step, which tells it to write a checkpoint (the flag is set, or
``checkpoint_minutes`` of wall time passed since the last checkpoint) and, for a signal, to stop.
The task then writes its checkpoint atomically and calls :meth:`Preemption.stop`, which raises
:class:`Preempted`: a :class:`SystemExit` with status 143 (SIGTERM, the shell's 128 + 15) or
:data:`REQUEUE_EXIT` (75, ``EX_TEMPFAIL``: "requeue me") for SIGUSR1. The run folder's lock is
released on the way out, so ``--resume auto`` continues from that checkpoint, on any host.

Under ``torchrun`` a signal may reach some ranks and not others, and each rank's clock differs:
:meth:`Preemption.poll` all-reduces (max) the local decision every step, so every rank stops or
checkpoints after the same optimizer step; the wall time is rank 0's alone.

A checkpoint inside an epoch stores the optimizer steps done in it; the resumed run skips the
samples of those steps with :class:`ResumableSampler` (the same order, without loading them) and
restores the random generators saved after the last step (every rank's own, gathered into the
checkpoint: :meth:`anchorformer.engine.trainer.TrainingRun.rng_state`). With ``num_workers=0`` the resumed run
is then the same, bit for bit, as one never stopped; with data-loader workers, the augmentations
drawn inside the workers for the rest of that epoch differ (each worker's generator is seeded
at the start of the pass), the order of the samples and everything else do not.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
from torch.utils.data import Sampler

from .distributed import all_reduce_max, barrier

__all__ = ["REQUEUE_EXIT", "SIGNAL_EXIT", "Preempted", "Preemption", "ResumableSampler"]

_logger = logging.getLogger(__name__)

SIGNAL_EXIT = 143  # SIGTERM: 128 + 15, what the shell reports for a process the signal ended
REQUEUE_EXIT = 75  # SIGUSR1: EX_TEMPFAIL of sysexits.h, "a temporary failure: requeue the job"
# poll() codes, ordered: the all-reduce keeps the largest (SIGTERM wins over SIGUSR1)
_CODES = {signal.SIGUSR1: 1, signal.SIGTERM: 2}
_NAMES = {1: "SIGUSR1", 2: "SIGTERM"}
_EXITS = {1: REQUEUE_EXIT, 2: SIGNAL_EXIT}


class Preempted(SystemExit):
    """The run stopped on a signal after writing a checkpoint; ``code`` is the exit status."""


class Preemption:
    """SIGTERM/SIGUSR1 handlers and the wall-time checkpoint clock of one training loop.

    Use as a context manager around the loop (the previous handlers come back at its end)::

        with Preemption(cfg.get("checkpoint_minutes"), device, is_main) as pre:
            for step in ...:
                ...optimizer.step()...
                why = pre.poll()
                if why:
                    path = save(...)  # atomically
                    pre.saved()
                    if pre.stopping:
                        pre.stop(step, path)

    Args:
        checkpoint_minutes: wall time between checkpoints; ``None`` or 0: only at the task's own
            points (epochs, ``checkpoint_every``) and on a signal.
        device: where the all-reduce of the decision runs (the process group's device).
        is_main: rank 0, whose clock decides the wall-time checkpoints.
    """

    def __init__(self, checkpoint_minutes: float | None, device: torch.device | str = "cpu", is_main: bool = True):
        self.interval = float(checkpoint_minutes) * 60.0 if checkpoint_minutes else None
        self.device = torch.device(device)
        self.is_main = is_main
        self.signal_code = 0  # set by the handler: 0 none, 1 SIGUSR1, 2 SIGTERM
        self.stop_code = 0  # agreed by poll()
        self._last = time.monotonic()
        self._previous: dict[int, Any] = {}

    # -- handlers: they only set a flag -----------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_code = max(self.signal_code, _CODES.get(signal.Signals(signum), 0))

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in _CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -- the loop's side --------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """Whether the last :meth:`poll` agreed on a signal: checkpoint, then :meth:`stop`."""
        return self.stop_code > 0

    def poll(self) -> str | None:
        """After an optimizer step: ``"SIGTERM"``/``"SIGUSR1"`` (checkpoint and stop), ``"time"``
        (checkpoint and go on) or ``None``. The same answer on every rank."""
        due = int(self.is_main and self.interval is not None and time.monotonic() - self._last >= self.interval)
        flags = torch.tensor([self.signal_code, due], dtype=torch.int64, device=self.device)
        code, due = (int(v) for v in all_reduce_max(flags).tolist())
        self.stop_code = code
        if code:
            return _NAMES[code]
        return "time" if due else None

    def saved(self) -> None:
        """A checkpoint was written (by :meth:`poll`'s request or the task's own schedule): the
        wall-time clock starts again."""
        self._last = time.monotonic()

    def stop(self, step: int, checkpoint: Any) -> None:
        """Raise :class:`Preempted` with the signal's exit status, after a log line naming the
        step and the checkpoint written."""
        name = _NAMES[self.stop_code]
        _logger.warning(
            "%s: stopped after optimizer step %d; checkpoint %s; rerun the same command (--resume auto) to go on",
            name,
            step,
            checkpoint if checkpoint is not None else "(rank 0's)",
        )
        barrier()  # every rank leaves once rank 0's checkpoint is written
        raise Preempted(_EXITS[self.stop_code])


class ResumableSampler(Sampler[int]):
    """A sampler whose next pass skips its first :attr:`skip` indices (the part of an epoch a
    resumed run has already trained on); later passes are whole. Drawing the order is left to the
    wrapped sampler, so the skipped pass consumes its generator exactly as a whole pass would."""

    def __init__(self, sampler: Sampler[int] | Any):
        self.sampler = sampler
        self.skip = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)
