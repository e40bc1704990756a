"""Weight loading: the official layout, timm DeiT weights, our own files, bad checkpoints."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import anchorformer
from anchorformer.models import CheckpointMismatchError, load_checkpoint

OFFICIAL_TSV = Path(__file__).resolve().parents[2] / "shared" / "official_state_dict_tiny.tsv"


def official_layout(depth: int = 12, num_classes: int = 1000, img: int = 224) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official tiny model (read from the shared TSV when present)."""
    if OFFICIAL_TSV.is_file() and depth == 12 and num_classes == 1000 and img == 224:
        shapes = {}
        for line in OFFICIAL_TSV.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.split("\t")
            shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        return shapes
    C, M, D, n = 192, 30, 64, (img // 16) ** 2 + 2
    shapes = {
        "cls_token": (1, 1, C),
        "dist_token": (1, 1, C),
        "pos_embed": (1, n, C),
        "patch_embed.proj.weight": (C, 3, 16, 16),
        "patch_embed.proj.bias": (C,),
        "norm.weight": (C,),
        "norm.bias": (C,),
        "head.weight": (num_classes, C),
        "head.bias": (num_classes,),
        "head_dist.weight": (num_classes, C),
        "head_dist.bias": (num_classes,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (C,),
                p + "norm1.bias": (C,),
                p + "attn.x_to_emb.weight": (2 * C, C),
                p + "attn.dist_anchor_B.weight": (M, D),
                p + "attn.to_out.0.weight": (C, C),
                p + "attn.to_out.0.bias": (C,),
                p + "norm2.weight": (C,),
                p + "norm2.bias": (C,),
                p + "mlp.fc1.weight": (4 * C, C),
                p + "mlp.fc1.bias": (4 * C,),
                p + "mlp.fc2.weight": (C, 4 * C),
                p + "mlp.fc2.bias": (C,),
            }
        )
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.05
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            t = 1 + t
        if "dist_anchor_B" in k:
            t = t * 20  # sharper anchor softmax, so that mistakes in the anchors show
        sd[k] = t
    return sd


def official_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 3) -> torch.Tensor:
    """An independent functional AnchorDeiT (eval mode) straight from the official state dict."""
    B = x.shape[0]
    C = sd["cls_token"].shape[-1]
    D = C // heads
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), sd["dist_token"].expand(B, -1, -1), t], dim=1)
    t = t + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        emb = h @ sd[p + "attn.x_to_emb.weight"].T
        qk, v = emb.chunk(2, dim=-1)
        N = t.shape[1]
        qk = qk.reshape(B, N, heads, D).permute(0, 2, 1, 3)
        v = v.reshape(B, N, heads, D).permute(0, 2, 1, 3)
        anchors = sd[p + "attn.dist_anchor_B.weight"]  # (M, D): Linear(D -> M).weight
        logits = torch.einsum("bhnd,md->bhnm", qk, anchors) * D**-0.5
        a = torch.softmax(logits, dim=-1)
        deg = a.sum(dim=2)
        inv = torch.where(deg == 0, torch.zeros_like(deg), 1 / deg)
        kv = torch.einsum("bhnm,bhnd->bhmd", a, v) * inv[..., None]
        out = torch.einsum("bhnm,bhmd->bhnd", a, kv)
        out = out.permute(0, 2, 1, 3).reshape(B, N, C)
        t = t + out @ sd[p + "attn.to_out.0.weight"].T + sd[p + "attn.to_out.0.bias"]
        h = F.layer_norm(t, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    t = F.layer_norm(t, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    logits = t[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    logits_dist = t[:, 1] @ sd["head_dist.weight"].T + sd["head_dist.bias"]
    return (logits + logits_dist) / 2


def test_official_layout_round_trip_matches_functional_implementation():
    shapes = official_layout()
    assert len(shapes) == 155
    sd = random_state_dict(shapes)
    model = anchorformer.create_model("anchor_deit_tiny_distilled_patch16_224").eval()
    report = load_checkpoint(model, sd)
    assert report.layout == "official" and not report.missing and not report.unused
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
        theirs = official_forward(sd, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_official_layout_resampled_to_another_size():
    sd = random_state_dict(official_layout())
    model = anchorformer.create_model("anchor_deit_tiny_distilled_patch16_224", img_size=160).eval()
    load_checkpoint(model, sd)
    assert model.pos_embed.shape == (1, 100 + 2, 192)
    torch.testing.assert_close(model.pos_embed[:, :2], sd["pos_embed"][:, :2])


def test_own_checkpoint_files_pth_and_safetensors(tmp_path):
    src = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
        if path.suffix == ".pth":
            torch.save({"model": src.state_dict(), "epoch": 3}, path)
        else:
            save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
        dst = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
        report = load_checkpoint(dst, path)
        assert report.layout == "anchorformer"
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(CheckpointMismatchError, match="weights-only"):
        load_checkpoint(model, path)


def test_timm_deit_weights_everything_but_anchors():
    deit = anchorformer.create_model("deit_tiny_patch16_224", img_size=64, depth=2, num_classes=4)
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=96, depth=2, num_classes=4)
    anchors_before = model.blocks[0].attn.anchors.detach().clone()
    report = load_checkpoint(model, deit.state_dict())
    assert report.layout == "timm"
    assert sorted(report.missing) == ["blocks.0.attn.anchors", "blocks.1.attn.anchors"]
    assert sorted(report.unused) == ["blocks.0.attn.in_proj.bias", "blocks.1.attn.in_proj.bias"]
    w = deit.state_dict()["blocks.1.attn.qkv.weight"]
    C = w.shape[1]
    torch.testing.assert_close(model.blocks[1].attn.in_proj.weight[:C], w[:C])  # queries -> shared qk
    torch.testing.assert_close(model.blocks[1].attn.in_proj.weight[C:], w[2 * C :])  # values
    torch.testing.assert_close(model.blocks[0].attn.anchors, anchors_before)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, deit.blocks[1].mlp.fc2.weight)
    assert model.pos_embed.shape == (1, 37, 192)


def test_checkpoint_of_another_model_lists_offending_keys():
    small = anchorformer.create_model("anchorformer_small_patch16_224", img_size=32, depth=2)
    tiny = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny, small.state_dict())
    msg = str(e.value)
    assert "blocks.0.attn.in_proj.weight: expected (384, 192), found (768, 384)" in msg
    assert "missing keys" in msg and "blocks.2.norm1.weight" in msg


def test_missing_file_and_non_tensor_mapping(tmp_path):
    model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(CheckpointMismatchError, match="mapping of names to tensors"):
        load_checkpoint(model, {"epoch": 3})


def test_non_strict_reports_instead_of_raising():
    src = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=1, num_classes=5)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    dst = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=1, num_classes=5)
    report = load_checkpoint(dst, sd, strict=False)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert math.isclose(float((dst.blocks[0].attn.anchors - src.blocks[0].attn.anchors).abs().sum().detach()), 0.0)


