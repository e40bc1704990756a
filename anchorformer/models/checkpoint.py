"""Loading weights into AnchorFormer and DeiT models.

Three layouts are understood and converted to ours by one pure function,
:func:`checkpoint_filter_fn`:

- ours (``blocks.i.attn.in_proj``, ``blocks.i.attn.anchors``, ``blocks.i.attn.proj``);
- the official AnchorFormer code (``blocks.i.attn.x_to_emb``, ``blocks.i.attn.dist_anchor_B``,
  ``blocks.i.attn.to_out.0``);
- timm / DeiT ViTs (``blocks.i.attn.qkv``, ``blocks.i.attn.proj``): the query rows become the
  shared query/key projection and the value rows the values; the anchors stay as initialised.

Position embeddings are resampled to the model's grid. Files are read without unpickling code
(``torch.load(weights_only=True)``) or from ``.safetensors``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .anchorformer import checkpoint_filter_fn, detect_layout
from .factory import create_model

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "UnreadableCheckpointError",
    "checkpoint_filter_fn",
    "describe_load_error",
    "errno_in",
    "load_checkpoint",
    "model_from_checkpoint",
    "read_state_dict",
    "save_safetensors",
    "safetensors_beside",
]

_logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model_ema", "state_dict_ema", "model", "state_dict", "module")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit a model; the message lists every offending key."""


