"""Seeding, the same for every task: Python, NumPy and torch from one integer.

A run seeds everything from its recipe's ``seed`` before it builds its model; a task that
reseeds per epoch does so from :func:`epoch_seed` so that a resumed run draws the same numbers as
an uninterrupted one. Data-loader workers take their seed from the loader's base seed
(:func:`seed_worker`), which the reseeded main process draws.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["epoch_seed", "seed_everything", "seed_worker"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of ``epoch`` on process ``rank``: distinct per (seed, epoch, rank), stable across resumes."""
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % 2**31


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed a data-loader worker's Python and NumPy from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, drawn from the reseeded main RNG
    random.seed(seed)
    np.random.seed(seed)
