"""One ``torchrun`` launcher for every task.

``launch("cls", ["--data", ..., "--out", OUT, ...], nproc_per_node=8)`` runs
``python -m torch.distributed.run --nproc_per_node 8 [--standalone] -m anchorformer.cli train cls ...``
and returns ``OUT/metrics.json``. Several nodes: pass ``nnodes`` and the rendezvous arguments
(``--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB``) in ``torchrun_args``.
:func:`cli_arguments` turns a task function's keyword arguments into the same command line, so a
notebook calls one function (:func:`anchorformer.tasks.run_training`) whatever the process count.

SIGTERM and SIGUSR1 sent to the launching process are passed on to torchrun, which hands them
to its workers (``--signals-to-handle`` includes SIGUSR1): they checkpoint after their current
step and stop (:mod:`.preempt`), and the launcher exits with the same status as one process
would (143, or 75 for SIGUSR1).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["cli_arguments", "launch", "launch_if_several", "resolve_nproc", "torchrun_command"]

_logger = logging.getLogger(__name__)


def cli_arguments(data: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> list[str]:
    """``--data D --out O`` plus one flag per option (``None``/``False`` skipped, ``True`` a bare flag,
    lists repeated: ``overrides=["a=1", "b=2"]`` -> ``--set a=1 --set b=2``)."""
    argv = ["--data", str(data), "--out", str(out_dir)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--set" if key == "overrides" else "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def torchrun_command(
    command: str,
    task: str,
    argv: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    torchrun_args: Sequence[str] = (),
) -> list[str]:
    """The ``torchrun`` command line of ``anchorformer COMMAND TASK ARGV``."""
    if int(nproc_per_node) < 1 or int(nnodes) < 1:
        raise ValueError(f"nproc_per_node and nnodes must be >= 1; got {nproc_per_node}, {nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={int(nproc_per_node)}"]
    cmd.append(f"--nnodes={int(nnodes)}")
    if not any(a.startswith("--signals") for a in torchrun_args):  # SIGUSR1 to the workers, not the end of torchrun
        cmd.append("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    if int(nnodes) == 1 and not any(a.startswith(("--rdzv", "--master")) for a in torchrun_args):
        cmd.append("--standalone")
    return [*cmd, *torchrun_args, "-m", "anchorformer.cli", command, task, *argv]


def launch(
    task: str,
    argv: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    torchrun_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``anchorformer train TASK ARGV`` under torchrun and return the run's ``metrics.json``.

    Raises:
        RuntimeError: the job failed (its exit status; the processes' errors are in the log above).
    """
    cmd = torchrun_command(
        "train", task, argv, nproc_per_node=nproc_per_node, nnodes=nnodes, torchrun_args=torchrun_args
    )
    _logger.info("launching %s", " ".join(cmd))
    from .preempt import REQUEUE_EXIT, SIGNAL_EXIT, Preempted

    received: list[int] = []
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        proc.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # handlers live there only
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)} if main_thread else {}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:  # the workers checkpointed and stopped
        raise Preempted(SIGNAL_EXIT if signal.SIGTERM in received else REQUEUE_EXIT)
    if returncode:
        raise RuntimeError(f"torchrun job `anchorformer train {task}` failed with exit status {returncode}")
    out = Path(argv[list(argv).index("--out") + 1])
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(nproc: int | str, device: str | None = None) -> int:
    """The number of processes of a run: ``"auto"`` is every visible GPU, or 1 on a CPU (or when
    the recipe's ``device`` is ``"cpu"``); a number is taken as it is, with a warning when it is
    fewer than the visible GPUs of a recipe that runs on them.

    Raises:
        ValueError: neither ``"auto"`` nor a positive integer.
    """
    gpus = 0 if device == "cpu" else _visible_gpus()
    if str(nproc).strip().lower() == "auto":
        return max(1, gpus)
    try:
        n = int(nproc)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(nproc).strip():
        raise ValueError(f"nproc must be 'auto' or a positive integer, got {nproc!r}")
    if n < gpus:
        _logger.warning(
            "running on %d process(es) while %d GPUs are visible: set nproc to auto (params.yaml) to use them all",
            n,
            gpus,
        )
    return n


def launch_if_several(
    task: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    nproc_per_node: int | str,
    nnodes: int,
    torchrun_args: Sequence[str] = (),
    device: str | None = None,
    **flags: Any,
) -> dict[str, Any] | None:
    """A task function's torchrun dispatch: with more than one process asked for, and this process
    not already one of them (``WORLD_SIZE`` unset), run ``anchorformer train TASK`` with ``flags``
    under torchrun and return its metrics; otherwise ``None`` (train here).

    ``nproc_per_node`` may be ``"auto"`` (:func:`resolve_nproc`, with the recipe's ``device``).
    ``if_different="refuse"`` is the command's default and is not passed on.
    """
    if "WORLD_SIZE" in os.environ:
        return None
    nproc_per_node = resolve_nproc(nproc_per_node, device)
    if nproc_per_node * int(nnodes) <= 1:
        return None
    if flags.get("if_different") == "refuse":
        flags["if_different"] = None
    argv = cli_arguments(data, out_dir, **flags)
    return launch(task, argv, nproc_per_node=nproc_per_node, nnodes=nnodes, torchrun_args=torchrun_args)
