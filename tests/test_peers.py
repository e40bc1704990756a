"""E10's peers (anchorformer.models.peers): each attention against a naive implementation of its
published formula (float64, explicit loops, the un-reassociated form), count_macs against closed
forms, creation by name, checkpoints, grids and prefix tokens, TorchScript/FX at mini shapes, ONNX."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import anchorformer
from anchorformer.complexity import count_macs, model_complexity
from anchorformer.models import PEER_MODEL_NAMES, backbone_kwargs, load_checkpoint, model_from_checkpoint
from anchorformer.models.peers import (
    AgentAttention,
    FocusedLinearAttention,
    ISABAttention,
    NystromAttention,
    nystrom_pinv,
    segment_bounds,
)

MINI = dict(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=10)  # T-mini, 2 blocks
TINY = [n for n in PEER_MODEL_NAMES if "_tiny_" in n]


# ---------------------------------------------------------------------------------------------
# Naive references: float64, one batch element, head and token at a time
# ---------------------------------------------------------------------------------------------


def _qkv(attn, x):
    """q, k, v as lists [head] of (N, D) float64 tensors, from the module's weights."""
    w, b = attn.qkv.weight.double(), attn.qkv.bias
    y = x.double() @ w.T + (0 if b is None else b.double())  # (N, 3C)
    C = x.shape[-1]
    H, D = attn.num_heads, attn.head_dim
    q, k, v = y[:, :C], y[:, C : 2 * C], y[:, 2 * C :]
    return [[t[:, h * D : (h + 1) * D] for h in range(H)] for t in (q, k, v)]


def _proj(attn, heads):
    out = torch.cat(heads, dim=-1)  # (N, C)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def _softmax_rows(m):
    e = torch.exp(m - m.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _dwc_naive(img, weight, bias):
    """Depthwise convolution with zero padding by explicit sums: img (Ch, h, w), weight (Ch, 1, k, k)."""
    ch, h, w = img.shape
    k = weight.shape[-1]
    r = k // 2
    out = torch.zeros_like(img)
    for dy in range(k):
        for dx in range(k):
            for y in range(h):
                for x in range(w):
                    yy, xx = y + dy - r, x + dx - r
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, y, x] += weight[:, 0, dy, dx] * img[:, yy, xx]
    return out + bias[:, None, None]


def _adaptive_bins(n, s):
    return [(math.floor(i * n / s), math.ceil((i + 1) * n / s)) for i in range(s)]


