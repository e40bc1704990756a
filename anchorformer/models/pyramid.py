"""Dense features from a plain ViT: the simple feature pyramid of ViTDet, mmsegmentation's multi-level neck.

Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection"
(ECCV 2022): the last map of a plain (non-hierarchical) backbone, at stride P (the patch size),
is turned into a pyramid by deconvolutions (scales 4 and 2), the identity (scale 1) and max
pooling (scales 1/2, 1/4); each level then gets a 1x1 and a 3x3 convolution to ``out_channels``
with LayerNorm. With P = 16 and the default scales the maps are at strides 4, 8, 16, 32.

The same module serves AnchorFormer (Shan et al., arXiv 2505.16463) and DeiT backbones: both
are timm ``VisionTransformer``s, run with ``dynamic_img_size`` so that any input size works.
Inputs are zero-padded at the bottom and right to a multiple of P; absolute position embeddings
are resampled (bicubic, timm's ``resample_abs_pos_embed``) from the pre-training grid to the
input's grid on every forward. At 1333x800 a stride-16 backbone sees 84 x 50 = 4,200 tokens:
there AnchorFormer's O(N·M) attention matters.

:class:`MultiLevelNeck` is the neck of mmsegmentation's ViT/DeiT + UperNet (``MultiLevelNeck``,
``upernet_vit-b16_mln``): the maps of four blocks (2, 5, 8, 11 of 12, the last of each quarter;
:func:`default_neck_indices`), taken without the final norm, each through a 1x1 convolution,
resized by 4, 2, 1 and 0.5 (bilinear; strides 4, 8, 16, 32 at P = 16) and a 3x3 convolution.

Letters used in shapes: B batch, C channels, H/W input height/width, h/w the stride-P grid
(``ceil(H / P)``, ``ceil(W / P)``), P the patch size.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format, LayerNorm2d

from ..ops.counting import count_macs
from .checkpoint import CheckpointMismatchError, detect_layout, load_checkpoint, read_state_dict
from .factory import create_model

__all__ = [
    "NECKS",
    "MultiLevelNeck",
    "SimpleFeaturePyramid",
    "backbone_macs",
    "default_neck_indices",
    "build_backbone",
    "param_groups_layer_decay",
]

_logger = logging.getLogger(__name__)

_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)
NECKS = ("multilevel", "simple")  # mmsegmentation's multi-level neck | ViTDet's simple feature pyramid
_NORMS = ("LN", "GN", "BN", "")


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "LN":
        return LayerNorm2d(channels, eps=1e-6)
    if kind == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _enable_dynamic_size(vit: nn.Module) -> None:
    """Switch a timm ViT built with a fixed input size to ``dynamic_img_size`` in place."""
    pe = vit.patch_embed
    vit.dynamic_img_size = True
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC


def build_backbone(
    name: str,
    *,
    drop_path_rate: float = 0.0,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A headless AnchorFormer or DeiT for dense prediction, optionally initialised from a checkpoint.

    Args:
        name: a registered model name (``anchorformer_tiny_patch16_224``, ``deit_small_patch16_224``, ...).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        checkpoint: weights of a classification model of the same architecture (an E1 checkpoint,
            official AnchorFormer or timm DeiT weights): loaded through
            :func:`anchorformer.load_checkpoint`; classifier heads are ignored, every backbone weight
            must be found (anchors excepted when loading DeiT weights into AnchorFormer).
        **kwargs: model arguments (``img_size`` = the pre-training size the position embeddings
            belong to, ``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``num_anchors``, ...).

    Returns:
        The timm ViT with ``num_classes=0`` and ``dynamic_img_size=True``.

    Raises:
        CheckpointMismatchError: the checkpoint lacks backbone weights or has other shapes.
    """
    model = create_model(name, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate, **kwargs)
    if checkpoint is not None:
        load_backbone_checkpoint(model, checkpoint)
    return model


