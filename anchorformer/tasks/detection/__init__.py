"""COCO detection and instance segmentation (E5): Mask R-CNN over a plain backbone, on the shared engine."""

from __future__ import annotations

from .recipe import DetRecipe

__all__ = ["DetRecipe"]