def agent_naive(attn: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """σ(Q Aᵀ + B₂) σ(A Kᵀ + B₁) V + DWC(V) for one image x (N, C)."""
    qs, ks, vs = _qkv(attn, x)
    P, gh, gw = attn.num_prefix_tokens, attn.grid_h, attn.grid_w
    s, H, D = attn.pool_side, attn.num_heads, attn.head_dim
    n = s * s
    outs = []
    for h in range(H):
        q, k, v = qs[h], ks[h], vs[h]
        grid = q[P:].reshape(gh, gw, D)
        agents = torch.stack(
            [
                grid[y0:y1, x0:x1].reshape(-1, D).mean(0)
                for (y0, y1) in _adaptive_bins(gh, s)
                for (x0, x1) in _adaptive_bins(gw, s)
            ]
        )  # (n, D), raster order of the s x s cells
        b1 = torch.zeros(n, len(q), dtype=torch.float64)
        b2 = torch.zeros(len(q), n, dtype=torch.float64)
        if attn.an_bias is not None:
            an = F.interpolate(attn.an_bias.double(), size=(gh, gw), mode="bilinear")[h]  # (n, gh, gw)
            na = F.interpolate(attn.na_bias.double(), size=(gh, gw), mode="bilinear")[h]
            ah = F.interpolate(attn.ah_bias.double(), size=(gh, 1), mode="bilinear")[h, :, :, 0]  # (n, gh)
            aw = F.interpolate(attn.aw_bias.double(), size=(1, gw), mode="bilinear")[h, :, 0, :]  # (n, gw)
            ha = F.interpolate(attn.ha_bias.double(), size=(gh, 1), mode="bilinear")[h, :, :, 0]
            wa = F.interpolate(attn.wa_bias.double(), size=(1, gw), mode="bilinear")[h, :, 0, :]
            for a in range(n):
                for p in range(P):
                    b1[a, p] = attn.ac_bias[h, a, p].double()
                    b2[p, a] = attn.ca_bias[h, p, a].double()
                for y in range(gh):
                    for xx in range(gw):
                        t = P + y * gw + xx
                        b1[a, t] = an[a, y, xx] + ah[a, y] + aw[a, xx]
                        b2[t, a] = na[a, y, xx] + ha[a, y] + wa[a, xx]
        scale = D**-0.5
        agent_v = _softmax_rows(agents @ k.T * scale + b1) @ v  # (n, D)
        out = _softmax_rows(q @ agents.T * scale + b2) @ agent_v  # (N, D)
        outs.append(out)
    if attn.dwc is not None:
        v_all = torch.cat(vs, dim=-1)  # (N, C)
        img = v_all[P:].T.reshape(-1, gh, gw)
        local = _dwc_naive(img, attn.dwc.weight.double(), attn.dwc.bias.double()).reshape(H * D, -1).T  # (h w, C)
        for h in range(H):
            outs[h] = torch.cat([outs[h][:P], outs[h][P:] + local[:, h * D : (h + 1) * D]])
    return _proj(attn, outs)


def nystrom_naive(attn: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """σ(Q K̃ᵀ) pinv(σ(Q̃ K̃ᵀ)) σ(Q̃ Kᵀ) V with the exact pseudo-inverse (torch.linalg.pinv)."""
    qs, ks, vs = _qkv(attn, x)
    N = len(qs[0])
    L = min(attn.num_landmarks, N)
    # segments by the published rule, written out: sizes floor(N/L) then floor(N/L) + 1
    base, extra = N // L, N % L
    sizes = [base] * (L - extra) + [base + 1] * extra
    bounds, start = [], 0
    for z in sizes:
        bounds.append((start, start + z))
        start += z
    outs = []
    for h in range(attn.num_heads):
        q, k, v = qs[h] * attn.head_dim**-0.5, ks[h], vs[h]
        ql = torch.stack([q[a:b].mean(0) for a, b in bounds])
        kl = torch.stack([k[a:b].mean(0) for a, b in bounds])
        f = _softmax_rows(q @ kl.T)
        a = _softmax_rows(ql @ kl.T)
        bmat = _softmax_rows(ql @ k.T)
        outs.append(f @ torch.linalg.pinv(a) @ bmat @ v)  # left to right: the un-reassociated product
    return _proj(attn, outs)


def flatten_naive(attn: FocusedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The quadratic form of focused linear attention: O_i = Σ_j S_ij V_j / (Σ_j S_ij + n ε),
    S_ij = φ_p(Q_i)·φ_p(K_j) per head, with φ_p computed token by token; plus DWC(V)."""
    C = x.shape[-1]
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    y = x.double() @ w.T + b
    q_all, k_all, v_all = y[:, :C], y[:, C : 2 * C], y[:, 2 * C :]
    soft = torch.log1p(torch.exp(attn.focus_scale.double()))
    p = attn.focusing_factor

    def phi(row):
        r = (torch.clamp(row, min=0) + 1e-6) / soft
        rp = r**p
        return rp * (torch.sqrt((r * r).sum()) / torch.sqrt((rp * rp).sum()))

    fq = torch.stack([phi(r) for r in q_all])
    fk = torch.stack([phi(r) for r in k_all])
    N = len(x)
    P, gh, gw, H, D = attn.num_prefix_tokens, attn.grid_h, attn.grid_w, attn.num_heads, attn.head_dim
    outs = []
    for h in range(H):
        sl = slice(h * D, (h + 1) * D)
        s = fq[:, sl] @ fk[:, sl].T  # (N, N)
        out = (s @ v_all[:, sl]) / (s.sum(dim=1, keepdim=True) + N * 1e-6)
        if attn.dwc is not None:
            img = v_all[P:, sl].T.reshape(D, gh, gw)
            local = _dwc_naive(img, attn.dwc.weight.double(), attn.dwc.bias.double()).reshape(D, -1).T
            out = torch.cat([out[:P], out[P:] + local])
        outs.append(out)
    return _proj(attn, outs)


def isab_naive(attn: ISABAttention, x: torch.Tensor) -> torch.Tensor:
    """H = I + σ(I K_Xᵀ) V_X, H ← H + ReLU(H W_o); O = σ(Q_X (H W_k)ᵀ) (H W_v), per head."""
    qs, ks, vs = _qkv(attn, x)
    H, D, M = attn.num_heads, attn.head_dim, attn.num_inducing
    ind = attn.inducing.double()
    scale = D**-0.5
    hs = []
    for h in range(H):
        i_h = ind[:, h * D : (h + 1) * D]
        hs.append(i_h + _softmax_rows(i_h @ ks[h].T * scale) @ vs[h])
    hm = torch.cat(hs, dim=-1)  # (M, C)
    hm = hm + torch.clamp(hm @ attn.fc_o.weight.double().T + attn.fc_o.bias.double(), min=0)
    kv = hm @ attn.kv_h.weight.double().T + attn.kv_h.bias.double()  # (M, 2C)
    C = H * D
    outs = []
    for h in range(H):
        k_h, v_h = kv[:, h * D : (h + 1) * D], kv[:, C + h * D : C + (h + 1) * D]
        outs.append(_softmax_rows(qs[h] @ k_h.T * scale) @ v_h)
    assert hm.shape == (M, C)
    return _proj(attn, outs)


def _randomize(module):
    """Non-trivial values for every parameter (biases, scales) so that each term is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_agent_matches_naive(prefix, grid):
    attn = _randomize(AgentAttention(12, num_heads=2, num_agents=4, grid_size=grid, num_prefix_tokens=prefix)).double()
    x = torch.randn(2, prefix + grid[0] * grid[1], 12, dtype=torch.float64)
    got = attn(x)
    for b in range(2):
        torch.testing.assert_close(got[b], agent_naive(attn, x[b]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [dict(agent_bias=False), dict(dwc_kernel=0), dict(num_agents=9, dwc_kernel=5)])
def test_agent_options_match_naive(options):
    attn = _randomize(AgentAttention(12, num_heads=3, grid_size=(5, 6), num_prefix_tokens=1, **options)).double()
    assert (attn.an_bias is None) == (options.get("agent_bias") is False)
    assert (attn.dwc is None) == (options.get("dwc_kernel") == 0)
    x = torch.randn(1, 31, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x)[0], agent_naive(attn, x[0]), rtol=1e-10, atol=1e-10)


def test_segments_follow_the_published_rule():
    assert segment_bounds(197, 64)[:2] == [(0, 3), (3, 6)] and segment_bounds(197, 64)[-1] == (193, 197)
    sizes = [b - a for a, b in segment_bounds(197, 64)]
    assert sizes == [3] * 59 + [4] * 5  # 197 = 59 x 3 + 5 x 4, raster order, the class token first
    assert [b - a for a, b in segment_bounds(65, 16)] == [4] * 15 + [5]
    assert segment_bounds(5, 64) == [(i, i + 1) for i in range(5)]  # fewer tokens than landmarks


@pytest.mark.parametrize("tokens,landmarks", [(17, 4), (16, 4), (19, 6)])  # N not divisible, divisible
def test_nystrom_matches_naive_with_a_converged_pinv(tokens, landmarks):
    grid = (4, 4) if tokens != 19 else (3, 6)
    prefix = tokens - grid[0] * grid[1]
    attn = NystromAttention(
        12, num_heads=2, num_landmarks=landmarks, pinv_iterations=40, grid_size=grid, num_prefix_tokens=prefix
    ).double()
    torch.manual_seed(0)
    with torch.no_grad():
        attn.qkv.weight.mul_(10)  # sharper softmax rows than at initialisation
    x = torch.randn(2, tokens, 12, dtype=torch.float64)
    got = attn(x)
    for b in range(2):
        want = nystrom_naive(attn, x[b])  # the module's pseudo-inverse is fp32 by design: fp32 tolerances
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_nystrom_with_fewer_tokens_than_landmarks_uses_every_token():
    attn = NystromAttention(12, num_heads=2, num_landmarks=16, grid_size=(2, 3), num_prefix_tokens=1)
    t = torch.randn(2, 2, 7, 6)
    torch.testing.assert_close(attn._landmarks(t), t)
    assert attn(torch.randn(1, 7, 12)).shape == (1, 7, 12)


def test_nystrom_pinv_iterations_converge_in_fp32():
    torch.manual_seed(0)
    k = torch.softmax(torch.randn(2, 3, 8, 8, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64), dim=-1)
    exact = torch.linalg.pinv(k)
    errs = [(nystrom_pinv(k, i).double() - exact).abs().max().item() for i in (0, 6, 10, 20)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[-1] < 1e-3, errs  # |pinv| ~ 70 here: fp32
    assert nystrom_pinv(k, 6).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the pseudo-inverse stays fp32 under autocast
        z = nystrom_pinv(k.float(), 6)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), nystrom_pinv(k, 6).double(), rtol=1e-4, atol=1e-4)


def test_nystrom_pinv_steps_match_the_newton_schulz_recursion():
    """Each step is Z ← ¼ Z (13I − KZ(15I − KZ(7I − KZ))) from Z₀ = Kᵀ / ||K||₁, written out here."""
    torch.manual_seed(0)
    k = torch.softmax(torch.randn(5, 5, dtype=torch.float64), dim=-1)
    z = k.T / max(k[:, j].sum() for j in range(5))
    eye = torch.eye(5, dtype=torch.float64)
    for _ in range(3):
        kz = k @ z
        z = 0.25 * z @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    torch.testing.assert_close(nystrom_pinv(k, 3).double(), z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix,grid", [(1, (4, 4)), (0, (3, 5)), (2, (2, 3))])
def test_flatten_matches_naive(prefix, grid):
    attn = _randomize(FocusedLinearAttention(12, num_heads=2, dwc_kernel=3, grid_size=grid, num_prefix_tokens=prefix))
    attn = attn.double()
    x = torch.randn(2, prefix + grid[0] * grid[1], 12, dtype=torch.float64)
    got = attn(x)  # φ_p and the sums in fp32, by design
    for b in range(2):
        torch.testing.assert_close(got[b], flatten_naive(attn, x[b]), rtol=1e-4, atol=1e-4)


def test_flatten_focusing_factor_and_kernel_options():
    attn = _randomize(FocusedLinearAttention(8, num_heads=2, focusing_factor=2.0, dwc_kernel=0, grid_size=(3, 3)))
    assert attn.dwc is None and attn.focusing_factor == 2.0
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(attn.double()(x)[0], flatten_naive(attn, x[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inducing", [1, 5])
def test_isab_matches_naive(inducing):
    attn = _randomize(ISABAttention(12, num_heads=3, num_inducing=inducing, grid_size=(3, 3))).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    got = attn(x)
    for b in range(2):
        torch.testing.assert_close(got[b], isab_naive(attn, x[b]), rtol=1e-10, atol=1e-10)


def test_bad_arguments_and_token_counts_are_clear_errors():
    with pytest.raises(ValueError, match="num_agents must be a square"):
        AgentAttention(12, num_heads=2, num_agents=30)
    with pytest.raises(ValueError, match="dwc_kernel must be 0"):
        FocusedLinearAttention(12, num_heads=2, dwc_kernel=4)
    with pytest.raises(ValueError, match="num_landmarks"):
        NystromAttention(12, num_heads=2, num_landmarks=0)
    with pytest.raises(ValueError, match="num_inducing"):
        ISABAttention(12, num_heads=2, num_inducing=0)
    attn = AgentAttention(12, num_heads=2, num_agents=4, grid_size=(4, 4))
    with pytest.raises(Exception, match=r"expected 17 tokens \(1 prefix \+ 4x4 patches"):
        attn(torch.randn(1, 20, 12))
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(1, 17, 12), attn_mask=torch.ones(17, 17, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# MACs: count_macs against closed forms at T/224² (and a non-square mini grid)
# ---------------------------------------------------------------------------------------------


def peer_macs(family: str, img: tuple[int, int], C=192, heads=3, depth=12, patch=16, classes=1000, **kw) -> int:
    """Closed form: patch embedding, per block qkv + attention + projection + MLP, head."""
    P = (img[0] // patch) * (img[1] // patch)
    N = P + 1
    H, D = heads, C // heads
    macs = P * C * 3 * patch * patch
    for _ in range(depth):
        macs += 3 * N * C * C + N * C * C + 8 * N * C * C  # qkv, output projection, MLP
        if family == "agent":
            n, k = kw.get("num_agents", 49), kw.get("dwc_kernel", 3)
            macs += 4 * N * n * C  # A Kᵀ, (·) V, Q Aᵀ, (·)(agent V), over all heads
            macs += P * C * k * k  # depthwise convolution of V
        elif family == "nystrom":
            L, it = min(kw.get("num_landmarks", 64), N), kw.get("pinv_iterations", 6)
            macs += N * L * C + L * L * C + L * N * C  # the three kernels' logits
            macs += 4 * it * H * L**3  # four L x L products per Newton-Schulz step and head
            macs += H * N * L * L + L * N * C + N * L * C  # σ₁ Z, σ₃ V, (σ₁ Z)(σ₃ V)
        elif family == "flatten":
            k = kw.get("dwc_kernel", 5)
            macs += N * C * D + N * C * D + N * C  # φ(K)ᵀ V, φ(Q)(·), φ(Q) mean φ(K)
            macs += P * C * k * k  # depthwise convolution of V (D channels, shared by the H heads)
        elif family == "isab":
            M = kw.get("num_inducing", 30)
            macs += 2 * M * N * C  # I K_Xᵀ and (·) V_X
            macs += M * C * C + 2 * M * C * C  # the first MAB's feed-forward, keys and values of H
            macs += 2 * N * M * C  # Q_X H_kᵀ and (·) H_v
    return macs + C * classes


@pytest.mark.parametrize("family", ["agent", "nystrom", "flatten", "isab"])
def test_count_macs_matches_closed_form_at_t_224(family):
    got = model_complexity(f"{family}_deit_tiny_patch16_224", 224)["macs"]
    want = peer_macs(family, (224, 224))
    assert abs(got - want) <= 0.01 * want, (got, want)
    assert got == want  # every term is a matmul or a convolution the counter sees


@pytest.mark.parametrize("family", ["agent", "nystrom", "flatten", "isab"])
def test_count_macs_matches_closed_form_at_mini_shapes_and_options(family):
    opts = {"agent": dict(num_agents=16, dwc_kernel=5), "nystrom": dict(num_landmarks=16, pinv_iterations=3),
            "flatten": dict(dwc_kernel=3), "isab": dict(num_inducing=16)}[family]  # fmt: skip
    with torch.device("meta"):
        model = anchorformer.create_model(f"{family}_deit_tiny_patch16_224", **MINI, **opts)
    got = count_macs(model, (48, 80))  # a non-square grid: 6 x 10 patches
    assert got == peer_macs(family, (48, 80), C=96, depth=2, patch=8, classes=10, **opts)


# ---------------------------------------------------------------------------------------------
# Models: creation, recipes, checkpoints, grids, TorchScript and FX at mini shapes
# ---------------------------------------------------------------------------------------------


def test_every_peer_is_created_by_both_factories():
    assert len(PEER_MODEL_NAMES) == 8 and set(timm.list_models("*_deit_*_patch16_224")) >= set(PEER_MODEL_NAMES)
    for name in PEER_MODEL_NAMES:
        with torch.device("meta"):
            ours = anchorformer.create_model(name)
            theirs = timm.create_model(name)
        assert type(ours) is type(theirs) and ours.embed_dim == (192 if "tiny" in name else 384)
        assert sorted(ours.state_dict()) == sorted(theirs.state_dict())


def test_recipe_mini_shapes_and_summary_tokens():
    from anchorformer.tasks.classification.train import resolve_recipe

    r = resolve_recipe(profile="mini")
    for family, key in (("agent", "num_agents"), ("nystrom", "num_landmarks"), ("isab", "num_inducing")):
        kw = backbone_kwargs(f"{family}_deit_tiny_patch16_224", r)
        assert kw == {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, key: 16}
    assert "num_anchors" not in backbone_kwargs("flatten_deit_small_patch16_224", r)
    with pytest.raises(ValueError, match="window_size applies"):
        anchorformer.create_model("agent_deit_tiny_patch16_224", window_size=7)
    with pytest.raises(ValueError, match="not an AnchorFormer model"):
        anchorformer.create_model("isab_deit_tiny_patch16_224", num_anchors=8)


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip_and_timm_pretrained_file(name, tmp_path):
    from anchorformer.models import safetensors_beside

    src = anchorformer.create_model(name, **MINI).eval()
    path = tmp_path / "model.pth"
    torch.save({"model": src.state_dict(), "model_name": name, "model_kwargs": MINI}, path)
    st = safetensors_beside(path)
    x = torch.randn(2, 3, 64, 64)
    model, _ = model_from_checkpoint(path)
    dst = anchorformer.create_model(name, **MINI).eval()
    report = load_checkpoint(dst, st)
    overlay = dict(file=str(st), num_classes=10)  # timm drops a head whose class count differs from the config's
    via_timm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **MINI).eval()
    assert not report.missing
    with torch.no_grad():
        want = src(x)
        for m in (model, dst, via_timm):
            torch.testing.assert_close(m(x), want)
    # the same weights at another (non-square) size: position embeddings resampled, grids updated
    other = anchorformer.create_model(name, **{**MINI, "img_size": (48, 80)}).eval()
    load_checkpoint(other, path)
    assert other(torch.randn(1, 3, 48, 80)).shape == (1, 10)


@pytest.mark.parametrize("name", TINY)
def test_grids_prefix_tokens_intermediates_script_and_fx(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = anchorformer.create_model(name, **MINI, reg_tokens=1).eval()  # two prefix tokens
    assert {m.num_prefix_tokens for m in model.modules() if hasattr(m, "grid_h")} == {2}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), y, rtol=1e-5, atol=1e-5)
        fx = create_feature_extractor(model, return_nodes=["head"])
        torch.testing.assert_close(fx(x)["head"], y, rtol=1e-5, atol=1e-5)
        model.set_input_size(img_size=(48, 80))  # non-square: 6 x 10 patches
        assert {(m.grid_h, m.grid_w) for m in model.modules() if hasattr(m, "grid_h")} == {(6, 10)}
        _, feats = model.forward_intermediates(torch.randn(1, 3, 48, 80), indices=2)
    assert [f.shape for f in feats] == [(1, 96, 6, 10)] * 2


@pytest.mark.parametrize("name", TINY)
def test_trains_one_step_finite_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = anchorformer.create_model(name, **MINI)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_cli_onnx_export_of_a_run_checkpoint(name, tmp_path):
    """``anchorformer export`` on a run's checkpoint (mini shape, one block): onnxruntime gives
    PyTorch's logits, with a dynamic batch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from anchorformer.cli import main
    from anchorformer.export import check_onnx

    kwargs = {**MINI, "depth": 1}
    model = anchorformer.create_model(name, **kwargs).eval()
    torch.save({"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs}, tmp_path / "model.pth")
    out = tmp_path / "model.onnx"
    argv = ["export", "--model", name, "--checkpoint", str(tmp_path / "model.pth"), "--format", "onnx",
            "--img-size", "64", "--out", str(out), "--check", "1e-4"]  # fmt: skip
    assert main(argv) == 0 and out.is_file()
    for batch in (1, 3):  # exported with batch 2: the batch is dynamic
        assert check_onnx(out, model, torch.randn(batch, 3, 64, 64)) < 1e-4


@pytest.mark.parametrize("name", TINY)
def test_trains_through_the_classification_engine(name, tmp_path):
    """Two epochs of each peer (1 block, 16² images, M = 4 summary tokens) through ``train``, as
    the E10 stage runs them: the loss falls, metrics count the peer's GMACs, the run reloads."""
    import json

    from cls_helpers import TINY as TINY_RECIPE
    from cls_helpers import make_tiny_imagefolder

    from anchorformer.tasks.classification.train import train

    root = make_tiny_imagefolder(tmp_path / "imagenet")
    metrics = train(root, tmp_path / "run", name, profile="mini", overrides=TINY_RECIPE, epochs=2)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["gmacs"] > 0 and metrics["params"] > 0
    model, _ = model_from_checkpoint(tmp_path / "run" / "model.pth")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
