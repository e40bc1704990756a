"""ImageNet classification (E1–E3): the DeiT recipe on the shared engine."""

from __future__ import annotations

from .recipe import ClsRecipe

__all__ = ["ClsRecipe"]
