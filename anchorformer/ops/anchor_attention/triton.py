"""Fused Triton kernels for AnchorFormer's anchor attention (forward and backward).

AnchorFormer (Shan et al., Pattern Recognition Letters 2025, arXiv 2505.16463), per (b, h):

    A   = softmax(qk U^T * s, dim=anchors)    (N, M), s = D**-0.5, never written to memory
    deg = A^T 1                               (M,)   anchor degrees Λ; 1/0 -> 0
    KV  = A^T v                               (M, D)
    W   = Λ^-1 KV                             (M, D) the anchors' mean values
    out = A W                                 (N, D)

Forward, two passes over N: ``_reduce_kernel`` recomputes A tile by tile and accumulates KV
and deg (N split across programs; splits combined with fp32 atomics or, in deterministic
mode, through per-split partials summed in a fixed order); ``_out_kernel`` recomputes A and
writes ``A W``.

Backward, with dO = dL/d out, dW = A^T dO, dKV = Λ^-1 dW, ddeg = -rowsum(W * dKV) (bounded factors):

    dA    = dO W^T + v dKV^T + 1 ddeg^T          (N, M)
    delta = rowsum(A * dA) = rowsum(dO * out) + rowsum(v * dv) + A ddeg     (N,)
    dZ    = A * (dA - delta) * s                 (N, M) softmax backward, Z = qk U^T
    dqk   = dZ U,  dv = A dKV,  dU = sum_{b(,h)} dZ^T qk

``_reduce_kernel`` (without degrees) gives dW; ``_bwd_kernel`` recomputes A once more and
writes dqk and dv (and accumulates dU).

Anchors are processed in chunks of BLOCK_M <= 64. With one chunk (M <= 64, AnchorFormer uses
30) every kernel takes the softmax within its tile. With more, ``_lse_kernel`` first stores
each token's log-sum-exp over all anchors, so that any chunk of A is ``exp(Z - lse)``; the
reductions get one program per chunk, and dU comes from ``_du_kernel``, which uses the
per-token ``delta`` stored by ``_bwd_kernel``. Shared memory and registers stay bounded
for M up to 256 and beyond.

Everything is accumulated in fp32, and every product is as accurate as the reference's, which
keeps the probabilities, W, dKV and dZ in fp32: fp32 inputs multiply as exact IEEE products;
with bf16/fp16 inputs two inputs (qk U^T) multiply on tensor cores in their dtype, and a product
with an fp32 factor is summed from bf16 tensor-core products of its split hi + lo parts (see
``_mm``). Degrees at or below 2^-63 count as 0, as in the reference.

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

from .limits import fused_unsupported
from .reference import check_inputs

__all__ = ["INTERPRETED", "AnchorAttentionFunction", "anchor_attention_triton", "check_triton_device"]


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
def _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D):
    """A (BLOCK_M, BLOCK_D) chunk of anchors (stride_uh = 0: one set shared by all heads)."""
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return tl.load(U + h * stride_uh + offs_m[:, None] * stride_um + offs_d[None, :] * stride_ud, mask=mask, other=0.0)


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
def _inverse_degree(DEG, bh, offs_m, M, NORMALIZE: tl.constexpr):
    """Λ^-1 for a chunk of anchors, (BLOCK_M,) fp32; ones without NORMALIZE. Degrees at or below
    2^-63 (the reference's ``degree_floor`` in fp32) count as 0: 1/deg -> 0."""
    mask_m = offs_m < M
    if NORMALIZE:
        deg = tl.load(DEG + bh * M + offs_m, mask=mask_m, other=0.0)
        live = deg > 1.0842021724855044e-19  # 2^-63
        return tl.where(live, 1.0 / tl.where(live, deg, 1.0), 0.0)
    else:
        return tl.where(mask_m, 1.0, 0.0)


@triton.jit
def _load_md(PTR, bh, offs_m, offs_d, M, D):
    """A (BLOCK_M, BLOCK_D) chunk of a contiguous fp32 (B*H, M, D) tensor."""
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return tl.load(PTR + bh * M * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _grad_consts(KV, DEG, DW, bh, offs_m, offs_d, M, D, NORMALIZE: tl.constexpr):
    """For a chunk of anchors: W = Λ^-1 KV, dKV = Λ^-1 dW (BLOCK_M, BLOCK_D) and
    ddeg = dL/ddeg = -rowsum(W * dKV) (BLOCK_M,), 0 where Λ^-1 = 0; all fp32. The degree's
    gradient comes from these bounded factors (|W| <= max|v|, |dKV| <= max|dO|), never from
    Λ^-2, which overflows once a degree falls below ~1e-19."""
    kv = _load_md(KV, bh, offs_m, offs_d, M, D)
    dw = _load_md(DW, bh, offs_m, offs_d, M, D)
    inv = _inverse_degree(DEG, bh, offs_m, M, NORMALIZE)
    w = kv * inv[:, None]
    dkv = dw * inv[:, None]
    if NORMALIZE:
        ddeg = -tl.sum(w * dkv, axis=1)
    else:
        ddeg = inv * 0.0
    return w, dkv, ddeg


@triton.jit
def _lse_kernel(
    QK,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    LSE,  # (B, H, N) fp32 out
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
    N_KEY,  # power of two >= N: an autotuning key (unused in the body)
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
        u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D)
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
    LSE,  # (B, H, N) fp32 (several chunks only)
    ACC,  # (S or 1, B*H, M, D) fp32 out: A^T X
    DEG,  # (S or 1, B*H, M) fp32 out: A^T 1 (WITH_DEG only)
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
    stride_acc_row,
    stride_deg_row,
    H,
    N,
    M,
    D,
    N_KEY,
    scale,
    WITH_DEG: tl.constexpr,
    ATOMIC: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (split of N, b*h, chunk of anchors): accumulate A^T X (and A^T 1) over the split."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D)
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

    if ATOMIC:
        row = 0
    else:
        row = tl.program_id(0)  # this split's partial
    mask_md = mask_m[:, None] & mask_d[None, :]
    acc_ptrs = ACC + row * stride_acc_row + bh * M * D + offs_m[:, None] * D + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(acc_ptrs, acc, mask=mask_md)
    else:
        tl.store(acc_ptrs, acc, mask=mask_md)
    if WITH_DEG:
        deg_ptrs = DEG + row * stride_deg_row + bh * M + offs_m
        if ATOMIC:
            tl.atomic_add(deg_ptrs, deg, mask=mask_m)
        else:
            tl.store(deg_ptrs, deg, mask=mask_m)


@triton.jit
def _out_kernel(
    QK,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    LSE,  # (B, H, N) fp32 (several chunks only)
    KV,  # (B*H, M, D) fp32
    DEG,  # (B*H, M) fp32
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
    N_KEY,
    scale,
    NORMALIZE: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (tile of N, b*h): out_tile = A_tile (Λ^-1 KV), summed over chunks of anchors."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & (offs_d[None, :] < D)
    qk = _load_tile(QK, b, h, offs_n, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, mask_nd)
    if SINGLE:
        lse = 0.0
    else:
        lse = tl.load(LSE + bh * N + offs_n, mask=mask_n, other=0.0)
    out = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for c in range(0, tl.cdiv(M, BLOCK_M)):
        offs_m = c * BLOCK_M + tl.arange(0, BLOCK_M)
        u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D)
        inv = _inverse_degree(DEG, bh, offs_m, M, NORMALIZE)
        w = _load_md(KV, bh, offs_m, offs_d, M, D) * inv[:, None]  # Λ^-1 KV: the anchors' mean values
        p = _probs(qk, u, lse, scale, mask_n, offs_m < M, SINGLE, PREC, F32_DOT)
        out = _mm(p, w, out, True, True, PREC, F32_DOT)
    _store_tile(OUT, out, b, h, offs_n, offs_d, stride_ob, stride_oh, stride_on, stride_od, mask_nd)


@triton.jit
def _bwd_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    DO,  # (B, H, N, D) gradient of the output
    U,  # (H or 1, M, D)
    LSE,  # (B, H, N) fp32 (several chunks only)
    KV,  # (B*H, M, D) fp32: A^T v
    DEG,  # (B*H, M) fp32
    DW,  # (B*H, M, D) fp32: A^T dO
    DQK,  # (B, H, N, D) out
    DV,  # (B, H, N, D) out
    DU,  # fp32 out (single chunk only): dU lands at row * stride_du_row + b * stride_dub + h * stride_duh
    DELTA,  # (B, H, N) fp32 out (several chunks only): rowsum(A * dA), for _du_kernel
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
    stride_du_row,
    stride_dub,
    stride_duh,
    H,
    N,
    M,
    D,
    N_KEY,
    scale,
    NORMALIZE: tl.constexpr,
    ATOMIC: tl.constexpr,
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
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if SINGLE:  # everything about the anchors fits in one chunk: load it once
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D)
        w, dkv, ddeg = _grad_consts(KV, DEG, DW, bh, offs_m, offs_d, M, D, NORMALIZE)
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
            # dA = dO W^T + v dKV^T + 1 ddeg^T
            da = _mm(do, tl.trans(w), tl.broadcast_to(ddeg[None, :], (BLOCK_N, BLOCK_M)), False, True, PREC, F32_DOT)
            da = _mm(v, tl.trans(dkv), da, False, True, PREC, F32_DOT)
            dz = p * (da - tl.sum(p * da, axis=1)[:, None]) * scale  # softmax backward; 0 on padding
            dqk = _mm(dz, u, zeros_nd, True, False, PREC, F32_DOT)
            dv = _mm(p, dkv, zeros_nd, True, True, PREC, F32_DOT)
            du = _mm(tl.trans(dz), qk, du, True, False, PREC, F32_DOT)
        else:
            lse = tl.load(LSE + bh * N + offs_n, mask=mask_n, other=0.0)
            # First sweep over the chunks: dv = A dKV and delta = rowsum(dO * out) + rowsum(v * dv) + A ddeg.
            dv = zeros_nd
            out = zeros_nd
            a_ddeg = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c in range(0, tl.cdiv(M, BLOCK_M)):
                offs_c = c * BLOCK_M + tl.arange(0, BLOCK_M)
                u_c = _load_anchors(U, h, offs_c, offs_d, stride_uh, stride_um, stride_ud, M, D)
                w_c, dkv_c, ddeg_c = _grad_consts(KV, DEG, DW, bh, offs_c, offs_d, M, D, NORMALIZE)
                p = _probs(qk, u_c, lse, scale, mask_n, offs_c < M, False, PREC, F32_DOT)
                dv = _mm(p, dkv_c, dv, True, True, PREC, F32_DOT)
                out = _mm(p, w_c, out, True, True, PREC, F32_DOT)
                a_ddeg += tl.sum(p * ddeg_c[None, :], axis=1)
            delta = tl.sum(do.to(tl.float32) * out, axis=1) + tl.sum(v.to(tl.float32) * dv, axis=1) + a_ddeg
            tl.store(DELTA + bh * N + offs_n, delta, mask=mask_n)
            # Second sweep: dqk = sum over chunks of dZ_c U_c.
            dqk = zeros_nd
            for c in range(0, tl.cdiv(M, BLOCK_M)):
                offs_c = c * BLOCK_M + tl.arange(0, BLOCK_M)
                u_c = _load_anchors(U, h, offs_c, offs_d, stride_uh, stride_um, stride_ud, M, D)
                w_c, dkv_c, ddeg_c = _grad_consts(KV, DEG, DW, bh, offs_c, offs_d, M, D, NORMALIZE)
                p = _probs(qk, u_c, lse, scale, mask_n, offs_c < M, False, PREC, F32_DOT)
                da = _mm(
                    do, tl.trans(w_c), tl.broadcast_to(ddeg_c[None, :], (BLOCK_N, BLOCK_M)), False, True, PREC, F32_DOT
                )
                da = _mm(v, tl.trans(dkv_c), da, False, True, PREC, F32_DOT)
                dz = p * (da - delta[:, None]) * scale
                dqk = _mm(dz, u_c, dqk, True, False, PREC, F32_DOT)
        _store_tile(DQK, dqk, b, h, offs_n, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd, mask_nd)
        _store_tile(DV, dv, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd, mask_nd)

    if SINGLE:
        if ATOMIC:
            row = 0
        else:
            row = tl.program_id(0)  # this split's partial
        du_ptrs = DU + row * stride_du_row + b * stride_dub + h * stride_duh + offs_m[:, None] * D + offs_d[None, :]
        mask_md = mask_m[:, None] & mask_d[None, :]
        if ATOMIC:
            tl.atomic_add(du_ptrs, du, mask=mask_md)
        else:
            tl.store(du_ptrs, du, mask=mask_md)


@triton.jit
def _du_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    DO,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    LSE,  # (B, H, N) fp32
    DELTA,  # (B, H, N) fp32
    KV,  # (B*H, M, D) fp32
    DEG,  # (B*H, M) fp32
    DW,  # (B*H, M, D) fp32
    DU,  # fp32 out, as in _bwd_kernel
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
    stride_du_row,
    stride_dub,
    stride_duh,
    H,
    N,
    M,
    D,
    N_KEY,
    scale,
    NORMALIZE: tl.constexpr,
    ATOMIC: tl.constexpr,
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
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = _load_anchors(U, h, offs_m, offs_d, stride_uh, stride_um, stride_ud, M, D)
    w, dkv, ddeg = _grad_consts(KV, DEG, DW, bh, offs_m, offs_d, M, D, NORMALIZE)
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

    if ATOMIC:
        row = 0
    else:
        row = tl.program_id(0)
    du_ptrs = DU + row * stride_du_row + b * stride_dub + h * stride_duh + offs_m[:, None] * D + offs_d[None, :]
    mask_md = mask_m[:, None] & mask_d[None, :]
    if ATOMIC:
        tl.atomic_add(du_ptrs, du, mask=mask_md)
    else:
        tl.store(du_ptrs, du, mask=mask_md)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(_reduce_kernel).__name__ == "InterpretedFunction"

# Launch configurations: autotuned on a GPU among these candidates (BLOCK_N, warps, stages),
# unless ANCHORFORMER_TRITON_AUTOTUNE=0 (then _fixed_config, which saves compile time, e.g. in
# tests); the interpreter always uses _fixed_config. The backward kernels hold three tiles of
# N x D and three of M x D, so they also try smaller token tiles (configurations that do not fit
# in shared memory, e.g. 128 tokens of fp32 backward, are skipped by the autotuner). Compiled for
# sm_90, the 16-bit kernels at M=30, D=64 use 20-82 KB of shared memory, M=256, D=128 up to 123 KB.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in [(64, 4, 2), (128, 4, 3), (128, 8, 3)]
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2)]
]
_AUTOTUNE = not INTERPRETED and os.environ.get("ANCHORFORMER_TRITON_AUTOTUNE", "1") != "0"
_MAX_BLOCK_M = 64  # anchors per chunk


