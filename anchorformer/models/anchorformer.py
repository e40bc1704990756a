"""AnchorFormer: a DeiT whose attention is AnchorFormer's anchor attention.

Shan et al., "AnchorFormer: Differentiable anchor attention for efficient vision transformer",
Pattern Recognition Letters 197 (2025), arXiv 2505.16463. The backbone follows the official
``model/AnchorDeiT.py``: timm's DeiT (pre-norm blocks, LayerNorm eps 1e-6, patch 16, MLP ratio
4, class + distillation tokens for the distilled variants) with every attention replaced by
:class:`AnchorAttention`.

Letters used in shapes: B batch, N tokens (patches + prefix tokens), C channels, H heads,
D = C / H head dim, M anchors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from ..ops.anchor_attention import IMPLS, anchor_attention
from .fused import FusedAnchorAttention

__all__ = [
    "ANCHOR_INITS",
    "ANCHOR_KWARGS",
    "ANCHOR_MODES",
    "DEFAULT_NUM_ANCHORS",
    "check_num_anchors",
    "checkpoint_filter_fn",
    "detect_layout",
    "fuse_for_inference",
    "AnchorAttention",
    "AnchorBlock",
    "AnchorFormer",
    "AnchorFormerDistilled",
    "MODEL_NAMES",
]

ANCHOR_MODES = ("learned", "pooled")
# How the anchors start (E9). official: the official nn.Linear(D, M) weight, U(-1/sqrt(D), 1/sqrt(D));
# unit: the same draw with every row scaled to norm 1; qk_norm: rows scaled to the typical norm of
# qk at initialisation (sqrt of E||qk||^2 for unit-variance inputs, the squared Frobenius norm of a
# head's rows of the qk projection, averaged over heads); kmeans: the official draw, replaced before
# training by k-means centroids of the first training batch's qk (anchorformer.models.anchor_init).
ANCHOR_INITS = ("official", "unit", "qk_norm", "kmeans")
DEFAULT_NUM_ANCHORS = 30  # M of the official code; the one place this default is set


def check_num_anchors(num_anchors: Any) -> int:
    """``num_anchors`` if it is an integer >= 1, else ValueError (one message for every caller)."""
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"num_anchors must be an integer >= 1; got {num_anchors!r}")
    return num_anchors


def _is_set(arg: Any) -> bool:
    """Whether a mask argument was really given (an FX proxy stands for any value, given or not)."""
    return not isinstance(arg, torch.fx.Proxy) and arg is not None and arg is not False


def _attend_torchscript(qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The reference operator (``ops/anchor_attention/reference.py``) in TorchScript's subset of
    Python, for ``torch.jit.script``: the dispatcher itself cannot be scripted. Shapes as there."""
    while anchors.dim() < 4:
        anchors = anchors.unsqueeze(0)  # (1, 1, M, D), (1, H, M, D) or (B, H, M, D)
    acc = torch.float64 if qk.dtype == torch.float64 else torch.float32
    a = torch.softmax(qk.to(acc) @ anchors.to(acc).transpose(-1, -2) * qk.shape[-1] ** -0.5, dim=-1)  # (B, H, N, M)
    kv = a.transpose(-1, -2) @ v.to(acc)  # (B, H, M, D)
    if normalize:
        deg = a.sum(dim=-2)  # (B, H, M)
        nonzero = deg > 0
        inv = torch.where(nonzero, 1.0 / torch.where(nonzero, deg, torch.ones_like(deg)), torch.zeros_like(deg))
        kv = kv * inv.unsqueeze(-1)
    return (a @ kv).to(v.dtype)  # (B, H, N, D)


def _attend(qk: torch.Tensor, v: torch.Tensor, anchors: torch.Tensor, normalize: bool, impl: str) -> torch.Tensor:
    """The operator call of :class:`AnchorAttention`: one opaque node for FX (``torch.fx.wrap``:
    the dispatcher checks shapes and devices, which FX proxies do not have), the reference maths
    under TorchScript, and :func:`anchor_attention` (reference or fused) otherwise."""
    if torch.jit.is_scripting():
        return _attend_torchscript(qk, v, anchors, normalize)
    return anchor_attention(qk, v, anchors, normalize=normalize, impl=impl)


torch.fx.wrap("_attend")


