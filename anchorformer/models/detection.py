"""COCO detectors over plain AnchorFormer / DeiT backbones (REFERENCE E5).

Mask R-CNN (He et al., ICCV 2017) and, as a second detector, RetinaNet (Lin et al., ICCV 2017)
from torchvision, with the backbone + simple feature pyramid of ViTDet (Li et al., ECCV 2022,
:mod:`anchorformer.models.pyramid`) as their feature extractor: the pyramid's stride 4–32 maps
(each with ``out_channels`` channels after the 1x1 + 3x3 neck convolutions) plus a stride-64
level by max pooling, as torchvision's FPN gives them.

The COCO training protocol for targets lives here too (:func:`sanitize_targets`): crowd regions
and degenerate boxes are removed from the training targets (torchvision's detectors have no
notion of ``iscrowd``), images without objects stay as negatives. Evaluation keeps the crowd
regions in the ground truth (:mod:`anchorformer.tasks.detection.coco_eval`).

"Comparable FLOPs" (the abstract's detection claim) is made concrete by
:func:`comparable_input_scale`: the input scale at which a backbone's MACs at 1333x800 match a
target, e.g. DeiT scaled down to the MACs of AnchorFormer at full size.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from .pyramid import SimpleFeaturePyramid, backbone_macs

__all__ = [
    "DETECTORS",
    "DetectorConfig",
    "PyramidBackbone",
    "build_detector",
    "comparable_input_scale",
    "sanitize_targets",
]

_logger = logging.getLogger(__name__)

DETECTORS = ("mask_rcnn", "retinanet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectorConfig:
    """Everything that defines a detector's architecture (saved in its checkpoints)."""

    backbone: str = "anchorformer_tiny_patch16_224"  # registered model name (AnchorFormer or DeiT)
    num_classes: int = 80  # object categories, background excluded
    detector: str = "mask_rcnn"  # mask_rcnn | retinanet
    backbone_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # create_model args (img_size, embed_dim, patch_size, num_anchors, ...)
    drop_path_rate: float = 0.1  # stochastic depth of the backbone
    grad_checkpointing: bool = False  # recompute backbone blocks in backward (memory at 1333x800)
    out_channels: int = 256  # channels of every pyramid level
    norm: str = "LN"  # normalisation in the pyramid and the heads: LN (ViTDet) | GN | BN | ""
    min_size: int = 800  # shorter image side after resizing (torchvision's transform)
    max_size: int = 1333  # longer side cap
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level (strides 4..64; RetinaNet 8..128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_conv_depth: int = 2  # convolutions of the RPN head (ViTDet: 2)
    rpn_pre_nms_top_n_train: int = 2000  # proposals per level before NMS
    rpn_post_nms_top_n_train: int = 1000  # proposals per image after NMS
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_head: str = "4conv1fc"  # 4conv1fc (ViTDet, normed convs) | 2fc (the original Mask R-CNN)
    representation_size: int = 1024  # width of the box head's fully connected layer(s)
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box loss
    box_score_thresh: float = 0.05  # detections below this score are dropped
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    mask_head_layers: int = 4  # 3x3 convolutions of the mask head
    mask_head_channels: int = 256
    train_resize: bool = True  # resize training images to min_size/max_size (false: the data did it, LSJ)
    size_divisible: int = 32  # a batch is zero-padded to a multiple of this (LSJ: the square, ViTDet's square pad)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DetectorConfig:
        """Build from a mapping; keys that are not fields raise a KeyError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KeyError(f"unknown detector option(s) {unknown}; valid: {sorted(names)}")
        cfg = cls(**dict(values))
        cfg.anchor_sizes = tuple(int(s) for s in cfg.anchor_sizes)
        cfg.aspect_ratios = tuple(float(r) for r in cfg.aspect_ratios)
        cfg.backbone_kwargs = dict(cfg.backbone_kwargs or {})
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples), for checkpoints and JSON."""
        d = asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes)
        d["aspect_ratios"] = list(self.aspect_ratios)
        return d


