"""Mask R-CNN / RetinaNet over AnchorFormer and DeiT pyramids: training steps, COCO target protocol."""

from __future__ import annotations

import pytest
import torch

from anchorformer.data.coco import CocoDetection, detection_collate
from anchorformer.models.detection import (
    DetectorConfig,
    PyramidBackbone,
    build_detector,
    comparable_input_scale,
    sanitize_targets,
)
from anchorformer.models.pyramid import SimpleFeaturePyramid, backbone_macs

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def tiny_config(backbone: str, detector: str = "mask_rcnn", num_classes: int = 3) -> DetectorConfig:
    kw = dict(TINY, num_anchors=8) if backbone.startswith("anchor") else dict(TINY)
    return DetectorConfig(
        backbone=backbone,
        num_classes=num_classes,
        detector=detector,
        backbone_kwargs=kw,
        drop_path_rate=0.0,
        out_channels=32,
        min_size=96,
        max_size=128,
        anchor_sizes=(16, 32, 64, 128, 256),
        rpn_conv_depth=1,
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64,
        box_head="2fc",
        representation_size=64,
        box_batch_size_per_image=32,
        box_detections_per_img=20,
        mask_head_layers=1,
        mask_head_channels=16,
    )


@pytest.fixture(scope="module")
def train_batch(mini_data) -> tuple[list[torch.Tensor], list[dict]]:
    ds = CocoDetection(mini_data / "coco", "train")
    # four images with objects, one of them with a crowd region
    picks = [i for i in range(len(ds)) if len(ds.annotations(ds.ids[i]))][:3]
    crowd = next(i for i in range(len(ds)) if any(a["iscrowd"] for a in ds.annotations(ds.ids[i])))
    return detection_collate([ds[i] for i in picks + [crowd]])


@pytest.mark.parametrize("backbone", ["anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_mask_rcnn_trains_on_the_mini_set(backbone: str, train_batch) -> None:
    model = build_detector(tiny_config(backbone))
    images, targets = train_batch
    targets = sanitize_targets(targets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss_dict = model(images, targets)
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(loss_dict.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert model.backbone.pyramid.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model(images[:1])
    h, w = images[0].shape[-2:]
    assert out["boxes"].shape[1] == 4 and out["masks"].shape[1:] == (1, h, w)
    assert len(out["boxes"]) <= 20


def test_retinanet_step(train_batch) -> None:
    model = build_detector(tiny_config("anchorformer_tiny_patch16_224", "retinanet"))
    assert isinstance(model.backbone, PyramidBackbone) and model.backbone.strides == (8, 16, 32, 64, 128)
    images, targets = train_batch
    loss_dict = model(images, sanitize_targets(targets, with_masks=False))
    assert set(loss_dict) == {"classification", "bbox_regression"}
    loss = sum(loss_dict.values())
    assert torch.isfinite(loss)
    loss.backward()


def test_coco_protocol_for_training_targets() -> None:
    h, w = 40, 50
    masks = torch.zeros(4, h, w, dtype=torch.uint8)
    masks[0, 5:20, 5:20] = 1
    target = {
        "boxes": torch.tensor([[5.0, 5, 20, 20], [10, 10, 10, 30], [0, 0, 50, 40], [30, 5, 45, 5.001]]),
        "labels": torch.tensor([1, 2, 3, 1]),
        "iscrowd": torch.tensor([0, 0, 1, 0]),
        "masks": masks,
        "image_id": 7,
    }
    (clean,) = sanitize_targets([target])
    # the zero-width box (1), the crowd region (2) and the sub-pixel box (3) are gone
    torch.testing.assert_close(clean["boxes"], torch.tensor([[5.0, 5, 20, 20]]))
    assert clean["labels"].tolist() == [1] and clean["masks"].shape == (1, h, w)
    assert set(clean) == {"boxes", "labels", "masks"}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w)}
    (e,) = sanitize_targets([empty])
    assert e["boxes"].shape == (0, 4) and e["masks"].shape == (0, h, w) and e["masks"].dtype == torch.uint8
    with pytest.raises(ValueError, match="needs 'masks'"):
        sanitize_targets([{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64)}])
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        sanitize_targets([{"boxes": torch.zeros(2, 4), "labels": torch.ones(1, dtype=torch.int64)}], with_masks=False)


def test_bad_images_train_without_crash() -> None:
    """An image without annotations, one with only a crowd region and a zero-width box."""
    model = build_detector(tiny_config("anchorformer_tiny_patch16_224"))
    model.train()
    h, w = 90, 110
    images = [torch.rand(3, h, w), torch.rand(3, h, w)]
    crowd_mask = torch.zeros(2, h, w, dtype=torch.uint8)
    crowd_mask[0, 10:60, 10:60] = 1
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w)},
        {
            "boxes": torch.tensor([[10.0, 10, 60, 60], [20, 20, 20, 40]]),
            "labels": torch.tensor([2, 1]),
            "iscrowd": torch.tensor([1, 0]),
            "masks": crowd_mask,
        },
    ]
    loss_dict = model(images, sanitize_targets(targets))
    loss = sum(loss_dict.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert (
        float(loss_dict["loss_box_reg"].detach()) == 0.0 and float(loss_dict["loss_mask"].detach()) == 0.0
    )  # nothing to regress


def test_comparable_input_scale() -> None:
    with torch.device("meta"):
        deit = SimpleFeaturePyramid("deit_tiny_patch16_224", 8, (1.0,))
        anchor = SimpleFeaturePyramid("anchorformer_tiny_patch16_224", 8, (1.0,))
    target = backbone_macs(anchor)
    assert target < backbone_macs(deit)  # O(N·M) vs O(N²) at 4,200 tokens
    r, macs = comparable_input_scale(deit, target)
    assert 0.2 < r < 1.0
    assert macs == backbone_macs(deit, (round(800 * r), round(1333 * r)))
    assert abs(macs - target) / target < 0.05
    # self-consistency: DeiT's own MACs at half size give back a scale of about one half
    half = backbone_macs(deit, (400, 667))
    r2, macs2 = comparable_input_scale(deit, half)
    assert abs(r2 - 0.5) < 0.02 and abs(macs2 - half) / half < 0.03
    with pytest.raises(ValueError, match="exceeds"):
        comparable_input_scale(anchor, 2 * backbone_macs(deit))


def test_detector_config_checks() -> None:
    with pytest.raises(KeyError, match="bogus"):
        DetectorConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="detector must be"):
        build_detector(DetectorConfig(detector="yolo"))
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_detector(DetectorConfig(anchor_sizes=(32, 64)))
    cfg = tiny_config("deit_tiny_patch16_224")
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
