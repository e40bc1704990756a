"""The operator against an independent construction of S = A Λ^-1 A^T."""

from __future__ import annotations

import math

import pytest
import torch

from anchorformer.ops import anchor_attention
from anchorformer.ops.anchor_attention import resolve_impl


def explicit_markov_attention(qk, v, anchors, normalize=True):
    """Form the N x N matrix S token -> anchor -> token explicitly, in float64, with loops-free
    but softmax-free arithmetic (exp / sum), and return (S @ v, S)."""
    qk, v, u = qk.double(), v.double(), anchors.double()
    D = qk.shape[-1]
    if u.dim() == 2:
        logits = torch.einsum("bhnd,md->bhnm", qk, u)
    else:
        logits = torch.einsum("bhnd,hmd->bhnm", qk, u)
    logits = logits / math.sqrt(D)
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    a = e / e.sum(dim=-1, keepdim=True)  # (B, H, N, M)
    if normalize:
        deg = a.sum(dim=2)  # (B, H, M)
        inv = torch.where(deg > 0, 1.0 / deg.clamp_min(1e-300), torch.zeros_like(deg))
        s = torch.einsum("bhnm,bhm,bhkm->bhnk", a, inv, a)
    else:
        s = torch.einsum("bhnm,bhkm->bhnk", a, a)
    return s @ v, s


CASES = [(n, m) for n in (1, 2, 17, 197, 577) for m in (1, 30, 64, 300)]


@pytest.mark.parametrize("n,m", CASES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_explicit_construction(n, m, per_head, normalize):
    B, H, D = 1, 2, 16
    g = torch.Generator().manual_seed(n * 1000 + m)
    qk = torch.randn(B, H, n, D, generator=g)
    v = torch.randn(B, H, n, D, generator=g)
    anchors = torch.randn(H, m, D, generator=g) if per_head else torch.randn(m, D, generator=g)
    out = anchor_attention(qk, v, anchors, normalize=normalize, impl="reference")
    expected, s = explicit_markov_attention(qk, v, anchors, normalize=normalize)
    assert out.shape == (B, H, n, D)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    if normalize:
        torch.testing.assert_close(s.sum(-1), torch.ones_like(s.sum(-1)), rtol=1e-10, atol=1e-10)


def test_rows_of_s_are_stochastic_and_constant_v_is_preserved():
    """S rows sum to 1, so attending to constant values gives the constant back."""
    qk = torch.randn(2, 3, 50, 8)
    anchors = torch.randn(7, 8)
    v = torch.full((2, 3, 50, 8), 3.5)
    out = anchor_attention(qk, v, anchors, impl="reference")
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(per_head, normalize):
    B, H, N, D, M = 1, 2, 5, 4, 3
    qk = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    shape = (H, M, D) if per_head else (M, D)
    anchors = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def f(qk, v, anchors):
        # float64 end to end: the reference accumulates in fp32 only for narrower inputs.
        from anchorformer.ops.anchor_attention.reference import anchor_attention_reference

        return anchor_attention_reference(qk, v, anchors, normalize=normalize)

    assert torch.autograd.gradcheck(f, (qk, v, anchors), eps=1e-6, atol=1e-5)


def test_zero_degree_anchor_gives_finite_outputs_and_gradients():
    """An anchor that no token weighs (its softmax weight underflows to 0) contributes nothing."""
    D = 4
    qk = torch.ones(1, 1, 6, D, requires_grad=True)
    # anchor 0 aligned with the tokens, anchor 1 opposite: exp(-huge) underflows to exactly 0.
    anchors = torch.tensor([[50.0] * D, [-50.0] * D], requires_grad=True)
    v = torch.randn(1, 1, 6, D, requires_grad=True)
    from anchorformer.ops.anchor_attention import anchor_probabilities

    a = anchor_probabilities(qk, anchors)
    assert (a[..., 1] == 0).all(), "the test needs an anchor of exactly zero degree"
    out = anchor_attention(qk, v, anchors, impl="reference")
    assert torch.isfinite(out).all()
    # with a single live anchor every token receives the mean of the values
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(v))
    out.square().sum().backward()
    for t in (qk, v, anchors):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_extreme_logits(dtype):
    qk = (torch.randn(2, 2, 33, 16) * 300).to(dtype).requires_grad_()
    v = torch.randn(2, 2, 33, 16).to(dtype).requires_grad_()
    anchors = (torch.randn(9, 16) * 300).to(dtype).requires_grad_()
    out = anchor_attention(qk, v, anchors, impl="reference")
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    for t in (qk, v, anchors):
        assert torch.isfinite(t.grad.float()).all()
    # the result stays close to the fp64 construction from the same rounded inputs
    expected, _ = explicit_markov_attention(qk.detach(), v.detach(), anchors.detach())
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_pooled_anchors_per_image():
    qk = torch.randn(2, 3, 20, 8)
    v = torch.randn(2, 3, 20, 8)
    anchors = torch.randn(2, 3, 5, 8)
    out = anchor_attention(qk, v, anchors, impl="reference")
    for b in range(2):
        expected, _ = explicit_markov_attention(qk[b : b + 1], v[b : b + 1], anchors[b])
        torch.testing.assert_close(out[b : b + 1].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "qk_shape,v_shape,a_shape,match",
    [
        ((3, 10, 8), (3, 10, 8), (4, 8), "qk must be 4-D"),
        ((1, 2, 10, 8), (1, 2, 11, 8), (4, 8), "v must have the shape"),
        ((1, 2, 10, 8), (1, 2, 10, 8), (4, 6), "head dim D=8"),
        ((1, 2, 10, 8), (1, 2, 10, 8), (3, 4, 8), "per-head anchors"),
        ((1, 2, 10, 8), (1, 2, 10, 8), (0, 8), "M >= 1"),
        ((1, 2, 10, 8), (1, 2, 10, 8), (8,), "anchors must be"),
    ],
)
def test_bad_shapes_raise_clear_errors(qk_shape, v_shape, a_shape, match):
    with pytest.raises(ValueError, match=match):
        anchor_attention(torch.randn(qk_shape), torch.randn(v_shape), torch.randn(a_shape))


def test_impl_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ANCHORFORMER_ATTN_IMPL", raising=False)
    assert resolve_impl("auto", cpu) == "reference"
    assert resolve_impl("reference", cpu) == "reference"
    monkeypatch.setenv("ANCHORFORMER_ATTN_IMPL", "reference")
    assert resolve_impl("auto", cpu) == "reference"
    monkeypatch.setenv("ANCHORFORMER_ATTN_IMPL", "bogus")
    with pytest.raises(ValueError, match="ANCHORFORMER_ATTN_IMPL"):
        resolve_impl("auto", cpu)
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast", cpu)
