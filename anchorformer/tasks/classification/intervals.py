"""Top-1 with its uncertainty: bootstrap intervals over validation images and seeds.

Every classification run writes ``predictions.json`` beside its ``metrics.json``: one flag per
validation image (1: top-1 correct) in the evaluation's deterministic order (the sorted
ImageFolder, after ``max_eval_images``), and a hash of the evaluated file list, so that two runs
can be compared image by image (:func:`read_predictions`).

A row of a table is one configuration trained with S ≥ 1 seeds, each evaluated on the same N
images: a (S, N) array of flags. Its top-1 is the mean over seeds of each seed's top-1, and its
95% interval comes from a two-level bootstrap (:func:`bootstrap_top1`): each replicate draws N
images with replacement (the same draw for every seed) and S seeds with replacement. A difference
between two rows (:func:`paired_difference`) uses the same image draw on both sides (the pairing:
the images both rows saw) and draws each side's seeds independently (seed k of one configuration
is not seed k of the other). The percentile interval of the replicates is reported.

The verdict rule (:func:`decide`), stated once in the report (:data:`RULE`): a difference is
"higher" when its whole 95% interval lies above zero, "lower" when it lies below, and "not
distinguishable" otherwise. Runs written before ``predictions.json`` existed have no flags: their
top-1 gets the Wilson score interval of its binomial count, and no paired interval.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_REPLICATES",
    "LEVEL",
    "PREDICTIONS",
    "RULE",
    "bootstrap_top1",
    "decide",
    "file_list_sha256",
    "paired_difference",
    "predictions_record",
    "read_predictions",
    "relative_gain",
    "wilson_interval",
]

PREDICTIONS = "predictions.json"  # per-image top-1 flags of a run, beside its metrics.json
LEVEL = 0.95
BOOTSTRAP_REPLICATES = 4000
RULE = (
    "Every top-1 carries a 95% interval: a bootstrap over the validation images (the same image draw for "
    "every seed of a row) and, where a row ran with several seeds, over its seeds (percentile interval, "
    f"{BOOTSTRAP_REPLICATES} replicates, fixed generator). Every difference is paired: both sides use the same "
    "image draw, each side draws its own seeds. **Rule:** a difference is *higher* (or *lower*) when its whole "
    "95% interval lies above (below) zero, and *not distinguishable* when the interval contains zero; a claim "
    "is *supported* when the interval of our value lies at or above the claimed value, *same direction* when it "
    "lies above zero without reaching the claim, *not supported* when it lies below zero, and *not "
    "distinguishable* when it contains zero. Runs without per-image predictions get the Wilson interval of "
    "their count and no paired interval."
)


def file_list_sha256(files: Sequence[str]) -> str:
    """SHA-256 of the evaluated files, one relative path per line, in evaluation order."""
    return hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest()


def predictions_record(correct: Sequence[bool] | np.ndarray, files: Sequence[str]) -> dict[str, Any]:
    """The content of ``predictions.json``: ``images``, ``files_sha256`` and ``correct`` (a string of
    0/1 per image, in evaluation order).

    Raises:
        ValueError: when the flags and the files differ in number.
    """
    flags = np.asarray(correct, dtype=bool).reshape(-1)
    if flags.size != len(files):
        raise ValueError(f"predictions: {flags.size} correctness flags for {len(files)} evaluated files")
    return {
        "images": int(flags.size),
        "files_sha256": file_list_sha256(files),
        "correct": "".join("1" if f else "0" for f in flags),
    }


def read_predictions(run_dir: str | Path) -> dict[str, Any] | None:
    """``predictions.json`` of a run folder as ``{"correct": bool array (N,), "files_sha256": str}``,
    or None when the run has none (written before per-image predictions existed).

    Raises:
        ValueError: naming the file, when it is not JSON or its flags do not match ``images``.
    """
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        flags = str(data["correct"])
        n = int(data["images"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a predictions file ({e}); expected images, files_sha256, correct") from e
    if len(flags) != n or set(flags) - {"0", "1"}:
        raise ValueError(f"{path}: 'correct' must be {n} characters 0/1, got {len(flags)}")
    return {
        "correct": np.frombuffer(flags.encode("ascii"), dtype=np.uint8) == ord("1"),
        "files_sha256": data.get("files_sha256"),
    }


def _stack(flags: Sequence[np.ndarray], what: str) -> np.ndarray:
    if not len(flags):
        raise ValueError(f"{what}: no run")
    sizes = {len(f) for f in flags}
    if len(sizes) != 1:
        raise ValueError(f"{what}: the seeds were evaluated on different numbers of images {sorted(sizes)}")
    return np.stack([np.asarray(f, dtype=np.float64) for f in flags])  # (S, N)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _replicates(sides: Sequence[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Bootstrap top-1 (percent) of each (S_i, N) side, (n_boot,) each, with one image draw shared by the
    sides and each side's seeds drawn on their own."""
    n = sides[0].shape[1]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, n, size=(n_boot, n))  # (B, N): the same images for every side
    out = []
    for side in sides:
        s = side.shape[0]
        per_seed = np.stack([side[k][images].mean(axis=1) for k in range(s)], axis=1)  # (B, S)
        if s > 1:
            pick = rng.integers(0, s, size=(n_boot, s))  # (B, S) seeds with replacement
            per_seed = np.take_along_axis(per_seed, pick, axis=1)
        out.append(100.0 * per_seed.mean(axis=1))
    return out


