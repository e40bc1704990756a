"""The fused Triton kernels against the reference: output and all three gradients, per dtype.

The kernel tests (marked ``kernel`` below) run on a CUDA device when there is one. On the CPU
they run under the Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before triton is imported: ``test_kernels_under_interpreter`` therefore runs this same file in
a child pytest with that variable set, where the kernel tests carry the ``interpreter`` marker
and use CPU tensors, and fails unless every one of them passed (none skipped).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import product
from pathlib import Path

import pytest
import torch

from anchorformer.ops.anchor_attention import anchor_attention, anchor_attention_reference, resolve_impl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# Every kernel test: under the interpreter in the child process, on CUDA otherwise.
kernel = pytest.mark.interpreter if INTERPRETED else pytest.mark.gpu

# Tolerances, one row per dtype: |got - want| <= ATOL * max(1, max|want|) + RTOL * |want|,
# elementwise, against the reference evaluated in fp32 on the same (rounded) inputs.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
}
DTYPES = list(TOLERANCES)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _inputs(B, H, N, D, M, dtype, per_head, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    u = torch.randn((H, M, D) if per_head else (M, D), generator=g)
    grad = torch.randn(B, H, N, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (qk, v, u, grad)]


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOLERANCES[dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(
        got.float(), want.float(), atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}"
    )


def _check_against_reference(qk, v, u, grad, *, normalize=True, deterministic=False):
    """Run kernels and reference (fp32 upcast), forward and backward; compare everything."""
    from anchorformer.ops.anchor_attention.triton import anchor_attention_triton

    dtype = qk.dtype
    leaves = [t.detach().clone().requires_grad_(True) for t in (qk, v, u)]
    out = anchor_attention_triton(*leaves, normalize=normalize, deterministic=deterministic)
    assert out.dtype == dtype and out.device == qk.device
    out.backward(grad)

    ref_leaves = [t.detach().float().requires_grad_(True) for t in (qk, v, u)]
    ref = anchor_attention_reference(*ref_leaves, normalize=normalize)
    ref.backward(grad.float())

    _assert_close(out, ref, dtype, "out")
    for name, a, b in zip(("d qk", "d v", "d anchors"), leaves, ref_leaves):
        assert a.grad.dtype == dtype, f"{name}: dtype {a.grad.dtype}"
        _assert_close(a.grad, b.grad, dtype, name)
    return out, [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------
# Kernel tests (interpreter on the CPU, or CUDA)
# ---------------------------------------------------------------------------------------------

# Every dtype x shared/per-head anchors x normalisation on and off, on a ragged shape; the
# per-head cases have M = 70 anchors, more than one chunk of the kernels (64).
BASIC = [
    pytest.param(
        dtype, per_head, normalize, id=f"{DTYPE_IDS[dtype]}-{'per_head' if per_head else 'shared'}-norm{int(normalize)}"
    )
    for dtype, per_head, normalize in product(DTYPES, (False, True), (True, False))
]

# Awkward shapes (B, H, N, D, M): N = 1, odd, 197 and 577; every D in {32, 48, 64, 96, 128};
# M from 1 to 256, and M > N. The interpreter gets small ones.
INTERPRETER_SHAPES = [
    (1, 1, 1, 32, 7),  # one token
    (2, 1, 63, 32, 1),  # one anchor: A = 1, every token gets the mean of v
    (1, 2, 197, 64, 30),  # a DeiT-T/S layer at 224²
    (1, 1, 9, 96, 40),  # more anchors than tokens
    (1, 1, 17, 128, 256),  # the largest M and D
    (1, 2, 50, 48, 3),
    (1, 2, 23, 32, 100),  # two chunks of anchors, the second ragged
]
# On a GPU: longer sequences; few distinct tile shapes (each one is a kernel compilation).
GPU_SHAPES = [
    (2, 3, 1, 32, 7),
    (2, 3, 197, 48, 30),
    (2, 3, 577, 64, 30),
    (1, 2, 4099, 64, 30),
    (2, 3, 1001, 96, 256),
    (1, 2, 9, 128, 256),
    (1, 1, 65, 128, 100),
    (2, 1, 197, 64, 1),
]
SHAPES = INTERPRETER_SHAPES if INTERPRETED else GPU_SHAPES
SHAPE_CASES = [
    pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{DTYPE_IDS[dtype]}")
    for shape, dtype in product(SHAPES, DTYPES)
]


@kernel
@pytest.mark.parametrize(("dtype", "per_head", "normalize"), BASIC)
def test_matches_reference(dtype, per_head, normalize):
    qk, v, u, grad = _inputs(2, 2, 37, 48, 70 if per_head else 5, dtype, per_head)
    _check_against_reference(qk, v, u, grad, normalize=normalize)


@kernel
@pytest.mark.parametrize(("shape", "dtype"), SHAPE_CASES)
def test_awkward_shapes(shape, dtype):
    B, H, N, D, M = shape
    per_head = (N + M) % 2 == 1  # both anchor layouts across the table
    qk, v, u, grad = _inputs(B, H, N, D, M, dtype, per_head, seed=N * 1000 + M)
    _check_against_reference(qk, v, u, grad)


@kernel
@pytest.mark.parametrize(("per_head", "M"), [(False, 4), (True, 70)], ids=["shared-M4", "per_head-M70"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_zero_degree_anchor(dtype, per_head, M):
    """An anchor whose probability underflows to 0 for every token has degree 0: 1/0 -> 0."""
    B, H, N, D = 1, 2, 21, 32
    qk, v, u, grad = _inputs(B, H, N, D, M, dtype, per_head)
    qk = qk.abs() + 0.5  # every token has positive coordinates ...
    if per_head:
        u[:, 0] = -30.0  # ... so anchor 0's logit is ~-30 * sum(qk) / sqrt(D) ~ -200 below the
    else:  # others: exp underflows to exactly 0
        u[0] = -30.0
    probs = torch.softmax(qk.float() @ u.float().transpose(-1, -2) / D**0.5, dim=-1)
    assert (probs[..., 0] == 0).all(), "test set-up: anchor 0 should have zero probability everywhere"
    out, grads = _check_against_reference(qk, v, u, grad)
    # The dead anchor's gradient is exactly zero, as in the reference.
    du = grads[2]
    assert (du[:, 0] if per_head else du[0]).abs().max().item() == 0.0


@kernel
@pytest.mark.parametrize(("per_head", "M"), [(False, 30), (True, 100)], ids=["shared-M30", "per_head-M100"])
def test_deterministic_mode(per_head, M):
    """Partial sums in a fixed order: two runs agree bitwise, and agree with the reference."""
    qk, v, u, grad = _inputs(2, 2, 77, 64, M, torch.float32, per_head, seed=3)
    out1, grads1 = _check_against_reference(qk, v, u, grad, deterministic=True)
    out2, grads2 = _check_against_reference(qk, v, u, grad, deterministic=True)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@kernel
def test_strided_inputs_and_dispatch(monkeypatch):
    """Views of a packed projection (the model's layout), picked through the env variable."""
    B, N, H, D, M = 2, 45, 3, 64, 30
    qkv = torch.randn(B, N, 2, H, D, device=DEVICE)
    qk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, D), non-contiguous
    u = torch.randn(M, D, device=DEVICE)
    grad = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)  # non-contiguous too
    monkeypatch.setenv("ANCHORFORMER_ATTN_IMPL", "triton")
    assert resolve_impl("auto", qk.device) == "triton"
    _check_against_reference(qk, v, u, grad)
    got = anchor_attention(qk, v, u)  # through the dispatcher, impl from the environment
    want = anchor_attention_reference(qk, v, u)
    _assert_close(got, want, torch.float32, "out (dispatch)")