class PyramidBackbone(nn.Module):
    """The feature extractor torchvision's detectors expect: an OrderedDict of maps + ``out_channels``.

    Mask R-CNN: the pyramid's levels "0".."3" (strides 4..32) and "pool" (stride 64, a stride-2
    max pool of the last level, torchvision's ``LastLevelMaxPool``). RetinaNet: levels "1".."3"
    (strides 8..32), "p6" and "p7" (stride-2 3x3 convolutions, torchvision's ``LastLevelP6P7``).
    """

    def __init__(self, pyramid: SimpleFeaturePyramid, mode: str = "mask_rcnn") -> None:
        super().__init__()
        if mode not in DETECTORS:
            raise ValueError(f"PyramidBackbone: mode must be one of {DETECTORS}; got {mode!r}")
        if len(pyramid.strides) != 4:
            raise ValueError(f"PyramidBackbone: expected a 4-level pyramid; got strides {pyramid.strides}")
        self.pyramid = pyramid
        self.mode = mode
        self.out_channels = pyramid.out_channels
        if mode == "retinanet":
            c = pyramid.out_channels
            self.p6 = nn.Conv2d(c, c, 3, stride=2, padding=1)
            self.p7 = nn.Conv2d(c, c, 3, stride=2, padding=1)
            for m in (self.p6, self.p7):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    @property
    def strides(self) -> tuple[float, ...]:
        s = self.pyramid.strides
        return (*s, 2 * s[-1]) if self.mode == "mask_rcnn" else (*s[1:], 2 * s[-1], 4 * s[-1])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Args: x (B, 3, H, W). Returns 5 maps (B, out_channels, ·, ·) at ``self.strides``."""
        feats = self.pyramid(x)
        last = feats["3"]
        if self.mode == "mask_rcnn":
            feats["pool"] = F.max_pool2d(last, kernel_size=1, stride=2)
            return feats
        p6 = self.p6(last)
        p7 = self.p7(F.relu(p6))
        return OrderedDict([("1", feats["1"]), ("2", feats["2"]), ("3", last), ("p6", p6), ("p7", p7)])


def _norm_layer(norm: str | None):
    if norm == "LN":
        return partial(LayerNorm2d, eps=1e-6)
    if norm == "GN":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if norm == "BN":
        return nn.BatchNorm2d
    return None


def build_detector(
    cfg: DetectorConfig | Mapping[str, Any],
    *,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
) -> nn.Module:
    """Mask R-CNN or RetinaNet over an AnchorFormer or DeiT backbone with a simple feature pyramid.

    Args:
        cfg: a :class:`DetectorConfig` or a mapping of its fields.
        checkpoint: classification weights to initialise the backbone (E1 checkpoint, official
            AnchorFormer or timm DeiT weights); heads are ignored. ``None``: random init.

    Returns:
        A torchvision detector: ``model(images, targets)`` returns the loss dict in training,
        ``model(images)`` a list of ``{"boxes", "labels", "scores"[, "masks"]}`` in eval mode
        (boxes in the input images' pixel coordinates). ``model.backbone.pyramid`` is the
        :class:`SimpleFeaturePyramid`, ``model.detector_config`` the config.
    """
    if not isinstance(cfg, DetectorConfig):
        cfg = DetectorConfig.from_dict(cfg)
    if cfg.detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}; got {cfg.detector!r}")
    if cfg.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object categories, background excluded); got {cfg.num_classes}")
    if len(cfg.anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes must give one size per level (5 levels); got {cfg.anchor_sizes}")
    bkw = dict(cfg.backbone_kwargs)
    patch = int(bkw.get("patch_size", 16))
    scales = tuple(patch / s for s in (4, 8, 16, 32))  # strides 4, 8, 16, 32 whatever the patch
    pyramid = SimpleFeaturePyramid(
        cfg.backbone,
        cfg.out_channels,
        scales,
        norm=cfg.norm,
        drop_path_rate=cfg.drop_path_rate,
        checkpoint=checkpoint,
        grad_checkpointing=cfg.grad_checkpointing,
        backbone_kwargs=bkw,
    )
    backbone = PyramidBackbone(pyramid, cfg.detector)
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes), aspect_ratios=(tuple(cfg.aspect_ratios),) * 5
    )
    n_cls = cfg.num_classes + 1  # + background (torchvision's convention, labels 1..num_classes)
    common = dict(
        min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )
    C = cfg.out_channels
    norm = _norm_layer(cfg.norm)
    if cfg.detector == "retinanet":
        anchors = AnchorGenerator(
            sizes=tuple(tuple(int(s * 2 ** (k / 3)) for k in range(3)) for s in cfg.anchor_sizes),
            aspect_ratios=(tuple(cfg.aspect_ratios),) * 5,
        )
        model = RetinaNet(
            backbone,
            n_cls,
            anchor_generator=anchors,
            score_thresh=cfg.box_score_thresh,
            nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.box_detections_per_img,
            **common,
        )
    else:
        if cfg.box_head == "4conv1fc":
            box_head: nn.Module = FastRCNNConvFCHead((C, 7, 7), [C] * 4, [cfg.representation_size], norm_layer=norm)
        elif cfg.box_head == "2fc":
            box_head = TwoMLPHead(C * 7 * 7, cfg.representation_size)
        else:
            raise ValueError(f"box_head must be '4conv1fc' or '2fc'; got {cfg.box_head!r}")
        names = ["0", "1", "2", "3"]
        model = MaskRCNN(
            backbone,
            num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(C, anchors.num_anchors_per_location()[0], conv_depth=cfg.rpn_conv_depth),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=0),
            box_head=box_head,
            box_predictor=FastRCNNPredictor(cfg.representation_size, n_cls),
            box_score_thresh=cfg.box_score_thresh,
            box_nms_thresh=cfg.box_nms_thresh,
            box_detections_per_img=cfg.box_detections_per_img,
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=0),
            mask_head=MaskRCNNHeads(C, [cfg.mask_head_channels] * cfg.mask_head_layers, 1, norm_layer=norm),
            mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, n_cls),
            **common,
        )
    model.transform.size_divisible = int(cfg.size_divisible)
    model.transform._skip_resize = not cfg.train_resize  # torchvision's switch (its references' LSJ)
    model.detector_config = cfg
    return model


def sanitize_targets(
    targets: Sequence[Mapping[str, Any]], *, min_size: float = 1e-2, with_masks: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Training targets under the COCO protocol, in the form torchvision's detectors take.

    Crowd regions (``iscrowd == 1``) and degenerate boxes (width or height below ``min_size``
    pixels) are removed; an image without objects keeps empty targets (it still trains the
    background). Keys other than boxes, labels and masks are dropped.

    Args:
        targets: per image ``boxes`` (K, 4) xyxy, ``labels`` (K,), optionally ``iscrowd`` (K,)
            and ``masks`` (K, H, W).
        min_size: the smallest kept box side, in pixels.
        with_masks: keep ``masks`` (Mask R-CNN needs them; RetinaNet does not).

    Returns:
        One dict per image: ``boxes`` (K', 4) float32, ``labels`` (K',) int64[, ``masks`` (K', H, W) uint8].

    Raises:
        ValueError: a target lacks ``boxes``/``labels`` or has inconsistent lengths.
    """
    out = []
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"target {i}: expected keys 'boxes' and 'labels'; got {sorted(t)}")
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
        k = boxes.shape[0]
        if labels.shape[0] != k:
            raise ValueError(f"target {i} (image_id {t.get('image_id')}): {k} boxes but {labels.shape[0]} labels")
        keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
        if "iscrowd" in t:
            crowd = torch.as_tensor(t["iscrowd"]).reshape(-1)
            if crowd.shape[0] != k:
                raise ValueError(f"target {i}: {k} boxes but {crowd.shape[0]} iscrowd flags")
            keep &= crowd == 0
        new = {"boxes": boxes[keep], "labels": labels[keep]}
        if with_masks:
            if "masks" not in t:
                raise ValueError(f"target {i} (image_id {t.get('image_id')}): Mask R-CNN needs 'masks'")
            masks = torch.as_tensor(t["masks"])
            if masks.shape[0] != k:
                raise ValueError(f"target {i}: {k} boxes but {masks.shape[0]} masks")
            new["masks"] = masks[keep].to(torch.uint8)
        out.append(new)
    return out


