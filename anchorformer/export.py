"""Export a model for deployment: ONNX (torch's dynamo exporter) or a ``torch.export`` program.

``anchorformer export --model NAME [--checkpoint PATH] --format onnx|pt2 --img-size N --out FILE``

The exported model is the eval-mode network (for the distilled variants: the mean of both
heads), with a dynamic batch dimension, the input ``images`` (B, 3, N, N) and the output
``logits`` (B, classes). ONNX has no fused anchor-attention operator, so ONNX files are exported
from the reference path (plain matmuls, softmax and sums, in fp32); a ``pt2`` program keeps the
model's ``attn_impl`` (``triton`` exports the fused kernels as the custom operators
``anchorformer::anchor_attention_fwd`` / ``_bwd``, which ``import anchorformer`` registers
before ``torch.export.load``). ``--fused`` exports the exact inference form
(``model.fuse_for_inference()``: the projections folded into the anchors; plain matmuls, either
format).

Check an ONNX file against PyTorch with :func:`check_onnx` (onnxruntime, CPU).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .models.anchorformer import MODEL_NAMES
from .models.checkpoint import describe_load_error, load_checkpoint, read_state_dict
from .models.factory import create_model

__all__ = ["FORMATS", "build_model", "check_onnx", "export_model", "register"]

_logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


# What a detection or segmentation run's weights record (the classification export cannot take them).
_OTHER_TASKS = {"detector_config": "detection", "model_config": "segmentation"}
_SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}


def _checkpoint_model_args(path: Path) -> tuple[str | None, dict[str, Any]]:
    """The model name and constructor arguments a checkpoint records (training ``model.pth`` or a
    ``model.safetensors`` written by :func:`anchorformer.models.save_safetensors`), if any."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state: Any = f.metadata() or {}
            kwargs = json.loads(state["model_kwargs"]) if "model_kwargs" in state else {}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            kwargs = dict(state.get("model_kwargs") or {}) if isinstance(state, dict) else {}
    except Exception as e:  # noqa: BLE001 - one line naming the file, as eval gives
        raise ValueError(f"{path}: cannot be read as weights to export: {describe_load_error(e)}") from e
    if not isinstance(state, dict):
        return None, {}
    for key, task in _OTHER_TASKS.items():
        if key in state:
            raise ValueError(
                f"{path} holds a {task} model ({key}); export takes a classification model "
                "(the model.pth or model.safetensors of `train cls`, or timm/official weights)"
            )
    name = state.get("model_name")
    return (name if isinstance(name, str) else None), kwargs


def build_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    attn_impl: str = "reference",
    fused: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The model to export, in eval mode.

    Args:
        name: a registered AnchorFormer variant (or any timm model).
        checkpoint: weights in any layout :func:`anchorformer.load_checkpoint` reads. A training
            checkpoint that records its model (``model_name``, ``model_kwargs``) is rebuilt with
            those arguments (depth, patch size, classes, anchors, ...); its ``model_name`` must be
            ``name``.
        img_size: input side; position embeddings are resampled when it differs from the
            checkpoint's.
        attn_impl: ``reference`` or ``triton`` (AnchorFormer models only).
        fused: fold the anchor attention's projections into the anchors
            (``model.fuse_for_inference()``, AnchorFormer models only): the same outputs up to
            rounding, fewer MACs.
        **kwargs: further model arguments (``num_classes``, ``num_anchors``, ...).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the checkpoint names another model, or ``fused`` for a model without anchor attention.
    """
    model_kwargs: dict[str, Any] = {}
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        recorded, model_kwargs = _checkpoint_model_args(checkpoint)
        if recorded is not None and recorded != name:
            raise ValueError(f"{checkpoint} holds a {recorded} model, not {name}")
    model_kwargs.update(kwargs)
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    if name in MODEL_NAMES:
        model_kwargs["attn_impl"] = attn_impl
    model = create_model(name, **model_kwargs)
    if checkpoint is not None:
        load_checkpoint(model, read_state_dict(checkpoint))
    if fused:
        if not hasattr(model, "fuse_for_inference"):
            raise ValueError(f"--fused: {name} has no anchor attention to fuse (AnchorFormer models only)")
        model.fuse_for_inference()
    return model.eval()


def _example(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """An input of the model's configured size; batch 2, so that the batch is not specialised."""
    c, h, w = model.pretrained_cfg["input_size"]
    param = next(model.parameters())
    return torch.randn(batch, c, h, w, device=param.device, dtype=param.dtype)


