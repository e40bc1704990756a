"""Semantic segmentation over a plain backbone's feature pyramid: Semantic FPN and UperNet (experiment E6).

The plain backbone (AnchorFormer or DeiT) gives maps at strides 4, 8, 16 and 32 through one of two
necks (``neck``): ``"multilevel"``, MMSegmentation's ``MultiLevelNeck`` over four blocks (2, 5, 8,
11 of 12, rescaled by 4, 2, 1, 0.5), as its ViT/DeiT + UperNet configs do
(:class:`anchorformer.models.pyramid.MultiLevelNeck`); or ``"simple"``, ViTDet's simple feature
pyramid from the last block's stride-16 map (:class:`anchorformer.models.pyramid.SimpleFeaturePyramid`,
the ablation, and what models saved before the choice existed use). Two decode heads read the
four maps, as the field builds them for ADE20K (MMSegmentation's ``FPNHead`` and ``UPerHead``):

- **Semantic FPN** (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019): each
  level goes through 3x3 conv-norm-ReLU blocks and 2x upsamplings until stride 4, the levels
  are summed, then dropout and a 1x1 classifier.
- **UperNet** (Xiao et al., "Unified Perceptual Parsing", ECCV 2018): a pyramid pooling module
  (scales 1, 2, 3, 6) on the stride-32 map, a top-down path with lateral 1x1 and output 3x3
  convolutions, the four levels concatenated at stride 4, a 3x3 fusion, dropout and a 1x1
  classifier.
- An optional auxiliary **FCN head** on the stride-16 map (loss weight 0.4).

Logits come out at stride 4 and are upsampled (bilinear) to the label map's size for the
cross-entropy, whose ignore index is 255 (ADE20K's "other").

Letters used in shapes: B batch, C channels, K classes, H, W the input's height and width.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "HEADS",
    "ConvNormAct",
    "FCNHead",
    "SegmentationModel",
    "SemanticFPNHead",
    "UperNetHead",
    "build_segmentation_model",
    "segmentation_loss",
    "segmentation_model_from_config",
]

_logger = logging.getLogger(__name__)

HEADS = ("fpn", "upernet")
NORMS = ("bn", "gn", "syncbn")
IGNORE_INDEX = 255


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":
        return nn.SyncBatchNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}; got {kind!r}")


class ConvNormAct(nn.Sequential):
    """``Conv2d(k x k, no bias) -> norm -> ReLU``, MMSegmentation's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str = "bn") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _as_list(features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], n: int, who: str) -> list[torch.Tensor]:
    maps = list(features.values()) if isinstance(features, Mapping) else list(features)
    if len(maps) != n:
        raise ValueError(f"{who}: expected {n} feature maps (strides 4, 8, 16, 32); got {len(maps)}")
    return maps


class _ClassifierMixin:
    """Dropout + 1x1 classifier shared by the heads (``cls_seg``)."""

    def _init_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))  # (B, K, h, w)


class SemanticFPNHead(_ClassifierMixin, nn.Module):
    """The semantic branch of Panoptic FPN.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: K.
        channels: width of the head (128 in the standard recipe).
        strides: strides of the input levels, finest first.
        norm: ``"bn"``, ``"syncbn"`` or ``"gn"``.
        dropout: before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 128,
        strides: Sequence[int] = (4, 8, 16, 32),
        norm: str = "bn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.scale_heads = nn.ModuleList()
        for s in self.strides:
            n = max(1, int(round(math.log2(s / self.strides[0]))))
            layers: list[nn.Module] = []
            for k in range(n):
                layers.append(ConvNormAct(in_channels if k == 0 else channels, channels, 3, norm))
                if s != self.strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self._init_classifier(channels, num_classes, dropout)

    def forward(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: features: the pyramid, finest first, (B, C_in, H/s, W/s) each.

        Returns: (B, K, H/4, W/4) logits.
        """
        maps = _as_list(features, len(self.strides), "SemanticFPNHead")
        out = self.scale_heads[0](maps[0])  # (B, C, H/4, W/4)
        for head, x in zip(self.scale_heads[1:], maps[1:]):
            out = out + _resize(head(x), out.shape[-2:])
        return self.cls_seg(out)


