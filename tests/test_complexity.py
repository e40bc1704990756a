"""count_macs against closed-form counts written here, and the complexity command."""

from __future__ import annotations

import json

import pytest

import anchorformer
from anchorformer.cli import main
from anchorformer.complexity import count_macs, model_complexity


def vit_macs(img: int, C: int, depth: int, n_prefix: int, num_classes: int, anchors: int | None, heads: int) -> int:
    """Closed form: patch embedding, per block (projections, attention, MLP), head(s)."""
    P = (img // 16) ** 2
    N = P + n_prefix
    macs = P * C * 3 * 16 * 16  # patch embedding convolution
    for _ in range(depth):
        if anchors is None:
            macs += N * C * 3 * C  # qkv
            macs += 2 * N * N * C  # Q K^T and A V, over all heads
        else:
            macs += N * C * 2 * C  # shared qk and v
            macs += 3 * N * anchors * C  # logits, A^T V, A (Λ^-1 A^T V), over all heads
        macs += N * C * C  # output projection
        macs += 2 * N * C * 4 * C  # MLP
    macs += (n_prefix if n_prefix == 2 else 1) * C * num_classes
    return macs


@pytest.mark.parametrize("img", [224, 384, 512])
@pytest.mark.parametrize("size,C,H", [("tiny", 192, 3), ("small", 384, 6)])
def test_deit_closed_form(img, size, C, H):
    got = model_complexity(f"deit_{size}_patch16_224", img_size=img)["macs"]
    assert got == vit_macs(img, C, 12, 1, 1000, None, H)


@pytest.mark.parametrize("img", [224, 384, 1024])
@pytest.mark.parametrize("m", [8, 30, 64])
def test_anchorformer_closed_form(img, m):
    got = model_complexity("anchorformer_tiny_patch16_224", img_size=img, num_anchors=m)["macs"]
    assert got == vit_macs(img, 192, 12, 1, 1000, m, 3)
    got = model_complexity("anchorformer_small_distilled_patch16_224", img_size=img, num_anchors=m)["macs"]
    assert got == vit_macs(img, 384, 12, 2, 1000, m, 6)


def test_deit_tiny_counts_1_26_gmacs():
    macs = count_macs(anchorformer.create_model("deit_tiny_patch16_224"), 224)
    assert abs(macs / 1.26e9 - 1) < 0.01
    assert abs(model_complexity("deit_tiny_patch16_224", img_size=1024)["macs"] / 99.7e9 - 1) < 0.01


def test_counting_on_cpu_equals_meta_and_leaves_model_unchanged():
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=64, depth=2)
    model.train()
    cpu = count_macs(model, 64)
    assert cpu == vit_macs(64, 192, 2, 1, 1000, 30, 3)
    # counting at another size works on a resized copy
    assert count_macs(model, 96) == vit_macs(96, 192, 2, 1, 1000, 30, 3)
    assert model.training and model.pos_embed.shape == (1, 17, 192)
    with pytest.raises(ValueError, match="positive"):
        count_macs(model, 0)


def test_sdpa_is_counted_for_timm_attention():
    """timm's DeiT uses F.scaled_dot_product_attention: its cost must appear in the count."""
    model = anchorformer.create_model("deit_tiny_patch16_224", img_size=64, depth=1, num_classes=0)
    N, C = 17, 192
    attention = 2 * N * N * C
    total = count_macs(model, 64)
    without_attention = 16 * C * 768 + N * C * 3 * C + N * C * C + 2 * N * C * 4 * C
    assert total - without_attention == attention


def test_complexity_command(tmp_path, capsys):
    rc = main(
        [
            "complexity",
            "--sizes",
            "tiny",
            "--anchors",
            "8",
            "30",
            "--img-sizes",
            "224",
            "--resolutions",
            "224",
            "1024",
            "--format",
            "json",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "complexity.json").read_text())
    assert printed == written
    rows = {(r["family"], r["num_anchors"]): r for r in written["models"]}
    assert rows[("DeiT", None)]["macs"] == vit_macs(224, 192, 12, 1, 1000, None, 3)
    assert rows[("AnchorFormer", 8)]["macs"] == vit_macs(224, 192, 12, 1, 1000, 8, 3)
    res = {r["img_size"]: r for r in written["resolution"]}
    assert res[1024]["ratio"] > 4 > res[224]["ratio"] > 1
    md = (tmp_path / "complexity.md").read_text()
    assert "| AnchorFormer | T | 30 | 224² |" in md


def test_complexity_command_bad_input(capsys):
    assert main(["complexity", "--sizes", "tiny", "--anchors", "0", "--img-sizes", "224", "--resolutions", "224"]) == 2
    assert "num_anchors must be an integer >= 1" in capsys.readouterr().err
