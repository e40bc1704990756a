"""Reading files of the datasets: decoding with clear errors, the expected layouts, bad-file policy.

Every loader and the verifier read images through :func:`load_rgb` and label maps through
:func:`load_label_map`, so a file that does not decode always gives a :class:`BadFileError`
naming the file, never a bare traceback from inside PIL. Datasets take ``on_bad``:

- ``"fail"``: the error is raised (the default; a training run stops at the first bad file);
- ``"skip"``: the file is logged once, recorded in the dataset's ``bad_files``, and the next
  sample is returned instead (the counts are per process: each DataLoader worker keeps its own;
  :meth:`BadFilePolicy.record_bad_files_in` names a file to which every process appends what it
  skips, which :func:`read_bad_file_log` reads back).

A :class:`BadFileError` raised in a DataLoader worker is rebuilt in the main process from the
worker's message alone (the DataLoader calls ``type(e)(message)``), so it reaches the caller as
the same error naming the same file, whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

__all__ = [
    "ADE20K_LAYOUT",
    "COCO_LAYOUT",
    "IMAGENET_LAYOUT",
    "ON_BAD",
    "BadFileError",
    "BadFilePolicy",
    "MissingFileError",
    "check_on_bad",
    "load_label_map",
    "load_rgb",
    "missing_path_error",
    "read_bad_file_log",
]

log = logging.getLogger(__name__)

ON_BAD = ("fail", "skip")

IMAGENET_LAYOUT = """\
ROOT/
  train/
    n01440764/                  one folder per class (WordNet id), 1000 folders
      n01440764_10026.JPEG      .JPEG, .jpg or .png
      ...
  val/
    n01440764/                  the same class folders (val images sorted by class)
      ILSVRC2012_val_00000293.JPEG
      ..."""

COCO_LAYOUT = """\
ROOT/
  annotations/
    instances_train2017.json
    instances_val2017.json
  train2017/
    000000000009.jpg            the file_name of each image in the json
    ...
  val2017/
    000000000139.jpg
    ..."""

ADE20K_LAYOUT = """\
ROOT/                           (the ADEChallengeData2016 folder)
  images/
    training/
      ADE_train_00000001.jpg
      ...
    validation/
      ADE_val_00000001.jpg
      ...
  annotations/
    training/
      ADE_train_00000001.png    label map, mode L: 0 = other, 1..150 = classes; same stem and size
      ...
    validation/
      ADE_val_00000001.png
      ..."""


# the last line of a traceback formatted by a DataLoader worker: "pkg.BadFileError: PATH: REASON"
_WORKER_LINE = re.compile(r"^(?:[\w.]+\.)?(?:BadFileError|MissingFileError): (.*)$", re.MULTILINE)


def _split_message(text: str) -> tuple[str, str]:
    """``(path, reason)`` of a message ``"PATH: REASON"``, or of a DataLoader worker's report of one."""
    found = _WORKER_LINE.findall(text)
    message = found[-1].strip() if found else text.strip().splitlines()[-1] if text.strip() else text
    path, sep, reason = message.partition(": ")
    return (path, reason) if sep else ("", message)


class BadFileError(ValueError):
    """A file of a dataset exists but cannot be used (does not decode, wrong size or mode).

    ``BadFileError(message)`` with one string (``"PATH: REASON"``, or the report of a DataLoader
    worker that raised one) rebuilds the error: that is how pickling and the DataLoader re-raise it.

    Attributes:
        path: the offending file.
        reason: what is wrong with it.
    """

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        report = str(path) if reason is None and "\n" in str(path) else None
        if reason is None:
            path, reason = _split_message(str(path))
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)
        if report is not None:  # the worker's traceback, shown with --debug
            self.add_note(report)


class MissingFileError(BadFileError, FileNotFoundError):
    """A file that the dataset lists (an annotation, a label map's image) does not exist."""

    def __init__(self, path: str | Path, what: str | None = None) -> None:
        if what is None:  # rebuilt from a message (pickling, a DataLoader worker)
            super().__init__(path)
        else:
            super().__init__(path, f"{what} does not exist")


def missing_path_error(path: str | Path, what: str, layout: str) -> FileNotFoundError:
    """A FileNotFoundError naming the missing ``path`` and showing the expected ``layout``."""
    return FileNotFoundError(f"missing {what}: {path}\nexpected layout:\n{layout}")


