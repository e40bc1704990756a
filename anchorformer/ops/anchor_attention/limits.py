"""What the fused Triton kernels can serve, checked before any launch (no triton import needed).

- D <= 128: a (BLOCK_N, D) tile of each of qk, v, dO, dqk, dv and the (BLOCK_M, D) anchor
  tiles live in registers and shared memory; at D = 256 the backward does not launch.
- B * H <= 65535: the kernels' grid axis 1 runs over the (b, h) pairs, and CUDA limits that
  axis to 65535 programs.

Letters: B batch, H heads, N tokens, D head dim, M anchors.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_BATCH_HEADS", "MAX_HEAD_DIM", "fused_unsupported"]

MAX_HEAD_DIM = 128
MAX_BATCH_HEADS = 65535


def fused_unsupported(qk: torch.Tensor, anchors: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take these inputs, or None.

    Args:
        qk: (B, H, N, D).
        anchors: (M, D), (H, M, D) or (B, H, M, D).
    """
    B, H, N, D = qk.shape
    if D > MAX_HEAD_DIM:
        return (
            f"head dim D={D} of qk {tuple(qk.shape)} exceeds the fused kernels' limit D <= {MAX_HEAD_DIM}; "
            "use impl='reference'"
        )
    if B * H > MAX_BATCH_HEADS:
        return (
            f"B*H = {B}*{H} = {B * H} of qk {tuple(qk.shape)} exceeds the fused kernels' limit of {MAX_BATCH_HEADS} "
            "(CUDA grid axis 1); split the batch"
        )
    if anchors.dim() == 4:
        return f"per-image anchors {tuple(anchors.shape)} are served by the reference implementation only"
    return None
