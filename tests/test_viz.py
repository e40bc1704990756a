"""E7 anchor maps: p(token | anchor) checked against the operator's own probabilities."""

from __future__ import annotations

import pytest
import torch

import anchorformer
from anchorformer.ops.anchor_attention import anchor_probabilities
from anchorformer.viz import compute_anchor_maps, images_to_tensor, plot_anchor_maps, real_photographs, save_figure


@pytest.mark.parametrize("anchor_mode", ["learned", "pooled"])
def test_anchor_maps_are_bayes_inverted_anchor_probabilities(anchor_mode):
    model = anchorformer.create_model(
        "anchorformer_tiny_distilled_patch16_224", img_size=32, depth=2, num_anchors=5, anchor_mode=anchor_mode
    )
    x = torch.randn(2, 3, 32, 32)
    maps = compute_anchor_maps(model, x, layers=[1])
    assert maps[1].shape == (2, 5, 2, 2)
    # independent route: recompute the block input by running block 0 by hand
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        tokens = model.blocks[0](tokens)
        h = model.blocks[1].norm1(tokens)
        attn = model.blocks[1].attn
        qk = attn.in_proj(h)[..., :192].reshape(2, -1, 3, 64).transpose(1, 2)
        anchors = attn.anchors if attn.anchors is not None else attn.pooled_anchors(qk)
        a = anchor_probabilities(qk, anchors)  # (B, H, N, M)
        col = a / a.sum(dim=2, keepdim=True)
        expected = col[:, :, 2:].mean(1).transpose(1, 2).reshape(2, 5, 2, 2)
    torch.testing.assert_close(maps[1], expected)
    # over all tokens (prefix included) each anchor's distribution sums to one
    assert (maps[1].sum((-1, -2)) <= 1 + 1e-6).all()
    assert torch.allclose(maps[("degree", 1)].sum(-1), torch.full((2,), 6.0))


def test_anchor_maps_on_photographs_and_bad_layer(tmp_path):
    photos = real_photographs(("astronaut", "chelsea"))
    x, shown = images_to_tensor(list(photos.values()), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 32, 32) and shown[0].shape == (32, 32, 3)
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=2, num_anchors=4)
    maps = compute_anchor_maps(model, x)
    paths = save_figure(plot_anchor_maps(shown, maps, [0, 1], 3, list(photos)), tmp_path / "maps")
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="layer 5"):
        compute_anchor_maps(model, x, layers=[5])
    with pytest.raises(ValueError, match="no image named"):
        real_photographs(("not_a_photo",))