def _blocks(M: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_M, number of anchor chunks, BLOCK_D); tl.dot needs every dimension >= 16."""
    block_m = min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(M)))
    return block_m, triton.cdiv(M, block_m), max(16, triton.next_power_of_2(D))


def _fixed_config(M: int, D: int) -> dict[str, int]:
    """Launch parameters without autotuning."""
    if INTERPRETED:
        return {"BLOCK_N": 16}  # small tiles: several per split even for short test sequences
    if _blocks(M, D)[2] <= 64:
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _tuned(deterministic: bool) -> bool:
    """Whether launches are autotuned. Never in deterministic mode: the autotuner picks BLOCK_N by
    timing, which would move the split boundaries, and with them the order of the sums, from one
    process to the next; a fixed configuration gives the same bits in every process."""
    return _AUTOTUNE and not deterministic


def _meta(M: int, D: int, deterministic: bool) -> dict[str, int]:
    """Launch parameters passed explicitly: none when autotuning."""
    return {} if _tuned(deterministic) else _fixed_config(M, D)


if _AUTOTUNE:  # pragma: no cover - needs a GPU
    _KEY = ["M", "D", "N_KEY"]
    _lse = triton.autotune(_CONFIGS, key=_KEY)(_lse_kernel)
    _reduce = triton.autotune(_CONFIGS, key=_KEY + ["WITH_DEG", "ATOMIC"], reset_to_zero=["ACC", "DEG"])(_reduce_kernel)
    _out = triton.autotune(_CONFIGS, key=_KEY + ["NORMALIZE"])(_out_kernel)
    _bwd = triton.autotune(_BWD_CONFIGS, key=_KEY + ["NORMALIZE", "ATOMIC"], reset_to_zero=["DU"])(_bwd_kernel)
    _du = triton.autotune(_BWD_CONFIGS, key=_KEY + ["NORMALIZE", "ATOMIC"], reset_to_zero=["DU"])(_du_kernel)
else:
    _lse, _reduce, _out, _bwd, _du = _lse_kernel, _reduce_kernel, _out_kernel, _bwd_kernel, _du_kernel


def _kernel(tuned, plain, deterministic: bool):
    """The autotuned kernel, or the plain one with a fixed configuration (see ``_tuned``)."""
    return tuned if _tuned(deterministic) else plain


_PREC = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # see _mm


def _f32_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels' dots take fp32 operands (see ``_dot``): fp32 inputs, and the interpreter."""
    return dtype == torch.float32 or INTERPRETED


