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

Two numerical rules, shared with the fused kernels:

- an anchor whose degree is below ``degree_floor`` (sqrt of the accumulation dtype's smallest
  normal number: 2^-63 in fp32) is treated as weighing nothing (1/deg -> 0). Above it 1/deg and
  1/deg^2 are finite; below it the anchor's contribution to any output is < deg * max|v|.
- the degree's gradient is computed from bounded factors, ``ddeg = -rowsum(W * dKV)`` with
  ``W = Λ^-1 KV`` (the anchors' mean values) and ``dKV = Λ^-1 A^T dO``, never through Λ^-2,
  which overflows once an anchor's degree falls below ~1e-19.

Without gradients the forward runs with one (B, H, N, M) buffer (logits, then probabilities, in
place) and writes the output token-major, as a view of a (B, N, H, D) tensor, so that merging
the heads afterwards is free; on the CPU these transient tensors are what the allocator would
otherwise map and fault in on every call.

Letters used in shapes: B batch, H heads, N tokens, D head dim, M anchors.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "anchor_attention_reference",
    "anchor_probabilities",
    "check_inputs",
    "degree_floor",
    "inverse_degree",
]


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
    return torch.float64 if dtype == torch.float64 else torch.float32


def degree_floor(dtype: torch.dtype) -> float:
    """Degrees at or below this are treated as 0: sqrt(smallest normal) of ``dtype`` (2^-63 in fp32).

    Above it, 1/deg and 1/deg^2 are finite and the anchor's mean value Λ^-1 KV is computed from
    normal numbers; below it (e.g. an anchor whose logit sits ~45 below the others for every
    token) the anchor changes no output by more than deg * max|v|.
    """
    return torch.finfo(dtype).tiny ** 0.5


def inverse_degree(deg: torch.Tensor) -> torch.Tensor:
    """1/deg where deg > :func:`degree_floor`, else 0, without ever computing 1/0 or 1/denormal."""
    return deg.masked_fill(deg <= degree_floor(deg.dtype), float("inf")).reciprocal_()  # 1/inf = 0