def _tiny_model(attn_impl: str, device: str = DEVICE):
    import anchorformer

    torch.manual_seed(0)
    return anchorformer.create_model(
        "anchorformer_tiny_distilled_patch16_224",
        img_size=32,
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_anchors=7,
        num_classes=5,
        attn_impl=attn_impl,
    ).to(device)


def _train_step(model, x, forward=None):
    """Loss on both heads, backward; returns (logits, {parameter name: gradient})."""
    model.zero_grad(set_to_none=True)
    logits, logits_dist = (model if forward is None else forward)(x)
    (logits.square().mean() + logits_dist.mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@kernel
@pytest.mark.slow
def test_model_and_torch_compile():
    """A model with attn_impl="triton" equals the reference model, eagerly and compiled."""
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ref_model, model = _tiny_model("reference"), _tiny_model("triton")
    model.load_state_dict(ref_model.state_dict())
    want, want_grads = _train_step(ref_model, x)
    got, got_grads = _train_step(model, x)
    _assert_close(got, want, torch.float32, "logits")
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        _assert_close(got_grads[name], want_grads[name], torch.float32, f"grad {name}")

    # Training step through dynamo + AOT autograd (one graph, the kernels as custom ops) ...
    torch._dynamo.reset()
    compiled, compiled_grads = _train_step(model, x, torch.compile(model, backend="aot_eager", fullgraph=True))
    _assert_close(compiled, want, torch.float32, "logits (compiled)")
    for name in want_grads:
        _assert_close(compiled_grads[name], want_grads[name], torch.float32, f"grad {name} (compiled)")
    # ... and inference through inductor.
    torch._dynamo.reset()
    model.eval()
    ref_model.eval()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(x)
        _assert_close(got, ref_model(x), torch.float32, "eval logits (inductor)")


# ---------------------------------------------------------------------------------------------
# Main process only: the interpreter suite, errors, dispatch, compile of the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_under_interpreter(tmp_path):
    """Run every kernel test of this file on the CPU under TRITON_INTERPRET=1 (a child pytest)."""
    repo = Path(__file__).resolve().parents[1]
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    env.pop("ANCHORFORMER_ATTN_IMPL", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).resolve()),
        "-m",
        "interpreter",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert junit.exists(), f"the interpreter run wrote no report:\n{report}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # basic + shapes + zero degree (dtype x anchors) + deterministic (2) + strided (1) + model (1)
    expected = len(BASIC) + len(INTERPRETER_SHAPES) * len(DTYPES) + 2 * len(DTYPES) + 2 + 1 + 1
    assert proc.returncode == 0 and counts["failures"] == counts["errors"] == 0, f"{counts}\n{report}"
    assert counts["skipped"] == 0, f"every kernel case must reach its assertions: {counts}\n{report}"
    assert counts["tests"] == expected, f"expected {expected} kernel cases, ran {counts}\n{report}"


