"""The fused Triton kernels against the reference: output and all three gradients, per dtype.

The kernel tests (marked ``kernel`` below) run on a CUDA device when there is one. On the CPU
they run under the Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before triton is imported: ``test_kernels_under_interpreter`` therefore runs this same file in
a child pytest with that variable set, where the kernel tests carry the ``interpreter`` marker
and use CPU tensors, and fails unless every one of them passed (none skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import product
from pathlib import Path

import pytest
import torch
from anchor_helpers import fp64_truth, logit_gap_inputs, rel_err

from anchorformer.ops.anchor_attention import anchor_attention, anchor_attention_reference, resolve_impl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# Every kernel test: under the interpreter in the child process, on CUDA otherwise.
kernel = pytest.mark.interpreter if INTERPRETED else pytest.mark.gpu

# Tolerances, one row per dtype: |got - want| <= ATOL * max(1, max|want|) + RTOL * |want|,
# elementwise, against the reference evaluated in fp32 on the same (rounded) inputs. The kernels
# keep in fp32 what the reference keeps in fp32, so in 16 bits the two differ by the final
# rounding to the output dtype (one unit in the last place: 2^-8 relative in bf16, 2^-11 in
# fp16) and fp32 summation order; RTOL is two such units.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-4, rtol=1e-3),
    torch.bfloat16: dict(atol=2e-3, rtol=8e-3),
}
DTYPES = list(TOLERANCES)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# fp32 where a 16-bit dtype does as well: on a GPU each fp32 kernel variant compiles for up to
# ~17 s (exact IEEE products), so the GPU's default run (`-m "gpu and not slow"`, benchmarks/gpu.sh)
# leaves fp32 and D = 128 to the slow set; the interpreter runs every case.
LIGHT_DTYPE = torch.float32 if INTERPRETED else torch.bfloat16


def gpu_slow(dtype: torch.dtype, D: int = 64) -> list:
    """Marks for a kernel case: ``slow`` on a GPU for fp32 or D >= 128 (long compilations)."""
    return [pytest.mark.slow] if not INTERPRETED and (dtype == torch.float32 or D >= 128) else []


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
        dtype,
        per_head,
        normalize,
        id=f"{DTYPE_IDS[dtype]}-{'per_head' if per_head else 'shared'}-norm{int(normalize)}",
        marks=gpu_slow(dtype),
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
    pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{DTYPE_IDS[dtype]}", marks=gpu_slow(dtype, shape[3]))
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
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_IDS[d], marks=gpu_slow(d)) for d in DTYPES])
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
    qk, v, u, grad = _inputs(2, 2, 77, 64, M, LIGHT_DTYPE, per_head, seed=3)
    out1, grads1 = _check_against_reference(qk, v, u, grad, deterministic=True)
    out2, grads2 = _check_against_reference(qk, v, u, grad, deterministic=True)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@kernel
def test_strided_inputs_and_dispatch(monkeypatch):
    """Views of a packed projection (the model's layout), picked through the env variable."""
    B, N, H, D, M = 2, 45, 3, 64, 30
    qkv = torch.randn(B, N, 2, H, D, device=DEVICE, dtype=LIGHT_DTYPE)
    qk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, D), non-contiguous
    u = torch.randn(M, D, device=DEVICE, dtype=LIGHT_DTYPE)
    grad = torch.randn(B, N, H, D, device=DEVICE, dtype=LIGHT_DTYPE).transpose(1, 2)  # non-contiguous too
    monkeypatch.setenv("ANCHORFORMER_ATTN_IMPL", "triton")
    assert resolve_impl("auto", qk.device) == "triton"
    _check_against_reference(qk, v, u, grad)
    got = anchor_attention(qk, v, u)  # through the dispatcher, impl from the environment
    want = anchor_attention_reference(qk.float(), v.float(), u.float())
    _assert_close(got, want, LIGHT_DTYPE, "out (dispatch)")


SPLIT_CASES = [  # (dtype, per-head anchors, M, normalize): one and two chunks of anchors
    pytest.param(torch.float32, False, 5, True, id="fp32-shared-M5"),
    pytest.param(torch.bfloat16, True, 70, True, id="bf16-per_head-M70"),
    pytest.param(torch.float16, False, 30, False, id="fp16-shared-M30-norm0"),
]


