"""The engine every task shares.

:mod:`.recipe` (typed recipes: presets, ``--set`` overrides, validation), :mod:`.run` (the run
folder: lock, resume protocol, nothing of an earlier run lost), :mod:`.trainer` (the scaffolding
around a task's loop), :mod:`.checkpoint` (atomic checkpoints, RNG states), :mod:`.distributed`
(torchrun / DDP set-up), :mod:`.launch` (the torchrun launcher), :mod:`.seeding` and
:mod:`.logging` (dvclive metrics, tqdm progress). The tasks live in :mod:`anchorformer.tasks`.
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
    save_training_state,
)
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup_distributed, init_distributed, unwrap_model
from .logging import MetricLogger, progress
from .recipe import PROFILES, Recipe, RecipeError, TaskRecipe, load_recipe
from .run import RunFolderError, open_run

__all__ = [
    "PROFILES",
    "DistInfo",
    "MetricLogger",
    "Recipe",
    "RecipeError",
    "RunFolderError",
    "TaskRecipe",
    "all_reduce_mean",
    "barrier",
    "capture_rng_state",
    "checkpoint_path",
    "cleanup_distributed",
    "find_latest_checkpoint",
    "init_distributed",
    "load_recipe",
    "load_training_checkpoint",
    "open_run",
    "progress",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "save_training_state",
    "unwrap_model",
]
