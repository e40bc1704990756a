"""``create_model``: AnchorFormer variants and timm's DeiT baselines through one call."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from .anchorformer import MODEL_NAMES

__all__ = ["create_model", "is_anchorformer"]

_ANCHOR_ONLY_KWARGS = ("num_anchors", "normalize", "per_head_anchors", "anchor_mode", "attn_impl")


def is_anchorformer(name: str) -> bool:
    """Whether ``name`` is one of the registered AnchorFormer variants."""
    return name in MODEL_NAMES


def create_model(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered AnchorFormer variant or a timm baseline (``deit_*``, any timm name).

    Args:
        name: e.g. ``anchorformer_tiny_patch16_224`` or ``deit_tiny_distilled_patch16_224``.
        pretrained: timm's flag; no AnchorFormer weights are published, so load them with
            :func:`anchorformer.load_checkpoint` instead.
        **kwargs: model arguments (``num_classes``, ``img_size``, ``drop_path_rate``,
            ``in_chans``, ...); for AnchorFormer also ``num_anchors``, ``attn_impl``,
            ``normalize``, ``per_head_anchors`` and ``anchor_mode``. Anchor arguments given for a
            baseline are an error; ``attn_impl`` is ignored for baselines.

    Raises:
        ValueError: unknown model name, or an anchor argument for a non-AnchorFormer model.
    """
    if not is_anchorformer(name):
        if not timm.is_model(name):
            close = sorted(n for n in MODEL_NAMES + timm.list_models("deit_*") if name.split("_")[0] in n)
            raise ValueError(f"unknown model {name!r}; AnchorFormer models: {MODEL_NAMES}; similar: {close[:8]}")
        kwargs.pop("attn_impl", None)
        bad = [k for k in _ANCHOR_ONLY_KWARGS if k in kwargs]
        if bad:
            raise ValueError(f"{name} is not an AnchorFormer model; it takes no {bad}")
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if "deit" in name and "distilled" in name and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    return model