class UperNetHead(_ClassifierMixin, nn.Module):
    """UperNet: pyramid pooling on the coarsest level plus a top-down FPN, fused at stride 4.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: K.
        channels: width of the head (512 in the standard recipe).
        num_levels: pyramid levels (4: strides 4, 8, 16, 32).
        pool_scales: output sizes of the pyramid pooling module.
        norm: ``"bn"``, ``"syncbn"`` or ``"gn"``.
        dropout: before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        num_levels: int = 4,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "bn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1, norm)) for s in pool_scales
        )
        self.ppm_bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList(ConvNormAct(in_channels, channels, 1, norm) for _ in range(num_levels - 1))
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in range(num_levels - 1))
        self.fpn_bottleneck = ConvNormAct(num_levels * channels, channels, 3, norm)
        self._init_classifier(channels, num_classes, dropout)

    def psp(self, x: torch.Tensor) -> torch.Tensor:
        """Pyramid pooling: (B, C_in, h, w) -> (B, C, h, w)."""
        pooled = [_resize(stage(x), x.shape[-2:]) for stage in self.ppm]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: features: the pyramid, finest first, (B, C_in, H/s, W/s) each.

        Returns: (B, K, H/4, W/4) logits.
        """
        maps = _as_list(features, self.num_levels, "UperNetHead")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps[:-1])]
        laterals.append(self.psp(maps[-1]))
        for i in range(self.num_levels - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))  # (B, C, H/4, W/4)
        return self.cls_seg(fused)


