"""ADE20K semantic segmentation (E6): Semantic FPN and UperNet over plain ViT backbones, on the shared engine.

:mod:`.recipe` (the typed recipe), :mod:`.train` (training, evaluation, ``train seg`` /
``eval seg``), :mod:`.inference` (sliding-window and multi-scale testing), :mod:`.metrics` (mIoU,
mAcc, aAcc: the ADE20K protocol).
"""

from __future__ import annotations

from .recipe import SegRecipe

__all__ = ["SegRecipe"]
