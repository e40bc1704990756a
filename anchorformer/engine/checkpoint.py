"""Training checkpoints: atomic writes, safe reads, finding the latest one, RNG states.

A training checkpoint is a plain dict of tensors and Python primitives (model, optimizer,
scheduler, scaler and EMA state dicts, RNG states, epoch or iteration, config) so that it can be
read back with ``torch.load(weights_only=True)``, which never unpickles code.

Checkpoints are written atomically: the bytes go to a temporary file in the same folder
(``.NAME.tmp-XXXX``), which is flushed and fsynced, then renamed over ``NAME`` with
:func:`os.replace`. A process killed mid-write therefore leaves at most a hidden temporary file,
never a truncated ``checkpoint-*.pth``; :func:`find_latest_checkpoint` skips temporary files
and anything that is not a complete checkpoint archive.

A write that fails for want of room or rights (disk full, quota, read-only folder) raises
:class:`CheckpointWriteError`: one line naming the file, the cause (``ENOSPC``, ...) and the
checkpoint left intact, whatever torch's serializer made of the failed ``write()``.

Naming: :func:`checkpoint_path` gives ``OUT/checkpoints/checkpoint-{step:06d}.pth`` where the step
is the number of completed epochs (classification) or iterations (detection, segmentation). A
classification checkpoint written inside an epoch (a signal, ``checkpoint_minutes``) is
``checkpoint-{epochs:06d}-{updates:06d}.pth``: the completed epochs, then the optimizer steps done
in the next one; it sorts after the epoch's own checkpoint and before the next epoch's.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import describe_load_error, errno_in

__all__ = [
    "CheckpointWriteError",
    "capture_rng_state",
    "checkpoint_candidates",
    "checkpoint_path",
    "code_version",
    "find_latest_checkpoint",
    "load_training_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "save_training_state",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^checkpoint-(\d+)(?:-(\d+))?\.pth$")


def checkpoint_path(out_dir: str | os.PathLike, step: int, within: int = 0) -> Path:
    """The canonical path of the checkpoint after ``step`` epochs or iterations (and ``within``
    optimizer steps into the next epoch: a mid-epoch classification checkpoint)."""
    if step < 0 or within < 0:
        raise ValueError(f"checkpoint step must be >= 0; got {step}, {within}")
    suffix = f"-{within:06d}" if within else ""
    return Path(out_dir) / CHECKPOINT_DIR / f"checkpoint-{step:06d}{suffix}.pth"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, no rights); ``errno`` is the cause's.
    Nothing was replaced: the message names the checkpoint that is intact."""


class _ContentPickler(pickle.Pickler):
    """A pickler without the memo: an object seen twice is written twice. With the memo, the bytes
    depend on which equal objects (strings, tuples) are the same object in memory, which differs
    between a run resumed from a checkpoint and one that was never stopped; without it they depend
    on the content alone. (Tensors' storages go by ``persistent_id``, shared as before.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = True


class _content_pickle:  # noqa: N801 - stands in for the pickle module torch.save is given
    Pickler = _ContentPickler
    Unpickler = pickle.Unpickler
    __name__ = "pickle"


def _intact(path: Path) -> str:
    """What a failed write of ``path`` left intact, in words."""
    if path.exists():
        return f"{path} is intact (unchanged)"
    earlier = [p for _, p in checkpoint_candidates(path.parent) if p != path]
    if earlier:
        return f"the previous checkpoint {earlier[-1]} is intact"
    return "no earlier checkpoint existed; nothing was replaced"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, flush + fsync, ``os.replace``).

    Args:
        path: the destination; its folder is created.
        state: a dict of tensors, state dicts and Python primitives (readable with
            ``weights_only=True``).

    Raises:
        CheckpointWriteError: the file system refused the write (``ENOSPC``, ``EDQUOT``,
            ``EACCES``, ...); the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e.errno, e) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f, pickle_module=_content_pickle)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = errno_in(e) if isinstance(e, Exception) else None
        if code is not None:
            raise _write_error(path, code, e) from e
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, code: int | None, cause: BaseException) -> CheckpointWriteError:
    code = code or 0
    name = errno.errorcode.get(code, str(code))
    err = CheckpointWriteError(
        f"{path}: cannot write the checkpoint: {os.strerror(code) if code else cause} ({name}); {_intact(path)}"
        + ("; free some space, then rerun the same command to resume" if code in (errno.ENOSPC, errno.EDQUOT) else "")
    )
    err.errno = code
    return err


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on the CPU).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a complete, weights-only PyTorch checkpoint holding a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable weights-only PyTorch checkpoint: {describe_load_error(e)}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, found {type(state).__name__}")
    return state


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole torch zip archive (a cut file lacks the central directory)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_candidates(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every `checkpoint-N.pth` under `out_dir` (or its `checkpoints/`), as (N, path) sorted by N."""
    out_dir = Path(out_dir)
    found = []
    for folder in (out_dir / CHECKPOINT_DIR, out_dir):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _NAME_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return [(n, p) for n, _, p in sorted(found)]


_PACKAGE = Path(__file__).resolve().parents[1]
_CODE_VERSION: str | None = None


def code_version() -> str:
    """A hash of the package's source and preset files: which code wrote a checkpoint."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        h = hashlib.sha256()
        for p in sorted(list(_PACKAGE.rglob("*.py")) + list(_PACKAGE.rglob("*.yaml"))):
            h.update(str(p.relative_to(_PACKAGE)).encode())
            h.update(p.read_bytes())
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


def save_training_state(
    out_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int, within: int = 0
) -> Path:
    """Write the training state after ``step`` epochs/iterations (``within``: and optimizer steps
    into the next epoch) atomically, with the code version, then keep the newest ``keep``
    checkpoints. Returns the checkpoint's path."""
    path = checkpoint_path(out_dir, step, within)
    save_checkpoint(path, {**state, "code_version": code_version()})
    prune_checkpoints(out_dir, keep)
    return path


def find_latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N.pth`` with the largest N under ``out_dir`` (or its ``checkpoints/``).

    Temporary files (``.NAME.tmp-*``) never match; a file that is not a complete archive is
    skipped with a warning and the next older checkpoint is returned.

    Returns:
        The path, or ``None`` when there is no complete checkpoint.
    """
    out_dir = Path(out_dir)
    for step, p in reversed(checkpoint_candidates(out_dir)):
        if _is_complete(p):
            return p
        _logger.warning("skipping incomplete checkpoint %s (step %d)", p, step)
    return None


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``checkpoint-N.pth`` files; return the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    cands = checkpoint_candidates(Path(out_dir))
    removed = []
    for _, p in cands[: max(0, len(cands) - keep)]:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators.

    Stored as tensors and primitives so that a checkpoint holding it loads with
    ``weights_only=True``.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from a dict made by :func:`capture_rng_state`.

    Raises:
        KeyError: a required entry (``python``, ``numpy``, ``torch``) is missing.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise KeyError(f"RNG state lacks {missing}; expected the dict of capture_rng_state()")
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, int(nps["pos"]), int(nps["has_gauss"]), float(nps["gauss"])))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            _logger.warning(
                "checkpoint holds %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