class FCNHead(_ClassifierMixin, nn.Module):
    """Auxiliary head: ``num_convs`` 3x3 conv-norm-ReLU blocks and a classifier on one level."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        level: int = 2,
        num_convs: int = 1,
        norm: str = "bn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.level = level
        self.convs = nn.Sequential(
            *(ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm) for i in range(num_convs))
        )
        self._init_classifier(channels, num_classes, dropout)

    def forward(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        maps = list(features.values()) if isinstance(features, Mapping) else list(features)
        return self.cls_seg(self.convs(maps[self.level]))  # (B, K, H/s, W/s)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels; logits are upsampled to the labels' size.

    Args:
        logits: (B, K, h, w).
        target: (B, H, W) int64 in [0, K) or ``ignore_index``.
        ignore_index: label of pixels left out.
        normalizer: divide the summed loss by this instead of this batch's labelled-pixel count
            (data parallel: the mean count per process, so that averaging the processes'
            gradients gives the mean over the labelled pixels of the whole global batch).

    Returns:
        A scalar; 0 (with a gradient) when every pixel is ignored, instead of NaN.
    """
    if target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B, H, W) with B={logits.shape[0]}; got {tuple(target.shape)}")
    k = logits.shape[1]
    # Channels-last: the upsampling and the log-softmax over K run on contiguous rows (about
    # 1.4x faster on the CPU for K = 150 than NCHW); the value is the same.
    logits = _resize(logits.float().contiguous(memory_format=torch.channels_last), target.shape[-2:])
    rows = logits.permute(0, 2, 3, 1).reshape(-1, k)  # (B*H*W, K)
    total = F.cross_entropy(rows, target.reshape(-1), ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum() if normalizer is None else torch.as_tensor(normalizer)
    return total / count.to(total).clamp(min=1)


class SegmentationModel(nn.Module):
    """Backbone pyramid + decode head (+ optional auxiliary head), MMSegmentation's ``EncoderDecoder``.

    ``forward(images)`` returns logits at the input's size, so the model can be counted
    (:func:`anchorformer.count_macs`) and used for inference directly; ``forward_train(images,
    labels)`` returns the losses. Inputs of any size are padded (zeros, bottom/right) to a
    multiple of ``size_divisor`` and the logits cropped back.

    Args:
        pyramid: module mapping (B, 3, H, W) to an ordered mapping of 4 maps at strides 4..32.
        decode_head: :class:`SemanticFPNHead` or :class:`UperNetHead`.
        num_classes: K.
        aux_head: optional :class:`FCNHead`.
        aux_weight: weight of the auxiliary loss.
        size_divisor: input sides are padded to a multiple of this.
        ignore_index: label of unlabelled pixels.
        config: the arguments of :func:`build_segmentation_model` (saved with checkpoints).
    """

    def __init__(
        self,
        pyramid: nn.Module,
        decode_head: nn.Module,
        num_classes: int,
        aux_head: nn.Module | None = None,
        aux_weight: float = 0.4,
        size_divisor: int = 32,
        ignore_index: int = IGNORE_INDEX,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.size_divisor = size_divisor
        self.ignore_index = ignore_index
        self.config = dict(config or {})
        self.in_chans = 3

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        return F.pad(images, (0, pw, 0, ph)) if ph or pw else images

    def features(self, images: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The pyramid of (padded) images: 4 maps (B, C, H'/s, W'/s), s = 4, 8, 16, 32."""
        return self.pyramid(self._pad(images))

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        normalizer: torch.Tensor | float | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits, or the losses when ``labels`` are given (so that DDP sees the training pass).

        Args:
            images: (B, 3, H, W), normalised.
            labels: optional (B, H, W) int64; see :meth:`forward_train`.
            normalizer: see :meth:`forward_train`.

        Returns:
            (B, K, H, W) logits, or the dict of :meth:`forward_train`.
        """
        if labels is not None:
            return self.forward_train(images, labels, normalizer)
        h, w = images.shape[-2:]
        logits = self.decode_head(self.features(images))  # (B, K, H'/4, W'/4)
        hp, wp = -(-h // self.size_divisor) * self.size_divisor, -(-w // self.size_divisor) * self.size_divisor
        logits = _resize(logits, (hp, wp))
        return logits[..., :h, :w]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | float | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch.

        Args:
            images: (B, 3, H, W) normalised, H and W multiples of ``size_divisor`` (training crops).
            labels: (B, H, W) int64, ``ignore_index`` for unlabelled (and padded) pixels.
            normalizer: see :func:`segmentation_loss` (default: this batch's labelled pixels).

        Returns:
            ``{"loss": total, "loss_decode": ..., "loss_aux": ...}`` (``loss_aux`` with an aux head).
        """
        if labels.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)} in (H, W)")
        h, w = images.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            images = self._pad(images)
            labels = F.pad(labels, (0, images.shape[-1] - w, 0, images.shape[-2] - h), value=self.ignore_index)
        feats = self.pyramid(images)
        losses = {"loss_decode": segmentation_loss(self.decode_head(feats), labels, self.ignore_index, normalizer)}
        total = losses["loss_decode"]
        if self.aux_head is not None:
            losses["loss_aux"] = segmentation_loss(self.aux_head(feats), labels, self.ignore_index, normalizer)
            total = total + self.aux_weight * losses["loss_aux"]
        losses["loss"] = total
        return losses


def build_segmentation_model(
    backbone: str | nn.Module,
    head: str = "fpn",
    num_classes: int = 150,
    *,
    pyramid_channels: int = 256,
    pyramid_norm: str = "LN",
    head_channels: int | None = None,
    aux_head: bool = False,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    norm: str = "bn",
    dropout: float = 0.1,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    drop_path_rate: float = 0.0,
    backbone_kwargs: dict[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    neck: str = "simple",
    neck_indices: Sequence[int] | None = None,
) -> SegmentationModel:
    """Build a Semantic FPN or UperNet segmentation model over a multi-level neck or the simple pyramid.

    The neck's scales are chosen from the backbone's patch size P so that the four maps are
    at strides 4, 8, 16 and 32 (P = 16: scales 4, 2, 1, 1/2; P = 8: 2, 1, 1/2, 1/4).

    Args:
        backbone: a registered model name (``anchorformer_tiny_patch16_224``,
            ``deit_small_patch16_224``, ...) or a built timm ViT.
        head: ``"fpn"`` (Semantic FPN) or ``"upernet"``.
        num_classes: K (150 for ADE20K).
        pyramid_channels: channels of every pyramid level (256 in the standard recipes).
        pyramid_norm: normalisation inside the pyramid (``"LN"`` as ViTDet, ``"GN"``, ``"BN"``, ``""``).
        head_channels: decode head width (default 128 for FPN, 512 for UperNet).
        aux_head: add the auxiliary FCN head on the stride-16 map.
        aux_channels: its width.
        aux_weight: its loss weight.
        norm: ``"bn"`` (a distributed run converts it to ``"syncbn"``), or ``"gn"``.
        dropout: before the classifiers.
        pool_scales: UperNet's pyramid pooling sizes.
        drop_path_rate: the backbone's stochastic depth.
        backbone_kwargs: the backbone's constructor arguments (``embed_dim``, ``depth``,
            ``num_heads``, ``patch_size``, ``img_size`` of the pre-training grid, ``num_anchors``, ...).
        checkpoint: classification weights to initialise the backbone (an E1 checkpoint);
            not part of ``config``.
        neck: ``"multilevel"`` (four blocks, MMSegmentation's ViT neck; ``pyramid_norm`` unused)
            or ``"simple"`` (ViTDet's pyramid from the last block; the default of models saved
            before this choice).
        neck_indices: the blocks the multi-level neck reads; None: the last of each quarter
            (:func:`anchorformer.models.pyramid.default_neck_indices`: 2, 5, 8, 11 of 12).

    Returns:
        A :class:`SegmentationModel` whose ``config`` holds these arguments (when ``backbone``
        is a name), so that :func:`segmentation_model_from_config` can rebuild it.
    """
    from .pyramid import NECKS, MultiLevelNeck, SimpleFeaturePyramid, build_backbone

    if neck not in NECKS:
        raise ValueError(f"neck must be one of {NECKS}; got {neck!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}; got {head!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    config = {
        "backbone": backbone if isinstance(backbone, str) else None,
        "head": head,
        "num_classes": int(num_classes),
        "pyramid_channels": int(pyramid_channels),
        "pyramid_norm": pyramid_norm,
        "head_channels": head_channels,
        "aux_head": bool(aux_head),
        "aux_channels": int(aux_channels),
        "aux_weight": float(aux_weight),
        "norm": norm,
        "dropout": float(dropout),
        "pool_scales": [int(s) for s in pool_scales],
        "drop_path_rate": float(drop_path_rate),
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "neck": neck,
        "neck_indices": None if neck_indices is None else [int(i) for i in neck_indices],
    }
    if isinstance(backbone, str):
        backbone = build_backbone(
            backbone, drop_path_rate=drop_path_rate, checkpoint=checkpoint, **dict(backbone_kwargs or {})
        )
        checkpoint = None
    patch = int(backbone.patch_embed.patch_size[0])
    if 32 % patch or patch < 2:
        raise ValueError(f"the backbone's patch size must divide 32 (2, 4, 8, 16 or 32); got {patch}")
    scales = tuple(patch / s for s in (4, 8, 16, 32))
    if neck == "multilevel":
        pyramid: nn.Module = MultiLevelNeck(
            backbone, out_channels=pyramid_channels, scales=scales, indices=neck_indices, checkpoint=checkpoint
        )
    else:
        pyramid = SimpleFeaturePyramid(
            backbone, out_channels=pyramid_channels, scales=scales, norm=pyramid_norm, checkpoint=checkpoint
        )
    channels = int(pyramid.out_channels)
    if head == "fpn":
        decode: nn.Module = SemanticFPNHead(channels, num_classes, head_channels or 128, norm=norm, dropout=dropout)
    else:
        decode = UperNetHead(
            channels, num_classes, head_channels or 512, pool_scales=pool_scales, norm=norm, dropout=dropout
        )
    aux = FCNHead(channels, num_classes, aux_channels, level=2, norm=norm, dropout=dropout) if aux_head else None
    return SegmentationModel(pyramid, decode, num_classes, aux, aux_weight, config=config)


def segmentation_model_from_config(config: Mapping[str, Any]) -> SegmentationModel:
    """Rebuild a model from the ``config`` a checkpoint saved (weights not loaded)."""
    cfg = dict(config)
    backbone = cfg.pop("backbone", None)
    if not backbone:
        raise ValueError("model config has no backbone name; it was built from a module and cannot be rebuilt")
    unknown = set(cfg) - set(_CONFIG_KEYS)
    if unknown:
        raise KeyError(f"model config has unknown keys {sorted(unknown)}; expected some of {sorted(_CONFIG_KEYS)}")
    return build_segmentation_model(backbone, **cfg)


_CONFIG_KEYS = (
    "head",
    "num_classes",
    "pyramid_channels",
    "pyramid_norm",
    "head_channels",
    "aux_head",
    "aux_channels",
    "aux_weight",
    "norm",
    "dropout",
    "pool_scales",
    "drop_path_rate",
    "backbone_kwargs",
    "neck",
    "neck_indices",
)