@kernel
@pytest.mark.parametrize(("dtype", "per_head", "M", "normalize"), SPLIT_CASES)
def test_split_path(monkeypatch, dtype, per_head, M, normalize):
    """The path for long sequences (split partials, persistent output kernel), forced at a short
    one: same numbers as the reference, bitwise equal across runs."""
    from anchorformer.ops.anchor_attention import triton as fused

    monkeypatch.setattr(fused, "SINGLE_PASS_MAX_N", 0)
    monkeypatch.setattr(fused, "_PLANS", {})
    qk, v, u, grad = _inputs(2, 2, 53, 32, M, dtype, per_head, seed=M)
    plan = fused.launch_plan(qk, v, u, normalize)
    assert not plan.fused and plan.splits_fwd > 1 and plan.splits_bwd > 1, plan
    out1, grads1 = _check_against_reference(qk, v, u, grad, normalize=normalize)
    out2, grads2 = _check_against_reference(qk, v, u, grad, normalize=normalize)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@kernel
def test_hot_path_reuses_the_plan(monkeypatch):
    """After the first call of a signature, calls neither validate nor plan again, and the launch
    parameters come from plain integers (no triton.cdiv / next_power_of_2, no new Plan)."""
    import triton

    from anchorformer.ops.anchor_attention import triton as fused

    qk, v, u, grad = _inputs(2, 3, 40, 16, 30, torch.float32, False)
    leaves = [t.requires_grad_(True) for t in (qk, v, u)]
    fused.anchor_attention_triton(*leaves).backward(grad)
    first = [t.grad.clone() for t in leaves]

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the hot path")

    for name in ("cdiv", "next_power_of_2"):
        monkeypatch.setattr(triton, name, forbidden)
    monkeypatch.setattr(fused, "_validate", forbidden)
    monkeypatch.setattr(fused, "Plan", forbidden)
    for t in leaves:
        t.grad = None
    fused.anchor_attention_triton(*leaves).backward(grad)
    for a, t in zip(first, leaves):
        assert torch.equal(a, t.grad)
    with torch.no_grad():
        fused.anchor_attention_triton(qk, v, u)


@kernel
@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the tool is run by hand: python -m ...tune")
def test_tune_writes_the_table(tmp_path, monkeypatch):
    """The offline tuning tool times candidates and writes the table; plans then take its entries."""
    from anchorformer.ops.anchor_attention import configs, tune
    from anchorformer.ops.anchor_attention import triton as fused

    table = tmp_path / "configs.json"
    monkeypatch.setattr(configs, "TABLE_PATH", table)
    configs.load_table.cache_clear()
    monkeypatch.setattr(fused, "_PLANS", {})
    candidates = [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}]
    found = tune.tune([40], [2], ["float32"], d=16, m=5, candidates=candidates, out=table)
    assert set(found) == {"fwd/64/16/float32/16/interpreter", "bwd/64/16/float32/16/interpreter"}
    assert all(c in candidates for c in found.values())
    written = json.loads(table.read_text())["configs"]
    assert written == found
    qk, v, u, _ = _inputs(1, 2, 40, 16, 5, torch.float32, False)
    plan = fused.launch_plan(qk, v, u)
    assert plan.meta_fwd["BLOCK_N"] == found["fwd/64/16/float32/16/interpreter"]["BLOCK_N"]
    configs.load_table.cache_clear()


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


# bf16 against an fp64 ground truth: the kernels' relative error within 2x of the reference's,
# forward and every gradient, on the sequence lengths and anchor counts the tests use.
BF16_ACCURACY_SHAPES = [(1, 2, 197, 64, 30), (1, 1, 577, 64, 64), (1, 1, 4096, 64, 100)]


def bf16_errors(shape, seed=0):
    """{quantity: (reference error, kernel error)} against fp64, relative (Frobenius), for bf16
    inputs; the fp64 truth is computed from the same bf16-rounded inputs."""
    from anchorformer.ops.anchor_attention.triton import anchor_attention_triton

    B, H, N, D, M = shape
    qk, v, u, grad = _inputs(B, H, N, D, M, torch.bfloat16, False, seed=seed)
    want, want_grads = fp64_truth(qk.cpu(), v.cpu(), u.cpu(), grad.cpu())
    errors = {}
    for impl, fn in (("reference", anchor_attention_reference), ("kernel", anchor_attention_triton)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (qk, v, u)]
        out = fn(*leaves)
        out.backward(grad)
        for name, got, ref in zip(
            ("out", "dqk", "dv", "danchors"), [out] + [t.grad for t in leaves], [want] + want_grads
        ):
            errors.setdefault(name, {})[impl] = rel_err(got.cpu(), ref)
    return errors