def _scaled_anchors(anchors: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """U / sqrt(D) in the accumulation dtype, in the anchors' own shape: the logits' scale folded
    into the (M, D)-sized anchors instead of a pass over the (B, H, N, M) logits."""
    return (anchors if anchors.dtype == dtype else anchors.to(dtype)) * D**-0.5


def anchor_probabilities(qk: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """p(anchor | token): softmax over anchors of the scaled token-anchor logits, in fp32.

    Args:
        qk: (B, H, N, D).
        anchors: (M, D), (H, M, D) or (B, H, M, D).

    Returns:
        (B, H, N, M) in fp32 (fp64 for fp64 inputs); every row sums to 1.
    """
    acc = accumulation_dtype(qk.dtype)
    u = _broadcast_anchors(_scaled_anchors(anchors, qk.shape[-1], acc))  # (1 or B, 1 or H, M, D)
    logits = qk.to(acc) @ u.transpose(-1, -2)  # (B, H, N, M)
    return logits.softmax(dim=-1)


class _NormalizeByDegree(torch.autograd.Function):
    """W = Λ^-1 KV with Λ^-1 from :func:`inverse_degree`; backward from bounded factors:
    dKV = Λ^-1 dW and ddeg = -rowsum(W * dKV) (= -Λ^-2 rowsum(KV * dW), without forming Λ^-2)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
        inv = inverse_degree(deg)  # (B, H, M)
        w = kv * inv[..., None]  # (B, H, M, D): the anchors' mean values, |W| <= max|v|
        ctx.save_for_backward(w, inv)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, inv = ctx.saved_tensors
        dkv = dw * inv[..., None]  # (B, H, M, D), |dKV| <= max|dO| when dw = A^T dO
        return dkv, -(w * dkv).sum(dim=-1)


def _reference_autograd(qk, v, anchors, normalize):
    """The formula as written, differentiable; (B, H, N, D) in the accumulation dtype."""
    a = anchor_probabilities(qk, anchors)  # (B, H, N, M)
    kv = a.transpose(-1, -2) @ v.to(a.dtype)  # (B, H, M, D): sum_n p(m|n) v_n
    if normalize:
        kv = _NormalizeByDegree.apply(kv, a.sum(dim=-2))  # the anchors' mean values
    return a @ kv  # (B, H, N, D)


@torch.no_grad()
def _reference_inference(qk, v, anchors, normalize):
    """The same maths without autograd, with few transient tensors and few calls.

    Per image, the logits go into one (H, M, N) slice of a buffer of A^T (anchors by tokens:
    the softmax over anchors then runs along contiguous tokens, several times faster than along
    a row of M = 30), the softmax is taken in place, and ``A W`` is written straight into a
    token-major output (B, N, H, D); ``out=`` forms throughout, batched over heads, so the
    strided views of a packed projection are read without copies. Inside a model each call
    costs several times what it costs in a loop of its own (its code and data have left the
    CPU's caches), so the path keeps to the calls the maths needs. The softmax and the degrees
    run once over the whole buffer: a reduction's bits depend on the shape it is given.
    """
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    acc = accumulation_dtype(qk.dtype)
    if qk.dtype != acc:
        qk, v = qk.to(acc), v.to(acc)
    u = _scaled_anchors(anchors, D, acc)
    if u.dim() == 2:
        u = u.expand(H, M, D)
    probs_t = torch.empty((B, H, M, N), dtype=acc, device=qk.device)  # logits^T, then p(m|n)^T in place
    kv = torch.empty((B, H, M, D), dtype=acc, device=qk.device)
    out = torch.empty((B, N, H, D), dtype=acc, device=qk.device).transpose(1, 2)  # (B, H, N, D), token-major
    for b in range(B):  # bmm, not matmul: matmul's out= path costs up to half again on these shapes
        torch.bmm(u[b] if u.dim() == 4 else u, qk[b].transpose(1, 2), out=probs_t[b])  # (H, M, N) logits^T
    torch.softmax(probs_t, dim=2, out=probs_t)  # over anchors
    for b in range(B):
        torch.bmm(probs_t[b], v[b], out=kv[b])  # (H, M, D)
    if normalize:  # the anchors' mean values
        kv.mul_(inverse_degree(probs_t.sum(dim=3, keepdim=True)))  # (B, H, M, 1)
    for b in range(B):
        torch.bmm(probs_t[b].transpose(1, 2), kv[b], out=out[b])  # (H, N, D) into (N, H, D) storage
    return out


def anchor_attention_reference(
    qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, *, normalize: bool = True
) -> torch.Tensor:
    """Anchor attention, computed right to left in O(N M D).

    Args:
        qk: (B, H, N, D) shared query/key embedding, fp32/bf16/fp16/fp64; any strides.
        v: (B, H, N, D) values, same dtype as ``qk``.
        anchors: (M, D), (H, M, D) or (B, H, M, D).
        normalize: divide by the anchor degrees Λ (the method); ``False`` drops Λ^-1 (ablation).

    Returns:
        (B, H, N, D) in the dtype of ``v``. The softmax, the degrees and both products are
        accumulated in fp32 (fp64 for fp64 inputs). Degrees at or below :func:`degree_floor`
        count as 0 (1/deg -> 0). Without autograd (and outside ``torch.compile``) the result is
        stored token-major (a view of a (B, N, H, D) tensor), as the fused kernels return it.
    """
    check_inputs(qk, v, anchors)
    return _reference_checked(qk, v, anchors, normalize)


def _reference_checked(qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool) -> torch.Tensor:
    """:func:`anchor_attention_reference` on inputs :func:`check_inputs` has passed."""
    needs_grad = torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad or anchors.requires_grad)
    if needs_grad or torch.compiler.is_compiling():  # a compiler fuses the formula itself (and takes no strided out=)
        out = _reference_autograd(qk, v, anchors, normalize)
    else:
        out = _reference_inference(qk, v, anchors, normalize)
    return out if out.dtype == v.dtype else out.to(v.dtype)
