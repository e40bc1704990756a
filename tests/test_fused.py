"""model.fuse_for_inference(): the projections folded into the anchors give the unfused model's
outputs (fp64: to 1e-12; fp32: within its rounding) for every variant that folds, at 224², 384²
and 1024² for T/S/B and through `anchorformer export`; count_macs counts the fused form against a
closed form written here; training and pooled anchors are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import anchorformer
from anchorformer.cli import main
from anchorformer.export import build_model, check_onnx, export_model
from anchorformer.models import AnchorAttention, FusedAnchorAttention, create_model
from anchorformer.models.fused import fuse_anchor_attention, is_fused
from anchorformer.ops.anchor_attention import anchor_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32 outputs: fused vs unfused, in units of max(1, max|unfused|) (both round; a wrong fold is off by O(1))
TOL32 = 2e-5


def _perturb(module: nn.Module) -> nn.Module:
    """Non-zero biases and temperatures, so that every folded term is exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, AnchorAttention) and m.logit_scale is not None:
                m.logit_scale.fill_(0.4)
    return module


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


VARIANTS = [
    {},
    {"per_head_anchors": True},
    {"normalize": False},
    {"qkv_bias": True},
    {"learn_temperature": True, "per_head_anchors": True, "qkv_bias": True, "normalize": False},
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(kw) or "official")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_equals_the_operator(kw, dtype):
    """One layer against AnchorAttention (the reference operator): fp64 to 1e-12, fp32 to its rounding."""
    attn = _perturb(AnchorAttention(96, num_heads=3, num_anchors=7, **kw)).to(dtype).eval()
    fused = fuse_anchor_attention(attn)
    x = torch.randn(2, 37, 96, dtype=dtype)  # 37 tokens: not a multiple of anything
    with torch.no_grad():
        want, got = attn(x), fused(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert _rel_err(got, want) < (1e-12 if dtype == torch.float64 else TOL32)
    assert not list(fused.parameters())  # nothing to train


@pytest.mark.parametrize("normalize", [True, False])
def test_an_anchor_no_token_reaches_keeps_the_zero_degree_rule(normalize):
    """qk constant over tokens (W_qk = 0, a bias), anchor 0 pointing away: its degree is exactly 0 in
    fp32, so Λ^-1 is 0 there (1/0 -> 0) and its value bias must not enter the fused output either."""
    attn = AnchorAttention(64, num_heads=2, num_anchors=5, qkv_bias=True, normalize=normalize, per_head_anchors=True)
    attn = _perturb(attn).eval()
    with torch.no_grad():
        attn.in_proj.weight[:64].zero_()
        b_qk = attn.in_proj.bias[:64].reshape(2, 1, 32)
        attn.anchors[:, 1:] *= 0.01
        attn.anchors[:, :1] = -1e4 * b_qk / b_qk.norm(dim=-1, keepdim=True)
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        qk, _, anchors = attn.embed(x)
        deg = anchor_probabilities(qk, anchors).sum(dim=-2)
        assert (deg[0, :, 0] == 0).all() and (deg[0, :, 1:] > 1).all()
        want, got = attn(x), fuse_anchor_attention(attn)(x)
    assert torch.isfinite(got).all()
    assert _rel_err(got, want) < TOL32


def _models(size: str):
    return [f"anchorformer_{size}_patch16_224", f"anchorformer_{size}_distilled_patch16_224"]


@pytest.mark.parametrize(
    ("name", "img"),
    [
        *[(n, img) for n in _models("tiny") for img in (224, 384, 1024)],
        *[(n, img) for n in _models("small") for img in (224, 384)],
        ("anchorformer_base_distilled_patch16_224", 224),
        pytest.param("anchorformer_base_distilled_patch16_384", 384, marks=pytest.mark.slow),
        pytest.param("anchorformer_small_distilled_patch16_224", 1024, marks=pytest.mark.slow),
        pytest.param("anchorformer_base_patch16_224", 1024, marks=pytest.mark.slow),
    ],
)
def test_whole_model_equals_unfused(name, img):
    """Registered models (12 blocks; distilled: class and distillation tokens) in fp32, batch 2."""
    model = _perturb(create_model(name, img_size=img)).eval()
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        want = model(x)
        fused = copy.deepcopy(model).fuse_for_inference()
        got = fused(x)
    assert sum(isinstance(m, FusedAnchorAttention) for m in fused.modules()) == 12
    assert not any(isinstance(m, AnchorAttention) for m in fused.modules())
    assert _rel_err(got, want) < TOL32, (name, img)


def test_whole_model_in_fp64_is_the_same_function():
    """In fp64 the rounding is gone: the fold is exact maths (T, distilled, 2 blocks at 224²)."""
    model = _perturb(create_model("anchorformer_tiny_distilled_patch16_224", depth=2, qkv_bias=True)).double().eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        got = copy.deepcopy(model).fuse_for_inference()(x)
    assert _rel_err(got, want) < 1e-12


def fused_vit_macs(img: int, C: int, H: int, depth: int, n_prefix: int, M: int, num_classes: int = 1000) -> int:
    """Closed form of the fused model: patch embedding, per block 3 N C (H M) + (H M) C^2 for the
    attention (logits, A^T x, A Z) and the per-head C x C product on the M anchors, MLP, head(s)."""
    P = (img // 16) ** 2
    N = P + n_prefix
    HM = H * M
    macs = P * C * 3 * 16 * 16
    macs += depth * (3 * N * C * HM + HM * C * C + 2 * N * C * 4 * C)
    return macs + (2 if n_prefix == 2 else 1) * C * num_classes


@pytest.mark.parametrize("img", [224, 512, 1024])
@pytest.mark.parametrize(("size", "C", "H"), [("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)])
def test_count_macs_counts_the_fused_form(img, size, C, H):
    with torch.device("meta"):
        model = create_model(f"anchorformer_{size}_distilled_patch16_224", img_size=img)
        unfused = anchorformer.count_macs(model, img)
        model.fuse_for_inference()
    fused = anchorformer.count_macs(model, img)
    assert fused == fused_vit_macs(img, C, H, 12, 2, 30)
    if size == "tiny":  # the figures: the attention sublayer of T 46% (224²) and 59% (1024²) cheaper
        N = (img // 16) ** 2 + 2
        attn_unfused = 3 * N * C * C + 3 * N * 30 * C
        attn_fused = 3 * N * C * 90 + 90 * C * C
        assert unfused - fused == 12 * (attn_unfused - attn_fused)
        assert round(1 - attn_fused / attn_unfused, 2) == {224: 0.46, 512: 0.57, 1024: 0.59}[img]
    from anchorformer.complexity import model_complexity

    assert model_complexity(f"anchorformer_{size}_distilled_patch16_224", img, fused=True)["macs"] == fused


def test_training_and_pooled_anchors_are_refused():
    model = create_model("anchorformer_tiny_patch16_224", depth=1).fuse_for_inference()
    assert is_fused(model) and not model.training
    with pytest.raises(RuntimeError, match="fused for inference"):
        model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model.blocks[0].attn.train()
    model.eval()  # eval stays allowed
    assert model.fuse_for_inference() is model  # a second call finds nothing left to fold
    pooled = create_model("anchorformer_tiny_patch16_224", depth=1, anchor_mode="pooled")
    with pytest.raises(ValueError, match="anchor_mode='pooled'"):
        pooled.fuse_for_inference()
    assert isinstance(pooled.blocks[0].attn, AnchorAttention)  # refused before anything changed


def test_fused_buffers_follow_the_model_and_state_dict_round_trips():
    model = create_model("anchorformer_tiny_patch16_224", depth=1).fuse_for_inference()
    attn = model.blocks[0].attn
    assert attn.logit_weight.shape == (90, 192) and attn.value_out.shape == (3, 192, 192)
    state = model.state_dict()
    other = create_model("anchorformer_tiny_patch16_224", depth=1).fuse_for_inference()
    other.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_export_fused_onnx_and_pt2(tmp_path):
    """`anchorformer export --fused`: ONNX through onnxruntime and a pt2 program give the unfused logits."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    name = "anchorformer_tiny_distilled_patch16_224"
    model = _perturb(create_model(name, depth=2, num_classes=7)).eval()
    torch.save({"model": model.state_dict(), "model_name": name, "model_kwargs": {"depth": 2, "num_classes": 7}},
               tmp_path / "model.pth")  # fmt: skip
    onnx, pt2 = tmp_path / "fused.onnx", tmp_path / "fused.pt2"
    common = ["export", "--model", name, "--checkpoint", str(tmp_path / "model.pth"), "--fused"]
    assert main([*common, "--format", "onnx", "--out", str(onnx), "--check", "1e-4"]) == 0
    assert main([*common, "--format", "pt2", "--out", str(pt2)]) == 0
    x = torch.randn(3, 3, 224, 224)
    assert check_onnx(onnx, model, x) < 1e-4  # against the UNFUSED model
    with torch.no_grad():
        got = torch.export.load(pt2).module()(x)
        assert _rel_err(got, model(x)) < TOL32
    assert is_fused(build_model(name, checkpoint=tmp_path / "model.pth", fused=True))
    assert main(["export", "--model", "deit_tiny_patch16_224", "--fused", "--out", str(tmp_path / "x.onnx")]) == 2


@pytest.mark.slow
def test_export_fused_full_model_at_384(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = build_model("anchorformer_small_distilled_patch16_224", img_size=384)
    fused = copy.deepcopy(model).fuse_for_inference()
    path = export_model(fused, tmp_path / "model.onnx", "onnx")
    assert check_onnx(path, model, torch.randn(1, 3, 384, 384)) < 1e-4


def test_complexity_table_and_report_row_count_the_fused_form(tmp_path):
    """E4: `anchorformer complexity` counts the fused form beside the unfused one; the report shows it."""
    from anchorformer.complexity import complexity_tables, tables_markdown
    from anchorformer.report import _complexity_section, _Doc

    tables = complexity_tables(["tiny"], [30], [224], [224, 1024])
    by = {r["img_size"]: r for r in tables["resolution"]}
    for img in (224, 1024):
        assert by[img]["anchorformer_fused_gmacs"] == round(fused_vit_macs(img, 192, 3, 12, 1, 30) / 1e9, 4)
        assert by[img]["fused_ratio"] > by[img]["ratio"]
    assert "| DeiT / fused |" in tables_markdown(tables)
    doc = _Doc(tmp_path, tmp_path / "report.md")
    _complexity_section(doc, tables)
    text = "".join(doc.parts)
    ratio = by[1024]["deit_gmacs"] / by[1024]["anchorformer_fused_gmacs"]
    assert (
        "AnchorFormer fused GMACs" in text and f"| {by[1024]['anchorformer_fused_gmacs']:.3f} | {ratio:.2f}× |" in text
    )
    old = {"models": [], "resolution": [{k: v for k, v in r.items() if "fused" not in k} for r in tables["resolution"]]}
    doc = _Doc(tmp_path, tmp_path / "report.md")
    _complexity_section(doc, old)  # a complexity.json from before the fused counts: no empty columns
    assert "fused" not in "".join(doc.parts)
