"""torchvision's create_feature_extractor (FX), with its default tracer, on every variant."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from anchorformer.models import MODEL_NAMES, AnchorAttention

DEFAULT_RUN = ("anchorformer_tiny_patch16_224", "anchorformer_tiny_distilled_patch16_224")
VARIANTS = [pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.slow) for n in MODEL_NAMES]


@pytest.mark.parametrize("name", VARIANTS)
def test_create_feature_extractor(name):
    model = timm.create_model(name).eval()
    _, eval_nodes = get_graph_node_names(model)  # the operator is one node per block
    assert sum(n.endswith("attn._attend") for n in eval_nodes) == 12, [n for n in eval_nodes if "blocks.0." in n]
    # a module's name stands for its output node
    extractor = create_feature_extractor(model, return_nodes={"blocks.3": "mid", "blocks.11": "last", "norm": "out"})
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        got = extractor(x)
        want = model.forward_intermediates(x, indices=[3, 11], norm=False, output_fmt="NLC")
        torch.testing.assert_close(got["out"], model.forward_features(x))
    n_prefix = model.num_prefix_tokens
    side = model.pretrained_cfg["input_size"][-1] // 16
    assert got["mid"].shape == (2, side * side + n_prefix, model.embed_dim)
    _, (mid, last) = want
    torch.testing.assert_close(got["last"][:, n_prefix:], last)
    torch.testing.assert_close(got["mid"][:, n_prefix:], mid)


def test_attn_mask_is_still_refused_when_it_runs():
    attn = AnchorAttention(32, num_heads=2, num_anchors=4)
    x = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="does not support attn_mask"):
        attn(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not support attn_mask"):
        attn(x, is_causal=True)