@kernel
@pytest.mark.parametrize("shape", BF16_ACCURACY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_as_accurate_as_the_reference(shape):
    errors = bf16_errors(shape)
    for name, e in errors.items():
        assert e["kernel"] <= 2 * e["reference"], f"{name}: kernel {e['kernel']:.2e} vs reference {e['reference']:.2e}"


@kernel
@pytest.mark.parametrize("M", [5, 70], ids=["M5", "M70"])
@pytest.mark.parametrize(
    "dtype", [pytest.param(d, id=DTYPE_IDS[d], marks=gpu_slow(d)) for d in (torch.float32, torch.bfloat16)]
)
def test_logit_gap_sweep_has_no_nan(dtype, M):
    """Anchor 0's logit 0..150 below the others (one head per gap): through the window where Λ^-2
    overflowed (degree ~1e-19) and 1/deg did (denormal degrees), no NaN and fp64 agreement."""
    from anchorformer.ops.anchor_attention.triton import anchor_attention_triton

    # One head per gap: every 2nd with one chunk of anchors, every 5th with two (50 and 95 included).
    gaps = [float(g) for g in range(0, 151, 2 if M <= 64 else 5)]
    qk, v, u, grad = (t.to(DEVICE, dtype) for t in logit_gap_inputs(gaps, N=40, M=M))
    leaves = [t.clone().requires_grad_(True) for t in (qk, v, u)]
    out = anchor_attention_triton(*leaves)
    out.backward(grad)
    want, want_grads = fp64_truth(qk.cpu(), v.cpu(), u.cpu(), grad.cpu())
    tol = TOLERANCES[dtype]
    for name, got, ref in zip(
        ("out", "d qk", "d v", "d anchors"), [out] + [t.grad for t in leaves], [want] + want_grads
    ):
        got = got.cpu()
        head_axis = 1 if got.dim() == 4 else 0
        bad = sorted({gaps[int(i[head_axis])] for i in (~torch.isfinite(got)).nonzero()})
        assert not bad, f"{name}: non-finite at gaps {bad}"
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(
            got.double(), ref, rtol=tol["rtol"] + 1e-3, atol=4 * tol["atol"] * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


_DETERMINISTIC_CHILD = """
import hashlib, torch
from anchorformer.ops.anchor_attention.triton import anchor_attention_triton
g = torch.Generator().manual_seed(7)
qk, v, dout = (torch.randn(2, 3, 301, 64, generator=g).to("{device}", {dtype}) for _ in range(3))
u = torch.randn(30, 64, generator=g).to("{device}", {dtype})
leaves = [t.requires_grad_(True) for t in (qk, v, u)]
out = anchor_attention_triton(*leaves, deterministic=True)
out.backward(dout)
h = hashlib.sha256()
for t in [out] + [t.grad for t in leaves]:
    h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
print("HASH", h.hexdigest())
"""


@kernel
def test_deterministic_mode_across_processes():
    """Two fresh processes (each autotuning from scratch on a GPU) give the same bits: a fixed
    configuration, not the autotuner's pick, sets the split boundaries and the order of the sums."""
    code = _DETERMINISTIC_CHILD.format(device=DEVICE, dtype=LIGHT_DTYPE)
    env = dict(os.environ)
    env.pop("ANCHORFORMER_TRITON_AUTOTUNE", None)  # autotuning on where it exists: it must not matter
    hashes = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        hashes.append([line for line in proc.stdout.splitlines() if line.startswith("HASH")])
    assert hashes[0] and hashes[0] == hashes[1], hashes


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
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert junit.exists(), f"the interpreter run wrote no report:\n{report}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    # basic + shapes + zero degree (dtype x anchors) + deterministic (2) + strided (1) + model (1)
    # + bf16 accuracy + gap sweep (2 dtypes x 2 M) + deterministic across processes (1)
    expected = len(BASIC) + len(INTERPRETER_SHAPES) * len(DTYPES) + 2 * len(DTYPES) + 2 + 1 + 1
    expected += len(BF16_ACCURACY_SHAPES) + 4 + 1 + len(SPLIT_CASES) + 2  # + split path, plan reuse, tuning tool
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


def test_fused_limits_are_clear_errors():
    """D > 128 and B*H > 65535 are refused before any launch, naming the shape and the limit."""
    from anchorformer.ops.anchor_attention.limits import fused_unsupported
    from anchorformer.ops.anchor_attention.triton import anchor_attention_triton

    qk = torch.randn(1, 2, 5, 256)
    with pytest.raises(ValueError, match=r"head dim D=256 of qk \(1, 2, 5, 256\) exceeds .* D <= 128"):
        anchor_attention_triton(qk, qk, torch.randn(3, 256))
    qk = torch.randn(65536, 1, 1, 16)
    with pytest.raises(ValueError, match=r"B\*H = 65536\*1 = 65536 .* limit of 65535"):
        anchor_attention_triton(qk, qk, torch.randn(3, 16))
    assert fused_unsupported(torch.randn(2, 3, 5, 128), torch.randn(4, 128)) is None
    assert "per-image" in fused_unsupported(torch.randn(2, 3, 5, 16), torch.randn(2, 3, 4, 16))


def test_backward_fake_gives_contiguous_anchor_gradient():
    """torch.compile's shape-only versions give the kernels' output layouts: gradients in their
    inputs' layout where it is dense (fake CUDA tensors: no GPU needed)."""
    if INTERPRETED:
        pytest.skip("fake CUDA tensors trace the GPU registration; the interpreter's is checked by opcheck")
    from torch._subclasses.fake_tensor import FakeTensorMode

    import anchorformer.ops.anchor_attention.triton  # noqa: F401  registers the custom ops

    with FakeTensorMode():
        B, H, N, D, M = 2, 3, 9, 16, 5
        qk, v, dout = (torch.empty(B, H, N, D, device="cuda") for _ in range(3))
        anchors = torch.empty(D, M, device="cuda").t()  # (M, D), not contiguous but dense
        out, ws = torch.ops.anchorformer.anchor_attention_fwd(qk, v, anchors, True)
        dqk, dv, du = torch.ops.anchorformer.anchor_attention_bwd(dout, qk, v, anchors, ws, True)
        gapped = torch.empty(2 * M, D, device="cuda")[::2]  # every other row: not dense
        _, _, du_gapped = torch.ops.anchorformer.anchor_attention_bwd(dout, qk, v, gapped, ws, True)
    assert out.stride() == (N * H * D, D, H * D, 1)  # token-major
    assert du.shape == (M, D) and du.stride() == anchors.stride()
    assert du_gapped.shape == (M, D) and du_gapped.is_contiguous()
    assert dqk.stride() == qk.stride() and dv.stride() == v.stride()


@pytest.mark.skipif(INTERPRETED, reason="traces the GPU registration with fake CUDA tensors")
def test_compiled_path_sees_the_kernels():
    """AOT autograd (what torch.compile runs before inductor) traces the operator into its Triton
    kernels, forward and backward, on a machine without a GPU: fake CUDA tensors, no launch."""
    from functorch.compile import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def kernels(gm):
        return [
            kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
            for n in gm.graph.nodes
            if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)
        ]

    def fwd(qk, v, u):
        return torch.ops.anchorformer.anchor_attention_fwd(qk, v, u, True)

    def bwd(grad, qk, v, u, ws):
        return torch.ops.anchorformer.anchor_attention_bwd(grad, qk, v, u, ws, True)

    with FakeTensorMode():
        qk, v, grad = (torch.empty(2, 3, 197, 64, device="cuda") for _ in range(3))
        u = torch.empty(30, 64, device="cuda")
        out, ws = aot_function(fwd, fw_compiler=capture)(qk, v, u)
        aot_function(bwd, fw_compiler=capture)(grad, qk, v, u, ws)
        long = torch.empty(1, 2, 8192, 64, device="cuda")  # a long sequence on few heads: split partials
        aot_function(fwd, fw_compiler=capture)(long, long, u)
    assert len(graphs) == 3
    assert kernels(graphs[0]) == ["_fused_fwd_kernel"], graphs[0].code
    assert kernels(graphs[1]) == ["_fused_bwd_kernel", "_du_sum_kernel"], graphs[1].code
    assert kernels(graphs[2]) == ["_reduce_kernel", "_out_kernel"], graphs[2].code