@pytest.mark.skipif(INTERPRETED, reason="checks the error raised without the interpreter")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    qk = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 in the environment before triton"):
        anchor_attention(qk, qk, torch.randn(3, 16), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: the kernels are already compiled ones
    with pytest.raises(ValueError, match="is set now, but was not when the kernels were imported"):
        anchor_attention(qk, qk, torch.randn(3, 16), impl="triton")


def test_resolve_impl(monkeypatch):
    monkeypatch.delenv("ANCHORFORMER_ATTN_IMPL", raising=False)
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    assert resolve_impl("triton", torch.device("cpu")) == "triton"
    monkeypatch.setenv("ANCHORFORMER_ATTN_IMPL", "reference")
    assert resolve_impl("auto", torch.device("cuda")) == "reference"
    assert resolve_impl("triton", torch.device("cuda")) == "triton"  # an explicit impl wins
    monkeypatch.setenv("ANCHORFORMER_ATTN_IMPL", "fast")
    with pytest.raises(ValueError, match="ANCHORFORMER_ATTN_IMPL"):
        resolve_impl("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cuda", torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the reference path, in the main process")
def test_torch_compile_reference_model():
    """torch.compile of a model on the reference path: one graph, same numbers."""
    x = torch.randn(2, 3, 32, 32)
    model = _tiny_model("reference", "cpu")
    want, want_grads = _train_step(model, x)
    torch._dynamo.reset()
    got, got_grads = _train_step(model, x, torch.compile(model, backend="aot_eager", fullgraph=True))
    _assert_close(got, want, torch.float32, "logits (compiled)")
    for name in want_grads:
        _assert_close(got_grads[name], want_grads[name], torch.float32, f"grad {name} (compiled)")
    torch._dynamo.reset()
    model.eval()
    with torch.no_grad():
        _assert_close(torch.compile(model, fullgraph=True)(x), model(x), torch.float32, "eval logits (inductor)")
