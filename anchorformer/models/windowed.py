"""Windowed attention for plain ViT backbones, as ViTDet runs them.

Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection"
(ECCV 2022): most blocks attend within non-overlapping ``window_size`` x ``window_size`` windows
of the patch grid, a few ("global blocks", 2, 5, 8, 11 of 12 for ViT-B: the last block of each
quarter of the depth) attend globally. The grid is padded with zeros at the bottom and right to
a multiple of the window after the block's first norm, and the padded tokens take part in the
windows' attention, unmasked, as in ViTDet's ``Block``; the outputs at the padding are dropped.
No relative position bias is added (ViTDet's is optional; the backbones here keep the absolute
position embeddings of their classification pre-training, which has none).

Prefix tokens (class, distillation) are not part of the grid: in a windowed block they form one
more group of their own (they attend to each other only), in a global block they attend as usual.
ViTDet drops the class token; keeping it leaves a classification checkpoint loadable unchanged.

The same blocks serve timm's DeiT (:class:`WindowedBlock`) and AnchorFormer
(:class:`WindowedAnchorBlock`; anchor attention is already global and linear in N, so AnchorFormer
stays global by default and windows are an ablation). State-dict keys are those of the plain
blocks: a checkpoint of the global model loads into the windowed one and back. The patch grid of the
forward pass in progress reaches the blocks through a forward hook of ``patch_embed``; with gradient
checkpointing, run the backward of a pass before a forward pass at another input size.

Letters used in shapes: B batch, N tokens (P prefix + h*w patches), C channels, h/w the patch
grid, S the window side, hp/wp the grid padded to a multiple of S.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .anchorformer import AnchorBlock

__all__ = [
    "WindowedAnchorBlock",
    "WindowedBlock",
    "default_global_blocks",
    "set_window_attention",
    "window_attention",
    "window_config",
]


def default_global_blocks(depth: int) -> list[int]:
    """ViTDet's global blocks for ``depth`` blocks: the last block of each of k equal groups,
    k = min(4, max(1, depth // 3)).

    12 blocks: 2, 5, 8, 11 (ViT-B); 24: 5, 11, 17, 23 (ViT-L); 32: 7, 15, 23, 31 (ViT-H), as ViTDet.
    Shallower backbones keep about one global block in three, always the last: 6 blocks: 2, 5;
    4 blocks (the mini backbones): 3; 3 or fewer: the last.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    k = min(4, max(1, depth // 3))
    return [round((j + 1) * depth / k) - 1 for j in range(k)]


def window_attention(attn: nn.Module, x: torch.Tensor, grid: tuple[int, int], window_size: int) -> torch.Tensor:
    """``attn`` within ``window_size``² windows of the patch grid, ViTDet's way.

    Args:
        attn: any attention module mapping (B', N', C) to (B', N', C) (timm's ``Attention``,
            :class:`anchorformer.models.AnchorAttention`).
        x: (B, N, C) normalised tokens, N = P + h*w: P prefix tokens, then the grid row by row.
        grid: (h, w).
        window_size: S >= 1.

    Returns:
        (B, N, C): the grid tokens attended within their windows (the grid zero-padded to a
        multiple of S, padding included in the attention, then cropped), the prefix tokens among
        themselves.
    """
    B, N, C = x.shape
    h, w = grid
    P = N - h * w
    if P < 0:
        raise ValueError(f"window attention: {N} tokens cannot hold a {h}x{w} grid")
    S = int(window_size)
    patches = x[:, P:].reshape(B, h, w, C)  # (B, h, w, C)
    ph, pw = (-h) % S, (-w) % S
    if ph or pw:
        patches = F.pad(patches, (0, 0, 0, pw, 0, ph))  # zeros at the bottom and right
    hp, wp = h + ph, w + pw
    windows = patches.reshape(B, hp // S, S, wp // S, S, C).permute(0, 1, 3, 2, 4, 5)  # (B, hp/S, wp/S, S, S, C)
    windows = attn(windows.reshape(-1, S * S, C))  # (B * hp/S * wp/S, S*S, C)
    windows = windows.reshape(B, hp // S, wp // S, S, S, C).permute(0, 1, 3, 2, 4, 5)  # (B, hp/S, S, wp/S, S, C)
    out = windows.reshape(B, hp, wp, C)[:, :h, :w].reshape(B, h * w, C)  # (B, h*w, C)
    if P == 0:
        return out
    return torch.cat([attn(x[:, :P]), out], dim=1)  # (B, N, C)


class _TokenGrid:
    """The patch grid (h, w) of the forward pass in progress, shared by a model's windowed blocks."""

    def __init__(self) -> None:
        self.hw: tuple[int, int] | None = None


class _RecordGrid:
    """Forward hook of ``patch_embed``: record the grid of the images it embeds.

    A callable object rather than a closure, so that ``copy.deepcopy`` of the model gives the
    copy's hook the copy's grid.
    """

    def __init__(self, grid: _TokenGrid) -> None:
        self.grid = grid

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        H, W = args[0].shape[-2:]
        if hasattr(module, "dynamic_feat_size"):
            self.grid.hw = tuple(int(s) for s in module.dynamic_feat_size((H, W)))  # type: ignore[assignment]
        else:
            p = module.patch_size
            self.grid.hw = (int(H) // p[0], int(W) // p[1])


class _WindowedForward:
    """The block forward with the attention windowed when ``window_size`` > 0 (0: the plain block)."""

    window_size: int = 0
    token_grid: _TokenGrid | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.window_size <= 0:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        if attn_mask is not None or is_causal:
            raise ValueError("windowed attention takes no attn_mask or is_causal")
        grid = self.token_grid.hw if self.token_grid is not None else None
        if grid is None:
            raise RuntimeError("windowed block called outside its model: the patch grid is unknown")
        x = x + self.drop_path1(self.ls1(window_attention(self.attn, self.norm1(x), grid, self.window_size)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}" if self.window_size > 0 else "global"


class WindowedBlock(_WindowedForward, Block):
    """timm's ``Block`` (DeiT) with optional windowed attention; the same parameters and keys."""


class WindowedAnchorBlock(_WindowedForward, AnchorBlock):
    """:class:`AnchorBlock` with optional windowed anchor attention (the ablation); the same keys."""


def set_window_attention(model: nn.Module, window_size: int, global_blocks: Sequence[int] | None = None) -> None:
    """Make the windowed blocks of a ViT built with :class:`WindowedBlock` / :class:`WindowedAnchorBlock` window.

    Args:
        model: a timm ``VisionTransformer`` whose blocks are windowed blocks.
        window_size: S >= 1.
        global_blocks: blocks that stay global; None: :func:`default_global_blocks`.

    Raises:
        ValueError: a block index out of range, or blocks that cannot window.
    """
    blocks = list(model.blocks)
    depth = len(blocks)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an integer >= 1 here; got {window_size!r}")
    glob = default_global_blocks(depth) if global_blocks is None else [int(i) for i in global_blocks]
    bad = [i for i in glob if not 0 <= i < depth]
    if bad:
        raise ValueError(f"global_blocks {list(global_blocks or [])}: indices {bad} outside 0..{depth - 1}")
    if not all(isinstance(b, _WindowedForward) for b in blocks):
        raise ValueError(f"{type(model).__name__}: its blocks are not windowed blocks; build it with window_size")
    grid = _TokenGrid()
    model.patch_embed.register_forward_hook(_RecordGrid(grid))
    for i, blk in enumerate(blocks):
        blk.window_size = 0 if i in glob else int(window_size)
        blk.token_grid = grid
    model.window_size = int(window_size)
    model.global_blocks = sorted(set(glob))


def window_config(model: nn.Module) -> tuple[int, list[int]] | None:
    """``(window_size, global_blocks)`` of a windowed ViT, None for one that attends globally."""
    size = getattr(model, "window_size", 0)
    return (int(size), list(model.global_blocks)) if size else None
