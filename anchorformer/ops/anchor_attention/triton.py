"""Fused Triton kernels for AnchorFormer's anchor attention (forward and backward).

AnchorFormer (Shan et al., Pattern Recognition Letters 2025, arXiv 2505.16463), per (b, h):

    A   = softmax(qk U^T * s, dim=anchors)    (N, M), s = D**-0.5, never written to memory
    deg = A^T 1                               (M,)   anchor degrees Λ; 1/0 -> 0
    KV  = A^T v                               (M, D)
    W   = Λ^-1 KV                             (M, D) the anchors' mean values
    out = A W                                 (N, D)

Backward, with dO = dL/d out, dW = A^T dO, dKV = Λ^-1 dW, ddeg = -rowsum(W * dKV) (bounded factors):

    dA    = dO W^T + v dKV^T + 1 ddeg^T          (N, M)
    delta = rowsum(A * dA) = rowsum(dO * out) + rowsum(v * dv) + A ddeg     (N,)
    dZ    = A * (dA - delta) * s                 (N, M) softmax backward, Z = qk U^T
    dqk   = dZ U,  dv = A dKV,  dU = sum_{b(,h)} dZ^T qk

Two shapes of launch, chosen per call shape by a cached :class:`Plan`:

- **one program per (b, h)** (one split of N and one chunk of anchors, M <= 64; always when
  N <= 256): ``_fused_fwd_kernel`` streams the sequence twice, keeping KV and the degrees in
  registers between the passes, and stores KV and the degrees for the backward: one launch.
  ``_fused_bwd_kernel`` computes dW, then dqk, dv and a per-(b, h) dU partial;
  ``_du_sum_kernel`` adds the partials in a fixed order: two launches.
- **split partials** (longer sequences on few (b, h), or M > 64): ``_reduce_kernel`` writes one
  partial A^T v (and A^T 1) per split of N; ``_out_kernel``, one persistent program per
  (split, b*h), sums the partials in a fixed order, keeps W in registers and streams its run
  of tiles. The backward: ``_reduce_kernel`` (dW partials), ``_bwd_kernel``, (M > 64)
  ``_du_kernel``, ``_du_sum_kernel``. With more than one chunk of anchors, ``_lse_kernel``
  first stores each token's log-sum-exp so that any chunk of A is ``exp(Z - lse)``.

No atomics anywhere: every cross-program sum is a partial per program added in a fixed order,
so results are bitwise reproducible (deterministic mode costs nothing). No zero-fills: every
partial is written in full. The fp32 intermediates (KV, degrees, log-sum-exps, partials) live
in one workspace allocation per call; the anchors are read in their own dtype (fp32 for a
model's parameters, rounded in the kernel to the inputs' 16-bit dtype where the products are
taken in it) and dU is written in the anchors' dtype, so no casts run around the kernels.

Everything is accumulated in fp32, and every product is as accurate as the reference's, which
keeps the probabilities, W, dKV and dZ in fp32: fp32 inputs multiply as exact IEEE products;
with bf16/fp16 inputs two inputs (qk U^T) multiply on tensor cores in their dtype, and a product
with an fp32 factor is summed from bf16 tensor-core products of its split hi + lo parts (see
``_mm``). Every ``tl.dot`` has all three sizes >= 16 (BLOCK_N, BLOCK_M, BLOCK_D), the shapes
tensor cores take. Degrees at or below 2^-63 count as 0, as in the reference.

Launch parameters come from a table (``configs.json``, keyed by N bucket, B*H bucket, dtype
and GPU; written offline by ``python -m anchorformer.ops.anchor_attention.tune``), never from
an autotuner on the call path.

Letters used in shapes: B batch, H heads, N tokens, D head dim, M anchors, S splits of N.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors
under the Triton interpreter (slow; for tests).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .configs import lookup_config
from .limits import fused_unsupported
from .reference import check_inputs

__all__ = [
    "INTERPRETED",
    "AnchorAttentionFunction",
    "Plan",
    "anchor_attention_triton",
    "check_triton_device",
    "launch_plan",
]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    """acc + a @ b for operands already in the dtype to multiply in (fp32 accumulation)."""
    if F32_DOT:
        # The interpreter's dot would read bf16 storage as integers: multiply the (already
        # rounded) operands in fp32, where a product of two 16-bit floats is exact, so this
        # matches tensor cores up to summation order.
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _split(x):
    """x ~ hi + lo with hi, lo in bf16: 16 significant bits, fp32's range. Exact for bf16 and fp16 x."""
    hi = x.to(tl.bfloat16)
    lo = (x.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _mm(a, b, acc, A32: tl.constexpr, B32: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation, as accurate as the reference's fp32 products.

    ``A32``/``B32`` flag an operand that is an fp32 intermediate (probabilities, the anchors'
    mean values, dKV, dZ); the others are inputs (qk, v, U, dO), exact in the input dtype.
    PREC 0 (fp32 inputs): IEEE fp32 products. PREC 1 (bf16) and 2 (fp16): two inputs multiply in
    the input dtype (exact products); an fp32 operand is split into bf16 hi + lo (16 bits) and
    the product summed from bf16 tensor-core products, hi*hi + hi*lo + lo*hi (an fp16 input is
    split exactly), dropping only lo*lo (~2^-16 relative) instead of rounding the fp32 operand
    to 8 bits (bf16) or to fp16's range (unnormalised products overflow it).
    """
    if PREC == 0:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif not A32 and not B32:
        if PREC == 1:
            r = _dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, F32_DOT)
        else:
            r = _dot(a.to(tl.float16), b.to(tl.float16), acc, F32_DOT)
    else:
        a_hi, a_lo = _split(a)
        b_hi, b_lo = _split(b)
        r = _dot(a_hi, b_hi, acc, F32_DOT)
        if B32 or PREC == 2:  # b_lo is 0 for a bf16 input
            r = _dot(a_hi, b_lo, r, F32_DOT)
        if A32 or PREC == 2:
            r = _dot(a_lo, b_hi, r, F32_DOT)
    return r


@triton.jit
def _split_range(N, BLOCK_N: tl.constexpr):
    """The contiguous run [start, end) of N-tiles of this program (axis 0 splits N)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, tl.num_programs(0))
    start = tl.program_id(0) * per_split
    return start, tl.minimum(start + per_split, n_tiles)


@triton.jit
def _load_tile(PTR, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, mask):
    """A (BLOCK_N, BLOCK_D) tile of a (B, H, N, D) tensor, zero outside ``mask``."""
    ptrs = PTR + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 (ties to even), still in fp32. The GPU's cast rounds so; the
    interpreter's truncates, which would double the rounding error the tests measure."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_tile(PTR, x, b, h, offs_n, offs_d, stride_b, stride_h, stride_n, stride_d, mask):
    """Store a fp32 (BLOCK_N, BLOCK_D) tile into a (B, H, N, D) tensor, rounded to nearest."""
    ptrs = PTR + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    if PTR.dtype.element_ty == tl.bfloat16:
        x = _round_bf16(x)
    tl.store(ptrs, x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) chunk of anchors (stride_uh = 0: one set shared by all heads), in
    the anchors' dtype, except fp32 anchors with bf16 inputs: rounded to the nearest bf16 value
    (as a cast on the host would), held in fp32."""
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    u = tl.load(U + h * stride_uh + offs_m[:, None] * stride_um + offs_d[None, :] * stride_ud, mask=mask, other=0.0)
    if PREC == 1:
        if U.dtype.element_ty != tl.bfloat16:
            u = _round_bf16(u.to(tl.float32))
    return u


@triton.jit
def _logits(qk, u, scale, mask_m, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """Z / sqrt(D) for a tile of tokens and a chunk of anchors, fp32, -inf on padded anchors."""
    z = _mm(qk, tl.trans(u), tl.zeros((qk.shape[0], u.shape[0]), dtype=tl.float32), False, False, PREC, F32_DOT)
    return tl.where(mask_m[None, :], z * scale, float("-inf"))


@triton.jit
def _probs(qk, u, lse, scale, mask_n, mask_m, SINGLE: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """p(anchor | token) for a tile x chunk, (BLOCK_N, BLOCK_M) fp32, 0 on padded rows/anchors.

    With a single chunk the softmax is taken here; otherwise ``lse`` (BLOCK_N,) holds the
    log-sum-exp over all anchors. An anchor far below a token's best one underflows to exactly
    0 (degree 0 if it does so for every token).
    """
    z = _logits(qk, u, scale, mask_m, PREC, F32_DOT)
    if SINGLE:
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
    else:
        p = tl.exp(z - lse[:, None])
    return tl.where(mask_n[:, None], p, 0.0)


@triton.jit
def _inverse(deg, mask_m, NORMALIZE: tl.constexpr):
    """Λ^-1 from degrees (BLOCK_M,) fp32; ones without NORMALIZE (0 on padded anchors). Degrees
    at or below 2^-63 (the reference's ``degree_floor`` in fp32) count as 0: 1/deg -> 0."""
    if NORMALIZE:
        live = deg > 1.0842021724855044e-19  # 2^-63
        return tl.where(live, 1.0 / tl.where(live, deg, 1.0), 0.0)
    else:
        return tl.where(mask_m, 1.0, 0.0)


@triton.jit
def _load_md(PTR, bh, offs_m, offs_d, M, D):
    """A (BLOCK_M, BLOCK_D) chunk of a contiguous fp32 (B*H, M, D) array at ``PTR``."""
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return tl.load(PTR + bh * M * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_m(PTR, bh, offs_m, M):
    """A (BLOCK_M,) chunk of a contiguous fp32 (B*H, M) array at ``PTR``."""
    return tl.load(PTR + bh * M + offs_m, mask=offs_m < M, other=0.0)


@triton.jit
def _sum_rows_md(PTR, row_stride, S, bh, offs_m, offs_d, M, D):
    """sum over s < S (in order) of the (BLOCK_M, BLOCK_D) chunks of ``PTR + s * row_stride``."""
    acc = tl.zeros((offs_m.shape[0], offs_d.shape[0]), dtype=tl.float32)
    for s in range(0, S):
        acc += _load_md(PTR + s * row_stride, bh, offs_m, offs_d, M, D)
    return acc


@triton.jit
def _sum_rows_m(PTR, row_stride, S, bh, offs_m, M):
    """sum over s < S (in order) of the (BLOCK_M,) chunks of ``PTR + s * row_stride``."""
    acc = tl.zeros((offs_m.shape[0],), dtype=tl.float32)
    for s in range(0, S):
        acc += _load_m(PTR + s * row_stride, bh, offs_m, M)
    return acc


@triton.jit
def _grad_consts(kv, dw, deg, mask_m, NORMALIZE: tl.constexpr):
    """For a chunk of anchors: W = Λ^-1 KV, dKV = Λ^-1 dW (BLOCK_M, BLOCK_D) and
    ddeg = dL/ddeg = -rowsum(W * dKV) (BLOCK_M,), 0 where Λ^-1 = 0; all fp32. The degree's
    gradient comes from these bounded factors (|W| <= max|v|, |dKV| <= max|dO|), never from
    Λ^-2, which overflows once a degree falls below ~1e-19."""
    inv = _inverse(deg, mask_m, NORMALIZE)
    w = kv * inv[:, None]
    dkv = dw * inv[:, None]
    if NORMALIZE:
        ddeg = -tl.sum(w * dkv, axis=1)
    else:
        ddeg = inv * 0.0
    return w, dkv, ddeg


@triton.jit
def _dqk_dv_du(qk, v, do, u, w, dkv, ddeg, p, du, scale, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """One tile, one chunk of anchors: (dqk, dv) of the tile (BLOCK_N, BLOCK_D) fp32 and du + dZ^T qk."""
    zeros_nd = tl.zeros((qk.shape[0], qk.shape[1]), dtype=tl.float32)
    # dA = dO W^T + v dKV^T + 1 ddeg^T
    da = _mm(do, tl.trans(w), tl.broadcast_to(ddeg[None, :], (p.shape[0], p.shape[1])), False, True, PREC, F32_DOT)
    da = _mm(v, tl.trans(dkv), da, False, True, PREC, F32_DOT)
    dz = p * (da - tl.sum(p * da, axis=1)[:, None]) * scale  # softmax backward; 0 on padding
    dqk = _mm(dz, u, zeros_nd, True, False, PREC, F32_DOT)
    dv = _mm(p, dkv, zeros_nd, True, True, PREC, F32_DOT)
    du = _mm(tl.trans(dz), qk, du, True, False, PREC, F32_DOT)
    return dqk, dv, du


@triton.jit
def _fused_fwd_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    OUT,  # (B, H, N, D) out
    WS,  # fp32 workspace out: KV (B*H, M, D) at 0, degrees (B*H, M) at DEG_OFF
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_uh,
    stride_um,
    stride_ud,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    M,
    D,
    DEG_OFF,
    scale,
    NORMALIZE: tl.constexpr,
    STORE_KV: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (b*h), one chunk of anchors: KV and degrees over the whole sequence (stored for the
    backward with STORE_KV), then out = A W."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
    kv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    deg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        x = _load_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, mask_nd)
        p = _probs(qk, u, 0.0, scale, mask_n, mask_m, True, PREC, F32_DOT)  # (BLOCK_N, BLOCK_M)
        deg += tl.sum(p, axis=0)
        kv = _mm(tl.trans(p), x, kv, True, False, PREC, F32_DOT)  # += A_tile^T v_tile
    if STORE_KV:  # for the backward
        mask_md = mask_m[:, None] & mask_d[None, :]
        tl.store(WS + bh * M * D + offs_m[:, None] * D + offs_d[None, :], kv, mask=mask_md)
        tl.store(WS + DEG_OFF + bh * M + offs_m, deg, mask=mask_m)
    w = kv * _inverse(deg, mask_m, NORMALIZE)[:, None]  # Λ^-1 KV: the anchors' mean values
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        p = _probs(qk, u, 0.0, scale, mask_n, mask_m, True, PREC, F32_DOT)
        out = _mm(p, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), True, True, PREC, F32_DOT)
        _store_tile(OUT, out, b, h, offs_n, offs_d, stride_ob, stride_oh, stride_on, stride_od, mask_nd)


@triton.jit
def _lse_kernel(
    QK,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    LSE,  # (B*H, N) fp32 out
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_uh,
    stride_um,
    stride_ud,
    H,
    N,
    M,
    D,
    scale,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (tile of N, b*h): log-sum-exp of the logits over all anchors (online over chunks)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & (offs_d[None, :] < D)
    qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(0, tl.cdiv(M, BLOCK_M)):
        offs_m = c * BLOCK_M + tl.arange(0, BLOCK_M)
        u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
        z = _logits(qk, u, scale, offs_m < M, PREC, F32_DOT)  # every chunk has at least one real anchor
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + bh * N + offs_n, m_i + tl.log(l_i), mask=mask_n)


@triton.jit
def _reduce_kernel(
    QK,  # (B, H, N, D)
    X,  # (B, H, N, D): v (forward) or dO (backward)
    U,  # (H or 1, M, D)
    LSE,  # (B*H, N) fp32 (several chunks only)
    ACC,  # (S, B*H, M, D) fp32 out: this split's A^T X
    DEG,  # (S, B*H, M) fp32 out: this split's A^T 1 (WITH_DEG only)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_uh,
    stride_um,
    stride_ud,
    H,
    N,
    M,
    D,
    scale,
    WITH_DEG: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (split of N, b*h, chunk of anchors): the split's A^T X (and A^T 1), stored in full."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    deg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_start, t_end = _split_range(N, BLOCK_N)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        x = _load_tile(X, b, h, offs_n, offs_d, stride_xb, stride_xh, stride_xn, stride_xd, mask_nd)
        if SINGLE:
            lse = 0.0
        else:
            lse = tl.load(LSE + bh * N + offs_n, mask=mask_n, other=0.0)
        p = _probs(qk, u, lse, scale, mask_n, mask_m, SINGLE, PREC, F32_DOT)  # (BLOCK_N, BLOCK_M)
        if WITH_DEG:
            deg += tl.sum(p, axis=0)
        acc = _mm(tl.trans(p), x, acc, True, False, PREC, F32_DOT)  # += A_tile^T X_tile
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1)  # this split's partial
    mask_md = mask_m[:, None] & mask_d[None, :]
    tl.store(ACC + (row + bh) * M * D + offs_m[:, None] * D + offs_d[None, :], acc, mask=mask_md)
    if WITH_DEG:
        tl.store(DEG + (row + bh) * M + offs_m, deg, mask=mask_m)


@triton.jit
def _out_kernel(
    QK,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    LSE,  # (B*H, N) fp32 (several chunks only)
    PKV,  # (S, B*H, M, D) fp32 partials of KV
    PDEG,  # (S, B*H, M) fp32 partials of the degrees
    KV,  # (B*H, M, D) fp32 out (WRITE_BACK): the summed KV, for the backward
    DEG,  # (B*H, M) fp32 out (WRITE_BACK)
    OUT,  # (B, H, N, D) out
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_uh,
    stride_um,
    stride_ud,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    M,
    D,
    S,
    scale,
    NORMALIZE: tl.constexpr,
    SINGLE: tl.constexpr,
    WRITE_BACK: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Persistent, per (split of N, b*h): sum the S partials in order, then out = A W over the
    split's run of tiles; W stays in registers with one chunk of anchors."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    BHMD = tl.num_programs(1) * M * D
    BHM = tl.num_programs(1) * M
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if WRITE_BACK:
        if tl.program_id(0) == 0:
            for c in range(0, tl.cdiv(M, BLOCK_M)):
                offs_c = c * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_c = offs_c < M
                kv_c = _sum_rows_md(PKV, BHMD, S, bh, offs_c, offs_d, M, D)
                deg_c = _sum_rows_m(PDEG, BHM, S, bh, offs_c, M)
                tl.store(
                    KV + bh * M * D + offs_c[:, None] * D + offs_d[None, :],
                    kv_c,
                    mask=mask_c[:, None] & mask_d[None, :],
                )
                tl.store(DEG + bh * M + offs_c, deg_c, mask=mask_c)
    if SINGLE:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
        kv = _sum_rows_md(PKV, BHMD, S, bh, offs_m, offs_d, M, D)
        w = kv * _inverse(_sum_rows_m(PDEG, BHM, S, bh, offs_m, M), mask_m, NORMALIZE)[:, None]
    t_start, t_end = _split_range(N, BLOCK_N)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        out = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if SINGLE:
            p = _probs(qk, u, 0.0, scale, mask_n, mask_m, True, PREC, F32_DOT)
            out = _mm(p, w, out, True, True, PREC, F32_DOT)
        else:
            lse = tl.load(LSE + bh * N + offs_n, mask=mask_n, other=0.0)
            for c in range(0, tl.cdiv(M, BLOCK_M)):
                offs_c = c * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_c = offs_c < M
                u_c = _load_anchors(U, h, offs_c, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
                kv_c = _sum_rows_md(PKV, BHMD, S, bh, offs_c, offs_d, M, D)
                w_c = kv_c * _inverse(_sum_rows_m(PDEG, BHM, S, bh, offs_c, M), mask_c, NORMALIZE)[:, None]
                p = _probs(qk, u_c, lse, scale, mask_n, mask_c, False, PREC, F32_DOT)
                out = _mm(p, w_c, out, True, True, PREC, F32_DOT)
        _store_tile(OUT, out, b, h, offs_n, offs_d, stride_ob, stride_oh, stride_on, stride_od, mask_nd)


@triton.jit
def _fused_bwd_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    DO,  # (B, H, N, D) gradient of the output
    U,  # (H or 1, M, D)
    WS,  # the forward's workspace: KV (B*H, M, D) at 0, degrees (B*H, M) at DEG_OFF
    DQK,  # (B, H, N, D) out
    DV,  # (B, H, N, D) out
    DUP,  # (B*H, M, D) fp32 out: this (b, h)'s dU
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    stride_uh,
    stride_um,
    stride_ud,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    H,
    N,
    M,
    D,
    DEG_OFF,
    scale,
    NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (b*h), one chunk of anchors: dW = A^T dO over the sequence, then dqk, dv and dU."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
    dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        do = _load_tile(DO, b, h, offs_n, offs_d, stride_gb, stride_gh, stride_gn, stride_gd, mask_nd)
        p = _probs(qk, u, 0.0, scale, mask_n, mask_m, True, PREC, F32_DOT)
        dw = _mm(tl.trans(p), do, dw, True, False, PREC, F32_DOT)  # += A_tile^T dO_tile
    kv = _load_md(WS, bh, offs_m, offs_d, M, D)
    w, dkv, ddeg = _grad_consts(kv, dw, _load_m(WS + DEG_OFF, bh, offs_m, M), mask_m, NORMALIZE)
    du = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        v = _load_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, mask_nd)
        do = _load_tile(DO, b, h, offs_n, offs_d, stride_gb, stride_gh, stride_gn, stride_gd, mask_nd)
        p = _probs(qk, u, 0.0, scale, mask_n, mask_m, True, PREC, F32_DOT)
        dqk, dv, du = _dqk_dv_du(qk, v, do, u, w, dkv, ddeg, p, du, scale, PREC, F32_DOT)
        _store_tile(DQK, dqk, b, h, offs_n, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd, mask_nd)
        _store_tile(DV, dv, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd, mask_nd)
    mask_md = mask_m[:, None] & mask_d[None, :]
    tl.store(DUP + bh * M * D + offs_m[:, None] * D + offs_d[None, :], du, mask=mask_md)


@triton.jit
def _bwd_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    DO,  # (B, H, N, D) gradient of the output
    U,  # (H or 1, M, D)
    LSE,  # (B*H, N) fp32 (several chunks only)
    KV,  # (B*H, M, D) fp32: A^T v
    DEG,  # (B*H, M) fp32
    PDW,  # (S, B*H, M, D) fp32: partials of dW = A^T dO
    DQK,  # (B, H, N, D) out
    DV,  # (B, H, N, D) out
    DUP,  # (S, B*H, M, D) fp32 out (single chunk only): this split's dU
    DELTA,  # (B*H, N) fp32 out (several chunks only): rowsum(A * dA), for _du_kernel
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    stride_uh,
    stride_um,
    stride_ud,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    H,
    N,
    M,
    D,
    S,
    scale,
    NORMALIZE: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (split of N, b*h): dqk and dv of the split's tiles (and, with one chunk, its dU)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    BHMD = tl.num_programs(1) * M * D
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if SINGLE:  # everything about the anchors fits in one chunk: load it once
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
        kv = _load_md(KV, bh, offs_m, offs_d, M, D)
        dw = _sum_rows_md(PDW, BHMD, S, bh, offs_m, offs_d, M, D)
        w, dkv, ddeg = _grad_consts(kv, dw, _load_m(DEG, bh, offs_m, M), mask_m, NORMALIZE)
        du = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    t_start, t_end = _split_range(N, BLOCK_N)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        v = _load_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, mask_nd)
        do = _load_tile(DO, b, h, offs_n, offs_d, stride_gb, stride_gh, stride_gn, stride_gd, mask_nd)
        zeros_nd = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if SINGLE:
            p = _probs(qk, u, 0.0, scale, mask_n, mask_m, True, PREC, F32_DOT)  # (BLOCK_N, BLOCK_M)
            dqk, dv, du = _dqk_dv_du(qk, v, do, u, w, dkv, ddeg, p, du, scale, PREC, F32_DOT)
        else:
            lse = tl.load(LSE + bh * N + offs_n, mask=mask_n, other=0.0)
            # First sweep over the chunks: dv = A dKV and delta = rowsum(dO * out) + rowsum(v * dv) + A ddeg.
            dv = zeros_nd
            out = zeros_nd
            a_ddeg = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c in range(0, tl.cdiv(M, BLOCK_M)):
                offs_c = c * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_c = offs_c < M
                u_c = _load_anchors(U, h, offs_c, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
                kv_c = _load_md(KV, bh, offs_c, offs_d, M, D)
                dw_c = _sum_rows_md(PDW, BHMD, S, bh, offs_c, offs_d, M, D)
                w_c, dkv_c, ddeg_c = _grad_consts(kv_c, dw_c, _load_m(DEG, bh, offs_c, M), mask_c, NORMALIZE)
                p = _probs(qk, u_c, lse, scale, mask_n, mask_c, False, PREC, F32_DOT)
                dv = _mm(p, dkv_c, dv, True, True, PREC, F32_DOT)
                out = _mm(p, w_c, out, True, True, PREC, F32_DOT)
                a_ddeg += tl.sum(p * ddeg_c[None, :], axis=1)
            delta = tl.sum(do.to(tl.float32) * out, axis=1) + tl.sum(v.to(tl.float32) * dv, axis=1) + a_ddeg
            tl.store(DELTA + bh * N + offs_n, delta, mask=mask_n)
            # Second sweep: dqk = sum over chunks of dZ_c U_c.
            dqk = zeros_nd
            for c in range(0, tl.cdiv(M, BLOCK_M)):
                offs_c = c * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_c = offs_c < M
                u_c = _load_anchors(U, h, offs_c, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
                kv_c = _load_md(KV, bh, offs_c, offs_d, M, D)
                dw_c = _sum_rows_md(PDW, BHMD, S, bh, offs_c, offs_d, M, D)
                w_c, dkv_c, ddeg_c = _grad_consts(kv_c, dw_c, _load_m(DEG, bh, offs_c, M), mask_c, NORMALIZE)
                p = _probs(qk, u_c, lse, scale, mask_n, mask_c, False, PREC, F32_DOT)
                da = _mm(
                    do, tl.trans(w_c), tl.broadcast_to(ddeg_c[None, :], (BLOCK_N, BLOCK_M)), False, True, PREC, F32_DOT
                )
                da = _mm(v, tl.trans(dkv_c), da, False, True, PREC, F32_DOT)
                dz = p * (da - delta[:, None]) * scale
                dqk = _mm(dz, u_c, dqk, True, False, PREC, F32_DOT)
        _store_tile(DQK, dqk, b, h, offs_n, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd, mask_nd)
        _store_tile(DV, dv, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd, mask_nd)

    if SINGLE:
        row = tl.program_id(0).to(tl.int64) * tl.num_programs(1)  # this split's partial
        mask_md = mask_m[:, None] & mask_d[None, :]
        tl.store(DUP + (row + bh) * M * D + offs_m[:, None] * D + offs_d[None, :], du, mask=mask_md)


@triton.jit
def _du_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    DO,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    LSE,  # (B*H, N) fp32
    DELTA,  # (B*H, N) fp32
    KV,  # (B*H, M, D) fp32
    DEG,  # (B*H, M) fp32
    PDW,  # (S, B*H, M, D) fp32 partials of dW
    DUP,  # (S, B*H, M, D) fp32 out
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    stride_uh,
    stride_um,
    stride_ud,
    H,
    N,
    M,
    D,
    S,
    scale,
    NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (split of N, b*h, chunk of anchors), several chunks only: dU_c = sum_n dZ_c^T qk."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    BHMD = tl.num_programs(1) * M * D
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D, PREC)
    kv = _load_md(KV, bh, offs_m, offs_d, M, D)
    dw = _sum_rows_md(PDW, BHMD, S, bh, offs_m, offs_d, M, D)
    w, dkv, ddeg = _grad_consts(kv, dw, _load_m(DEG, bh, offs_m, M), mask_m, NORMALIZE)
    du = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    t_start, t_end = _split_range(N, BLOCK_N)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
        v = _load_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd, mask_nd)
        do = _load_tile(DO, b, h, offs_n, offs_d, stride_gb, stride_gh, stride_gn, stride_gd, mask_nd)
        lse = tl.load(LSE + bh * N + offs_n, mask=mask_n, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_n, mask=mask_n, other=0.0)
        p = _probs(qk, u, lse, scale, mask_n, mask_m, False, PREC, F32_DOT)
        da = _mm(do, tl.trans(w), tl.broadcast_to(ddeg[None, :], (BLOCK_N, BLOCK_M)), False, True, PREC, F32_DOT)
        da = _mm(v, tl.trans(dkv), da, False, True, PREC, F32_DOT)
        dz = p * (da - delta[:, None]) * scale
        du = _mm(tl.trans(dz), qk, du, True, False, PREC, F32_DOT)
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1)
    mask_md = mask_m[:, None] & mask_d[None, :]
    tl.store(DUP + (row + bh) * M * D + offs_m[:, None] * D + offs_d[None, :], du, mask=mask_md)


@triton.jit
def _du_sum_kernel(
    DUP,  # (S, B, H, M, D) fp32 partials of dU
    DU,  # (H, M, D) or (M, D) out, the anchors' dtype
    stride_duh,
    stride_dum,
    stride_dud,
    B,
    H,
    M,
    D,
    S,
    PER_HEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (head, or the one shared set; chunk of anchors): dU = the partials summed in a fixed
    order (split, then image, then head), rounded once to the anchors' dtype."""
    hu = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, S):
        for b in range(0, B):
            if PER_HEAD:
                acc += _load_md(DUP, (s * B + b) * H + hu, offs_m, offs_d, M, D)
            else:
                for h in range(0, H):
                    acc += _load_md(DUP, ((s * B + b) * H + h).to(tl.int64), offs_m, offs_d, M, D)
    if DU.dtype.element_ty == tl.bfloat16:
        acc = _round_bf16(acc)
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    ptrs = DU + hu * stride_duh + offs_m[:, None] * stride_dum + offs_d[None, :] * stride_dud
    tl.store(ptrs, acc.to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch plans (plain integer arithmetic, cached per call shape)
# ---------------------------------------------------------------------------------------------

# Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(_fused_fwd_kernel).__name__ == "InterpretedFunction"

SINGLE_PASS_MAX_N = 256  # up to this many tokens: one split of N, one program per (b, h)
_MAX_BLOCK_M = 64  # anchors per chunk
_PREC = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # see _mm
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ANCHOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLANS: dict[tuple, Plan] = {}  # call signature -> plan; see launch_plan


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    """The smallest power of two >= x (x >= 1)."""
    return 1 << (x - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _device_info(device: torch.device) -> tuple[str, int, bool]:
    """(GPU name for the config table, target number of programs for the split reductions,
    whether launches must switch the current device)."""
    if INTERPRETED or device.type != "cuda":
        # Many programs: the interpreter tests exercise the split path from a few hundred tokens.
        return "interpreter", 16, False
    if not torch.cuda.is_available():  # fake CUDA tensors traced on a machine without a GPU
        return "no GPU", 4 * 132, False
    props = torch.cuda.get_device_properties(device)  # pragma: no cover - needs a GPU
    return props.name, 4 * props.multi_processor_count, torch.cuda.device_count() > 1  # pragma: no cover


def _splits(n: int, block_n: int, programs_per_split: int, target: int) -> int:
    """Splits S of N: about ``target`` programs in all, every split non-empty; 1 up to
    SINGLE_PASS_MAX_N tokens."""
    n_tiles = _cdiv(n, block_n)
    if n <= SINGLE_PASS_MAX_N or n_tiles <= 1:
        return 1
    per = _cdiv(n_tiles, max(1, min(n_tiles, _cdiv(target, programs_per_split))))
    return _cdiv(n_tiles, per)


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape and strides covers its memory exactly once (no gaps, no
    overlaps), so that a gradient can be given its layout."""
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if s != expected:
            return False
        expected *= n
    return True


def _token_major(B: int, H: int, N: int, D: int) -> tuple[int, int, int, int]:
    """Strides of a (B, H, N, D) view of a (B, N, H, D) tensor: merging heads afterwards is free."""
    return (N * H * D, D, H * D, 1)


class Plan:
    """Everything about a call that its shapes, strides and dtypes decide, computed once.

    Attributes (ints unless said): ``B, H, N, D, M``; ``fused`` (bool: forward and backward take
    one program per (b, h), no partials); ``splits_fwd``/``splits_bwd`` (S); ``chunks`` of
    anchors; ``ws_numel``/``wb_numel``: fp32 elements of the forward's workspace (KV, degrees,
    log-sum-exps, partials; kept for the backward) and the backward's; offsets into them; the
    outputs' shapes and strides; the kernels' trailing arguments and constexprs.
    """

    def __init__(self, key: tuple) -> None:
        """``key``: the call's signature, as :func:`launch_plan` builds it (plain integers)."""
        q_shape, q_stride, v_shape, v_stride, u_shape, u_stride, dtype, _, u_dtype, device, _, _, normalize = key
        B, H, N, D = q_shape
        M = u_shape[-2]
        BH = B * H
        self.B, self.H, self.N, self.D, self.M = B, H, N, D, M
        self.per_head = len(u_shape) == 3
        self.normalize = normalize
        self.dtype, self.device = dtype, device
        gpu, target, self.switch_device = _device_info(device)
        block_m = min(_MAX_BLOCK_M, max(16, _pow2(M)))  # tl.dot needs every dimension >= 16
        block_d = max(16, _pow2(D))
        self.chunks = chunks = _cdiv(M, block_m)
        common = dict(PREC=_PREC[dtype], F32_DOT=dtype == torch.float32 or INTERPRETED, BLOCK_M=block_m)
        common["BLOCK_D"] = block_d
        cfg = {}
        for kind in ("fwd", "bwd"):
            cfg[kind] = lookup_config(kind, N, BH, _DTYPE_NAMES[dtype], gpu, block_d)
        self.splits_fwd = S = _splits(N, cfg["fwd"]["BLOCK_N"], BH * chunks, target)
        self.splits_bwd = Sb = _splits(N, cfg["bwd"]["BLOCK_N"], BH * chunks, target)
        self.fused = fused = S == 1 and Sb == 1 and chunks == 1
        scale = D**-0.5
        self.meta_fwd = dict(common, **cfg["fwd"])
        self.meta_bwd = dict(common, **cfg["bwd"])
        self.n_tiles_fwd = _cdiv(N, cfg["fwd"]["BLOCK_N"])

        # Forward workspace: KV (BH, M, D) | degrees (BH, M) | lse (BH, N) | partials (S, BH, M, D) | (S, BH, M)
        bhmd, bhm = BH * M * D, BH * M
        self.deg_off = bhmd
        self.lse_off = bhmd + bhm
        self.pkv_off = self.lse_off + (BH * N if chunks > 1 else 0)
        self.pdeg_off = self.pkv_off + (S * bhmd if S > 1 else 0)
        self.ws_numel = self.pdeg_off + (S * bhm if S > 1 else 0)
        if S == 1:
            self.pkv_off, self.pdeg_off = 0, self.deg_off
        # Backward workspace: dU partials (Sb, BH, M, D) | dW partials (Sb, BH, M, D) | delta (BH, N)
        self.pdw_off = Sb * bhmd
        self.delta_off = self.pdw_off + (0 if fused else Sb * bhmd)
        self.wb_numel = self.delta_off + (BH * N if chunks > 1 else 0)

        # Outputs: token-major out; gradients in their inputs' layout where that is dense.
        self.shape = (B, H, N, D)
        self.out_stride = _token_major(B, H, N, D)
        self.dqk_stride = q_stride if _dense(q_shape, q_stride) else self.out_stride
        self.dv_stride = v_stride if _dense(v_shape, v_stride) else self.out_stride
        self.du_shape = u_shape
        contiguous = (M * D, D, 1)[-len(u_shape) :]
        self.du_stride = u_stride if _dense(u_shape, u_stride) else contiguous
        self.du_dtype = u_dtype
        u_strides = (0, *u_stride) if len(u_shape) == 2 else u_stride
        du_strides = (0, *self.du_stride) if len(u_shape) == 2 else self.du_stride

        qs, vs = q_stride, v_stride
        sizes = (H, N, M, D)
        self.fwd_tail = (*qs, *vs, *u_strides, *self.out_stride, *sizes, self.deg_off, scale)
        self.lse_tail = (*qs, *u_strides, *sizes, scale)
        self.reduce_tail = (*qs, *vs, *u_strides, *sizes, scale)
        self.out_tail = (*qs, *u_strides, *self.out_stride, *sizes, S, scale)
        self.bwd_fused_tail = (*self.dqk_stride, *self.dv_stride, *sizes, self.deg_off, scale)
        self.bwd_tail = (*self.dqk_stride, *self.dv_stride, *sizes, Sb, scale)
        self.du_tail = (*sizes, Sb, scale)
        self.du_sum_tail = (*du_strides, B, H, M, D, 1 if fused else Sb)
        self.qs, self.vs, self.us = qs, vs, u_strides
        self.sizes_scale = (*sizes, scale)
        self.grid_bh = (BH,)
        self.grid_lse = (self.n_tiles_fwd, BH)
        self.grid_reduce_fwd = (S, BH, chunks)
        self.grid_out = (S, BH)
        self.grid_reduce_bwd = (Sb, BH, chunks)
        self.grid_bwd = (Sb, BH)
        self.grid_du_sum = (H if self.per_head else 1, chunks)
        self.k_fwd = dict(NORMALIZE=normalize, STORE_KV=True, **self.meta_fwd)
        self.k_infer = dict(NORMALIZE=normalize, STORE_KV=False, **self.meta_fwd)
        self.k_lse = self.meta_fwd
        self.k_reduce_fwd = dict(WITH_DEG=True, SINGLE=chunks == 1, **self.meta_fwd)
        self.k_out = dict(NORMALIZE=normalize, SINGLE=chunks == 1, WRITE_BACK=S > 1, **self.meta_fwd)
        self.k_bwd_fused = dict(NORMALIZE=normalize, **self.meta_bwd)
        self.k_reduce_bwd = dict(WITH_DEG=False, SINGLE=chunks == 1, **self.meta_bwd)
        self.k_bwd = dict(NORMALIZE=normalize, SINGLE=chunks == 1, **self.meta_bwd)
        self.k_du = dict(NORMALIZE=normalize, **self.meta_bwd)
        self.k_du_sum = dict(PER_HEAD=self.per_head, BLOCK_M=block_m, BLOCK_D=block_d)
        if not INTERPRETED:  # pragma: no cover - needs a GPU
            self.k_du_sum.update(num_warps=4, num_stages=1)

    def __repr__(self) -> str:
        return (
            f"Plan(B={self.B}, H={self.H}, N={self.N}, D={self.D}, M={self.M}, fused={self.fused}, "
            f"splits={self.splits_fwd}/{self.splits_bwd}, chunks={self.chunks}, BLOCK_N="
            f"{self.meta_fwd['BLOCK_N']}/{self.meta_bwd['BLOCK_N']})"
        )


def _validate(qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor) -> None:
    """Every check the kernels need, raising a one-line ``ValueError``."""
    check_inputs(qk, v, anchors)
    if anchors.dim() == 4:
        raise ValueError(
            f"anchor_attention_triton: anchors must be (M, D) or (H, M, D); got {tuple(anchors.shape)} "
            "(per-image anchors are served by the reference implementation)"
        )
    if qk.dtype not in _PREC or v.dtype != qk.dtype:
        raise ValueError(
            f"anchor_attention_triton: qk and v must share a dtype in (float32, bfloat16, float16); "
            f"got {qk.dtype} and {v.dtype}"
        )
    if anchors.dtype not in _ANCHOR_DTYPES:
        raise ValueError(f"anchor_attention_triton: anchors must be float32, bfloat16 or float16; got {anchors.dtype}")
    if v.device != qk.device or anchors.device != qk.device:
        raise ValueError(
            f"anchor_attention_triton: qk, v and anchors must be on one device; got {qk.device}, {v.device}, "
            f"{anchors.device}"
        )
    reason = fused_unsupported(qk, anchors)
    if reason is not None:
        raise ValueError(f"anchor_attention_triton: {reason}")
    check_triton_device(qk.device)


def launch_plan(qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool = True) -> Plan:
    """The cached :class:`Plan` for these inputs, validating them the first time a signature
    (shapes, strides, dtypes, devices, ``normalize``) is seen."""
    key = (
        qk.shape,
        qk.stride(),
        v.shape,
        v.stride(),
        anchors.shape,
        anchors.stride(),
        qk.dtype,
        v.dtype,
        anchors.dtype,
        qk.device,
        v.device,
        anchors.device,
        normalize,
    )
    try:
        plan = _PLANS.get(key)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes): the plan specialises them
        key = tuple(tuple(int(x) for x in k) if isinstance(k, tuple) else k for k in key)
        plan = _PLANS.get(key)
    if plan is None:
        _validate(qk, v, anchors)
        plan = _PLANS[key] = Plan(tuple(tuple(k) if isinstance(k, torch.Size) else k for k in key))
    return plan


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _eager(kernel):
    return kernel


def _infer(plan: Plan, qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The output alone (nothing kept for a backward): one allocation with one split."""
    if not plan.fused:
        return _forward(plan, qk, v, anchors)[0]
    out = torch.empty_strided(plan.shape, plan.out_stride, dtype=plan.dtype, device=plan.device)
    _fused_fwd_kernel[plan.grid_bh](qk, v, anchors, out, out, *plan.fwd_tail, **plan.k_infer)
    return out


def _forward(plan: Plan, qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, wrap=_eager):
    """(out (B, H, N, D) token-major in v's dtype, the fp32 workspace). ``wrap``:
    ``torch.library.wrap_triton`` on the compiled path, None for shapes only (fake tensors)."""
    out = torch.empty_strided(plan.shape, plan.out_stride, dtype=plan.dtype, device=plan.device)
    ws = torch.empty(plan.ws_numel, dtype=torch.float32, device=plan.device)
    if wrap is None:
        return out, ws
    if plan.fused:
        wrap(_fused_fwd_kernel)[plan.grid_bh](qk, v, anchors, out, ws, *plan.fwd_tail, **plan.k_fwd)
        return out, ws
    kv, deg, lse = ws, ws[plan.deg_off :], ws[plan.lse_off :]
    pkv, pdeg = ws[plan.pkv_off :], ws[plan.pdeg_off :]
    if plan.chunks > 1:
        wrap(_lse_kernel)[plan.grid_lse](qk, anchors, lse, *plan.lse_tail, **plan.k_lse)
    wrap(_reduce_kernel)[plan.grid_reduce_fwd](qk, v, anchors, lse, pkv, pdeg, *plan.reduce_tail, **plan.k_reduce_fwd)
    wrap(_out_kernel)[plan.grid_out](qk, anchors, lse, pkv, pdeg, kv, deg, out, *plan.out_tail, **plan.k_out)
    return out, ws


def _backward(
    plan: Plan,
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    ws: torch.Tensor,
    wrap=_eager,
):
    """(dqk, dv, danchors), each in its input's dtype and (where dense) layout."""
    if grad_out.dtype != plan.dtype:
        grad_out = grad_out.to(plan.dtype)
    dqk = torch.empty_strided(plan.shape, plan.dqk_stride, dtype=plan.dtype, device=plan.device)
    dv = torch.empty_strided(plan.shape, plan.dv_stride, dtype=plan.dtype, device=plan.device)
    du = torch.empty_strided(plan.du_shape, plan.du_stride, dtype=plan.du_dtype, device=plan.device)
    wb = torch.empty(plan.wb_numel, dtype=torch.float32, device=plan.device)
    if wrap is None:
        return dqk, dv, du
    gs = grad_out.stride()
    if plan.fused:
        wrap(_fused_bwd_kernel)[plan.grid_bh](
            qk, v, grad_out, anchors, ws, dqk, dv, wb, *plan.qs, *plan.vs, *gs, *plan.us, *plan.bwd_fused_tail,
            **plan.k_bwd_fused,
        )  # fmt: skip
    else:
        kv, deg, lse = ws, ws[plan.deg_off :], ws[plan.lse_off :]
        pdw, delta = wb[plan.pdw_off :], wb[plan.delta_off :]
        wrap(_reduce_kernel)[plan.grid_reduce_bwd](
            qk, grad_out, anchors, lse, pdw, pdw, *plan.qs, *gs, *plan.us, *plan.sizes_scale,
            **plan.k_reduce_bwd,
        )  # fmt: skip
        wrap(_bwd_kernel)[plan.grid_bwd](
            qk, v, grad_out, anchors, lse, kv, deg, pdw, dqk, dv, wb, delta, *plan.qs, *plan.vs, *gs, *plan.us,
            *plan.bwd_tail, **plan.k_bwd,
        )  # fmt: skip
        if plan.chunks > 1:
            wrap(_du_kernel)[plan.grid_reduce_bwd](
                qk, v, grad_out, anchors, lse, delta, kv, deg, pdw, wb, *plan.qs, *plan.vs, *gs, *plan.us,
                *plan.du_tail, **plan.k_du,
            )  # fmt: skip
    wrap(_du_sum_kernel)[plan.grid_du_sum](wb, du, *plan.du_sum_tail, **plan.k_du_sum)
    return dqk, dv, du


def _on_device(plan: Plan):
    """Launch on the inputs' GPU, not the current one (only where there are several)."""
    return torch.cuda.device(plan.device) if plan.switch_device else contextlib.nullcontext()


def _forward_eager(plan: Plan, qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor):
    if plan.switch_device:  # pragma: no cover - needs several GPUs
        with torch.cuda.device(plan.device):
            return _forward(plan, qk, v, anchors)
    return _forward(plan, qk, v, anchors)


# ---------------------------------------------------------------------------------------------
# The compiled path: custom operators torch.compile and torch.export see
# ---------------------------------------------------------------------------------------------

# On a GPU the operators are ``torch.library.triton_op``s whose launches go through
# ``wrap_triton``: torch.compile sees the Triton kernels themselves (inductor schedules them with
# the rest of the graph, and CUDA-graph capture takes them), torch.export keeps the operators.
# The Triton interpreter has no kernels to trace, so there they are opaque custom operators with
# shape-only fake versions, running the same launchers. Eager calls go around both (see
# ``anchor_attention_triton``): ``wrap_triton`` costs tens of microseconds per call in eager mode.


def _fwd_impl(
    qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = launch_plan(qk, v, anchors, normalize)
    with _on_device(plan):
        return _forward(plan, qk, v, anchors, _wrap)


def _bwd_impl(
    grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, ws: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = launch_plan(qk, v, anchors, normalize)
    with _on_device(plan):
        return _backward(plan, grad_out, qk, v, anchors, ws, _wrap)


if INTERPRETED:
    _wrap = _eager
    _forward_op = torch.library.custom_op("anchorformer::anchor_attention_fwd", _fwd_impl, mutates_args=())
    _backward_op = torch.library.custom_op("anchorformer::anchor_attention_bwd", _bwd_impl, mutates_args=())

    @_forward_op.register_fake
    def _(qk, v, anchors, normalize):
        return _forward(launch_plan(qk, v, anchors, normalize), qk, v, anchors, None)

    @_backward_op.register_fake
    def _(grad_out, qk, v, anchors, ws, normalize):
        return _backward(launch_plan(qk, v, anchors, normalize), grad_out, qk, v, anchors, ws, None)

else:  # pragma: no cover - needs a GPU
    _wrap = torch.library.wrap_triton
    _forward_op = torch.library.triton_op("anchorformer::anchor_attention_fwd", _fwd_impl, mutates_args=())
    _backward_op = torch.library.triton_op("anchorformer::anchor_attention_bwd", _bwd_impl, mutates_args=())


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class AnchorAttentionFunction(torch.autograd.Function):
    """Fused anchor attention on the eager path; saves the inputs and the fp32 workspace (KV,
    degrees and, for M > 64, each token's log-sum-exp)."""

    @staticmethod
    def forward(ctx, qk, v, anchors, plan):
        out, ctx.ws = _forward_eager(plan, qk, v, anchors)  # the op's own workspace: no one else writes it
        ctx.save_for_backward(qk, v, anchors)  # inputs: checked against in-place changes
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qk, v, anchors = ctx.saved_tensors
        plan, ws = ctx.plan, ctx.ws
        if plan.switch_device:  # pragma: no cover - needs several GPUs
            with torch.cuda.device(plan.device):
                return (*_backward(plan, grad_out, qk, v, anchors, ws), None)
        return (*_backward(plan, grad_out, qk, v, anchors, ws), None)


class _CompiledAnchorAttention(torch.autograd.Function):
    """The same through the custom operators, for torch.compile and torch.export."""

    @staticmethod
    def forward(ctx, qk, v, anchors, normalize):
        out, ws = _forward_op(qk, v, anchors, normalize)
        ctx.save_for_backward(qk, v, anchors, ws)
        ctx.normalize = normalize
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qk, v, anchors, ws = ctx.saved_tensors
        dqk, dv, du = _backward_op(grad_out, qk, v, anchors, ws, ctx.normalize)
        return dqk, dv, du, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def check_triton_device(device: torch.device) -> None:
    """Raise a ``ValueError`` if the kernels cannot run on ``device`` in this process."""
    if device.type == "cuda" or INTERPRETED:
        return
    late = (
        " (TRITON_INTERPRET=1 is set now, but was not when the kernels were imported)"
        if os.environ.get("TRITON_INTERPRET") == "1"
        else ""
    )
    raise ValueError(
        f"anchor_attention impl='triton' got {device.type} tensors: the Triton kernels run on CUDA "
        "tensors, or on the CPU under the Triton interpreter, which needs TRITON_INTERPRET=1 in the "
        f"environment before triton and anchorformer are imported{late}. Use impl='reference' (or "
        "'auto') on the CPU."
    )


def anchor_attention_triton(
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    *,
    normalize: bool = True,
    deterministic: bool = False,
) -> torch.Tensor:
    """Anchor attention with the fused Triton kernels (differentiable in all three inputs).

    Args:
        qk: (B, H, N, D) shared query/key embedding; fp32, bf16 or fp16; any strides.
        v: (B, H, N, D) values, same dtype and device as ``qk``.
        anchors: (M, D) shared by all heads or (H, M, D) per head; fp32, bf16 or fp16, read in
            their own dtype (no cast; with 16-bit ``qk`` the logits' products are taken in
            ``qk``'s dtype, as with anchors cast to it); their gradient comes back in their dtype.
        normalize: apply Λ^-1 (the anchor degrees, 1/0 -> 0); ``False`` is the ablation.
        deterministic: accepted for compatibility. Every path sums partials in a fixed order
            (no atomics), so repeated runs give bitwise-equal results either way.

    Returns:
        (B, H, N, D) in ``v``'s dtype, stored token-major (a view of a (B, N, H, D) tensor).
        Gradients of ``qk``, ``v`` and the anchors have their inputs' layout where that layout
        is dense (token-major otherwise).

    Raises:
        ValueError: bad shapes or dtypes, shapes beyond the kernels' limits (D > 128,
            B * H > 65535; see ``limits.py``), or CPU tensors without the Triton interpreter.
    """
    normalize = bool(normalize)
    if torch.compiler.is_compiling():
        _validate(qk, v, anchors)
        return _CompiledAnchorAttention.apply(qk, v, anchors, normalize)
    plan = launch_plan(qk, v, anchors, normalize)
    if torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad or anchors.requires_grad):
        return AnchorAttentionFunction.apply(qk, v, anchors, plan)
    if plan.switch_device:  # pragma: no cover - needs several GPUs
        with torch.cuda.device(plan.device):
            return _infer(plan, qk, v, anchors)
    return _infer(plan, qk, v, anchors)
