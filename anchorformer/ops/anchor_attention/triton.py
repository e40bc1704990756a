"""Fused Triton kernels for AnchorFormer's anchor attention (forward and backward).

AnchorFormer (Shan et al., Pattern Recognition Letters 2025, arXiv 2505.16463), per (b, h):

    A   = softmax(qk U^T * s, dim=anchors)    (N, M), s = D**-0.5, never written to memory
    deg = A^T 1                               (M,)   anchor degrees Λ; 1/0 -> 0
    KV  = A^T v                               (M, D)
    W   = Λ^-1 KV                             (M, D) the anchors' mean values
    out = A W                                 (N, D)

Forward, two passes over N: ``_reduce_kernel`` recomputes A tile by tile and accumulates KV
and deg (split over N, combined with fp32 atomics or, in deterministic mode, per-split
partials summed in a fixed order); ``_out_kernel`` recomputes A and writes ``A W``.

Backward, with dO = dL/d out, dW = A^T dO, dKV = Λ^-1 dW, ddeg = -Λ^-2 rowsum(dW * KV):

    dA   = dO W^T + v dKV^T + 1 ddeg^T          (N, M)
    dZ   = A * (dA - rowsum(A * dA)) * s        (N, M) softmax backward, Z = qk U^T
    dqk  = dZ U,  dv = A dKV,  dU = sum_{b(,h)} dZ^T qk

``_reduce_kernel`` (without degrees) gives dW; ``_bwd_kernel`` recomputes A once more and
writes dqk, dv and accumulates dU. Everything is accumulated in fp32; the matrix products
take their operands in the input dtype (bf16/fp16 tensor cores, exact IEEE fp32 for fp32).

Letters used in shapes: B batch, H heads, N tokens, D head dim, M anchors, S splits of N.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors
under the Triton interpreter (slow; for tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "anchor_attention_triton", "check_triton_device"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, acc, DTYPE: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + a @ b: operands rounded to DTYPE (the input dtype), products accumulated in fp32."""
    a = a.to(DTYPE)
    b = b.to(DTYPE)
    if F32_DOT:
        # fp32 inputs (exact IEEE products, no TF32), and bf16 under the interpreter, whose dot
        # would read bf16 storage as integers: the operands are already rounded to bf16, and a
        # bf16 x bf16 product is exact in fp32, so this matches tensor cores up to summation order.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _anchor_probs(qk, u, scale, mask_n, mask_m, F32_DOT: tl.constexpr):
    """A tile of p(anchor | token): (BLOCK_N, BLOCK_M) fp32, zero on padded rows and anchors."""
    z = tl.zeros((qk.shape[0], u.shape[0]), dtype=tl.float32)
    z = _mm(qk, tl.trans(u), z, qk.dtype, F32_DOT)
    z = z * scale  # logits Z / sqrt(D), fp32
    z = tl.where(mask_m[None, :], z, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    p = tl.exp(z)  # an anchor far below the row's best underflows to exactly 0 (-> degree 0)
    p = p / tl.sum(p, axis=1)[:, None]
    return tl.where(mask_n[:, None], p, 0.0)


@triton.jit
def _reduce_kernel(
    QK,  # (B, H, N, D) input
    X,  # (B, H, N, D) v (forward) or dO (backward)
    U,  # (H or 1, M, D) anchors
    ACC,  # (S or 1, B, H, M, D) fp32 out: A^T X
    DEG,  # (S or 1, B, H, M) fp32 out: A^T 1 (only with WITH_DEG)
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
    stride_as,
    stride_ab,
    stride_ah,
    stride_am,
    stride_ds,
    stride_db,
    stride_dh,
    H,
    N,
    M,
    D,
    N_KEY,  # power of two >= N: the autotuning key (unused in the body)
    scale,
    WITH_DEG: tl.constexpr,
    ATOMIC: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (split of N, b*h): accumulate A^T X (and the degrees A^T 1) over the split's tiles."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = tl.load(
        U + h * stride_uh + offs_m[:, None] * stride_um + offs_d[None, :] * stride_ud,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    qk_base = QK + b * stride_qb + h * stride_qh
    x_base = X + b * stride_xb + h * stride_xh

    # This program's contiguous run of tiles of N.
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, tl.num_programs(0))
    t_start = pid_s * per_split
    t_end = tl.minimum(t_start + per_split, n_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    deg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = tl.load(qk_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_nd, other=0.0)
        x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask_nd, other=0.0)
        p = _anchor_probs(qk, u, scale, mask_n, mask_m, F32_DOT)  # (BLOCK_N, BLOCK_M) fp32
        if WITH_DEG:
            deg += tl.sum(p, axis=0)
        acc = _mm(tl.trans(p), x, acc, x.dtype, F32_DOT)  # (BLOCK_M, BLOCK_D) += A_tile^T X_tile

    if ATOMIC:
        row = 0
    else:
        row = pid_s  # this split's partial
    acc_ptrs = ACC + row * stride_as + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :]
    mask_md = mask_m[:, None] & mask_d[None, :]
    if ATOMIC:
        tl.atomic_add(acc_ptrs, acc, mask=mask_md)
    else:
        tl.store(acc_ptrs, acc, mask=mask_md)
    if WITH_DEG:
        deg_ptrs = DEG + row * stride_ds + b * stride_db + h * stride_dh + offs_m
        if ATOMIC:
            tl.atomic_add(deg_ptrs, deg, mask=mask_m)
        else:
            tl.store(deg_ptrs, deg, mask=mask_m)


