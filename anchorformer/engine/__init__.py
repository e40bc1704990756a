"""Training and evaluation engines.

Shared pieces used by every task: :mod:`.checkpoint` (atomic checkpoints, RNG states),
:mod:`.distributed` (torchrun / DDP set-up), :mod:`.config` (profile presets and ``--set``
overrides), :mod:`.logging` (dvclive metrics, tqdm progress). The task loops live in
:mod:`.classification`, :mod:`.detection` and :mod:`.segmentation`; each exposes
``register_train(subparsers)`` and ``register_eval(subparsers)`` for the command line.
"""

from __future__ import annotations

from .checkpoint import (
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from .config import apply_overrides, default_profile, load_profile
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup_distributed, init_distributed, unwrap_model
from .logging import MetricLogger, progress

__all__ = [
    "DistInfo",
    "MetricLogger",
    "all_reduce_mean",
    "apply_overrides",
    "barrier",
    "capture_rng_state",
    "checkpoint_path",
    "cleanup_distributed",
    "default_profile",
    "find_latest_checkpoint",
    "init_distributed",
    "load_profile",
    "load_training_checkpoint",
    "progress",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]
