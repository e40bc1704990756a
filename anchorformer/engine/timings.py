"""Timings and the machine, kept apart from a run's results.

A run's results (``metrics.json``, ``history.json``, the dvclive curves, checkpoints, weights) are
the same bytes whenever the parameters, the seed and the arithmetic are the same; what the clock
and the machine say is not. So the seconds a run took, its measured throughput and the machine it
ran on go to ``OUT/timings.json``, which no DVC stage declares (it is committed to git as a
timing file), and to the log, where :class:`RunClock` adds the elapsed time and an estimate of
the time left (ETA) to every progress line.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from .numerics import native_capability

__all__ = ["TIMINGS", "RunClock", "format_seconds", "machine_info", "write_timings"]

TIMINGS = "timings.json"  # beside metrics.json; undeclared in dvc.yaml: DVC never hashes it


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: a duration for a log line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunClock:
    """Wall-clock of a run of ``total`` units (epochs or iterations), started at unit ``start``.

    :meth:`lap` closes a unit and returns its seconds; :meth:`progress` is ``"elapsed 1m02s, ETA
    3m10s"``, the time left estimated from the mean time of the units done in this process (a
    resumed run counts from where it resumed).
    """

    def __init__(self, total: int, start: int = 0) -> None:
        self.total, self.start = int(total), int(start)
        self.done = int(start)
        self.t0 = self._last = time.perf_counter()
        self.laps: list[float] = []

    def lap(self, done: int | None = None) -> float:
        """Close the units up to ``done`` (default: one more); the seconds since the last lap."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.done = self.done + 1 if done is None else int(done)
        self.laps.append(round(seconds, 3))
        return seconds

    @property
    def ran(self) -> bool:
        """Whether this process closed any unit (a finished run resumed closes none)."""
        return self.done > self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far; ``None`` before the first unit."""
        ran = self.done - self.start
        if ran <= 0:
            return None
        return self.elapsed / ran * max(0, self.total - self.done)

    def progress(self) -> str:
        eta = self.eta()
        return f"elapsed {format_seconds(self.elapsed)}, ETA {'?' if eta is None else format_seconds(eta)}"


def machine_info() -> dict[str, Any]:
    """The machine and software a timing was taken on: CPU, cores, accelerator, versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": native_capability(),  # the CPU's own; the results' path is in metrics.json
        "aten_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels ATen ran
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_timings(out_dir: str | os.PathLike, timings: Mapping[str, Any], *, ran: bool = True) -> Path:
    """Write ``OUT/timings.json``: ``timings`` (seconds, throughput, ...) and :func:`machine_info`.

    ``ran=False`` (a finished run resumed: this process trained nothing) keeps an existing file,
    which holds the training's timings.
    """
    path = Path(out_dir) / TIMINGS
    if not ran and path.is_file():
        return path
    write_json_atomic(path, {**dict(timings), "machine": machine_info()})
    return path
