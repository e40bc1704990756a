"""Anchor attention in plain PyTorch: the obviously-correct reference.

AnchorFormer (Shan et al., Pattern Recognition Letters 2025, arXiv 2505.16463) replaces the
N x N softmax attention of a ViT by a bipartite attention between the N tokens and M learned
anchors. Per head, with a shared query/key embedding ``qk`` and values ``v``:

    A   = softmax(qk @ U^T / sqrt(D), dim=anchors)     # (B, H, N, M), p(anchor | token)
    deg = A.sum(dim=tokens)                            # (B, H, M), the anchor degrees Λ
    out = A @ (Λ^-1 (A^T @ v))                         # (B, H, N, D), evaluated right to left

``S = A Λ^-1 A^T`` is a row-stochastic N x N matrix (token -> anchor -> token, a two-step
Markov chain) standing in for softmax(Q K^T / sqrt(D)); it is never formed, so the cost is
O(N M D) instead of O(N^2 D).

Letters used in shapes: B batch, H heads, N tokens, D head dim, M anchors.
"""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "anchor_attention_reference", "anchor_probabilities", "check_inputs"]


def check_inputs(qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor) -> None:
    """Validate shapes, raising a ``ValueError`` that names the offending argument.

    Args:
        qk: (B, H, N, D) shared query/key embedding.
        v: (B, H, N, D) values.
        anchors: (M, D) shared by all heads, (H, M, D) per head, or (B, H, M, D) per image
            (the "fixed anchors" ablation, where anchors are pooled from each image's tokens).
    """
    if qk.dim() != 4:
        raise ValueError(f"anchor_attention: qk must be 4-D (B, H, N, D); got {qk.dim()}-D shape {tuple(qk.shape)}")
    if v.shape != qk.shape:
        raise ValueError(f"anchor_attention: v must have the shape of qk {tuple(qk.shape)}; got {tuple(v.shape)}")
    B, H, N, D = qk.shape
    if N < 1 or D < 1:
        raise ValueError(f"anchor_attention: need N >= 1 tokens and D >= 1; got qk {tuple(qk.shape)}")
    if anchors.dim() not in (2, 3, 4):
        raise ValueError(
            "anchor_attention: anchors must be (M, D), (H, M, D) or (B, H, M, D); "
            f"got {anchors.dim()}-D shape {tuple(anchors.shape)}"
        )
    if anchors.shape[-1] != D:
        raise ValueError(
            f"anchor_attention: anchors' last dim must equal the head dim D={D}; got {tuple(anchors.shape)}"
        )
    if anchors.shape[-2] < 1:
        raise ValueError(f"anchor_attention: need M >= 1 anchors; got anchors {tuple(anchors.shape)}")
    if anchors.dim() == 3 and anchors.shape[0] != H:
        raise ValueError(f"anchor_attention: per-head anchors must be (H={H}, M, D); got {tuple(anchors.shape)}")
    if anchors.dim() == 4 and anchors.shape[:2] != (B, H):
        raise ValueError(
            f"anchor_attention: per-image anchors must be (B={B}, H={H}, M, D); got {tuple(anchors.shape)}"
        )


def _broadcast_anchors(anchors: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (1, 1, M, D); (H, M, D) -> (1, H, M, D); (B, H, M, D) unchanged."""
    if anchors.dim() == 2:
        return anchors[None, None]
    if anchors.dim() == 3:
        return anchors[None]
    return anchors


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def anchor_probabilities(qk: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """p(anchor | token): softmax over anchors of the scaled token-anchor logits, in fp32.

    Args:
        qk: (B, H, N, D).
        anchors: (M, D), (H, M, D) or (B, H, M, D).

    Returns:
        (B, H, N, M) in fp32 (fp64 for fp64 inputs); every row sums to 1.
    """
    D = qk.shape[-1]
    acc = accumulation_dtype(qk.dtype)
    u = _broadcast_anchors(anchors).to(acc)
    logits = qk.to(acc) @ u.transpose(-1, -2) * D**-0.5  # (B, H, N, M)
    return logits.softmax(dim=-1)


def anchor_attention_reference(
    qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, *, normalize: bool = True
) -> torch.Tensor:
    """Anchor attention, computed right to left in O(N M D).

    Args:
        qk: (B, H, N, D) shared query/key embedding, fp32/bf16/fp16.
        v: (B, H, N, D) values, same dtype as ``qk``.
        anchors: (M, D), (H, M, D) or (B, H, M, D).
        normalize: divide by the anchor degrees Λ (the method); ``False`` drops Λ^-1 (ablation).

    Returns:
        (B, H, N, D) in the dtype of ``v``. The softmax, the degrees and both products are
        accumulated in fp32. An anchor no token weighs (degree 0) contributes 0 (1/0 -> 0).
    """
    check_inputs(qk, v, anchors)
    a = anchor_probabilities(qk, anchors)  # (B, H, N, M) fp32
    kv = a.transpose(-1, -2) @ v.to(a.dtype)  # (B, H, M, D): sum_n p(m|n) v_n
    if normalize:
        deg = a.sum(dim=-2)  # (B, H, M)
        nonzero = deg > 0
        # 1/0 -> 0 without ever computing 1/0, so no inf/NaN leaks into the backward pass.
        inv = torch.where(nonzero, 1.0 / torch.where(nonzero, deg, torch.ones_like(deg)), torch.zeros_like(deg))
        kv = kv * inv[..., None]  # (B, H, M, D): the anchors' mean values
    out = a @ kv  # (B, H, N, D)
    return out.to(v.dtype)
