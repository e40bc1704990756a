"""DeiT's distillation through the distillation token (Touvron et al., ICML 2021, §4).

A distilled student returns two logits in training, ``(z_cls, z_dist)``. The class head learns
the labels; the distillation head learns the teacher's output:

- soft: ``(1 - α) L_base(z_cls, y) + α τ² KL(softmax(z_t / τ) || softmax(z_dist / τ))``, the
  KL divergence summed over classes and averaged over the batch;
- hard: ``(1 - α) L_base(z_cls, y) + α CE(z_dist, argmax z_t)`` (DeiT uses α = 1/2);
- none: ``L_base(z_cls, y)``.

``L_base`` is the recipe's loss (soft-target cross-entropy under Mixup/CutMix, label smoothing
otherwise). The teacher sees the same (mixed) images as the student and is never updated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DISTILLATION_KINDS", "DistillationLoss", "distillation_term"]

DISTILLATION_KINDS = ("none", "soft", "hard")


def distillation_term(
    student_dist_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, tau: float = 1.0
) -> torch.Tensor:
    """The distillation term alone (without the α weight).

    Args:
        student_dist_logits: (B, K) logits of the distillation head.
        teacher_logits: (B, K) logits of the teacher.
        kind: "soft" or "hard".
        tau: temperature of the soft term.

    Returns:
        A scalar: ``τ² KL(p_t || p_s)`` per sample (soft) or ``CE(z_dist, argmax z_t)`` (hard).
    """
    if student_dist_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation: student logits {tuple(student_dist_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, num_classes)"
        )
    if kind == "soft":
        log_p_s = F.log_softmax(student_dist_logits.float() / tau, dim=1)
        log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        return kl * (tau * tau) / student_dist_logits.shape[0]
    if kind == "hard":
        return F.cross_entropy(student_dist_logits, teacher_logits.argmax(dim=1))
    raise ValueError(f"distillation kind must be 'soft' or 'hard' here; got {kind!r}")


class DistillationLoss(nn.Module):
    """The training loss of a (possibly distilled) classifier.

    Args:
        base_criterion: ``(logits (B, K), targets) -> scalar``.
        teacher: a frozen model mapping images to (B, K) logits; ``None`` for ``kind="none"``.
        kind: "none", "soft" or "hard".
        alpha: weight of the distillation term.
        tau: temperature of the soft term.
    """

    def __init__(
        self,
        base_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        teacher: nn.Module | None,
        kind: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in DISTILLATION_KINDS:
            raise ValueError(f"distillation must be one of {DISTILLATION_KINDS}; got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"distillation={kind!r} needs a teacher")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation_alpha must lie in [0, 1]; got {alpha}")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """Args: inputs (B, 3, H, W) images; outputs (B, K) or ``(z_cls, z_dist)``; targets (B,) or (B, K)."""
        dist_logits = None
        if not isinstance(outputs, torch.Tensor):
            outputs, dist_logits = outputs
        base = self.base_criterion(outputs, targets)
        if self.kind == "none":
            if dist_logits is not None:
                raise ValueError("the model returns distillation logits but distillation is 'none'")
            return base
        if dist_logits is None:
            raise ValueError(f"distillation={self.kind!r} needs a distilled model (class and distillation heads)")
        assert self.teacher is not None
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return (1.0 - self.alpha) * base + self.alpha * distillation_term(
            dist_logits, teacher_logits, self.kind, self.tau
        )
