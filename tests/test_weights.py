"""Weights as timm users expect them: device/dtype at creation, meta-device initialisation,
``model.safetensors`` beside ``model.pth``, and ``pretrained=True`` with a local file."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors import safe_open
from test_checkpoint_loading import official_forward, official_layout, random_state_dict

import anchorformer
from anchorformer.models import AnchorAttention, load_checkpoint, safetensors_beside

NAME = "anchorformer_tiny_distilled_patch16_224"
SMALL = dict(img_size=32, depth=2, num_classes=5, num_anchors=7)


@pytest.mark.parametrize("name", ["anchorformer_tiny_patch16_224", NAME])
def test_meta_device_then_to_empty_and_init(name):
    """create_model(device="meta") allocates nothing; to_empty + init_weights gives the usual init."""
    model = timm.create_model(name, device="meta")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"meta"}, [n for n, t in tensors.items() if not t.is_meta][:5]
    model.to_empty(device="cpu")
    model.init_weights()
    bound = 1 / math.sqrt(64)  # anchors: the official nn.Linear(D, M).weight init, U(-1/sqrt(D), 1/sqrt(D))
    for i, blk in enumerate(model.blocks):
        a = blk.attn.anchors
        assert a.shape == (30, 64) and a.abs().max() <= bound and a.std() > bound / 3, f"block {i} anchors"
        assert torch.equal(blk.norm1.weight, torch.ones(192)) and torch.equal(blk.norm1.bias, torch.zeros(192))
        assert blk.attn.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    reference = timm.create_model(name)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_dtype_and_device_reach_every_parameter():
    model = timm.create_model(NAME, dtype=torch.bfloat16, device="cpu", **SMALL)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    attn = [m for m in model.modules() if isinstance(m, AnchorAttention)]
    assert attn and all(m.anchors.dtype == torch.bfloat16 for m in attn)
    out = model.eval()(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # the anchors keep the official initialisation at creation too
    assert all(m.anchors.abs().max() <= 1 / math.sqrt(64) for m in attn)


def _run_checkpoint(tmp_path, ema: bool = False):
    """A run's model.pth as the training engine writes it."""
    model = anchorformer.create_model(NAME, **SMALL)
    state = {
        "model": model.state_dict(),
        "model_name": NAME,
        "model_kwargs": SMALL,
        "classes": list("abcde"),
        "epoch": 3,
    }
    if ema:
        state["model_ema"] = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "model.pth")
    return model, state


def test_safetensors_beside_model_pth(tmp_path):
    model, state = _run_checkpoint(tmp_path)
    path = safetensors_beside(tmp_path / "model.pth")
    assert path == tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(state["model"])
    assert meta["model_name"] == NAME and json.loads(meta["model_kwargs"]) == SMALL
    assert json.loads(meta["classes"]) == list("abcde") and meta["weights"] == "model"
    # timm's loader, from either file (num_classes is the checkpoint's: tell the config, or timm drops the head)
    for file in ("model.safetensors", "model.pth"):
        loaded = timm.create_model(
            NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / file), num_classes=5), **SMALL
        )
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), f"{file}: {k}"
    # ours too
    fresh = anchorformer.create_model(NAME, **SMALL)
    assert load_checkpoint(fresh, path).layout == "anchorformer"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_safetensors_beside_prefers_ema_like_timm(tmp_path):
    _, state = _run_checkpoint(tmp_path, ema=True)
    path = safetensors_beside(tmp_path / "model.pth")
    loaded = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **SMALL
    )
    via_pth = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.pth"), num_classes=5), **SMALL
    )
    for k, v in state["model_ema"].items():
        assert torch.equal(loaded.state_dict()[k], v) and torch.equal(via_pth.state_dict()[k], v), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_cfg_overlay_loads_the_official_layout(tmp_path, suffix):
    """The official AnchorDeiT-Ti state dict, as a local file, through timm's pretrained=True."""
    from safetensors.torch import save_file

    sd = random_state_dict(official_layout())
    path = tmp_path / f"official{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    model = timm.create_model(
        "anchor_deit_tiny_distilled_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), official_forward(sd, x), atol=1e-4, rtol=1e-4)


def test_pretrained_without_a_file_is_an_error():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(NAME, pretrained=True)
