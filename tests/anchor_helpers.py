"""Inputs and fp64 ground truths shared by the operator and kernel tests."""

from __future__ import annotations

import torch


def logit_gap_inputs(gaps, *, N=64, D=16, M=5, seed=0):
    """fp32 inputs with per-head anchors (H = len(gaps)): in head h, anchor 0's scaled logit sits
    ``gaps[h]`` (+- ~0.5) below the other anchors' for every token.

    Every token has qk[..., 0] = 1 and anchor 0 is -gap * sqrt(D) along that axis only; the other
    anchors are small and orthogonal to it. Returns (qk, v, anchors (H, M, D), grad), fp32.
    """
    g = torch.Generator().manual_seed(seed)
    H = len(gaps)
    qk = torch.randn(1, H, N, D, generator=g) * 0.5
    qk[..., 0] = 1.0
    u = torch.randn(H, M, D, generator=g) * 0.3
    u[:, :, 0] = 0.0
    u[:, 0, :] = 0.0
    u[:, 0, 0] = -torch.as_tensor(gaps, dtype=torch.float32) * D**0.5
    v = torch.randn(1, H, N, D, generator=g)
    grad = torch.randn(1, H, N, D, generator=g)
    return qk, v, u, grad


def fp64_truth(qk, v, anchors, grad, *, normalize=True):
    """Output and gradients (qk, v, anchors) in fp64 by plain autograd on the formula
    A (Λ^-1 (A^T v)), softmax written as exp / sum; no degree floor (fp64 has the range)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (qk, v, anchors)]
    q, x, u = leaves
    D = q.shape[-1]
    u4 = u[None, None] if u.dim() == 2 else u[None]
    z = q @ u4.transpose(-1, -2) / D**0.5  # (B, H, N, M)
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    a = e / e.sum(dim=-1, keepdim=True)
    kv = a.transpose(-1, -2) @ x  # (B, H, M, D)
    if normalize:
        kv = kv / a.sum(dim=-2)[..., None]
    out = a @ kv
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius), in fp64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()