class UnreadableCheckpointError(CheckpointMismatchError, ValueError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint, unsafe to unpickle);
    the message names the file and the reason."""


def describe_load_error(e: BaseException) -> str:
    """One line saying why ``torch.load``/safetensors refused a file (torch's messages run to pages)."""
    text = str(e).strip()
    unsafe = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if unsafe:
        what = unsafe.group(1).split(" Please use")[0].strip()
        return f"refused as unsafe to load with weights_only=True ({what})"
    line = text.splitlines()[0] if text else ""
    if len(line) > 160 and ". " in line[40:]:
        line = line[: line.index(". ", 40) + 1]
    return f"{type(e).__name__}: {line}"


def _unreadable(path: Path, kind: str, e: Exception) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{path}: cannot be read as a {kind}: {describe_load_error(e)}")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    layout: str  # "anchorformer", "official" or "timm"
    missing: list[str] = field(default_factory=list)  # model keys left as initialised
    unused: list[str] = field(default_factory=list)  # checkpoint keys not loaded


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read a state dict from a file or a mapping, unwrapping training checkpoints.

    ``{"model": sd}``, ``{"state_dict": sd}``, ``{"model_ema": sd}`` and DDP's ``module.``
    prefixes are unwrapped (EMA weights are preferred when present, as timm does).
    """
    if isinstance(path_or_state_dict, Mapping):
        obj: Any = path_or_state_dict
        where = "state dict"
    else:
        path = Path(path_or_state_dict)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                obj = load_file(str(path), device="cpu")
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise _unreadable(path, "safetensors file", e) from e
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise _unreadable(path, "weights-only PyTorch checkpoint", e) from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping) and obj[key]:
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{where}: expected a mapping of names to tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
) -> LoadReport:
    """Load weights of any supported layout into ``model``.

    Args:
        model: an AnchorFormer or timm ViT/DeiT model.
        path_or_state_dict: a ``.pth``/``.pt``/``.bin`` file (read with ``weights_only=True``),
            a ``.safetensors`` file, or a mapping (optionally a training checkpoint wrapping the
            weights under ``model``/``state_dict``/``model_ema``).
        strict: raise :class:`CheckpointMismatchError` when keys are missing or shapes differ.
            Loading timm DeiT weights into an AnchorFormer always leaves the anchors as initialised
            (they have no counterpart) and reports the unused keys; that is not a mismatch.

    Returns:
        A :class:`LoadReport` with the layout, the missing and the unused keys.
    """
    raw = read_state_dict(path_or_state_dict)
    layout = detect_layout(raw)
    sd = checkpoint_filter_fn(raw, model)
    own = model.state_dict()

    bad_shapes = [
        f"  {k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in sd]
    unused = [k for k in sd if k not in own]
    allowed_missing = {k for k in missing if layout == "timm" and k.endswith(".attn.anchors")}
    problems = []
    if bad_shapes:
        problems.append("shape mismatches:\n" + "\n".join(bad_shapes))
    if strict and set(missing) - allowed_missing:
        problems.append(
            "missing keys:\n"
            + "\n".join(f"  {k}: expected {tuple(own[k].shape)}" for k in missing if k not in allowed_missing)
        )
    if strict and unused and layout != "timm":
        problems.append("unexpected keys:\n" + "\n".join(f"  {k}: found {tuple(sd[k].shape)}" for k in unused))
    if problems:
        src = path_or_state_dict if not isinstance(path_or_state_dict, Mapping) else "state dict"
        raise CheckpointMismatchError(
            f"checkpoint {src} ({layout} layout) does not fit {type(model).__name__}:\n" + "\n".join(problems)
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if unused:
        _logger.info("load_checkpoint: %d unused keys: %s", len(unused), ", ".join(unused))
    if missing:
        _logger.info("load_checkpoint: %d keys left as initialised: %s", len(missing), ", ".join(missing))
    return LoadReport(layout=layout, missing=missing, unused=unused)


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load the model of a training checkpoint that names it.

    Checkpoints written by the training engines (``model.pth``) carry ``model_name`` and
    ``model_kwargs`` beside the weights (``model``, and ``model_ema`` when EMA was used: the
    plain weights are loaded).

    Returns:
        The model in eval mode, and the checkpoint's other entries (config, classes, ...).

    Raises:
        FileNotFoundError: no such file.
        UnreadableCheckpointError: the file cannot be read (a ValueError naming it).
        CheckpointMismatchError: the file does not name its model, or the weights do not fit it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise _unreadable(path, "weights-only PyTorch checkpoint", e) from e
    if not isinstance(state, Mapping) or "model_name" not in state or "model" not in state:
        raise CheckpointMismatchError(
            f"{path}: expected a training checkpoint with keys 'model_name', 'model_kwargs' and 'model'"
        )
    model = create_model(state["model_name"], **dict(state.get("model_kwargs") or {}))
    load_checkpoint(model, state["model"])
    meta = {k: v for k, v in state.items() if k not in ("model", "model_ema")}
    return model.eval(), meta


def save_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state_dict`` to ``path`` as safetensors, atomically (temporary file, ``os.replace``).

    Args:
        path: the destination (``model.safetensors``); its folder is created.
        state_dict: names to tensors (copied to contiguous CPU tensors; shared storage is fine).
        metadata: written into the file's header, each value as JSON unless it is a string
            (``model_name``, ``model_kwargs``, ...: what :func:`anchorformer.export.build_model`
            and ``anchorformer export`` read back).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    header = {"format": "pt"}
    for k, v in (metadata or {}).items():
        header[k] = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=header)
        _sort_safetensors_header(tmp_name)
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        code = errno_in(e) if isinstance(e, Exception) else None
        if code is None:
            raise
        # The writer's own error (SafetensorError "IoError(Os { code: 28, ... })") as the one
        # line a checkpoint write gives: the file, the cause by name, what was left.
        name = errno.errorcode.get(code, str(code))
        err = OSError(
            f"{path}: cannot write the weights: {os.strerror(code)} ({name}); "
            + (f"{path} is intact (unchanged)" if path.exists() else "nothing was replaced")
            + ("; free some space, then rerun the same command" if code in (errno.ENOSPC, errno.EDQUOT) else "")
        )
        err.errno = code
        raise err from e
    return path


def errno_in(exc: BaseException) -> int | None:
    """The errno of a failed write in ``exc``: an OSError with one in its chain (torch's serializer
    turns a failed ``write()`` into a RuntimeError whose context is the OSError), or the
    ``code: N`` of an I/O error that a Rust writer (safetensors) reports in words; else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        m = re.search(r"\bOs \{ code: (\d+)", str(e))
        if m:
            return int(m.group(1))
        todo += [e.__cause__, e.__context__]
    return None


def _sort_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place.

    The writer serialises the header from hash maps, so the same tensors and metadata come out
    in a different key order from one process to the next; sorted, the file is the same bytes.
    The header keeps its length (same entries, compact JSON, space padding), so the tensor data
    and its offsets stay where they are.
    """
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:
            raise ValueError(f"{path}: sorted safetensors header is {len(text)} bytes, longer than the {size} written")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def safetensors_beside(checkpoint: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` beside a run's ``model.pth`` (same folder, same stem).

    The weights are the ones :func:`read_state_dict` and timm's loader pick from the checkpoint
    (EMA weights when present); the checkpoint's other JSON-able entries (``model_name``,
    ``model_kwargs``, ``classes``, ``detector_config``, ``model_config``, ...) go into the
    header. ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
    and :func:`load_checkpoint` read the result.

    Returns:
        The path written.
    """
    checkpoint = Path(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = read_state_dict(state)
    meta: dict[str, Any] = {}
    if isinstance(state, Mapping):
        picked = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping) and state[k]), None)
        if picked is not None:
            meta["weights"] = picked
        for k, v in state.items():
            if k in _WRAPPER_KEYS or isinstance(v, torch.Tensor):
                continue
            try:
                json.dumps(v)
            except TypeError:
                continue  # tensors or other objects nested in an entry: not header material
            meta[k] = v
    return save_safetensors(checkpoint.with_suffix(".safetensors"), weights, meta)
