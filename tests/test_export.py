"""anchorformer export: ONNX (dynamo exporter) run by onnxruntime gives PyTorch's logits, at 224²
and 384² and with a dynamic batch; torch.export programs load and give the same logits."""

from __future__ import annotations

import pytest
import torch

import anchorformer
from anchorformer.cli import main
from anchorformer.export import build_model, check_onnx, export_model
from anchorformer.models import safetensors_beside

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4
NAME = "anchorformer_tiny_distilled_patch16_224"


def _run_checkpoint(tmp_path, **kwargs):
    """A run's model.pth (as the training engine writes it), and model.safetensors beside it."""
    model = anchorformer.create_model(NAME, **kwargs)
    state = {"model": model.state_dict(), "model_name": NAME, "model_kwargs": kwargs}
    torch.save(state, tmp_path / "model.pth")
    safetensors_beside(tmp_path / "model.pth")
    return model.eval()


def test_cli_onnx_from_a_run_checkpoint_dynamic_batch(tmp_path):
    """The README's command on a run's checkpoint (2 blocks, 7 classes, as recorded in the file)."""
    want = _run_checkpoint(tmp_path, depth=2, num_classes=7)
    out = tmp_path / "model.onnx"
    rc = main(["export", "--model", NAME, "--checkpoint", str(tmp_path / "model.pth"), "--format", "onnx"]
              + ["--img-size", "224", "--out", str(out), "--check", str(TOL)])  # fmt: skip
    assert rc == 0 and out.is_file()
    for batch in (1, 4):  # exported with batch 2: the batch dimension is dynamic
        x = torch.randn(batch, 3, 224, 224)
        assert check_onnx(out, want, x) < TOL


def test_cli_pt2_from_safetensors_at_another_size(tmp_path):
    _run_checkpoint(tmp_path, depth=2, num_classes=7)
    out = tmp_path / "model.pt2"
    ckpt = tmp_path / "model.safetensors"
    assert main(["export", "--model", NAME, "--checkpoint", str(ckpt), "--format", "pt2", "--img-size", "96",
                 "--out", str(out)]) == 0  # fmt: skip
    want = build_model(NAME, checkpoint=ckpt, img_size=96)  # position embeddings resampled to 6x6
    assert want.blocks.__len__() == 2 and want.num_classes == 7
    program = torch.export.load(out)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want(x), atol=1e-5, rtol=1e-5)


def test_cli_errors(tmp_path, capsys):
    _run_checkpoint(tmp_path, depth=1, num_classes=3)
    assert main(["export", "--model", "anchorformer_small_patch16_224", "--checkpoint", str(tmp_path / "model.pth"),
                 "--out", str(tmp_path / "x.onnx")]) == 2  # fmt: skip
    assert "holds a anchorformer_tiny_distilled_patch16_224 model" in capsys.readouterr().err
    assert main(["export", "--model", NAME, "--checkpoint", str(tmp_path / "nope.pth"), "--out", "x.onnx"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "img"),
    [
        ("anchorformer_tiny_patch16_224", 224),
        (NAME, 224),
        (NAME, 384),
        ("anchorformer_base_distilled_patch16_384", 384),
    ],
)
def test_onnx_matches_pytorch_full_models(tmp_path, name, img):
    """Whole registered models (12 blocks) at 224² and 384², batch 1 and 3 through onnxruntime."""
    model = build_model(name, img_size=img)
    path = export_model(model, tmp_path / "model.onnx", "onnx")
    for batch in (1, 3):
        assert check_onnx(path, model, torch.randn(batch, 3, img, img)) < TOL, (name, img, batch)