def bootstrap_top1(
    flags: Sequence[np.ndarray], *, n_boot: int = BOOTSTRAP_REPLICATES, level: float = LEVEL, seed: int = 0
) -> dict[str, Any]:
    """Top-1 (percent) of one row and its bootstrap interval.

    Args:
        flags: one (N,) array of per-image correctness per seed, all over the same N images.
        n_boot: bootstrap replicates.
        level: the interval's coverage.
        seed: the generator's seed (the same inputs give the same interval).

    Returns:
        ``{"top1": mean over seeds, "lo", "hi", "seeds": S, "per_seed": [top-1 of each seed],
        "spread": sample standard deviation over seeds (None for one seed)}``.
    """
    side = _stack(flags, "bootstrap_top1")
    (boot,) = _replicates([side], n_boot, seed)
    per_seed = [100.0 * float(v) for v in side.mean(axis=1)]
    lo, hi = _percentiles(boot, level)
    return {
        "top1": float(np.mean(per_seed)),
        "lo": lo,
        "hi": hi,
        "seeds": len(per_seed),
        "per_seed": per_seed,
        "spread": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
    }


def paired_difference(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    *,
    n_boot: int = BOOTSTRAP_REPLICATES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 of ``a`` minus top-1 of ``b`` (points), paired over images, with its bootstrap interval and
    the relative gain ``(a - b) / b`` (percent) with its own.

    Args:
        a, b: each a list of (N,) per-image flags, one per seed, over the same N images in the same order.

    Returns:
        ``{"diff", "lo", "hi", "verdict"}`` (the verdict of :func:`decide`) and ``"rel", "rel_lo", "rel_hi"``
        (None when b's top-1 is 0).
    """
    sa, sb = _stack(a, "paired_difference"), _stack(b, "paired_difference")
    if sa.shape[1] != sb.shape[1]:
        raise ValueError(f"paired_difference: {sa.shape[1]} images on one side, {sb.shape[1]} on the other")
    ra, rb = _replicates([sa, sb], n_boot, seed)
    top_a, top_b = 100.0 * float(sa.mean()), 100.0 * float(sb.mean())
    lo, hi = _percentiles(ra - rb, level)
    out: dict[str, Any] = {"diff": top_a - top_b, "lo": lo, "hi": hi, "verdict": decide(lo, hi)}
    out.update(relative_gain(top_a, top_b, ra, rb, level))
    return out


def relative_gain(
    top_a: float, top_b: float, boot_a: np.ndarray, boot_b: np.ndarray, level: float = LEVEL
) -> dict[str, float | None]:
    """``100 (a - b) / b`` and its percentile interval from paired replicates (replicates with b = 0 dropped)."""
    if top_b == 0:
        return {"rel": None, "rel_lo": None, "rel_hi": None}
    keep = boot_b > 0
    rel = 100.0 * (boot_a[keep] - boot_b[keep]) / boot_b[keep]
    lo, hi = _percentiles(rel, level)
    return {"rel": 100.0 * (top_a - top_b) / top_b, "rel_lo": lo, "rel_hi": hi}


def decide(lo: float | None, hi: float | None) -> str:
    """The verdict of a difference's interval: ``higher``, ``lower`` or ``not distinguishable``
    (``no interval`` without one)."""
    if lo is None or hi is None:
        return "no interval"
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "not distinguishable"


def wilson_interval(top1: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval (percent) of a top-1 of ``top1`` percent over ``n`` images: the interval
    of a run without per-image flags (closed form)."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    z = _normal_quantile((1 + level) / 2)
    p = top1 / 100.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    """The standard normal quantile (bisection on erf: no scipy needed)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
