"""COCO detection and instance segmentation (E5): Mask R-CNN over a plain backbone, on the shared engine."""

from __future__ import annotations

from .recipe import DetRecipe
from .train import evaluate_checkpoint, resolve_recipe, train

__all__ = ["DetRecipe", "evaluate_checkpoint", "resolve_recipe", "train"]