def check_on_bad(on_bad: str) -> str:
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    return on_bad


def load_rgb(path: str | Path, *, draft: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB.

    Args:
        path: the image file.
        draft: if given, JPEGs are decoded at a reduced scale no smaller than this side (fast
            checks); the whole entropy-coded stream is still read, so truncation is detected.

    Raises:
        MissingFileError: the file does not exist (a FileNotFoundError and a BadFileError).
        BadFileError: it exists but does not decode (truncated, not an image, unsupported).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "image file")
    try:
        with Image.open(path) as im:
            if draft is not None:
                im.draft("RGB", (draft, draft))
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadFileError(path, f"cannot decode image ({type(e).__name__}: {e})") from e


def load_label_map(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a single-channel PNG label map.

    Args:
        path: the PNG file.
        expected_size: ``(width, height)`` of its image, checked if given.

    Returns:
        uint8 array (H, W).

    Raises:
        MissingFileError: the file does not exist (a FileNotFoundError and a BadFileError).
        BadFileError: it does not decode, is not single-channel (mode L or P), or its size differs.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "label map")
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in ("L", "P"):
                raise BadFileError(path, f"label map must be single-channel (mode L or P), got mode {mode}")
            arr = np.array(im, dtype=np.uint8)
    except BadFileError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadFileError(path, f"cannot decode label map ({type(e).__name__}: {e})") from e
    if expected_size is not None and tuple(size) != tuple(expected_size):
        raise BadFileError(
            path, f"label map size {size[0]}x{size[1]} differs from its image's {expected_size[0]}x{expected_size[1]}"
        )
    return arr


T = TypeVar("T")


def _append_record(log_file: str, path: str, reason: str) -> None:
    # one short line per write(): appends from several processes (workers, ranks) do not interleave
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"path": path, "reason": reason}) + "\n")


def read_bad_file_log(log_file: str | Path) -> dict[str, str]:
    """The files recorded by :meth:`BadFilePolicy.record_bad_files_in`: ``{path: reason}`` (each once).

    A missing log means nothing was skipped; a line cut by a killed process is ignored.
    """
    found: dict[str, str] = {}
    try:
        lines = Path(log_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "path" in record:
            found.setdefault(str(record["path"]), str(record.get("reason", "")))
    return found


class BadFilePolicy:
    """Mixin of the datasets: apply ``on_bad`` around a per-index fetch.

    The subclass sets ``self.on_bad`` (checked with :func:`check_on_bad`) and calls
    :meth:`_init_bad_files`; ``__getitem__`` calls ``self._fetch(index, fn)``.
    """

    on_bad: str
    bad_files: list[str]
    bad_file_log: str | None = None

    def _init_bad_files(self, on_bad: str) -> None:
        self.on_bad = check_on_bad(on_bad)
        self.bad_files = []
        self._bad_reasons: dict[str, str] = {}

    def record_bad_files_in(self, log_file: str | Path) -> None:
        """Append every file skipped from now on (and those skipped already) to ``log_file``, one
        JSON line each; the DataLoader's workers and other processes append to the same file."""
        self.bad_file_log = str(log_file)
        for path in self.bad_files:
            _append_record(self.bad_file_log, path, self._bad_reasons.get(path, ""))

    def _skip(self, path: str, reason: str) -> None:
        """Record ``path`` as skipped (logged once, with the reason)."""
        if path in self.bad_files:
            return
        self.bad_files.append(path)
        self._bad_reasons[path] = reason
        log.warning("skipping bad file (%d so far): %s: %s", len(self.bad_files), path, reason)
        if self.bad_file_log is not None:
            _append_record(self.bad_file_log, path, reason)

    def _fetch(self, index: int, fn: Callable[[int], T]) -> T:
        n = len(self)  # type: ignore[arg-type]
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return fn(i)
            except BadFileError as e:
                if self.on_bad == "fail":
                    raise
                self._skip(e.path, e.reason)
        where = getattr(self, "root", type(self).__name__)
        raise BadFileError(where, f"no sample could be read: all {n} are bad, e.g. {self.bad_files[:3]}")

    @property
    def num_bad(self) -> int:
        return len(self.bad_files)