def load_backbone_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> None:
    """Load classification weights into a headless backbone (heads of the checkpoint are ignored)."""
    raw = read_state_dict(checkpoint)
    report = load_checkpoint(model, raw, strict=False)
    allowed = {k for k in report.missing if detect_layout(raw) == "timm" and k.endswith(".attn.anchors")}
    missing = [k for k in report.missing if k not in allowed]
    if missing:
        src = checkpoint if not isinstance(checkpoint, Mapping) else "state dict"
        raise CheckpointMismatchError(
            f"checkpoint {src} does not contain backbone weights of {type(model).__name__}: missing "
            + ", ".join(missing[:12])
            + (f" (+{len(missing) - 12} more)" if len(missing) > 12 else "")
            + "; was it written for another architecture (embed_dim, depth, patch size)?"
        )
    heads = [k for k in report.unused if k.startswith(("head.", "head_dist.", "fc_norm."))]
    other = [k for k in report.unused if k not in heads and not k.endswith(".attn.in_proj.bias")]
    if other:
        _logger.warning("backbone checkpoint: %d keys not used: %s", len(other), ", ".join(other[:12]))
    _logger.info(
        "backbone initialised from %s (%s layout; %d head keys ignored)",
        checkpoint if not isinstance(checkpoint, Mapping) else "state dict",
        report.layout,
        len(heads),
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a plain AnchorFormer or DeiT backbone.

    Attributes:
        backbone: the timm ViT (headless, ``dynamic_img_size``).
        out_channels: channels of every output map (read by torchvision's detectors).
        strides: stride of each output map, ``patch_size / scale``.
        patch_size: P.
        embed_dim: the backbone's C.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        *,
        norm: str = "LN",
        drop_path_rate: float = 0.0,
        checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
        grad_checkpointing: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Args:
            backbone: a model name for :func:`build_backbone`, or a timm ViT module (its classifier
                is removed and ``dynamic_img_size`` switched on).
            out_channels: channels of every pyramid level.
            scales: output scales relative to the stride-P map, each one of 4, 2, 1, 0.5, 0.25,
                in decreasing order.
            norm: "LN" (ViTDet), "GN", "BN" or "" (none) after each convolution.
            drop_path_rate: stochastic depth of the backbone (only when built by name).
            checkpoint: classification weights for the backbone (only when built by name).
            grad_checkpointing: recompute the backbone's blocks in the backward pass (memory).
            backbone_kwargs: further arguments of :func:`build_backbone`.
        """
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or any(s not in _SCALES for s in scales) or list(scales) != sorted(scales, reverse=True):
            raise ValueError(f"SimpleFeaturePyramid: scales must be decreasing values from {_SCALES}; got {scales}")
        norm = norm or ""  # None: no normalisation
        if norm not in _NORMS:
            raise ValueError(f"SimpleFeaturePyramid: norm must be one of {_NORMS}; got {norm!r}")
        backbone = _plain_backbone(
            backbone, drop_path_rate, checkpoint, grad_checkpointing, backbone_kwargs, "SimpleFeaturePyramid"
        )
        self.backbone = backbone
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        self.embed_dim = int(backbone.embed_dim)
        self.out_channels = int(out_channels)
        self.scales = scales
        self.strides = tuple(self.patch_size / s for s in scales)
        self.strides = tuple(int(s) if float(s).is_integer() else s for s in self.strides)
        use_bias = norm == ""
        C = self.embed_dim
        self.stages = nn.ModuleList()
        for scale in scales:
            layers: list[nn.Module] = []
            dim = C
            if scale == 4.0:
                layers += [
                    nn.ConvTranspose2d(C, C // 2, 2, stride=2),
                    _norm2d(norm or "LN", C // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(C // 2, C // 4, 2, stride=2),
                ]
                dim = C // 4
            elif scale == 2.0:
                layers += [nn.ConvTranspose2d(C, C // 2, 2, stride=2)]
                dim = C // 2
            elif scale == 0.5:
                layers += [nn.MaxPool2d(2, 2, ceil_mode=True)]
            elif scale == 0.25:
                layers += [nn.MaxPool2d(4, 4, ceil_mode=True)]
            layers += [
                nn.Conv2d(dim, out_channels, 1, bias=use_bias),
                _norm2d(norm, out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias),
                _norm2d(norm, out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))
        self._init_neck()

    def _init_neck(self) -> None:
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d):  # c2_msra_fill, as ViTDet
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The stride-P grid (h, w) = (ceil(H / P), ceil(W / P)) of an (H, W) input."""
        return math.ceil(img_size[0] / self.patch_size), math.ceil(img_size[1] / self.patch_size)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last block (final norm applied) as a map.

        Args:
            x: (B, 3, H, W) normalised images, any H and W.

        Returns:
            (B, C, h, w) with h = ceil(H / P), w = ceil(W / P).
        """
        if x.dim() != 4:
            raise ValueError(f"SimpleFeaturePyramid: expected images (B, C, H, W); got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % self.patch_size, (-W) % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros at the bottom and right
        (feat,) = self.backbone.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return feat  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Args: x (B, 3, H, W). Returns an OrderedDict "0", "1", ... of (B, out_channels, h·s, w·s) maps,
        one per scale s (max pooling rounds up: ceil(h / 2)), i.e. at ``self.strides``."""
        feat = self.forward_backbone(x)
        return OrderedDict((str(i), stage(feat)) for i, stage in enumerate(self.stages))


def default_neck_indices(depth: int, levels: int = 4) -> list[int]:
    """The blocks a multi-level neck reads: the last block of each of ``levels`` equal parts of the depth.

    12 blocks: 2, 5, 8, 11 (mmsegmentation's ViT/DeiT UperNet); 24: 5, 11, 17, 23; 4 blocks (the
    mini backbones): 0, 1, 2, 3; fewer blocks than levels repeat blocks (3: 0, 1, 1, 2).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    return [max(0, round((j + 1) * depth / levels) - 1) for j in range(levels)]


class MultiLevelNeck(nn.Module):
    """mmsegmentation's multi-level neck over a plain AnchorFormer or DeiT backbone.

    Attributes:
        backbone: the timm ViT (headless, ``dynamic_img_size``).
        indices: the blocks read, one per output level (finest first).
        out_channels: channels of every output map.
        strides: stride of each output map, ``patch_size / scale``.
        patch_size: P.
        embed_dim: the backbone's C.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        indices: Sequence[int] | None = None,
        *,
        drop_path_rate: float = 0.0,
        checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
        grad_checkpointing: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Args:
            backbone: a model name for :func:`build_backbone`, or a timm ViT module.
            out_channels: channels of every level (mmsegmentation: the backbone's C).
            scales: resize factor of each level's map, e.g. 4, 2, 1, 0.5 (P = 16) or 2, 1, 0.5,
                0.25 (P = 8) for strides 4, 8, 16, 32.
            indices: the blocks read, one per scale; None: :func:`default_neck_indices`.
            drop_path_rate, checkpoint, grad_checkpointing, backbone_kwargs: as for
                :class:`SimpleFeaturePyramid`.
        """
        super().__init__()
        self.backbone = _plain_backbone(
            backbone, drop_path_rate, checkpoint, grad_checkpointing, backbone_kwargs, "MultiLevelNeck"
        )
        self.scales = tuple(float(s) for s in scales)
        depth = len(self.backbone.blocks)
        self.indices = list(default_neck_indices(depth, len(self.scales)) if indices is None else indices)
        if len(self.indices) != len(self.scales) or not all(0 <= int(i) < depth for i in self.indices):
            raise ValueError(
                f"MultiLevelNeck: indices {self.indices} must give one block in 0..{depth - 1} per scale {self.scales}"
            )
        self.indices = [int(i) for i in self.indices]
        # What forward never reads (the final norm, blocks after the last index) keeps its weights, so
        # checkpoints load and save whole, but takes no gradient: DDP and the optimizer skip it.
        for module in (getattr(self.backbone, "norm", None), *self.backbone.blocks[max(self.indices) + 1 :]):
            if module is not None:
                module.requires_grad_(False)
        self.patch_size = int(self.backbone.patch_embed.patch_size[0])
        self.embed_dim = int(self.backbone.embed_dim)
        self.out_channels = int(out_channels)
        self.strides = tuple(self.patch_size / s for s in self.scales)
        self.strides = tuple(int(s) if float(s).is_integer() else s for s in self.strides)
        C = self.embed_dim
        self.lateral_convs = nn.ModuleList(nn.Conv2d(C, out_channels, 1) for _ in self.scales)
        self.convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.scales)
        for m in (*self.lateral_convs, *self.convs):  # mmsegmentation: xavier_init(distribution="uniform")
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps of the blocks in ``indices`` (no final norm, as mmsegmentation's ViT).

        Args:
            x: (B, 3, H, W) normalised images, any H and W (zero-padded to a multiple of P).

        Returns:
            One (B, C, h, w) map per index, h = ceil(H / P), w = ceil(W / P).
        """
        if x.dim() != 4:
            raise ValueError(f"MultiLevelNeck: expected images (B, C, H, W); got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % self.patch_size, (-W) % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros at the bottom and right
        taken = sorted(set(self.indices))
        maps = self.backbone.forward_intermediates(
            x, indices=taken, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        by_block = dict(zip(taken, maps))
        return [by_block[i] for i in self.indices]  # each (B, C, h, w)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Args: x (B, 3, H, W). Returns an OrderedDict "0", "1", ... of (B, out_channels, ·, ·) maps,
        level i at ``floor(h · scale_i)`` x ``floor(w · scale_i)`` (at least 1), i.e. at ``self.strides``."""
        out = OrderedDict()
        for i, (feat, scale) in enumerate(zip(self.forward_backbone(x), self.scales)):
            y = self.lateral_convs[i](feat)  # (B, out_channels, h, w)
            if scale != 1.0:
                h, w = y.shape[-2:]
                size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out[str(i)] = self.convs[i](y)
        return out


def _plain_backbone(
    backbone: str | nn.Module,
    drop_path_rate: float,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    grad_checkpointing: bool,
    backbone_kwargs: Mapping[str, Any] | None,
    who: str,
) -> nn.Module:
    """The headless dynamic-size ViT a neck reads: built by name, or a module made ready."""
    if isinstance(backbone, str):
        backbone = build_backbone(
            backbone, drop_path_rate=drop_path_rate, checkpoint=checkpoint, **dict(backbone_kwargs or {})
        )
    else:
        if checkpoint is not None:
            load_backbone_checkpoint(backbone, checkpoint)
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        if not getattr(backbone, "dynamic_img_size", False):
            _enable_dynamic_size(backbone)
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "patch_embed"):
        raise ValueError(f"{who}: expected a timm VisionTransformer; got {type(backbone).__name__}")
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    patch = backbone.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ValueError(f"{who}: square patches expected; got {patch}")
    return backbone


class _BackboneOnly(nn.Module):
    """The pyramid's backbone pass alone (padding included), for counting."""

    def __init__(self, pyramid: SimpleFeaturePyramid) -> None:
        super().__init__()
        self.pyramid = pyramid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pyramid.forward_backbone(x)


def backbone_macs(pyramid: SimpleFeaturePyramid, img_size: int | tuple[int, int] = (800, 1333)) -> int:
    """MACs of the backbone alone on one (H, W) image (padded to a multiple of P), attention included.

    The default is the COCO protocol's 1333x800 (H = 800, W = 1333). Works on the meta device.
    """
    return count_macs(_BackboneOnly(pyramid), img_size)


def _backbone_layer_ids(pyramid: SimpleFeaturePyramid) -> tuple[dict[int, int], int, set[int]]:
    """Map id(param) -> layer id (0 embeddings, i + 1 block i, depth + 1 final norm) and the no-decay ids."""
    vit = pyramid.backbone
    depth = len(vit.blocks)
    skip = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    ids: dict[int, int] = {}
    no_decay: set[int] = set()
    for name, p in vit.named_parameters():
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed")):
            layer = 0
        else:
            layer = depth + 1
        ids[id(p)] = layer
        if name in skip:
            no_decay.add(id(p))
    return ids, depth, no_decay


def param_groups_layer_decay(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    no_weight_decay: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay over the backbone (ViTDet, BEiT).

    The backbone's layer i (0 = patch/position embeddings and tokens, 1..depth = the blocks,
    depth + 1 = the final norm) gets ``lr * layer_decay ** (depth + 1 - i)``; everything outside
    the backbone (pyramid, detector or segmentation heads) gets ``lr``. Biases, normalisation
    weights (every parameter with fewer than 2 dims), position embeddings, tokens, anchors and
    the names in ``no_weight_decay`` get no weight decay.

    Args:
        model: a module containing one or more :class:`SimpleFeaturePyramid` or :class:`MultiLevelNeck`
            (or one itself).
        lr: base learning rate.
        weight_decay: weight decay of the decayed parameters.
        layer_decay: per-layer factor; 1.0 disables the decay.
        no_weight_decay: extra parameter names (as in ``model.named_parameters()``) without decay.

    Returns:
        A list of ``{"params", "lr", "lr_scale", "weight_decay", "name"}`` dicts (``lr_scale`` is
        honoured by timm's schedulers; the engine's schedulers scale each group's ``lr``).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1]; got {layer_decay}")
    pyramids = [m for m in model.modules() if isinstance(m, (SimpleFeaturePyramid, MultiLevelNeck))]
    layer_of: dict[int, tuple[int, int]] = {}  # id(param) -> (layer, depth)
    skip_ids: set[int] = set()
    for pyr in pyramids:
        ids, depth, no_decay = _backbone_layer_ids(pyr)
        layer_of.update({k: (v, depth) for k, v in ids.items()})
        skip_ids |= no_decay
    extra = set(no_weight_decay)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, depth = layer_of.get(id(p), (None, None))
        scale = 1.0 if layer is None else layer_decay ** (depth + 1 - layer)
        decay = not (p.ndim < 2 or id(p) in skip_ids or name in extra)
        key = (scale, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"lr_scale={scale:.4g},{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(p)
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))
