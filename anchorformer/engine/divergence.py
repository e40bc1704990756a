"""Divergence: a training loss that is infinite or NaN stops the run in one line.

Every task's training step calls :func:`check_loss`; the run around it
(:func:`anchorformer.engine.trainer.training_run`) adds which checkpoint is kept. Nothing is
written after the bad step, so the newest checkpoint (written before it) stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["DivergenceError", "check_loss"]


class DivergenceError(ValueError):
    """The training loss became infinite or NaN (the command line: one line, exit status 2)."""


def check_loss(loss: torch.Tensor | float, step: str, parts: Mapping[str, torch.Tensor | float] | None = None) -> float:
    """Return ``loss`` as a float, or raise :class:`DivergenceError` naming ``step`` if it is not finite.

    Args:
        loss: the step's loss (a scalar tensor or a number).
        step: where it was computed, in words (``"epoch 3, step 12"``, ``"iteration 40"``).
        parts: the loss's terms, named in the message (detection: classifier, box, mask, ...).
    """
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return value
    terms = ""
    if parts:
        terms = " (" + ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items()) + ")"
    raise DivergenceError(f"training diverged: the loss is {value} at {step}{terms}")
