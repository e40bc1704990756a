"""Reading files of the datasets: decoding with clear errors, the expected layouts, bad-file policy.

Every loader and the verifier read images through :func:`load_rgb` and label maps through
:func:`load_label_map`, so a file that does not decode always gives a :class:`BadFileError`
naming the file, never a bare traceback from inside PIL. Datasets take ``on_bad``:

- ``"fail"``: the error is raised (the default; a training run stops at the first bad file);
- ``"skip"``: the file is logged once, recorded in the dataset's ``bad_files``, and the next
  sample is returned instead (the counts are per process: each DataLoader worker keeps its own).
"""

from __future__ import annotations

import logging
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


class BadFileError(ValueError):
    """A file of a dataset exists but cannot be used (does not decode, wrong size or mode).

    Attributes:
        path: the offending file.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class MissingFileError(BadFileError, FileNotFoundError):
    """A file that the dataset lists (an annotation, a label map's image) does not exist."""

    def __init__(self, path: str | Path, what: str = "file") -> None:
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


class BadFilePolicy:
    """Mixin of the datasets: apply ``on_bad`` around a per-index fetch.

    The subclass sets ``self.on_bad`` (checked with :func:`check_on_bad`) and calls
    :meth:`_init_bad_files`; ``__getitem__`` calls ``self._fetch(index, fn)``.
    """

    on_bad: str
    bad_files: list[str]

    def _init_bad_files(self, on_bad: str) -> None:
        self.on_bad = check_on_bad(on_bad)
        self.bad_files = []

    def _fetch(self, index: int, fn: Callable[[int], T]) -> T:
        n = len(self)  # type: ignore[arg-type]
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return fn(i)
            except BadFileError as e:
                if self.on_bad == "fail":
                    raise
                if e.path not in self.bad_files:
                    self.bad_files.append(e.path)
                    log.warning("skipping bad file (%d so far): %s", len(self.bad_files), e)
        raise RuntimeError(f"no sample of {type(self).__name__} could be read; bad files: {self.bad_files[:10]}")

    @property
    def num_bad(self) -> int:
        return len(self.bad_files)
