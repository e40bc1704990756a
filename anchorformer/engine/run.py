"""The run folder: one run's, resumed or refused, never silently mixed with another.

Every task (``train cls|det|seg``) starts through :func:`open_run`, which

1. takes a lock in ``OUT`` (``OUT/.run.lock``: host, PID, command, start time and a heartbeat,
   rewritten every minute by a thread of the run). A second run on the same folder is refused
   with that information; a lock left by a dead process on this host, or one whose heartbeat is
   older than ``lock_stale_minutes`` (default 10; a job killed on another host, then requeued),
   is taken over with a warning. The lock is released when the run ends, however it ends (a
   ``kill -9`` leaves it behind: its heartbeat stops).
2. removes orphan temporary files of interrupted atomic writes (``.NAME.tmp-*``), with a log line.
3. decides where the run starts (the resume protocol, the same for every task):

   - ``resume="auto"`` (the default): the newest checkpoint under ``OUT/checkpoints`` that loads;
     one that does not (truncated, or refused as unsafe) is skipped with a warning naming it and
     the next older one is tried. Its recipe must equal this run's, apart from the settings marked
     resumable; otherwise the run is refused. A folder holding an earlier run's results but no
     checkpoint to resume is refused too.
   - ``resume="never"``: a fresh start. A folder holding an earlier run's checkpoints or results is
     refused unless ``overwrite=True``, which moves them aside into ``OUT/previous-<timestamp>/``
     (nothing is deleted).
   - ``resume=PATH``: that checkpoint (it must load and fit the recipe).

4. removes this run's own result files from an earlier attempt (``metrics.json`` is written last
   and its presence means the run finished, so it must not survive a restart).

Under ``torchrun`` only the main process touches the folder; every process reads the checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_DIR, checkpoint_candidates, code_version, load_training_checkpoint

__all__ = [
    "HEARTBEAT_SECONDS",
    "LOCK_NAME",
    "RESUME_CHOICES",
    "RunFolderError",
    "RunStart",
    "open_run",
    "release_run",
]

_logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
RESUME_CHOICES = ("auto", "never")
_TMP_MARK = ".tmp-"
HEARTBEAT_SECONDS = 60.0  # how often a run rewrites its lock's heartbeat


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (locked, holds another run, unreadable checkpoint)."""


@dataclass
class RunStart:
    """Where a run starts: ``state`` is the checkpoint resumed from (``None``: a fresh start)."""

    out_dir: Path
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)
    lock: Path | None = None
    heartbeat: _Heartbeat | None = None

    @property
    def resumed(self) -> bool:
        return self.state is not None


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock_info() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "heartbeat": now,
    }


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        held = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return held if isinstance(held, dict) else {}


def _heartbeat_age(path: Path, held: Mapping[str, Any]) -> float:
    """Seconds since the lock's last heartbeat (its file's modification time for a lock without one)."""
    beat = held.get("heartbeat")
    if not isinstance(beat, (int, float)):
        try:
            beat = path.stat().st_mtime
        except OSError:
            return 0.0
    return max(0.0, time.time() - float(beat))


