"""Attention entropies and the anchors' initialisations (E9), against naive formulas."""

from __future__ import annotations

import math

import pytest
import torch

import anchorformer
from anchorformer.models.attention_stats import (
    anchor_entropies,
    attention_entropies,
    init_anchors_kmeans,
    kmeans,
    softmax_entropy,
    uniform_entropies,
)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_anchors=4, num_classes=3)


def _naive_anchor_entropies(qk, anchors):
    """Python loops: p(anchor | token) = softmax over anchors, p(token | anchor) = column / column sum."""
    qk, anchors = qk.double(), anchors.double()
    B, H, N, D = qk.shape
    M = anchors.shape[-2]
    h_anchor, h_token = [], []
    for b in range(B):
        for h in range(H):
            u = anchors if anchors.dim() == 2 else anchors[h]
            a = [[math.exp(float(qk[b, h, n] @ u[m]) / math.sqrt(D)) for m in range(M)] for n in range(N)]
            a = [[x / sum(row) for x in row] for row in a]
            h_anchor += [-sum(p * math.log(p) for p in row) for row in a]
            for m in range(M):
                col = [a[n][m] for n in range(N)]
                h_token.append(-sum(p / sum(col) * math.log(p / sum(col)) for p in col))
    return sum(h_token) / len(h_token), sum(h_anchor) / len(h_anchor)


@pytest.mark.parametrize("per_head", [False, True])
def test_anchor_entropies_match_a_naive_formula(per_head):
    g = torch.Generator().manual_seed(0)
    qk = torch.randn(2, 3, 7, 5, generator=g) * 2
    anchors = torch.randn(*((3,) if per_head else ()), 4, 5, generator=g)
    h_token, h_anchor = anchor_entropies(qk, anchors)
    want_token, want_anchor = _naive_anchor_entropies(qk, anchors)
    assert h_token.item() == pytest.approx(want_token, rel=1e-10)
    assert h_anchor.item() == pytest.approx(want_anchor, rel=1e-10)
    assert 0 < h_token < math.log(7) and 0 < h_anchor < math.log(4)


def test_zero_anchors_are_uniform():
    qk = torch.randn(2, 3, 9, 8)
    h_token, h_anchor = anchor_entropies(qk, torch.zeros(6, 8))
    assert h_token.item() == pytest.approx(math.log(9), abs=1e-12)
    assert h_anchor.item() == pytest.approx(math.log(6), abs=1e-12)


def test_softmax_entropy_matches_a_naive_formula():
    q, k = torch.randn(1, 2, 5, 4, dtype=torch.float64), torch.randn(1, 2, 5, 4, dtype=torch.float64)
    want = []
    for h in range(2):
        for i in range(5):
            e = [math.exp(float(q[0, h, i] @ k[0, h, j]) * 0.5) for j in range(5)]
            want.append(-sum(x / sum(e) * math.log(x / sum(e)) for x in e))
    assert softmax_entropy(q, k, 0.5).item() == pytest.approx(sum(want) / len(want), rel=1e-10)


