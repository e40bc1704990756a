"""Semantic FPN / UperNet heads, the segmentation model, and sliding-window inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from anchorformer import count_macs
from anchorformer.models.segmentation import (
    FCNHead,
    SegmentationModel,
    SemanticFPNHead,
    UperNetHead,
    build_segmentation_model,
    segmentation_loss,
    segmentation_model_from_config,
)
from anchorformer.tasks.segmentation.inference import predict_probs, rescaled_size, slide_logits, whole_logits

TINY = dict(embed_dim=48, depth=2, num_heads=3, patch_size=8, img_size=64)


def _pyramid(b: int, c: int, h: int, w: int) -> list[torch.Tensor]:
    return [torch.randn(b, c, -(-h // s), -(-w // s)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("head_cls", [SemanticFPNHead, UperNetHead])
def test_heads_give_stride4_logits(head_cls: type[nn.Module]) -> None:
    head = head_cls(16, 7, 8).eval()
    out = head(_pyramid(2, 16, 96, 160))
    assert out.shape == (2, 7, 24, 40)
    aux = FCNHead(16, 7, 8).eval()
    assert aux(_pyramid(2, 16, 96, 160)).shape == (2, 7, 6, 10)
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        head(_pyramid(1, 16, 64, 64)[:3])


@pytest.mark.parametrize("backbone", ["anchorformer_tiny_patch16_224", "deit_tiny_patch16_224"])
@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_model_any_size_and_rebuild(backbone: str, head: str) -> None:
    kw = dict(TINY, num_anchors=8) if backbone.startswith("anchor") else TINY
    model = build_segmentation_model(
        backbone, head, 5, pyramid_channels=16, head_channels=16, aux_head=True, backbone_kwargs=kw
    ).eval()
    x = torch.randn(1, 3, 45, 70)  # odd sizes: padded inside, logits cropped back
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 5, 45, 70)
    strides = [model.pyramid.patch_size / s for s in model.pyramid.scales]
    assert strides == [4, 8, 16, 32]
    again = segmentation_model_from_config(model.config)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), y)


def test_macs_count_the_whole_model() -> None:
    """count_macs(model) = backbone + pyramid + decode head (the auxiliary head is training-only)."""
    model = build_segmentation_model(
        "deit_tiny_patch16_224",
        "upernet",
        150,
        pyramid_channels=16,
        head_channels=16,
        aux_head=True,
        backbone_kwargs=TINY,
    )
    total = count_macs(model, (128, 96))
    pyramid = count_macs(model.pyramid, (128, 96))

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = model.decode_head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(_pyramid(1, 16, 128, 96))

    head = count_macs(HeadOnly(), (1, 1))
    assert total == pyramid + head > pyramid > 0


def test_loss_ignores_255_and_all_ignored_is_zero() -> None:
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 32, 32))
    target[:, :16] = 255
    up = nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    want = nn.functional.cross_entropy(up, target, ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, target), want)
    zero = segmentation_loss(logits, torch.full((2, 32, 32), 255))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.isfinite(logits.grad).all()


class PixelModel(nn.Module):
    """A context-free model: a 1x1 convolution (each output pixel sees only its input pixel)."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class WindowSensitive(nn.Module):
    """Output depends on the whole input (a global mean): sliding differs from whole-image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] + x.mean(dim=(2, 3), keepdim=True)[:, :2]


def test_sliding_window_equals_whole_image_for_context_free_model() -> None:
    model = PixelModel().eval()
    x = torch.randn(2, 3, 70, 95)
    with torch.no_grad():
        whole = whole_logits(model, x)
        for crop, stride in [(32, 21), ((40, 24), (17, 24)), (128, 64)]:  # overlaps, exact tiling, crop > image
            torch.testing.assert_close(slide_logits(model, x, crop, stride, 5), whole, rtol=1e-5, atol=1e-5)
    # and the windows really are windows: a context-sensitive model gives another result
    ctx = WindowSensitive()
    assert not torch.allclose(slide_logits(ctx, x, 32, 21, 2), whole_logits(ctx, x), atol=1e-3)
    with pytest.raises(ValueError, match="must not exceed crop_size"):
        slide_logits(model, x, 16, 17, 5)


def test_predict_probs_flip_and_scales() -> None:
    model = PixelModel().eval()
    x = torch.randn(1, 3, 40, 60)
    ref = model(x).softmax(1)
    # a pixel-wise model is flip-equivariant: flip testing changes nothing
    got = predict_probs(model, x, 5, mode="slide", crop_size=24, stride=16, test_scale=None, flip=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # multi-scale: probabilities resized back to the input's size and averaged
    ms = predict_probs(model, x, 5, mode="whole", test_scale=None, scales=(0.5, 1.0), out_size=(40, 60))
    assert ms.shape == (1, 5, 40, 60)
    torch.testing.assert_close(ms.sum(1), torch.ones(1, 40, 60))
    half = nn.functional.interpolate(x, size=(20, 30), mode="bilinear", align_corners=False)
    half = nn.functional.interpolate(model(half), size=(40, 60), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(ms, (ref + half) / 2)


def test_rescaled_size() -> None:
    # ADE20K protocol: fit inside (2048, 512) keeping the aspect ratio
    assert rescaled_size(375, 500, (2048, 512)) == (512, 683)
    assert rescaled_size(300, 3000, (2048, 512)) == (205, 2048)
    assert rescaled_size(100, 120, (512, 128), ratio=0.5) == (64, 77)
    assert rescaled_size(100, 120, None) == (100, 120)


def test_bad_input() -> None:
    model = SegmentationModel(nn.Identity(), nn.Identity(), 3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="head must be one of"):
        build_segmentation_model("deit_tiny_patch16_224", "deeplab", backbone_kwargs=TINY)
    with pytest.raises(ValueError, match="do not match"):
        build_segmentation_model("deit_tiny_patch16_224", backbone_kwargs=TINY)(
            torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 16, dtype=torch.long)
        )


def test_label_map_figure_has_a_legend_of_the_classes_shown() -> None:
    from anchorformer.data.ade20k import ADE20K_CLASSES
    from anchorformer.viz import plot_segmentation

    img = np.zeros((20, 30, 3), dtype=np.uint8)
    gt = np.zeros((20, 30), dtype=np.uint8)
    gt[:10] = 3  # sky
    pred = np.full((20, 30), 3, dtype=np.uint8)
    pred[15:] = 21  # car
    fig = plot_segmentation([img, img], [gt, gt], [pred, pred], ADE20K_CLASSES, titles=["a", "b"])
    assert len(fig.axes) == 6
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["other (ignored)", "sky", "car"]
