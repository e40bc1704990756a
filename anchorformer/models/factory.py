"""``create_model``: AnchorFormer variants and timm's DeiT baselines through one call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch.nn as nn

from .anchorformer import DEFAULT_NUM_ANCHORS, MODEL_NAMES, check_num_anchors

__all__ = ["DEFAULT_NUM_ANCHORS", "backbone_kwargs", "check_num_anchors", "create_model", "is_anchorformer", "is_vit"]

_ANCHOR_ONLY_KWARGS = ("num_anchors", "normalize", "per_head_anchors", "anchor_mode", "attn_impl")
_SIZE_WORDS = ("tiny", "small", "base")


def is_anchorformer(name: str) -> bool:
    """Whether ``name`` is one of the registered AnchorFormer variants."""
    return name in MODEL_NAMES


def is_vit(name: str) -> bool:
    """Whether ``name`` is a plain ViT whose shape a recipe sets (AnchorFormer, ``deit_*``, ``vit_*``)."""
    return is_anchorformer(name) or name.startswith(("deit_", "vit_"))


def _size_word(name: str) -> str | None:
    parts = name.split("_")
    return next((s for s in _SIZE_WORDS if s in parts), None)


def backbone_kwargs(name: str, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The ``create_model`` arguments of model ``name`` under a task recipe: the one recipe-to-model step.

    Every task (classification, detection, segmentation) and the results tables build their
    backbones through this function. For ViTs (AnchorFormer, ``deit_*``, ``vit_*``): ``img_size``
    (the grid the position embeddings belong to), ``patch_size`` when set, and the entry of
    ``model_sizes`` for the size word (tiny/small/base) in ``name``. For AnchorFormer also the
    anchor settings: ``num_anchors`` (M; ``None`` keeps the model's default,
    :data:`DEFAULT_NUM_ANCHORS`), ``anchor_mode``, ``normalize``, ``per_head_anchors`` and
    ``attn_impl``; baselines take none. ``model_kwargs`` come last and win.

    Args:
        name: a registered AnchorFormer variant or a timm model name.
        recipe: a task recipe (or mapping) with the keys above; missing keys are skipped.

    Raises:
        ValueError: ``num_anchors`` below 1 (the same message as the model's).
    """
    get = recipe.get
    kw: dict[str, Any] = {}
    if is_vit(name):
        if get("img_size") is not None:
            kw["img_size"] = int(get("img_size"))
        if get("patch_size") is not None:
            kw["patch_size"] = int(get("patch_size"))
        size = _size_word(name)
        if size is not None:
            kw.update((get("model_sizes") or {}).get(size) or {})
    if is_anchorformer(name):
        if get("num_anchors") is not None:
            kw["num_anchors"] = check_num_anchors(get("num_anchors"))
        for key in ("anchor_mode", "normalize", "per_head_anchors", "attn_impl"):
            if get(key) is not None:
                kw[key] = get(key)
    kw.update(get("model_kwargs") or {})
    return kw


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
