"""Windowed attention (ViTDet) for DeiT and AnchorFormer: the maths, the contract, exact MAC counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

import anchorformer
from anchorformer.models.pyramid import SimpleFeaturePyramid, backbone_macs
from anchorformer.models.windowed import default_global_blocks, window_attention, window_config
from anchorformer.ops.counting import count_macs

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2)


def _naive_windows(attn: Attention, x: torch.Tensor, grid: tuple[int, int], S: int) -> torch.Tensor:
    """Per window, an explicit softmax(q kᵀ / √D) v over the zero-padded grid; prefix tokens alone."""
    B, N, C = x.shape
    h, w = grid
    P = N - h * w
    H, D = attn.num_heads, C // attn.num_heads
    hp, wp = math.ceil(h / S) * S, math.ceil(w / S) * S
    padded = torch.zeros(B, hp, wp, C, dtype=x.dtype)
    padded[:, :h, :w] = x[:, P:].reshape(B, h, w, C)

    def attend(tokens: torch.Tensor) -> torch.Tensor:  # (B, n, C) -> (B, n, C)
        n = tokens.shape[1]
        q, k, v = (attn.qkv(tokens).reshape(B, n, 3, H, D).permute(2, 0, 3, 1, 4)).unbind(0)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(B, n, C))

    out = torch.zeros_like(padded)
    for i in range(0, hp, S):
        for j in range(0, wp, S):
            win = padded[:, i : i + S, j : j + S].reshape(B, S * S, C)
            out[:, i : i + S, j : j + S] = attend(win).reshape(B, S, S, C)
    patches = out[:, :h, :w].reshape(B, h * w, C)
    return torch.cat([attend(x[:, :P]), patches], dim=1) if P else patches


@pytest.mark.parametrize("grid,S,prefix", [((5, 7), 3, 1), ((4, 6), 2, 0), ((3, 3), 4, 2), ((6, 6), 3, 1)])
def test_window_attention_equals_naive_per_window_softmax(grid, S, prefix) -> None:
    torch.manual_seed(0)
    attn = Attention(24, num_heads=2, qkv_bias=True).double().eval()
    x = torch.randn(2, prefix + grid[0] * grid[1], 24, dtype=torch.float64)
    got = window_attention(attn, x, grid, S)
    torch.testing.assert_close(got, _naive_windows(attn, x, grid, S), rtol=1e-10, atol=1e-10)


def test_one_window_over_the_whole_grid_is_global_attention() -> None:
    torch.manual_seed(1)
    attn = Attention(16, num_heads=2).double().eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(window_attention(attn, x[:, :9], (3, 3), 3), attn(x[:, :9]))


def test_create_model_contract() -> None:
    assert default_global_blocks(12) == [2, 5, 8, 11]
    assert default_global_blocks(24) == [5, 11, 17, 23] and default_global_blocks(32) == [7, 15, 23, 31]
    assert default_global_blocks(4) == [3] and default_global_blocks(6) == [2, 5] and default_global_blocks(1) == [0]
    for name in ("deit_tiny_patch16_224", "anchorformer_tiny_patch16_224"):
        plain = anchorformer.create_model(name, **SMALL)
        same = anchorformer.create_model(name, window_size=0, **SMALL)
        assert type(same.blocks[0]) is type(plain.blocks[0]) and window_config(same) is None
        win = anchorformer.create_model(name, window_size=2, global_blocks=(1,), **SMALL)
        assert [b.window_size for b in win.blocks] == [2, 0, 2] and window_config(win) == (2, [1])
        assert list(win.state_dict()) == list(plain.state_dict())  # the same keys: checkpoints load both ways
        win.load_state_dict(plain.state_dict())
        default = anchorformer.create_model(name, window_size=2, **SMALL)
        assert [b.window_size for b in default.blocks] == [2, 2, 0]
        # a global block of a windowed model is the plain block
        x = torch.randn(2, 17, 48)
        win.eval(), plain.eval()
        torch.testing.assert_close(win.blocks[1](x), plain.blocks[1](x))
    anchor = anchorformer.create_model("anchorformer_tiny_patch16_224", window_size=2, **SMALL)
    assert all(isinstance(b.attn, anchorformer.AnchorAttention) for b in anchor.blocks)
    with pytest.raises(ValueError, match="outside 0..2"):
        anchorformer.create_model("deit_tiny_patch16_224", window_size=2, global_blocks=[3], **SMALL)
    with pytest.raises(ValueError, match="plain ViTs"):
        anchorformer.create_model("resnet18", window_size=7)


def test_windowed_model_runs_any_size_and_copies() -> None:
    torch.manual_seed(0)
    for name in ("deit_tiny_patch16_224", "anchorformer_tiny_patch16_224"):
        pyr = SimpleFeaturePyramid(name, 8, (1.0,), backbone_kwargs=dict(SMALL, window_size=2, global_blocks=[2]))
        pyr.eval()
        for hw in ((40, 56), (33, 47)):
            x = torch.randn(1, 3, *hw)
            out = pyr(x)["0"]
            assert out.shape[-2:] == (math.ceil(hw[0] / 8), math.ceil(hw[1] / 8))
            # a deep copy attends over its own grid (the hook travels with the copy)
            torch.testing.assert_close(copy.deepcopy(pyr)(x)["0"], out)
        # gradients flow through the windows
        pyr.train()
        pyr(torch.randn(1, 3, 40, 56))["0"].sum().backward()
        assert all(p.grad is not None for p in pyr.backbone.blocks[0].attn.parameters())


def _deit_macs(C: int, depth: int, grid: tuple[int, int], P: int, patch: int, S: int, glob: list[int]) -> int:
    """Closed form: patch embedding, per block qkv + proj (4NC²), attention (2N²C per group),
    MLP (8NC²); windowed blocks run qkv and proj on the padded windows and the prefix group."""
    h, w = grid
    n = P + h * w
    total = h * w * 3 * patch * patch * C
    windows = math.ceil(h / S) * math.ceil(w / S) if S else 0
    for i in range(depth):
        total += 8 * n * C * C
        if S == 0 or i in glob:
            total += 4 * n * C * C + 2 * n * n * C
        else:
            tokens = windows * S * S + P
            total += 4 * tokens * C * C + windows * 2 * (S * S) ** 2 * C + 2 * P * P * C
    return total


def test_count_macs_is_exact_for_windowed_attention() -> None:
    kw = dict(SMALL, window_size=3, global_blocks=[1])
    model = anchorformer.create_model("deit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **kw)
    got = count_macs(model, (40, 56))  # grid 5 x 7, padded to 6 x 9: 6 windows
    assert got == _deit_macs(48, 3, (5, 7), 1, 8, 3, [1])
    # DeiT-T at 1333x800 (grid 50 x 84, 4,200 tokens + class token): global vs ViTDet-windowed
    for S, expected_g in ((0, 104.2438), (14, 53.4548)):
        with torch.device("meta"):
            pyr = SimpleFeaturePyramid(
                "deit_tiny_patch16_224", 8, (1.0,), backbone_kwargs={"window_size": S} if S else {}
            )
        macs = backbone_macs(pyr, (800, 1333))
        assert macs == _deit_macs(192, 12, (50, 84), 1, 16, S, [2, 5, 8, 11])
        assert round(macs / 1e9, 4) == expected_g


def test_padding_is_zeros_after_the_norm() -> None:
    """ViTDet pads the normalised grid with zeros: the padded keys are the qkv bias alone."""
    torch.manual_seed(0)
    attn = Attention(8, num_heads=1, qkv_bias=True).double().eval()
    x = torch.randn(1, 3, 8, dtype=torch.float64)  # a 1x3 grid in 2x2 windows: padded to 2x4
    out = window_attention(attn, x, (1, 3), 2)
    padded = F.pad(x.reshape(1, 1, 3, 8), (0, 0, 0, 1, 0, 1)).reshape(1, 2, 4, 8)
    first = torch.stack([padded[0, 0, :2], padded[0, 1, :2]]).reshape(1, 4, 8)
    torch.testing.assert_close(out[:, :2], attn(first)[:, :2])
