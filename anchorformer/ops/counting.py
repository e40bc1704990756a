"""Counting multiply-accumulates (MACs), attention included.

The field (DeiT, timm, fvcore) reports MACs as "FLOPs": DeiT-Ti is "1.3 GFLOPs" at 224².
Counters that skip ``scaled_dot_product_attention`` undercount attention (torch's
``FlopCounterMode`` on the CPU dispatches it to ``_scaled_dot_product_flash_attention_for_cpu``,
which it has no formula for). :func:`count_macs` counts every matmul, linear and convolution,
and every fused attention kernel, through torch's dispatcher, so the count does not depend on
how a model writes its attention.

Elementwise work (softmax, normalisation, the Λ^-1 scaling, activations) is not counted, as in
the field's convention.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params"]

aten = torch.ops.aten


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any) -> int:
    """2 * (QK^T + AV) multiply-adds, as FLOPs (2 per MAC): 4 * B*H*Nq*Nk*D (+ Dv)."""
    *batch, nq, d = query_shape
    nk = key_shape[-2]
    dv = value_shape[-1]
    b = math.prod(batch)
    return 2 * b * nq * nk * (d + dv)


def _sdpa_formula(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    # FlopCounterMode hands formulas the shapes of tensor arguments.
    return _sdpa_flops(*(getattr(t, "shape", t) for t in (query, key, value)))


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    ):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_formula
    return mapping


def _input_size(model: nn.Module) -> tuple[int, int] | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    return tuple(size) if size is not None else None  # type: ignore[return-value]


def _as_hw(img_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = img_size
    return (int(h), int(w))


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | tuple[int, int] = 224, *, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``batch_size`` images.

    Counts ``mm``/``bmm``/``addmm``/``baddbmm``/convolutions and the fused attention kernels.
    A ViT built for another size is counted at ``img_size`` by a resized copy (position
    embeddings resampled), so the model passed in is never modified. Models on the ``meta``
    device are counted without computing anything.

    Args:
        model: any ``nn.Module`` taking (B, C, H, W) images.
        img_size: the input's side, or (height, width).
        batch_size: images per forward pass.

    Returns:
        The number of MACs (the field's "FLOPs").
    """
    hw = _as_hw(img_size)
    if any(s <= 0 for s in hw):
        raise ValueError(f"count_macs: img_size must be positive; got {img_size!r}")
    current = _input_size(model)
    if current is not None and current != hw:
        if not hasattr(model, "set_input_size"):
            raise ValueError(f"count_macs: model is built for {current}, cannot count it at {hw}")
        model = copy.deepcopy(model)
        model.set_input_size(img_size=hw)
    try:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    in_chans = int(getattr(model, "in_chans", 3) or 3)
    x = torch.zeros(batch_size, in_chans, *hw, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