@functools.lru_cache(maxsize=16)
def _target_programs(device_index: int | None) -> int:
    """About four programs per streaming multiprocessor keeps a GPU busy during the reductions."""
    if INTERPRETED or device_index is None:
        return 3  # a few splits, so that the interpreter tests exercise the cross-split reduction
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count  # pragma: no cover


def _num_splits(n: int, block_n: int, programs_per_split: int, target: int) -> int:
    """Splits S of N for the reductions: about ``target`` programs in all, every split non-empty."""
    n_tiles = triton.cdiv(n, block_n)
    per = triton.cdiv(n_tiles, max(1, min(n_tiles, triton.cdiv(target, programs_per_split))))
    return triton.cdiv(n_tiles, per)


def _anchor_strides(anchors: torch.Tensor) -> tuple[int, int, int]:
    """(stride over heads, over anchors, over D); 0 over heads for one shared (M, D) set."""
    if anchors.dim() == 2:
        return 0, anchors.stride(0), anchors.stride(1)
    return anchors.stride(0), anchors.stride(1), anchors.stride(2)


def _empty_like_bnhd(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, N, D) tensor stored token-major, as (B, N, H, D): merging the
    heads afterwards (transpose + reshape to (B, N, H*D)) is then free."""
    B, H, N, D = x.shape
    return x.new_empty((B, N, H, D)).permute(0, 2, 1, 3)


def _lse_shape(qk: torch.Tensor, anchors: torch.Tensor) -> tuple[int, ...]:
    """(B, H, N) when the anchors take several chunks (the log-sum-exp is stored), else (0,)."""
    B, H, N, D = qk.shape
    return (B, H, N) if _blocks(anchors.shape[-2], D)[1] > 1 else (0,)


def _launch_common(qk: torch.Tensor, anchors: torch.Tensor, deterministic: bool) -> tuple[dict[str, object], int]:
    """(keyword arguments shared by every launch, number of anchor chunks)."""
    M, D = anchors.shape[-2], qk.shape[-1]
    block_m, chunks, block_d = _blocks(M, D)
    kw = dict(
        scale=D**-0.5,
        PREC=_PREC[qk.dtype],
        F32_DOT=_f32_dot(qk.dtype),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        **_meta(M, D, deterministic),
    )
    return kw, chunks


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _reduce_launch(
    qk: torch.Tensor,
    x: torch.Tensor,
    anchors: torch.Tensor,
    lse: torch.Tensor,
    *,
    with_deg: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T x and (with ``with_deg``) A^T 1: ((B, H, M, D) fp32, (B, H, M) fp32)."""
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    kw, chunks = _launch_common(qk, anchors, deterministic)
    target = _target_programs(qk.device.index if qk.device.type == "cuda" else None)
    # Deterministic: one partial per split (fixed configuration), summed below in a fixed order.
    rows = _num_splits(N, kw["BLOCK_N"], B * H * chunks, target) if deterministic else 1
    acc = torch.zeros((rows, B * H, M, D), device=qk.device, dtype=torch.float32)
    deg = torch.zeros((rows, B * H, M) if with_deg else (1,), device=qk.device, dtype=torch.float32)
    max_splits = rows if deterministic else N
    grid = lambda meta: (min(max_splits, _num_splits(N, meta["BLOCK_N"], B * H * chunks, target)), B * H, chunks)
    _kernel(_reduce, _reduce_kernel, deterministic)[grid](
        qk,
        x,
        anchors,
        lse,
        acc,
        deg,
        *qk.stride(),
        *x.stride(),
        *_anchor_strides(anchors),
        acc.stride(0),
        deg.stride(0) if with_deg else 0,
        H,
        N,
        M,
        D,
        triton.next_power_of_2(N),
        WITH_DEG=with_deg,
        ATOMIC=not deterministic,
        SINGLE=chunks == 1,
        **kw,
    )
    acc = acc.sum(0) if deterministic else acc[0]  # unused partial rows are zeros
    deg = (deg.sum(0) if deterministic else deg[0]) if with_deg else deg
    return acc.view(B, H, M, D), (deg.view(B, H, M) if with_deg else deg)


