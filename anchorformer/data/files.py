"""Reading files of the datasets: decoding with clear errors, the expected layouts, bad-file policy.

Every loader and the verifier read images through :func:`load_rgb` and label maps through
:func:`load_label_map`, so a file that does not decode always gives a :class:`BadFileError`
naming the file, never a bare traceback from inside PIL. Datasets take ``on_bad``:

- ``"fail"``: the error is raised (the default; a training run stops at the first bad file);
- ``"skip"``: the file is logged once, recorded in the dataset's ``bad_files``, and the next
  sample is returned instead (the counts are per process: each DataLoader worker keeps its own;
  :meth:`BadFilePolicy.record_bad_files_in` names a file to which every process appends what it
  skips, which :func:`read_bad_file_log` reads back).

Any other exception raised while a dataset loads or transforms a sample (a bug, an augmentation
that fails on some draw) is re-raised as a :class:`SampleError` naming the sample's file and the
transform step that raised; it is never skipped, whatever ``on_bad`` says, and the command line
turns it into one line and exit status 2 like a bad file.

A :class:`BadFileError` (or :class:`SampleError`) raised in a DataLoader worker is rebuilt in the main process from the
worker's message alone (the DataLoader calls ``type(e)(message)``), so it reaches the caller as
the same error naming the same file, whatever the number of workers.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
    "SampleError",
    "check_ade_pair",
    "check_dataset_files",
    "check_image",
    "check_on_bad",
    "load_label_map",
    "load_rgb",
    "missing_path_error",
    "read_bad_file_log",
    "unwrap_dataset",
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
_WORKER_LINE = re.compile(r"^(?:[\w.]+\.)?(?:BadFileError|MissingFileError|SampleError): (.*)$", re.MULTILINE)


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


class SampleError(BadFileError):
    """Loading or transforming a sample raised an unexpected exception; ``path`` is the sample's
    file and ``reason`` says which step raised what. Never skipped: the run ends."""


def _describe(obj: Any) -> str:
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return obj.__qualname__
    func = getattr(obj, "__func__", None)
    if func is not None and hasattr(obj, "__self__"):  # a bound method
        return f"{type(obj.__self__).__name__}.{func.__name__}"
    text = repr(obj)
    return text if "\n" not in text and len(text) <= 100 else type(obj).__name__


def _failing_step(transform: Any, tb: Any) -> str:
    """The step of ``transform`` (a Compose's element, or the transform itself) in whose code the
    traceback ``tb`` passed, and the callable objects below it, e.g.
    ``RandAugment > AugmentOp(name=PosterizeIncreasing, p=0.5, m=9, mstd=0.5)``."""
    steps = list(getattr(transform, "transforms", None) or [transform])
    owners = [getattr(s, "__self__", s) for s in steps]
    chain: list[Any] = []
    seen: list[Any] = []
    for frame, _ in traceback.walk_tb(tb):
        if not chain:
            function = next((s for s in steps if getattr(s, "__code__", None) is frame.f_code), None)
            if function is not None:
                chain.append(function)
                continue
        obj = frame.f_locals.get("self")
        if obj is None or any(obj is o for o in seen):
            continue
        if not chain:
            for step, owner in zip(steps, owners, strict=True):
                if obj is owner:
                    chain.append(step)
                    seen.append(obj)
                    break
        elif callable(obj) and not isinstance(obj, type):
            chain.append(obj)
            seen.append(obj)
    return " > ".join(_describe(o) for o in chain) if chain else _describe(transform)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


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


# ----------------------------------------------------------------------------------------------
# whole-file checks without transforms (module level, so that worker processes can run them):
# what `data verify` and a run's check before training (:func:`check_dataset_files`) decode


def check_image(path: str) -> tuple[str, tuple[int, int] | None, str | None]:
    """``(path, (width, height), None)`` if the image decodes, else ``(path, None, reason)``.

    JPEGs are decoded at a reduced DCT scale (all of the entropy-coded data is still read, so
    truncation and corruption are caught) to keep a pass over ImageNet affordable.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", (64, 64))
            im.load()
        return path, size, None
    except Exception as e:  # anything PIL raises means "does not decode"
        return path, None, f"cannot decode image ({type(e).__name__}: {e})"


def check_ade_pair(pair: tuple[str, str]) -> tuple[str, tuple[int, int] | None, str | None]:
    """:func:`check_image` of an ADE20K image and a check of its label map (single channel, the
    image's size, values 0..150): ``(path, size, None)`` or ``(the bad file, None, reason)``."""
    img_path, ann_path = pair
    path, size, reason = check_image(img_path)
    if reason is not None:
        return path, None, reason
    try:
        label = load_label_map(ann_path, expected_size=size)
    except BadFileError as e:
        return ann_path, None, e.reason
    top = int(label.max(initial=0))
    if top > 150:
        return ann_path, None, f"label value {top} found; expected 0 (other) or 1..150"
    return img_path, size, None


def unwrap_dataset(dataset: Any) -> tuple[Any, list[int] | None]:
    """The dataset with the ``on_bad`` policy (a :class:`BadFilePolicy`) under ``Subset`` and other
    wrappers (``.dataset``), and the indices of it that ``dataset`` reads (None: all of them).
    A dataset without the policy comes back as the innermost one found."""
    indices: list[int] | None = None
    while not isinstance(dataset, BadFilePolicy) and hasattr(dataset, "dataset"):
        if hasattr(dataset, "indices"):  # a Subset: map our indices through it
            sub = list(dataset.indices)
            indices = sub if indices is None else [sub[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


class _SampleChecks:
    """``check_sample`` of chosen indices of a dataset, as a map-style dataset (for a DataLoader)."""

    def __init__(self, base: Any, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[str, str | None]:
        return self.base.check_sample(self.indices[i])


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def check_dataset_files(
    dataset: Any, *, workers: int = 0, rank: int = 0, world_size: int = 1
) -> tuple[dict[str, str], int]:
    """Decode every file that ``dataset`` (a dataset with :class:`BadFilePolicy`, or a ``Subset``
    of one) reads, without its transforms: ``({path: reason} of the bad ones, number of samples)``.

    With ``world_size`` > 1 this process checks every ``world_size``-th sample from ``rank``
    (the caller gathers the findings). ``workers`` DataLoader processes decode when there are at
    least 2,000 samples to check; fewer are decoded in this process.
    """
    import torch
    from torch.utils.data import DataLoader

    base, indices = unwrap_dataset(dataset)
    if not isinstance(base, BadFilePolicy):
        raise TypeError(f"{type(base).__name__} has no check_sample(index): not a dataset of anchorformer.data")
    if indices is None:
        indices = list(range(len(base)))  # type: ignore[arg-type]
    mine = indices[rank::world_size]
    loader = DataLoader(
        _SampleChecks(base, mine),  # type: ignore[arg-type]
        batch_size=64,
        num_workers=workers if len(mine) >= 2000 else 0,
        collate_fn=_as_list,
        generator=torch.Generator(),  # its own: the global generator, and so the training, is untouched
    )
    bad: dict[str, str] = {}
    for batch in loader:
        for path, reason in batch:
            if reason is not None:
                bad.setdefault(path, reason)
    return bad, len(indices)


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

    def skip_file(self, path: str, reason: str) -> None:
        """Record ``path`` as skipped (logged once, with the reason)."""
        if path in self.bad_files:
            return
        self.bad_files.append(path)
        self._bad_reasons[path] = reason
        log.warning("skipping bad file (%d so far): %s: %s", len(self.bad_files), path, reason)
        if self.bad_file_log is not None:
            _append_record(self.bad_file_log, path, reason)

    def check_sample(self, index: int) -> tuple[str, str | None]:
        """Decode the file(s) of sample ``index`` without transforms: ``(path, None)`` when they
        can be used, else ``(the bad file, reason)``. Subclasses with more than one file override."""
        path, _, reason = check_image(self.sample_path(index))
        return path, reason

    def sample_path(self, index: int) -> str:
        """The file of sample ``index`` (named by a :class:`SampleError`); subclasses override."""
        samples = getattr(self, "samples", None)
        if samples is not None:
            item = samples[index]
            return str(item[0] if isinstance(item, (tuple, list)) else item)
        return str(getattr(self, "root", type(self).__name__))

    def _transform(self, path: str | Path, transform: Callable[..., T], *args: Any) -> T:
        """``transform(*args)``; any exception but a BadFileError (or MemoryError) becomes a
        :class:`SampleError` naming ``path`` and the step of ``transform`` that raised."""
        try:
            return transform(*args)
        except (BadFileError, MemoryError):
            raise
        except Exception as e:
            step = _failing_step(transform, e.__traceback__)
            raise SampleError(path, f"transform {step} raised {_one_line(e)}") from e

    def _fetch(self, index: int, fn: Callable[[int], T]) -> T:
        n = len(self)  # type: ignore[arg-type]
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return fn(i)
            except SampleError:
                raise
            except BadFileError as e:
                if self.on_bad == "fail":
                    raise
                self.skip_file(e.path, e.reason)
            except MemoryError:
                raise
            except Exception as e:
                raise SampleError(self.sample_path(i), f"loading the sample raised {_one_line(e)}") from e
        where = getattr(self, "root", type(self).__name__)
        raise BadFileError(where, f"no sample could be read: all {n} are bad, e.g. {self.bad_files[:3]}")

    @property
    def num_bad(self) -> int:
        return len(self.bad_files)