class AnchorAttention(nn.Module):
    """Multi-head anchor attention (REFERENCE: the official ``AnchorAttention`` forward).

    One shared query/key projection and a value projection (a single bias-free linear layer
    ``in_proj``), M anchors of dim D (one set per layer by default, ``anchors`` of shape (M, D)),
    the operator :func:`anchorformer.ops.anchor_attention`, then an output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_anchors: int = DEFAULT_NUM_ANCHORS,
        qkv_bias: bool = False,  # the official projection has no bias
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        normalize: bool = True,  # apply Λ^-1 (False: the ablation without it)
        per_head_anchors: bool = False,  # (H, M, D) anchors instead of one (M, D) set per layer
        anchor_mode: str = "learned",  # "learned" (the method) or "pooled" (fixed-anchor ablation)
        anchor_init: str = "official",  # ANCHOR_INITS: how the anchors start (E9)
        learn_temperature: bool = False,  # a learned scale exp(logit_scale) on the token-anchor logits (E9)
        attn_impl: str = "auto",  # "auto" | "reference" | "triton"
        device: torch.device | str | None = None,  # timm's factory arguments: where and in which
        dtype: torch.dtype | None = None,  # dtype every parameter is created
        **_: Any,  # the rest of timm's attention arguments (qk_norm, attn_drop, ...) do not apply
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads != 0:
            raise ValueError(f"AnchorAttention: dim={dim} must be divisible by num_heads={num_heads}")
        check_num_anchors(num_anchors)
        if anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"AnchorAttention: anchor_mode must be one of {ANCHOR_MODES}; got {anchor_mode!r}")
        if anchor_init not in ANCHOR_INITS:
            raise ValueError(f"AnchorAttention: anchor_init must be one of {ANCHOR_INITS}; got {anchor_init!r}")
        if anchor_init != "official" and anchor_mode != "learned":
            raise ValueError(
                f"AnchorAttention: anchor_init={anchor_init!r} needs anchor_mode='learned' (pooled anchors are not initialised)"
            )
        if attn_impl not in IMPLS:
            raise ValueError(f"AnchorAttention: attn_impl must be one of {IMPLS}; got {attn_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_anchors = num_anchors
        self.normalize = normalize
        self.per_head_anchors = per_head_anchors
        self.anchor_mode = anchor_mode
        self.anchor_init = anchor_init
        self.attn_impl = attn_impl

        self.in_proj = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)  # -> [qk | v]
        if anchor_mode == "learned":
            shape = (num_heads, num_anchors, self.head_dim) if per_head_anchors else (num_anchors, self.head_dim)
            self.anchors = nn.Parameter(torch.empty(shape, **dd))
        else:
            self.register_parameter("anchors", None)
        # exists only when learned, so the official layout and earlier checkpoints load unchanged
        self.logit_scale = nn.Parameter(torch.zeros((), **dd)) if learn_temperature else None
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_weights()

    def init_weights(self) -> None:
        """Anchors as the official ``nn.Linear(D, M)`` weight: U(-1/sqrt(D), 1/sqrt(D)), then
        rescaled by ``anchor_init`` (the same random draw for every choice); the temperature at 1.

        timm's ViT initialisation calls this for every attention layer, after the projections
        (children first); so does ``model.init_weights()`` after ``create_model(..., device="meta")``
        and ``to_empty``. ``"kmeans"`` starts as ``"official"``: its centroids need data
        (:func:`anchorformer.models.anchor_init.init_anchors_kmeans`).
        """
        if self.anchors is not None:
            bound = 1.0 / math.sqrt(self.head_dim)
            nn.init.uniform_(self.anchors, -bound, bound)
            if self.anchor_init in ("unit", "qk_norm"):
                with torch.no_grad():
                    self.anchors.div_(self.anchors.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                    if self.anchor_init == "qk_norm":
                        self.anchors.mul_(self.typical_qk_norm())
        if self.logit_scale is not None:
            nn.init.zeros_(self.logit_scale)

    @torch.no_grad()
    def typical_qk_norm(self) -> torch.Tensor:
        """The typical norm of ``qk`` for inputs of unit variance per channel (LayerNorm's output):
        E||W_h x||^2 = ||W_h||_F^2 for head h's (D, C) rows W_h of the qk projection; the root of
        its mean over heads. A scalar tensor."""
        w_qk = self.in_proj.weight[: self.num_heads * self.head_dim].float()  # (H*D, C)
        per_head = w_qk.reshape(self.num_heads, -1).pow(2).sum(dim=1)  # (H,)
        return per_head.mean().sqrt()

    def pooled_anchors(self, qk: torch.Tensor) -> torch.Tensor:
        """Fixed anchors: the tokens' embeddings average-pooled to M, detached (not learned).

        Args:
            qk: (B, H, N, D).

        Returns:
            (B, H, M, D).
        """
        B, H, N, D = qk.shape
        pooled = F.adaptive_avg_pool1d(qk.detach().reshape(B * H, N, D).transpose(1, 2), self.num_anchors)
        return pooled.transpose(1, 2).reshape(B, H, self.num_anchors, D)  # (B, H, M, D)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The operator's inputs for tokens ``x`` (B, N, C): ``qk``, ``v`` (B, H, N, D) and the
        anchors in ``qk``'s dtype: (M, D), (H, M, D), or (B, H, M, D) when pooled."""
        B, N, _ = x.shape
        qkv = self.in_proj(x).reshape(B, N, 2, self.num_heads, self.head_dim)  # (B, N, 2, H, D)
        qk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, D)
        anchors = self.anchors if self.anchors is not None else self.pooled_anchors(qk)
        if self.logit_scale is not None:  # softmax(s * qk U^T / sqrt(D)) = softmax(qk (s U)^T / sqrt(D))
            anchors = anchors * self.logit_scale.exp()
        return qk, v, anchors.to(qk.dtype)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Args: x (B, N, C). Returns (B, N, C).

        ``attn_mask`` must be ``None`` and ``is_causal`` ``False`` (timm's block interface): anchor
        attention has no token-to-token matrix to mask. FX tracing passes proxies for both (every
        argument of the traced ``forward`` is one), so the check is left to the calls that run.
        """
        if torch.jit.is_scripting():
            if attn_mask is not None or is_causal:
                raise ValueError("AnchorAttention does not support attn_mask or is_causal")
        elif _is_set(attn_mask) or _is_set(is_causal):
            raise ValueError("AnchorAttention does not support attn_mask or is_causal")
        B, N, C = x.shape
        qk, v, anchors = self.embed(x)
        out = _attend(qk, v, anchors, self.normalize, self.attn_impl)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, anchors={self.num_anchors}, normalize={self.normalize}, "
            f"per_head_anchors={self.per_head_anchors}, anchor_mode={self.anchor_mode!r}, "
            f"anchor_init={self.anchor_init!r}, learn_temperature={self.logit_scale is not None}, impl={self.attn_impl!r}"
        )


class AnchorBlock(nn.Module):
    """Pre-norm transformer block ``x + DropPath(attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))``.

    Module names follow timm's ``Block`` so that DeiT weights map one to one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        num_anchors: int = DEFAULT_NUM_ANCHORS,
        normalize: bool = True,
        per_head_anchors: bool = False,
        anchor_mode: str = "learned",
        anchor_init: str = "official",
        learn_temperature: bool = False,
        attn_impl: str = "auto",
        device: torch.device | str | None = None,  # timm's factory arguments, passed to every layer
        dtype: torch.dtype | None = None,
        **_: Any,  # timm passes qk_norm, attn_drop, attn_layer, depth, ...: not used here
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AnchorAttention(
            dim,
            num_heads=num_heads,
            num_anchors=num_anchors,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            proj_drop=proj_drop,
            normalize=normalize,
            per_head_anchors=per_head_anchors,
            anchor_mode=anchor_mode,
            anchor_init=anchor_init,
            learn_temperature=learn_temperature,
            attn_impl=attn_impl,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Replace every :class:`AnchorAttention` of ``model`` by its :class:`FusedAnchorAttention`, in place.

    The model is put in eval mode; every fused layer refuses training mode afterwards. A model
    with pooled anchors is refused (``ValueError``) before anything changes. Calling it again is a
    no-op.

    Returns:
        ``model``.
    """
    targets: list[tuple[nn.Module, str, AnchorAttention]] = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, AnchorAttention)
    ]
    for _, _, attn in targets:
        if attn.anchors is None:
            raise ValueError(
                f"fuse_for_inference: anchor_mode={attn.anchor_mode!r} computes its anchors from each image's qk; "
                "only learned anchors fold into the projections"
            )
    model.eval()
    for parent, name, attn in targets:
        setattr(parent, name, FusedAnchorAttention(attn))
    model._fused_for_inference = True  # the model's own train() refuses from now on (where it checks)
    return model


ANCHOR_KWARGS = (  # the keyword arguments of the anchor attention (routed into every block)
    "num_anchors",
    "normalize",
    "per_head_anchors",
    "anchor_mode",
    "anchor_init",
    "learn_temperature",
    "attn_impl",
)


def _split_anchor_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    anchor = {k: kwargs.pop(k) for k in ANCHOR_KWARGS if k in kwargs}
    return anchor, kwargs


def _check_img_size(img_size: Any, patch_size: Any) -> None:
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(sizes) != 2 or any((not isinstance(s, int)) or s <= 0 for s in sizes):
        raise ValueError(f"img_size must be a positive int or (height, width); got {img_size!r}")
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"img_size {img_size!r} must be a multiple of the patch size {patch_size!r}")


class _AnchorMixin:
    """Shared constructor logic: route the anchor arguments into every block."""

    @staticmethod
    def _prepare(kwargs: dict[str, Any]) -> dict[str, Any]:
        anchor, kwargs = _split_anchor_kwargs(dict(kwargs))
        _check_img_size(kwargs.get("img_size", 224), kwargs.get("patch_size", 16))
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs["block_fn"] = partial(kwargs.get("block_fn", AnchorBlock), **anchor)  # windowed: a subclass
        return kwargs

    def set_attn_impl(self, impl: str) -> None:
        """Switch every attention layer to ``impl`` ("auto", "reference" or "triton")."""
        if impl not in IMPLS:
            raise ValueError(f"attn_impl must be one of {IMPLS}; got {impl!r}")
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, AnchorAttention):
                m.attn_impl = impl

    def fuse_for_inference(self) -> nn.Module:
        """Fold the projections of every anchor-attention layer into its anchors, for inference only.

        In place; returns the model, in eval mode. The outputs equal the unfused model's up to
        rounding (:mod:`anchorformer.models.fused` gives the maths and the MACs saved); training
        mode is refused afterwards. Pooled anchors do not fold (``ValueError``).
        """
        return fuse_for_inference(self)  # type: ignore[arg-type]

    def train(self, mode: bool = True) -> nn.Module:
        """timm's ``train``, refused once :meth:`fuse_for_inference` has folded the layers."""
        if mode and getattr(self, "_fused_for_inference", False):
            raise RuntimeError(
                f"{type(self).__name__} was fused for inference (fuse_for_inference()): it cannot train; "
                "train the unfused model and fuse a copy"
            )
        return super().train(mode)  # type: ignore[misc]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings, tokens, anchors and temperatures are not decayed."""
        names = {"pos_embed", "cls_token", "dist_token"}
        names |= {n for n, _ in self.named_parameters() if n.endswith((".anchors", ".logit_scale"))}  # type: ignore[attr-defined]
        return names


class AnchorFormer(_AnchorMixin, VisionTransformer):
    """Plain (class token only) AnchorFormer ViT with timm's model API."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._prepare(kwargs))


class AnchorFormerDistilled(_AnchorMixin, VisionTransformerDistilled):
    """Distilled AnchorFormer: class and distillation tokens, two heads.

    In training mode ``forward`` returns ``(logits, logits_dist)``; in eval mode their mean.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._prepare(kwargs))
        self.distilled_training = True