def _take_lock(out: Path, stale_minutes: float = 10.0) -> Path:
    path = out / LOCK_NAME
    info = _lock_info()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            pid = held.get("pid")
            same_host = held.get("host") == info["host"]
            if same_host and isinstance(pid, int) and pid != info["pid"] and not _pid_alive(pid):
                _logger.warning("%s: taking over the lock of process %d, which is no longer running", path, pid)
                path.unlink(missing_ok=True)
                continue
            if same_host and pid == info["pid"]:
                return path  # this process holds it already (e.g. train then evaluate)
            age = _heartbeat_age(path, held)
            if age > stale_minutes * 60.0:
                _logger.warning(
                    "%s: taking over the lock of host %s, PID %s, whose heartbeat stopped %.1f minutes ago "
                    "(lock_stale_minutes=%g)",
                    path, held.get("host", "?"), pid, age / 60.0, stale_minutes,
                )  # fmt: skip
                path.unlink(missing_ok=True)
                continue
            raise RunFolderError(
                f"{out} is in use by another run (host {held.get('host', '?')}, PID {pid}, started "
                f"{held.get('started', '?')}, heartbeat {age / 60.0:.1f} min ago: {held.get('command', '?')}); "
                f"wait for it to end, or use another --out (a lock whose heartbeat is older than "
                f"lock_stale_minutes={stale_minutes:g} is taken over)"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        return path
    raise RunFolderError(f"{path}: could not take the lock")


class _Heartbeat:
    """A daemon thread rewriting the lock's ``heartbeat`` every :data:`HEARTBEAT_SECONDS` while
    this process holds it (atomically: a temporary file renamed over it)."""

    def __init__(self, path: Path, interval: float):
        self.path, self.interval = path, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            held = _read_lock(self.path)
            if held.get("pid") != os.getpid() or held.get("host") != socket.gethostname():
                _logger.warning("%s is no longer this run's lock (taken over?); heartbeat stopped", self.path)
                return
            held["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{self.path.name}{_TMP_MARK}{os.getpid()}")
            try:
                tmp.write_text(json.dumps(held), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError as e:  # a full disk must not end the run; the next beat tries again
                _logger.warning("%s: cannot refresh the heartbeat: %s", self.path, e)
                tmp.unlink(missing_ok=True)

    def stop(self) -> None:
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


def release_run(start: RunStart | None) -> None:
    """Release the folder's lock (a no-op when this process holds none)."""
    if start is None or start.lock is None:
        return
    if start.heartbeat is not None:
        start.heartbeat.stop()
        start.heartbeat = None
    held = _read_lock(start.lock)
    if not held:
        return
    if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        start.lock.unlink(missing_ok=True)
    start.lock = None


# ---------------------------------------------------------------------------------------------
# The folder's contents
# ---------------------------------------------------------------------------------------------


def _remove_orphans(out: Path) -> None:
    for folder in (out, out / CHECKPOINT_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and _TMP_MARK in p.name:
                _logger.info("removing %s, left by an interrupted write", p)
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _earlier_run(out: Path, results: Iterable[str]) -> list[str]:
    """What in ``out`` belongs to an earlier run: checkpoints and result files."""
    found = [str(p.relative_to(out)) for _, p in checkpoint_candidates(out)]
    found += [name for name in results if (out / name).exists()]
    return found


def _move_aside(out: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = out / f"previous-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"previous-{stamp}-{n}"
    dest.mkdir()
    for p in sorted(out.iterdir()):
        if p == dest or p.name == LOCK_NAME or p.name.startswith("previous-"):
            continue
        shutil.move(str(p), str(dest / p.name))
    return dest


def _remove_results(out: Path, results: Iterable[str]) -> None:
    found = [name for name in results if (out / name).exists()]
    if found:
        _logger.warning(
            "resuming: removing %s of this run's earlier attempt (a result never outlives the weights it describes)",
            ", ".join(found),
        )
    for name in found:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---------------------------------------------------------------------------------------------
# Resume protocol
# ---------------------------------------------------------------------------------------------


def _load_first_good(out: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    skipped = []
    for _, path in reversed(checkpoint_candidates(out)):
        try:
            return path, load_training_checkpoint(path), skipped
        except (ValueError, OSError) as e:
            _logger.warning("skipping %s: %s", path, e)
            skipped.append(f"{path.name} ({e})")
    return None, None, skipped


_WEIGHT_KEYS = ("model", "state_dict", "model_ema")  # where a file of weights keeps them


def _load_named(path: Path) -> dict[str, Any]:
    """The checkpoint ``--resume PATH`` names, read and judged before the run folder is touched."""
    try:
        state = load_training_checkpoint(path)
    except ValueError as e:
        raise RunFolderError(f"--resume {path}: {e}") from e
    weights_only = "optimizer" not in state and (
        any(k in state for k in _WEIGHT_KEYS) or (state and all(isinstance(v, torch.Tensor) for v in state.values()))
    )
    if weights_only:  # a run's model.pth, model.safetensors' twin, timm weights: nothing to resume
        raise RunFolderError(
            f"--resume {path}: {path.name} holds weights only, not a training checkpoint (no optimizer state); "
            "resume from OUT/checkpoints/checkpoint-*.pth, or start afresh with --resume never"
        )
    return state


def open_run(
    out_dir: str | os.PathLike,
    *,
    resume: str = "auto",
    overwrite: bool = False,
    is_main: bool = True,
    results: Iterable[str] = ("metrics.json", "model.pth", "model.safetensors"),
    differences: Callable[[Mapping[str, Any]], list[str]] | None = None,
    if_different: str = "refuse",
    lock: bool = True,
    lock_stale_minutes: float = 10.0,
    restart_on_code_change: bool = False,
) -> RunStart:
    """Take ``out_dir`` for a run and decide where it starts (see the module docstring).

    Args:
        out_dir: the run folder (created).
        resume: ``"auto"``, ``"never"`` or a checkpoint path.
        overwrite: with ``resume="never"``, move an earlier run's files aside instead of refusing.
        is_main: whether this process owns the folder (rank 0); others only read the checkpoint.
        results: the run's result files and folders, relative to ``out_dir`` (removed before a
            start so that a stopped run never looks finished; moved aside with ``overwrite``).
        differences: ``state -> [why it cannot be resumed]`` (empty: it can), checked on the
            checkpoint chosen.
        if_different: what ``resume="auto"`` does when the newest checkpoint cannot be resumed
            (another recipe): ``"refuse"`` (the command line's behaviour) or ``"restart"`` (the
            pipeline's: a stage reruns because its parameters changed, so the earlier run's files
            are moved to ``previous-<timestamp>/`` and it starts afresh).
        lock: take the folder's lock (main process only) and keep its heartbeat.
        lock_stale_minutes: a lock whose heartbeat is older than this is taken over (any host).
        restart_on_code_change: with ``if_different="restart"``, a checkpoint written by another
            version of the code counts as another recipe (the run starts afresh); otherwise it is
            resumed with a warning.

    Returns:
        A :class:`RunStart`; release it with :func:`release_run` when the run ends.

    Raises:
        RunFolderError: the folder is locked by a live run, holds another run, or the named
            checkpoint cannot be resumed.
    """
    out = Path(out_dir)
    results = tuple(results)
    start = RunStart(out)
    if resume not in RESUME_CHOICES and not Path(resume).is_file():
        raise RunFolderError(f"--resume {resume}: expected auto, never or an existing checkpoint file")
    named_state = _load_named(Path(resume)) if resume not in RESUME_CHOICES else None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if lock:
            start.lock = _take_lock(out, lock_stale_minutes)
            start.heartbeat = _Heartbeat(start.lock, HEARTBEAT_SECONDS)
    try:
        if is_main:
            _remove_orphans(out)
        if resume == "never":
            earlier = _earlier_run(out, results)
            if earlier and is_main:
                if not overwrite:
                    raise RunFolderError(
                        f"{out} holds an earlier run ({', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''}); "
                        "resume it with --resume auto, or start afresh with --resume never --overwrite "
                        "(which moves its files to previous-<timestamp>/)"
                    )
                dest = _move_aside(out)
                _logger.warning("starting afresh: the earlier run's files are now in %s", dest)
            return start
        if resume == "auto":
            path, state, start.skipped = _load_first_good(out)
            if path is None:
                leftover = [name for name in results if (out / name).exists()]
                if leftover and is_main:
                    raise RunFolderError(
                        f"{out} holds an earlier run's results ({', '.join(leftover)}) but no checkpoint to resume"
                        + (f" (unreadable: {'; '.join(start.skipped)})" if start.skipped else "")
                        + "; use another --out, or start afresh with --resume never --overwrite "
                        "(which moves them to previous-<timestamp>/)"
                    )
                return start
        else:
            path, state = Path(resume), named_state
        why = differences(state) if differences is not None else []
        stored = state.get("code_version")
        same_code = stored in (None, code_version())
        if not same_code and restart_on_code_change and resume == "auto" and if_different == "restart":
            why = [*why, f"code version: checkpoint {stored} vs now {code_version()} (restart_on_code_change=true)"]
        if resume == "auto" and if_different == "restart" and why:
            if is_main:
                dest = _move_aside(out)
                _logger.warning(
                    "%s cannot be resumed (%s): starting afresh; its files are now in %s", path, "; ".join(why), dest
                )
            return start
        if not same_code and not why:
            _logger.warning(
                "%s was written by code version %s, this is %s: resuming all the same (the model and recipe "
                "match; metrics.json lists each segment's code version)",
                path, stored, code_version(),
            )  # fmt: skip
        if why:
            raise RunFolderError(
                f"cannot resume from {path}: it was written by another recipe ({'; '.join(why)}); "
                "use another --out, or start afresh with --resume never --overwrite"
            )
        if start.skipped:
            _logger.warning("resuming from %s; skipped newer checkpoint(s): %s", path, "; ".join(start.skipped))
        start.checkpoint, start.state = path, state
        if is_main:
            _remove_results(out, results)
        return start
    except BaseException:
        release_run(start)
        raise