def _forward(
    qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, N, D) in v's dtype, KV (B, H, M, D) fp32, deg (B, H, M) fp32,
    lse (B, H, N) fp32 or an empty tensor when the anchors fit in one chunk)."""
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    kw, chunks = _launch_common(qk, anchors, deterministic)
    lse = torch.empty(_lse_shape(qk, anchors), device=qk.device, dtype=torch.float32)
    tiles = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)
    if chunks > 1:
        _kernel(_lse, _lse_kernel, deterministic)[tiles](
            qk, anchors, lse, *qk.stride(), *_anchor_strides(anchors), H, N, M, D, triton.next_power_of_2(N), **kw
        )
    kv, deg = _reduce_launch(qk, v, anchors, lse, with_deg=True, deterministic=deterministic)
    out = _empty_like_bnhd(v)
    _kernel(_out, _out_kernel, deterministic)[tiles](
        qk,
        anchors,
        lse,
        kv,
        deg,
        out,
        *qk.stride(),
        *_anchor_strides(anchors),
        *out.stride(),
        H,
        N,
        M,
        D,
        triton.next_power_of_2(N),
        NORMALIZE=normalize,
        SINGLE=chunks == 1,
        **kw,
    )
    return out, kv, deg, lse


def _backward(
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    kv: torch.Tensor,
    deg: torch.Tensor,
    lse: torch.Tensor,
    normalize: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dqk, dv, danchors) shaped and typed like (qk, v, anchors)."""
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    kw, chunks = _launch_common(qk, anchors, deterministic)
    grad_out = grad_out.to(qk.dtype)
    dw, _ = _reduce_launch(qk, grad_out, anchors, lse, with_deg=False, deterministic=deterministic)
    dqk = _empty_like_bnhd(qk)
    dv = _empty_like_bnhd(v)
    delta = torch.empty(_lse_shape(qk, anchors), device=qk.device, dtype=torch.float32)
    target = _target_programs(qk.device.index if qk.device.type == "cuda" else None)
    per_head = anchors.dim() == 3
    if deterministic:
        # One partial per (split, b, h), reduced below in a fixed order.
        rows = _num_splits(N, kw["BLOCK_N"], B * H * chunks, target)
        du = torch.zeros((rows, B, H, M, D), device=qk.device, dtype=torch.float32)
        du_strides = du.stride()[:3]
    else:
        rows = N
        du = torch.zeros((1, H if per_head else 1, M, D), device=qk.device, dtype=torch.float32)
        du_strides = (0, 0, du.stride(1) if per_head else 0)
    common = (
        *qk.stride(),
        *v.stride(),
        *grad_out.stride(),
        *_anchor_strides(anchors),
    )
    sizes = (H, N, M, D, triton.next_power_of_2(N))
    grid = lambda meta: (min(rows, _num_splits(N, meta["BLOCK_N"], B * H, target)), B * H)
    _kernel(_bwd, _bwd_kernel, deterministic)[grid](
        qk,
        v,
        grad_out,
        anchors,
        lse,
        kv,
        deg,
        dw,
        dqk,
        dv,
        du,
        delta,
        *common,
        *dqk.stride(),
        *dv.stride(),
        *du_strides,
        *sizes,
        NORMALIZE=normalize,
        ATOMIC=not deterministic,
        SINGLE=chunks == 1,
        **kw,
    )
    if chunks > 1:
        grid = lambda meta: (min(rows, _num_splits(N, meta["BLOCK_N"], B * H * chunks, target)), B * H, chunks)
        _kernel(_du, _du_kernel, deterministic)[grid](
            qk,
            v,
            grad_out,
            anchors,
            lse,
            delta,
            kv,
            deg,
            dw,
            du,
            *common,
            *du_strides,
            *sizes,
            NORMALIZE=normalize,
            ATOMIC=not deterministic,
            **kw,
        )
    if deterministic:
        du = du.sum(dim=(0, 1))  # (H, M, D)
        du = du if per_head else du.sum(0)
    else:
        du = du[0] if per_head else du[0, 0]
    return dqk, dv, du.to(anchors.dtype)


