"""The operator and the models under torch.compile, torch.export and torch.library.opcheck.

Main process (CPU, reference path): ``torch.compile(model, fullgraph=True)`` captures every
registered variant in one graph (``fullgraph`` fails on any graph break) and gives the eager
logits. The fused path runs on the CPU only under the Triton interpreter, which must be on
before triton is imported: ``test_fused_path_under_interpreter`` runs this file again in a
child pytest with ``TRITON_INTERPRET=1``, where the ``interpreter`` tests check the fused
launchers with ``torch.library.opcheck`` (fake tensors, schema, dispatch under dynamo/AOT), compile
every variant with ``attn_impl="triton"`` in one graph, and ``torch.export`` a fused model. On a
CUDA machine the same tests run on the GPU (``gpu``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm
import torch

import anchorformer
from anchorformer.models import MODEL_NAMES

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
fused = pytest.mark.interpreter if INTERPRETED else pytest.mark.gpu
DEFAULT_RUN = ("anchorformer_tiny_patch16_224",)  # the other variants: slow
VARIANTS = [pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.slow) for n in MODEL_NAMES]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Main process: the reference path
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="the reference path, in the main process")
@pytest.mark.parametrize("name", VARIANTS)
def test_fullgraph_compile_reference(name):
    """Every variant, as registered (12 blocks, its width and image size), in one dynamo graph."""
    model = timm.create_model(name, attn_impl="reference").eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
        _close(got, model(x), f"{name} compiled")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the reference path, in the main process")
def test_fullgraph_compile_reference_training_and_inductor():
    """A training step through dynamo + AOT autograd, and inductor for inference, on the CPU."""
    model = anchorformer.create_model("anchorformer_tiny_distilled_patch16_224", img_size=64, depth=3, num_classes=5)
    x = torch.randn(2, 3, 64, 64)

    def step(fn):
        model.zero_grad(set_to_none=True)
        logits, logits_dist = fn(x)
        (logits.square().mean() + logits_dist.mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = step(model)
    torch._dynamo.reset()
    got, got_grads = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    _close(got, want, "logits")
    for n in want_grads:
        _close(got_grads[n], want_grads[n], f"grad {n}")
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        _close(torch.compile(model, fullgraph=True)(x), model(x), "inductor")


@pytest.mark.skipif(INTERPRETED, reason="the reference path, in the main process")
def test_torch_export_reference_dynamic_batch():
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=64, depth=2, num_classes=5).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        _close(program.module()(x), model(x), "exported")


# ---------------------------------------------------------------------------------------------
# The fused path: under the interpreter (child process) or on CUDA
# ---------------------------------------------------------------------------------------------

OPCHECK_CASES = [  # (B, H, N, D, M, per-head anchors, normalize): one tile; ragged N; M > 64 (log-sum-exp)
    (2, 3, 10, 16, 5, False, True),
    (1, 2, 37, 8, 6, True, False),
    (1, 1, 9, 8, 70, False, True),
]


@fused
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: "B{}H{}N{}D{}M{}-{}-{}".format(*c))
def test_opcheck_fused_launchers(case):
    """torch.library.opcheck on both custom operators: schema, fake (meta) kernels, dispatch under
    dynamo and AOT autograd. The launchers are not differentiable themselves (the autograd
    Function around them is), so the inputs do not require grad."""
    import anchorformer.ops.anchor_attention.triton  # noqa: F401  registers the custom operators

    B, H, N, D, M, per_head, normalize = case
    g = torch.Generator().manual_seed(0)
    qk, v, grad = (torch.randn(B, H, N, D, generator=g).to(DEVICE) for _ in range(3))
    u = torch.randn((H, M, D) if per_head else (M, D), generator=g).to(DEVICE)
    fwd, bwd = torch.ops.anchorformer.anchor_attention_fwd.default, torch.ops.anchorformer.anchor_attention_bwd.default
    torch.library.opcheck(fwd, (qk, v, u, normalize))
    out, ws = fwd(qk, v, u, normalize)
    ref = anchorformer.ops.anchor_attention_reference(qk, v, u, normalize=normalize)
    _close(out, ref, "fused forward")
    torch.library.opcheck(bwd, (grad, qk, v, u, ws, normalize))


@fused
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fullgraph_compile_fused(name):
    """Every variant (2 of its blocks, 32 px) with attn_impl="triton": one graph, the reference's
    logits; the fused kernels appear in the graph as the custom operators."""
    kwargs = dict(img_size=32, depth=2)
    ref = timm.create_model(name, attn_impl="reference", **kwargs).to(DEVICE).eval()
    model = timm.create_model(name, attn_impl="triton", **kwargs).to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend=backend)(x)
        _close(got, ref(x), f"{name} compiled, fused")
    assert len(graphs) == 1


@fused
def test_torch_export_fused_model(tmp_path):
    """A model made with attn_impl="triton" exports with torch.export; the saved program loads and
    calls the fused launchers."""
    kwargs = dict(img_size=32, depth=2, num_classes=5)
    ref = anchorformer.create_model("anchorformer_tiny_distilled_patch16_224", attn_impl="reference", **kwargs)
    model = anchorformer.create_model("anchorformer_tiny_distilled_patch16_224", attn_impl="triton", **kwargs)
    model.load_state_dict(ref.state_dict())
    ref, model = ref.to(DEVICE).eval(), model.to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "anchorformer.anchor_attention_fwd.default" in targets
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    with torch.no_grad():
        _close(loaded.module()(x), ref(x), "exported, fused")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="starts the interpreter run")
def test_fused_path_under_interpreter(tmp_path):
    """Run this file's fused-path tests on the CPU under TRITON_INTERPRET=1 (a child pytest)."""
    pytest.importorskip("triton")
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    env.pop("ANCHORFORMER_ATTN_IMPL", None)
    cmd = [sys.executable, "-m", "pytest", __file__, "-m", "interpreter", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*cmd, f"--junitxml={junit}"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert junit.exists(), f"the interpreter run wrote no report:\n{report}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    expected = len(OPCHECK_CASES) + len(MODEL_NAMES) + 1
    assert proc.returncode == 0 and counts["failures"] == counts["errors"] == 0, f"{counts}\n{report}"
    assert counts["skipped"] == 0 and counts["tests"] == expected, f"expected {expected} cases: {counts}\n{report}"