def test_model_entropies_per_layer_and_uniform_values():
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", **TINY).train()
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.anchors)
    x = torch.randn(2, 3, 16, 16)
    layers = attention_entropies(model, x)
    N = 16 + 1
    assert len(layers) == 2 and model.training  # mode restored
    for layer in layers:
        assert layer["token_given_anchor"] == pytest.approx(math.log(N), abs=1e-9)
        assert layer["anchor_given_token"] == pytest.approx(math.log(4), abs=1e-9)
    assert uniform_entropies(model, N) == {"token_given_anchor": math.log(N), "anchor_given_token": math.log(4)}
    deit = anchorformer.create_model(
        "deit_tiny_patch16_224",
        **{k: TINY[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes")},
    )
    for block in deit.blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    (layer0, _) = attention_entropies(deit, x)
    assert layer0 == {"token_given_token": pytest.approx(math.log(N), abs=1e-9)}
    with pytest.raises(ValueError, match="no AnchorAttention or timm Attention"):
        attention_entropies(torch.nn.Linear(2, 2), torch.zeros(1, 2))


def test_fresh_official_model_starts_uniform_at_224():
    """The issue's measurement: official anchors give logits of std ~0.02, so p(token | anchor) is
    ln N to three decimals in every layer."""
    torch.manual_seed(0)
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", depth=2)
    (first, last) = attention_entropies(model, torch.randn(1, 3, 224, 224))
    for layer in (first, last):
        assert layer["token_given_anchor"] == pytest.approx(math.log(197), abs=1e-3)


def _anchor_norms(model):
    return torch.cat([b.attn.anchors.norm(dim=-1) for b in model.blocks])


def test_anchor_inits_give_the_promised_row_norms():
    models = {}
    for init in ("official", "unit", "qk_norm", "kmeans"):
        torch.manual_seed(3)
        models[init] = anchorformer.create_model("anchorformer_tiny_patch16_224", anchor_init=init, **TINY)
    D = TINY["embed_dim"] // TINY["num_heads"]
    official = torch.cat([b.attn.anchors for b in models["official"].blocks])
    assert official.abs().max() <= 1 / math.sqrt(D)
    torch.testing.assert_close(torch.cat([b.attn.anchors for b in models["kmeans"].blocks]), official)  # before data
    torch.testing.assert_close(_anchor_norms(models["unit"]), torch.ones(2 * 4))
    # the same draw, rescaled: every init leaves the rest of the model (and the random stream) alone
    unit = torch.cat([b.attn.anchors for b in models["unit"].blocks])
    torch.testing.assert_close(unit, official / official.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(models["unit"].head.weight, models["official"].head.weight)
    for block in models["qk_norm"].blocks:
        attn = block.attn
        typical = attn.typical_qk_norm()
        torch.testing.assert_close(attn.anchors.norm(dim=-1), typical.expand(4))
        # the typical norm is the root mean square of qk for unit-variance inputs
        qk, _, _ = attn.embed(torch.randn(64, 50, TINY["embed_dim"]))
        assert qk.pow(2).sum(-1).mean().sqrt().item() == pytest.approx(typical.item(), rel=0.05)
    with pytest.raises(ValueError, match="anchor_init must be one of"):
        anchorformer.create_model("anchorformer_tiny_patch16_224", anchor_init="orthogonal", **TINY)
    with pytest.raises(ValueError, match="anchor_init"):
        anchorformer.create_model("deit_tiny_patch16_224", anchor_init="unit")


def test_kmeans_is_deterministic_and_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(40, 2, generator=g) for c in centres])
    state = torch.get_rng_state()
    a, b = kmeans(points, 3, seed=1), kmeans(points, 3, seed=1)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    found = sorted(a.tolist())
    for want, got in zip(sorted(centres.tolist()), found):
        assert got == pytest.approx(want, abs=0.1)
    with pytest.raises(ValueError, match="P >= k=5"):
        kmeans(points[:4], 5, seed=0)


def test_kmeans_init_of_a_model_is_deterministic():
    def build():
        torch.manual_seed(0)
        return anchorformer.create_model("anchorformer_tiny_patch16_224", anchor_init="kmeans", **TINY).train()

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m1, m2 = build(), build()
    before = m1.blocks[1].attn.anchors.detach().clone()
    assert init_anchors_kmeans(m1, x, seed=0) == 2 and init_anchors_kmeans(m2, x, seed=0) == 2
    assert m1.training
    for b1, b2 in zip(m1.blocks, m2.blocks):
        assert torch.equal(b1.attn.anchors, b2.attn.anchors)
    assert not torch.equal(m1.blocks[1].attn.anchors, before)
    # layer 0's anchors are centroids of its qk: each is the mean of the embeddings nearest to it
    qk, _, _ = m1.blocks[0].attn.embed(m1.blocks[0].norm1(m1._pos_embed(m1.patch_embed(x))))
    pts = qk.reshape(-1, qk.shape[-1])
    u = m1.blocks[0].attn.anchors
    nearest = torch.cdist(pts.double(), u.double()).argmin(1)
    for m in nearest.unique():
        torch.testing.assert_close(u[m], pts[nearest == m].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no learned anchors"):
        init_anchors_kmeans(
            anchorformer.create_model("anchorformer_tiny_patch16_224", anchor_mode="pooled", **TINY), x, seed=0
        )


def test_learned_temperature_scales_the_logits():
    torch.manual_seed(0)
    plain = anchorformer.create_model("anchorformer_tiny_patch16_224", **TINY).eval()
    tempered = anchorformer.create_model("anchorformer_tiny_patch16_224", learn_temperature=True, **TINY).eval()
    assert "blocks.0.attn.logit_scale" in tempered.state_dict() and plain.blocks[0].attn.logit_scale is None
    assert "blocks.0.attn.logit_scale" in tempered.no_weight_decay()
    tempered.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tempered(x), plain(x))  # exp(0) = 1: the plain model
        for b in tempered.blocks:
            b.attn.logit_scale.fill_(math.log(2.0))
        for b in plain.blocks:
            b.attn.anchors.mul_(2.0)
        torch.testing.assert_close(tempered(x), plain(x), rtol=1e-5, atol=1e-6)
    tempered(x).sum().backward()
    assert tempered.blocks[0].attn.logit_scale.grad is not None


def test_learned_temperature_traces_compiles_and_exports():
    """The E9 switches keep the model FX-, compile- and export-safe (the default path is tested elsewhere)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = anchorformer.create_model(
        "anchorformer_tiny_patch16_224", learn_temperature=True, anchor_init="qk_norm", **TINY
    ).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.logit_scale.fill_(0.5)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        out = create_feature_extractor(model, return_nodes={"head": "logits"})(x)["logits"]
        torch.testing.assert_close(out, want)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), want)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want)