# torch.compile sees the launchers as opaque custom operators (with shape-only fake versions), so
# a compiled model calls the same kernels as eager mode.
@torch.library.custom_op("anchorformer::anchor_attention_fwd", mutates_args=())
def _forward_op(
    qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on_device(qk):
        return _forward(qk, v, anchors, normalize, deterministic)


@_forward_op.register_fake
def _(qk, v, anchors, normalize, deterministic):
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    f32 = dict(dtype=torch.float32)
    return (
        _empty_like_bnhd(v),
        qk.new_empty((B, H, M, D), **f32),
        qk.new_empty((B, H, M), **f32),
        qk.new_empty(_lse_shape(qk, anchors), **f32),
    )


@torch.library.custom_op("anchorformer::anchor_attention_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    kv: torch.Tensor,
    deg: torch.Tensor,
    lse: torch.Tensor,
    normalize: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on_device(qk):
        return _backward(grad_out, qk, v, anchors, kv, deg, lse, normalize, deterministic)


@_backward_op.register_fake
def _(grad_out, qk, v, anchors, kv, deg, lse, normalize, deterministic):
    return _empty_like_bnhd(qk), _empty_like_bnhd(v), anchors.new_empty(anchors.shape)  # contiguous, as the kernel's


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class AnchorAttentionFunction(torch.autograd.Function):
    """Fused anchor attention; saves the inputs, the (M, D)-sized KV and degrees, and (M > 64)
    each token's log-sum-exp."""

    @staticmethod
    def forward(ctx, qk, v, anchors, normalize, deterministic):
        if torch.compiler.is_compiling():
            out, kv, deg, lse = _forward_op(qk, v, anchors, normalize, deterministic)
        else:
            with _on_device(qk):
                out, kv, deg, lse = _forward(qk, v, anchors, normalize, deterministic)
        ctx.save_for_backward(qk, v, anchors, kv, deg, lse)
        ctx.normalize = normalize
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qk, v, anchors, kv, deg, lse = ctx.saved_tensors
        args = (grad_out, qk, v, anchors, kv, deg, lse, ctx.normalize, ctx.deterministic)
        if torch.compiler.is_compiling():
            dqk, dv, du = _backward_op(*args)
        else:
            with _on_device(qk):
                dqk, dv, du = _backward(*args)
        return dqk, dv, du, None, None


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
        anchors: (M, D) shared by all heads or (H, M, D) per head; cast to ``qk``'s dtype.
        normalize: apply Λ^-1 (the anchor degrees, 1/0 -> 0); ``False`` is the ablation.
        deterministic: reduce over N through per-split partials summed in a fixed order instead
            of fp32 atomics, so that repeated runs give bitwise-equal results.

    Returns:
        (B, H, N, D) in ``v``'s dtype, stored token-major (a view of a (B, N, H, D) tensor).

    Raises:
        ValueError: bad shapes or dtypes, shapes beyond the kernels' limits (D > 128,
            B * H > 65535; see ``limits.py``), or CPU tensors without the Triton interpreter.
    """
    check_inputs(qk, v, anchors)
    if anchors.dim() == 4:
        raise ValueError(
            f"anchor_attention_triton: anchors must be (M, D) or (H, M, D); got {tuple(anchors.shape)} "
            "(per-image anchors are served by the reference implementation)"
        )
    if qk.dtype not in (torch.float32, torch.bfloat16, torch.float16) or v.dtype != qk.dtype:
        raise ValueError(
            f"anchor_attention_triton: qk and v must share a dtype in (float32, bfloat16, float16); "
            f"got {qk.dtype} and {v.dtype}"
        )
    if v.device != qk.device or anchors.device != qk.device:
        raise ValueError(
            f"anchor_attention_triton: qk, v and anchors must be on one device; got {qk.device}, {v.device}, "
            f"{anchors.device}"
        )
    reason = fused_unsupported(qk, anchors)
    if reason is not None:
        raise ValueError(f"anchor_attention_triton: {reason}")
    check_triton_device(qk.device)
    return AnchorAttentionFunction.apply(qk, v, anchors.to(qk.dtype), bool(normalize), bool(deterministic))
