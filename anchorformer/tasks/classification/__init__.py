"""ImageNet classification (E1–E3): the DeiT recipe on the shared engine."""

from __future__ import annotations

from .recipe import ClsRecipe
from .train import evaluate_checkpoint, resolve_recipe, train

__all__ = ["ClsRecipe", "evaluate_checkpoint", "resolve_recipe", "train"]
