"""The operator against an independent construction of S = A Λ^-1 A^T."""

from __future__ import annotations

import math

import pytest
import torch
from anchor_helpers import fp64_truth, logit_gap_inputs
from torch.utils._python_dispatch import TorchDispatchMode

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


# ---------------------------------------------------------------------------------------------
# Numerics near dead anchors, the inference path, its allocations
# ---------------------------------------------------------------------------------------------

GAPS = [float(g) for g in range(0, 151)]  # scaled logit gap of anchor 0 below the others, per head


@pytest.mark.parametrize("normalize", [True, False])
def test_logit_gap_sweep_has_no_nan_and_matches_fp64(normalize):
    """Gaps 0..150: the degree of anchor 0 runs from ~N/M through the old NaN window (an
    overflowing Λ^-2 near 1e-19, 1/denormal near 1e-40) to exact underflow; outputs and every
    gradient stay finite and match an fp64 ground truth."""
    qk, v, u, grad = logit_gap_inputs(GAPS)
    leaves = [t.clone().requires_grad_(True) for t in (qk, v, u)]
    out = anchor_attention(*leaves, normalize=normalize, impl="reference")
    out.backward(grad)
    want, want_grads = fp64_truth(qk, v, u, grad, normalize=normalize)
    for name, got, ref in zip(
        ("out", "d qk", "d v", "d anchors"), [out] + [t.grad for t in leaves], [want] + want_grads
    ):
        bad = (~torch.isfinite(got)).nonzero()
        assert bad.numel() == 0, (
            f"{name}: non-finite at gaps {sorted({GAPS[int(i[1 if got.dim() == 4 else 0])] for i in bad})}"
        )
        scale = ref.abs().max().item()
        torch.testing.assert_close(
            got.double(), ref, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_degree_floor_and_inverse():
    from anchorformer.ops.anchor_attention.reference import degree_floor, inverse_degree

    assert degree_floor(torch.float32) == 2.0**-63
    deg = torch.tensor([0.0, 1e-40, 2.0**-63, 2.0**-62, 0.5])
    assert inverse_degree(deg).tolist() == [0.0, 0.0, 0.0, 2.0**62, 2.0]
    assert torch.isfinite(inverse_degree(deg) ** 2).all()


def _strided_inputs(B, H, N, D, M, anchors_dim, dtype=torch.float32, seed=0):
    """qk, v as views of a packed (B, N, 2, H, D) projection (the model's layout), and anchors."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 2, H, D, generator=g).to(dtype)
    qk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, D)
    shape = {2: (M, D), 3: (H, M, D), 4: (B, H, M, D)}[anchors_dim]
    return qk, v, torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("anchors_dim", [2, 3, 4])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inference_path_matches_autograd_path(anchors_dim, normalize, dtype):
    """Without autograd the reference takes its buffer-reusing path; same numbers, token-major output."""
    qk, v, u = _strided_inputs(3, 2, 41, 16, 7, anchors_dim, dtype)
    with torch.no_grad():
        fast = anchor_attention(qk, v, u, normalize=normalize, impl="reference")
    leaves = [t.clone().requires_grad_(True) for t in (qk, v, u)]
    slow = anchor_attention(*leaves, normalize=normalize, impl="reference")
    assert fast.dtype == slow.dtype == dtype and fast.shape == slow.shape
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(fast, slow.detach(), rtol=tol, atol=tol)
    # (B, H, N, D) stored as (B, N, H, D): merging the heads is a view
    assert fast.transpose(1, 2).is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(anchor_attention(qk, v, u, normalize=normalize, impl="reference"), fast)


def _allocations(fn) -> list[int]:
    """Sizes in bytes of the tensors allocated during one call of ``fn`` (profiler memory events)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.json"
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    return [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]" and e["args"]["Bytes"] > 0]


@pytest.mark.parametrize("B", [1, 2])
def test_inference_allocates_one_probability_buffer_and_the_output(B):
    """No copy of qk or v, one (B, H, N, M) buffer, the output, and only (M, D)-sized others."""
    H, N, D, M = 3, 1000, 64, 30
    qk, v, u = _strided_inputs(B, H, N, D, M, 2)
    with torch.inference_mode():
        sizes = _allocations(lambda: anchor_attention(qk, v, u, impl="reference"))
    probs, out = B * H * N * M * 4, B * H * N * D * 4
    large = sorted(s for s in sizes if s > B * H * M * D * 4)
    assert large == sorted([probs, out]), f"allocations above the (B, H, M, D) size: {large}"
    assert sum(sizes) < probs + out + 64 * B * H * M * D, f"{len(sizes)} allocations, {sum(sizes)} bytes"


class _CountOps(TorchDispatchMode):
    """The aten calls made under it, by name (views included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


_VIEWS = {"transpose", "select", "expand", "view", "unsqueeze", "permute", "as_strided", "alias"}


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_inference_makes_only_the_calls_the_maths_needs(B, normalize):
    """Inside a model every call costs several times its cost in a loop of its own: besides views,
    the path scales the anchors, allocates its three buffers, and runs 3 products per image, one
    softmax and (normalized) the degrees' sum, mask and reciprocal: no conversion, copy or check."""
    qk, v, u = _strided_inputs(B, 3, 50, 16, 7, 2)
    with torch.inference_mode(), _CountOps() as ops:
        anchor_attention(qk, v, u, normalize=normalize, impl="reference")
    work = sorted(n for n in ops.names if n not in _VIEWS)
    want = ["mul", *["empty"] * 3, *["bmm"] * (3 * B), "softmax"]
    want += ["sum", "le", "masked_fill", "reciprocal_", "mul_"] if normalize else []
    assert work == sorted(want), f"calls besides views: {work}"
