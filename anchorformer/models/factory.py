"""``create_model``: AnchorFormer variants and timm's DeiT baselines through one call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch.nn as nn

from .anchorformer import ANCHOR_KWARGS, DEFAULT_NUM_ANCHORS, MODEL_NAMES, check_num_anchors
from .peers import PEER_MODEL_NAMES, PEER_TOKEN_KWARG, is_peer, peer_family
from .windowed import WindowedAnchorBlock, WindowedBlock, set_window_attention

__all__ = [
    "DEFAULT_NUM_ANCHORS",
    "backbone_kwargs",
    "check_num_anchors",
    "create_model",
    "is_anchorformer",
    "is_peer",
    "is_vit",
]

_SIZE_WORDS = ("tiny", "small", "base")


def is_anchorformer(name: str) -> bool:
    """Whether ``name`` is one of the registered AnchorFormer variants."""
    return name in MODEL_NAMES


def is_vit(name: str) -> bool:
    """Whether ``name`` is a plain ViT whose shape a recipe sets (AnchorFormer, its peers, ``deit_*``, ``vit_*``)."""
    return is_anchorformer(name) or is_peer(name) or name.startswith(("deit_", "vit_"))


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
    :data:`DEFAULT_NUM_ANCHORS`), ``anchor_mode``, ``normalize``, ``per_head_anchors``,
    ``attn_impl``, and ``anchor_init`` and ``learn_temperature`` where the recipe has them (the
    classification recipe, E9); baselines take none. For the peers (:mod:`anchorformer.models.peers`)
    ``num_anchors`` sets their number of summary tokens (Agent's agents, Nyström's landmarks,
    ISAB's inducing points; FLatten has none), so that a recipe compares them at one M. For ViTs with ``window_size`` > 0 (ViTDet's windowed
    attention, dense tasks): ``window_size`` and ``global_blocks``; with 0 (global attention) neither
    is passed, so a recipe without windows builds the model it always built. ``model_kwargs`` come
    last and win.

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
        if get("window_size"):
            kw["window_size"] = int(get("window_size"))
            if get("global_blocks") is not None:
                kw["global_blocks"] = [int(i) for i in get("global_blocks")]
    if is_anchorformer(name):
        if get("num_anchors") is not None:
            kw["num_anchors"] = check_num_anchors(get("num_anchors"))
        for key in ("anchor_mode", "normalize", "per_head_anchors", "anchor_init", "learn_temperature", "attn_impl"):
            if get(key) is not None:
                kw[key] = get(key)
    elif is_peer(name):
        token_kwarg = PEER_TOKEN_KWARG[peer_family(name)]  # type: ignore[index]
        if token_kwarg is not None and get("num_anchors") is not None:
            kw[token_kwarg] = check_num_anchors(get("num_anchors"))
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
            ``normalize``, ``per_head_anchors``, ``anchor_mode``, ``anchor_init`` and
            ``learn_temperature``. Anchor arguments given for a
            baseline are an error; ``attn_impl`` is ignored for baselines. ``window_size`` (S,
            default 0: global attention in every block) and ``global_blocks`` (default: ViTDet's,
            :func:`anchorformer.models.windowed.default_global_blocks`) window the attention of the
            other blocks in S x S windows of the patch grid, for ``deit_*`` and AnchorFormer alike
            (:mod:`anchorformer.models.windowed`); the weights and their keys are unchanged.

    Raises:
        ValueError: unknown model name, an anchor argument for a non-AnchorFormer model, or
            windows for a model that is not a plain ViT.
    """
    window_size = kwargs.pop("window_size", 0) or 0
    global_blocks = kwargs.pop("global_blocks", None)
    if window_size:
        if not is_vit(name) or is_peer(name):
            raise ValueError(
                f"{name}: window_size applies to plain ViTs only (AnchorFormer, deit_*, vit_*; not the peers)"
            )
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be an integer >= 0; got {window_size!r}")
        kwargs["block_fn"] = WindowedAnchorBlock if is_anchorformer(name) else WindowedBlock
    if not is_anchorformer(name):
        if not timm.is_model(name):
            close = sorted(
                n for n in MODEL_NAMES + PEER_MODEL_NAMES + timm.list_models("deit_*") if name.split("_")[0] in n
            )
            raise ValueError(f"unknown model {name!r}; AnchorFormer models: {MODEL_NAMES}; similar: {close[:8]}")
        kwargs.pop("attn_impl", None)
        bad = [k for k in ANCHOR_KWARGS if k in kwargs]
        if bad:
            raise ValueError(f"{name} is not an AnchorFormer model; it takes no {bad}")
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if window_size:
        set_window_attention(model, window_size, global_blocks)
    if "deit" in name and "distilled" in name and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    return model