def export_model(model: nn.Module, out: str | Path, fmt: str = "onnx", *, dynamic_batch: bool = True) -> Path:
    """Write ``model`` (eval mode) to ``out`` as ONNX or as a ``torch.export`` program (``pt2``).

    Args:
        model: built with the input size to export (``img_size``); see :func:`build_model`.
        out: the file to write; its folder is created.
        fmt: ``onnx`` (dynamo exporter, reference attention) or ``pt2`` (``torch.export.save``).
        dynamic_batch: export the batch dimension as dynamic (otherwise batch 2 is fixed).

    Returns:
        The path written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}; got {fmt!r}")
    out = Path(out)
    other = next((f for f, suffix in _SUFFIXES.items() if f != fmt and out.suffix == suffix), None)
    if other is not None:
        raise ValueError(
            f"--out {out}: a {out.suffix} name for a {fmt} export; name it {out.with_suffix(_SUFFIXES[fmt])}"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise OSError(f"{out}: cannot write the {fmt} file: {e.strerror or e}") from e
    model = model.eval()
    x = _example(model)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    if fmt == "onnx":
        if hasattr(model, "set_attn_impl"):
            model.set_attn_impl("reference")  # ONNX has no fused anchor-attention operator
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
        _save_atomic(out, fmt, lambda tmp: program.save(tmp))
    else:
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
        _save_atomic(out, fmt, lambda tmp: torch.export.save(program, tmp))
    _logger.info("exported %s (%s) to %s", type(model).__name__, fmt, out)
    return out


def _save_atomic(out: Path, fmt: str, save: Any) -> None:
    """``save(tmp)`` into a temporary file beside ``out``, then rename it over ``out``; a failed
    write (no room, no rights) is one line naming ``out`` and leaves it as it was."""
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        save(tmp)
        os.replace(tmp, out)
    except Exception as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(f"{out}: cannot write the {fmt} file: {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def check_onnx(path: str | Path, model: nn.Module, images: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) on ``images`` and return the largest absolute
    difference from ``model``'s logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        want = model.eval()(images)
    return float((torch.from_numpy(got) - want).abs().max())


def _run(args: argparse.Namespace) -> int:
    model = build_model(
        args.model,
        checkpoint=args.checkpoint,
        img_size=args.img_size,
        attn_impl=args.attn_impl,
        fused=args.fused,
        **({"num_classes": args.num_classes} if args.num_classes is not None else {}),
    )
    out = export_model(model, args.out, args.format, dynamic_batch=not args.static_batch)
    if args.format == "onnx" and args.check:
        images = _example(model, batch=3)
        err = check_onnx(out, model, images)
        _logger.info("onnxruntime vs PyTorch, batch 3: max |logits difference| = %.3g", err)
        if err > args.check:
            _logger.error("difference %.3g exceeds --check %.3g", err, args.check)
            return 1
    return 0


def register(subparsers: Any) -> None:
    """Add ``anchorformer export`` to the command line."""
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX or a torch.export program",
        description="Export the eval-mode model (dynamic batch; input 'images', output 'logits').",
    )
    p.add_argument("--model", required=True, help="model name, e.g. anchorformer_tiny_patch16_224")
    p.add_argument("--checkpoint", help="weights: model.pth, model.safetensors, the official layout, timm DeiT")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (dynamo exporter) or pt2 (torch.export)")
    p.add_argument("--img-size", type=int, help="input side (default: the model's or the checkpoint's)")
    p.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    p.add_argument("--num-classes", type=int, help="classes (default: the model's or the checkpoint's)")
    p.add_argument(
        "--attn-impl", choices=("reference", "triton"), default="reference", help="pt2 only; ONNX uses the reference"
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="export the exact inference form: projections folded into the anchors (model.fuse_for_inference())",
    )
    p.add_argument("--static-batch", action="store_true", help="fix the batch size (2) instead of a dynamic one")
    p.add_argument(
        "--check",
        type=float,
        metavar="TOL",
        help="onnx: compare onnxruntime's logits with PyTorch's on a random batch; fail above TOL",
    )
    p.set_defaults(func=_run)