def comparable_input_scale(
    pyramid: SimpleFeaturePyramid,
    target_macs: int,
    img_size: tuple[int, int] = (800, 1333),
    *,
    tol: float = 1e-3,
) -> tuple[float, int]:
    """The input scale r at which the backbone's MACs on (r·H, r·W) are closest to ``target_macs``.

    The backbone's MACs grow monotonically with r (in steps: the input is padded to the patch
    size), so r is found by bisection on (0, 1]. Use a meta-device pyramid to count for free.

    Args:
        pyramid: the backbone to scale (e.g. DeiT).
        target_macs: the MACs to match (e.g. AnchorFormer's backbone at 1333x800).
        img_size: the reference (H, W).
        tol: bisection stops when the scale interval is below ``tol``.

    Returns:
        ``(r, macs)``: the scale and the backbone MACs at ``(round(r·H), round(r·W))``.

    Raises:
        ValueError: ``target_macs`` exceeds the backbone's MACs at scale 1 (nothing to scale down).
    """

    def macs_at(r: float) -> int:
        return backbone_macs(pyramid, (max(1, round(r * img_size[0])), max(1, round(r * img_size[1]))))

    full = macs_at(1.0)
    if target_macs > full:
        raise ValueError(
            f"comparable_input_scale: target {target_macs / 1e9:.3f} GMACs exceeds the backbone's "
            f"{full / 1e9:.3f} GMACs at {img_size}; scaling up is not supported"
        )
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if macs_at(mid) <= target_macs:
            lo = mid
        else:
            hi = mid
    best = min((r for r in (lo, hi) if r > 0), key=lambda r: abs(macs_at(r) - target_macs))
    return best, macs_at(best)