@triton.jit
def _load_md(PTR, b, h, stride_b, stride_h, offs_m, offs_d, M, D):
    """A (BLOCK_M, BLOCK_D) fp32 per-(b, h) matrix with rows of length D (contiguous)."""
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return tl.load(PTR + b * stride_b + h * stride_h + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _inverse_degree(DEG, b, h, stride_b, stride_h, offs_m, M, NORMALIZE: tl.constexpr):
    """Λ^-1 as a (BLOCK_M,) fp32 vector, with 1/0 -> 0; all ones without NORMALIZE."""
    mask_m = offs_m < M
    if NORMALIZE:
        deg = tl.load(DEG + b * stride_b + h * stride_h + offs_m, mask=mask_m, other=0.0)
        return tl.where(deg > 0, 1.0 / tl.where(deg > 0, deg, 1.0), 0.0)
    else:
        return tl.where(mask_m, 1.0, 0.0)


@triton.jit
def _out_kernel(
    QK,  # (B, H, N, D)
    U,  # (H or 1, M, D)
    KV,  # (B, H, M, D) fp32, contiguous
    DEG,  # (B, H, M) fp32, contiguous
    OUT,  # (B, H, N, D)
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
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (tile of N, b*h): out_tile = A_tile (Λ^-1 KV)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D
    u = tl.load(
        U + h * stride_uh + offs_m[:, None] * stride_um + offs_d[None, :] * stride_ud,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    inv = _inverse_degree(DEG, b, h, H * M, M, offs_m, M, NORMALIZE)
    w = _load_md(KV, b, h, H * M * D, M * D, offs_m, offs_d, M, D) * inv[:, None]  # (BLOCK_M, BLOCK_D) = Λ^-1 KV

    mask_nd = mask_n[:, None] & mask_d[None, :]
    qk = tl.load(
        QK + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_nd,
        other=0.0,
    )
    p = _anchor_probs(qk, u, scale, mask_n, mask_m, F32_DOT)
    out = _mm(p, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), qk.dtype, F32_DOT)
    tl.store(
        OUT + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=mask_nd,
    )


@triton.jit
def _bwd_kernel(
    QK,  # (B, H, N, D)
    V,  # (B, H, N, D)
    DO,  # (B, H, N, D) gradient of the output
    U,  # (H or 1, M, D)
    KV,  # (B, H, M, D) fp32, contiguous
    DEG,  # (B, H, M) fp32, contiguous
    DW,  # (B, H, M, D) fp32, contiguous: A^T dO
    DQK,  # (B, H, N, D) out
    DV,  # (B, H, N, D) out
    DU,  # fp32 out; U's gradient lands at row*stride_us + b*stride_ub + h*stride_uh2 (+ m, d)
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
    stride_dus,
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
    F32_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (split of N, b*h): dqk and dv of the split's tiles, and its share of dU."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    u = tl.load(U + h * stride_uh + offs_m[:, None] * stride_um + offs_d[None, :] * stride_ud, mask=mask_md, other=0.0)

    # Per-(b, h) quantities of size M x D, shared by every tile.
    inv = _inverse_degree(DEG, b, h, H * M, M, offs_m, M, NORMALIZE)  # (BLOCK_M,)
    kv = _load_md(KV, b, h, H * M * D, M * D, offs_m, offs_d, M, D)  # A^T v
    dw = _load_md(DW, b, h, H * M * D, M * D, offs_m, offs_d, M, D)  # A^T dO
    w = kv * inv[:, None]  # Λ^-1 A^T v
    dkv = dw * inv[:, None]  # dL/dKV
    if NORMALIZE:
        # deg -> inv = 1/deg -> W = inv KV: dL/ddeg = -inv^2 * sum_d dW * KV (0 where inv = 0).
        ddeg = -inv * inv * tl.sum(dw * kv, axis=1)  # (BLOCK_M,)
    else:
        ddeg = tl.zeros((BLOCK_M,), dtype=tl.float32)

    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, tl.num_programs(0))
    t_start = pid_s * per_split
    t_end = tl.minimum(t_start + per_split, n_tiles)

    DT = QK.dtype.element_ty
    du = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        qk = tl.load(
            QK + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=mask_nd,
            other=0.0,
        )
        v = tl.load(
            V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=mask_nd,
            other=0.0,
        )
        do = tl.load(
            DO + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
            mask=mask_nd,
            other=0.0,
        )
        p = _anchor_probs(qk, u, scale, mask_n, mask_m, F32_DOT)  # (BLOCK_N, BLOCK_M)
        # dL/dA = dO W^T + v dKV^T + 1 ddeg^T, (BLOCK_N, BLOCK_M)
        da = _mm(do, tl.trans(w), tl.broadcast_to(ddeg[None, :], (BLOCK_N, BLOCK_M)), DT, F32_DOT)
        da = _mm(v, tl.trans(dkv), da, DT, F32_DOT)
        dz = p * (da - tl.sum(p * da, axis=1)[:, None]) * scale  # softmax backward; 0 on padding
        zeros_nd = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dqk = _mm(dz, u, zeros_nd, DT, F32_DOT)
        dv = _mm(p, dkv, zeros_nd, DT, F32_DOT)
        du = _mm(tl.trans(dz), qk, du, DT, F32_DOT)
        tl.store(
            DQK + b * stride_dqb + h * stride_dqh + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
            dqk.to(DQK.dtype.element_ty),
            mask=mask_nd,
        )
        tl.store(
            DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
            dv.to(DV.dtype.element_ty),
            mask=mask_nd,
        )

    if ATOMIC:
        row = 0
    else:
        row = pid_s  # this split's partial
    du_ptrs = DU + row * stride_dus + b * stride_dub + h * stride_duh + offs_m[:, None] * D + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(du_ptrs, du, mask=mask_md)
    else:
        tl.store(du_ptrs, du, mask=mask_md)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(_reduce_kernel).__name__ == "InterpretedFunction"

# Candidate launch configurations on a GPU; the interpreter uses _INTERPRETER_BLOCK_N.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 8, 2)]
]
_MIN_BLOCK_N = 32
_INTERPRETER_BLOCK_N = 16
_KEY = ["M", "D", "N_KEY"]


def _prune(configs, named_args, **kwargs):
    """Large M x D tiles leave no room for big token tiles: keep the small ones."""
    if named_args["M"] * named_args["D"] > 128 * 128:
        small = [c for c in configs if c.kwargs["BLOCK_N"] <= 32]
        return small or configs[:1]
    return configs


if INTERPRETED:
    _reduce = _reduce_kernel
    _out = _out_kernel
    _bwd = _bwd_kernel
else:  # pragma: no cover - needs a GPU
    _prune_cfg = {"early_config_prune": _prune}
    _reduce = triton.autotune(
        _CONFIGS, key=_KEY + ["WITH_DEG", "ATOMIC"], reset_to_zero=["ACC", "DEG"], prune_configs_by=_prune_cfg
    )(_reduce_kernel)
    _out = triton.autotune(_CONFIGS, key=_KEY + ["NORMALIZE"], prune_configs_by=_prune_cfg)(_out_kernel)
    _bwd = triton.autotune(
        _CONFIGS, key=_KEY + ["NORMALIZE", "ATOMIC"], reset_to_zero=["DU"], prune_configs_by=_prune_cfg
    )(_bwd_kernel)


def _f32_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply in fp32 (see ``_mm``)."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _meta() -> dict[str, int]:
    """Launch parameters given explicitly (interpreter) rather than autotuned (GPU)."""
    return {"BLOCK_N": _INTERPRETER_BLOCK_N} if INTERPRETED else {}


@functools.lru_cache(maxsize=16)
def _target_programs(device_index: int | None) -> int:
    """About four programs per streaming multiprocessor keeps a GPU busy during the reductions."""
    if INTERPRETED or device_index is None:
        return 3  # a few splits, so that the interpreter tests exercise the cross-split reduction
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count  # pragma: no cover


def _num_splits(n: int, block_n: int, bh: int, target: int) -> int:
    """Splits S of N for the reductions: enough (S x B*H) programs, every split non-empty."""
    n_tiles = triton.cdiv(n, block_n)
    per = triton.cdiv(n_tiles, max(1, min(n_tiles, triton.cdiv(target, bh))))
    return triton.cdiv(n_tiles, per)


def _blocks(M: int, D: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(M)), max(16, triton.next_power_of_2(D))


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


def _reduce_launch(
    qk: torch.Tensor, x: torch.Tensor, anchors: torch.Tensor, *, with_deg: bool, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T x and (with ``with_deg``) A^T 1: ((B, H, M, D) fp32, (B, H, M) fp32)."""
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    BLOCK_M, BLOCK_D = _blocks(M, D)
    target = _target_programs(qk.device.index if qk.device.type == "cuda" else None)
    block_n = _INTERPRETER_BLOCK_N if INTERPRETED else _MIN_BLOCK_N
    rows = 1 if not deterministic else _num_splits(N, block_n, B * H, target)
    acc = torch.zeros((rows, B, H, M, D), device=qk.device, dtype=torch.float32)
    deg = torch.zeros((rows, B, H, M) if with_deg else (1,), device=qk.device, dtype=torch.float32)
    grid = lambda meta: (_num_splits(N, meta["BLOCK_N"], B * H, target), B * H)
    deg_strides = deg.stride()[:3] if with_deg else (0, 0, 0)
    _reduce[grid](
        qk,
        x,
        anchors,
        acc,
        deg,
        *qk.stride(),
        *x.stride(),
        *_anchor_strides(anchors),
        *acc.stride()[:4],
        *deg_strides,
        H,
        N,
        M,
        D,
        triton.next_power_of_2(N),
        D**-0.5,
        WITH_DEG=with_deg,
        ATOMIC=not deterministic,
        F32_DOT=_f32_dot(qk.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        **_meta(),
    )
    # Deterministic: per-split partials, summed in a fixed order (unused splits are zeros).
    return acc.sum(0), (deg.sum(0) if with_deg else deg)


def _forward(
    qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, N, D) in v's dtype, KV (B, H, M, D) fp32, deg (B, H, M) fp32)."""
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    BLOCK_M, BLOCK_D = _blocks(M, D)
    kv, deg = _reduce_launch(qk, v, anchors, with_deg=True, deterministic=deterministic)
    out = _empty_like_bnhd(v)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)
    _out[grid](
        qk,
        anchors,
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
        D**-0.5,
        NORMALIZE=normalize,
        F32_DOT=_f32_dot(qk.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        **_meta(),
    )
    return out, kv, deg


def _backward(
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    kv: torch.Tensor,
    deg: torch.Tensor,
    normalize: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dqk, dv, danchors) shaped and typed like (qk, v, anchors)."""
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    BLOCK_M, BLOCK_D = _blocks(M, D)
    grad_out = grad_out.to(qk.dtype)
    dw, _ = _reduce_launch(qk, grad_out, anchors, with_deg=False, deterministic=deterministic)
    dqk = _empty_like_bnhd(qk)
    dv = _empty_like_bnhd(v)
    target = _target_programs(qk.device.index if qk.device.type == "cuda" else None)
    per_head = anchors.dim() == 3
    if deterministic:
        # One partial per (split, b, h), reduced below in a fixed order.
        block_n = _INTERPRETER_BLOCK_N if INTERPRETED else _MIN_BLOCK_N
        du = torch.zeros((_num_splits(N, block_n, B * H, target), B, H, M, D), device=qk.device, dtype=torch.float32)
        du_strides = du.stride()[:3]
    else:
        du = torch.zeros((1, H if per_head else 1, M, D), device=qk.device, dtype=torch.float32)
        du_strides = (0, 0, du.stride(1) if per_head else 0)
    grid = lambda meta: (_num_splits(N, meta["BLOCK_N"], B * H, target), B * H)
    _bwd[grid](
        qk,
        v,
        grad_out,
        anchors,
        kv,
        deg,
        dw,
        dqk,
        dv,
        du,
        *qk.stride(),
        *v.stride(),
        *grad_out.stride(),
        *_anchor_strides(anchors),
        *dqk.stride(),
        *dv.stride(),
        *du_strides,
        H,
        N,
        M,
        D,
        triton.next_power_of_2(N),
        D**-0.5,
        NORMALIZE=normalize,
        ATOMIC=not deterministic,
        F32_DOT=_f32_dot(qk.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        **_meta(),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(qk, v, anchors, normalize, deterministic)


@_forward_op.register_fake
def _(qk, v, anchors, normalize, deterministic):
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    out = _empty_like_bnhd(v)
    return out, qk.new_empty((B, H, M, D), dtype=torch.float32), qk.new_empty((B, H, M), dtype=torch.float32)


@torch.library.custom_op("anchorformer::anchor_attention_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    kv: torch.Tensor,
    deg: torch.Tensor,
    normalize: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, qk, v, anchors, kv, deg, normalize, deterministic)


@_backward_op.register_fake
def _(grad_out, qk, v, anchors, kv, deg, normalize, deterministic):
    return _empty_like_bnhd(qk), _empty_like_bnhd(v), torch.empty_like(anchors)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class AnchorAttentionFunction(torch.autograd.Function):
    """Fused anchor attention; saves the inputs and the (M, D)-sized KV and degrees only."""

    @staticmethod
    def forward(ctx, qk, v, anchors, normalize, deterministic):
        fwd = _forward_op if torch.compiler.is_compiling() else _forward
        out, kv, deg = fwd(qk, v, anchors, normalize, deterministic)
        ctx.save_for_backward(qk, v, anchors, kv, deg)
        ctx.normalize = normalize
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qk, v, anchors, kv, deg = ctx.saved_tensors
        bwd = _backward_op if torch.compiler.is_compiling() else _backward
        dqk, dv, du = bwd(grad_out, qk, v, anchors, kv, deg, ctx.normalize, ctx.deterministic)
        return dqk, dv, du, None, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def check_triton_device(device: torch.device) -> None:
    """Raise a ``ValueError`` if the kernels cannot run on ``device`` in this process."""
    if device.type == "cuda" or INTERPRETED:
        return
    raise ValueError(
        f"anchor_attention impl='triton' got {device.type} tensors: the Triton kernels run on CUDA "
        "tensors, or on the CPU under the Triton interpreter, which needs TRITON_INTERPRET=1 in the "
        "environment before triton and anchorformer are imported. Use impl='reference' (or 'auto') "
        "on the CPU."
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
        ValueError: bad shapes or dtypes, or CPU tensors without the Triton interpreter.
    """
    from .reference import check_inputs

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
    check_triton_device(qk.device)
    return AnchorAttentionFunction.apply(qk, v, anchors.to(qk.dtype), bool(normalize), bool(deterministic))