def test_model_from_training_checkpoint(tmp_path):
    from anchorformer.models import model_from_checkpoint

    kwargs = dict(img_size=32, depth=2, num_classes=5, num_anchors=6)
    src = anchorformer.create_model("anchorformer_tiny_patch16_224", **kwargs).eval()
    path = tmp_path / "model.pth"
    torch.save(
        {
            "model": src.state_dict(),
            "model_name": "anchorformer_tiny_patch16_224",
            "model_kwargs": kwargs,
            "classes": list("abcde"),
        },
        path,
    )
    model, meta = model_from_checkpoint(path)
    assert meta["classes"] == list("abcde") and not model.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    torch.save({"model": src.state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointMismatchError, match="model_name"):
        model_from_checkpoint(tmp_path / "plain.pth")


@pytest.mark.parametrize("anchor_init", ["official", "unit", "qk_norm", "kmeans"])
def test_official_layout_loads_under_every_anchor_init(anchor_init):
    """The E9 initialisations add no weights: the official layout loads strictly and unchanged."""
    sd = random_state_dict(official_layout())
    model = anchorformer.create_model("anchor_deit_tiny_distilled_patch16_224", anchor_init=anchor_init).eval()
    report = load_checkpoint(model, sd)
    assert report.layout == "official" and not report.missing and not report.unused
    torch.testing.assert_close(model.blocks[3].attn.anchors, sd["blocks.3.attn.dist_anchor_B.weight"])


def test_learned_temperature_is_the_only_extra_key():
    """learn_temperature adds one scalar per layer, and only then; the official layout still maps onto
    everything else (the temperatures are reported missing, at 1 = exp(0))."""
    plain = anchorformer.create_model("anchor_deit_tiny_distilled_patch16_224")
    tempered = anchorformer.create_model("anchor_deit_tiny_distilled_patch16_224", learn_temperature=True)
    extra = set(tempered.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.attn.logit_scale" for i in range(12)}
    assert not any("logit_scale" in k for k in plain.state_dict())
    report = load_checkpoint(tempered, random_state_dict(official_layout()), strict=False)
    assert sorted(report.missing) == sorted(extra) and not report.unused
    assert all(tempered.blocks[i].attn.logit_scale.item() == 0.0 for i in range(12))
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(tempered, random_state_dict(official_layout()))