# ---------------------------------------------------------------------------------------------
# Registered variants
# ---------------------------------------------------------------------------------------------

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


# ---------------------------------------------------------------------------------------------
# Weights of other layouts (timm's pretrained_filter_fn)
# ---------------------------------------------------------------------------------------------


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of ``state_dict``: "official", "timm" or "anchorformer"."""
    keys = list(state_dict)
    if any(".attn.x_to_emb." in k or ".attn.dist_anchor_B." in k for k in keys):
        return "official"
    if any(".attn.qkv." in k for k in keys):
        return "timm"
    return "anchorformer"


def _num_prefix_tokens(model: nn.Module) -> int:
    return 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert ``state_dict`` (any supported layout) to the keys and grid of ``model``.

    Pure: the input is not modified. Keys that do not apply (timm's qkv biases, a distillation
    head for a plain model) are kept so that the caller can report them.
    """
    layout = detect_layout(state_dict)
    is_anchor_model = any(isinstance(m, AnchorAttention) for m in model.modules())
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if layout == "official":
            k = re.sub(r"\.attn\.x_to_emb\.", ".attn.in_proj.", k)
            k = re.sub(r"\.attn\.to_out\.0\.", ".attn.proj.", k)
            if k.endswith(".attn.dist_anchor_B.weight"):
                k = k[: -len("dist_anchor_B.weight")] + "anchors"
        elif layout == "timm" and is_anchor_model and ".attn.qkv." in k:
            prefix, kind = k.split(".attn.qkv.")
            q, _, val = v.chunk(3, dim=0)
            if kind == "weight":
                out[f"{prefix}.attn.in_proj.weight"] = torch.cat([q, val], dim=0)
            else:  # the official projection has no bias: keep the biases only to report them
                out[f"{prefix}.attn.in_proj.bias"] = torch.cat([q, val], dim=0)
            continue
        out[k] = v
    pos = out.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is not None and isinstance(target, torch.Tensor) and pos.shape != target.shape and pos.dim() == 3:
        n_prefix = _num_prefix_tokens(model)
        old_patches = pos.shape[1] - n_prefix
        side = int(round(old_patches**0.5))
        if side * side == old_patches and pos.shape[2] == target.shape[2]:
            out["pos_embed"] = resample_abs_pos_embed(
                pos,
                new_size=model.patch_embed.grid_size,
                old_size=(side, side),
                num_prefix_tokens=n_prefix,
                verbose=False,
            )
    return out


def _cfg(img_size: int = 224, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, img_size, img_size),
        "pool_size": None,
        "crop_pct": 0.875 if img_size == 224 else 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _create(variant: str, pretrained: bool, distilled: bool, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the registered pretrained config of ``variant``.

    ``pretrained=True`` loads the config's ``file`` (``pretrained_cfg_overlay=dict(file=PATH)``):
    our checkpoints (``model.pth``, ``model.safetensors``) and the official layout alike, through
    :func:`checkpoint_filter_fn`. The config's ``input_size`` follows ``img_size`` and ``in_chans``.
    """
    cls = AnchorFormerDistilled if distilled else AnchorFormer
    out_indices = kwargs.pop("out_indices", 3)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay.setdefault("input_size", (kwargs.get("in_chans", 3), *_pair(kwargs.get("img_size", 224))))
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# (name, size, native image size, distilled): the paper's T/S/B, the distilled forms, the official names.
_VARIANTS = [
    *(
        (name, size, 224, distilled)
        for size in ("tiny", "small", "base")
        for name, distilled in (
            (f"anchorformer_{size}_patch16_224", False),
            (f"anchorformer_{size}_distilled_patch16_224", True),
            (f"anchor_deit_{size}_distilled_patch16_224", True),
        )
    ),
    ("anchorformer_base_patch16_384", "base", 384, False),
    ("anchorformer_base_distilled_patch16_384", "base", 384, True),
    ("anchor_deit_base_distilled_patch16_384", "base", 384, True),
]

# timm's register_model reads each variant's pretrained config from this module's `default_cfgs`.
default_cfgs = generate_default_cfgs(
    {
        name: _cfg(img, classifier=("head", "head_dist") if distilled else "head")
        for name, _, img, distilled in _VARIANTS
    }
)

MODEL_NAMES: list[str] = []


def _register(name: str, size: str, img_size: int, distilled: bool) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model_args = dict(patch_size=16, img_size=img_size, **_SIZES[size])
        return _create(name, pretrained, distilled, **dict(model_args, **kwargs))

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__module__ = __name__
    kind = "distilled " if distilled else ""
    fn.__doc__ = f"AnchorFormer-{size[0].upper()} {kind}(patch 16, {img_size}x{img_size}, {_SIZES[size]})."
    register_model(fn)
    globals()[name] = fn
    MODEL_NAMES.append(name)


for _name, _size, _img, _distilled in _VARIANTS:
    _register(_name, _size, _img, _distilled)
