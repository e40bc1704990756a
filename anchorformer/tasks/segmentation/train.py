"""ADE20K semantic segmentation: training, evaluation and the ``train seg`` / ``eval seg`` commands (E6).

Shan et al., "AnchorFormer", arXiv 2505.16463, evaluate on ADE20K with Semantic FPN (T) and
UperNet (S); the recipes are the field's standard ones (``anchorformer/configs/seg.yaml``):
iteration-based training of 512² crops with AdamW and a poly schedule (optionally after a
linear warm-up), single-scale sliding-window testing at the (2048, 512) scale, and mIoU, mAcc
and aAcc over the 150 classes (:mod:`.seg_metrics`).

The loop runs on one CPU process, one GPU or many under ``torchrun`` (DDP, SyncBN in the heads
on CUDA). The training stream is deterministic: global batch ``i`` holds the same samples, with
the same augmentation seeds, whatever the number of processes or workers and whether the run
was resumed, so a run resumed from a checkpoint ends where an uninterrupted one does.

Outputs of a run in ``OUT``: ``checkpoints/checkpoint-NNNNNN.pth`` (every ``checkpoint_every``
iterations, atomically), ``model.pth`` (the final weights and the model config), ``dvclive/``
(curves), and after evaluation ``metrics.json`` (``mIoU``, ``mAcc``, ``aAcc``, ...),
``per_class.json`` and ``predictions/*.png`` (ADE20K format: 1..150, named like the ground truth).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..complexity import count_macs, count_params
from ..io import write_json_atomic
from ..models.anchorformer import AnchorAttention
from ..models.factory import is_anchorformer
from ..models.segmentation import HEADS, SegmentationModel, build_segmentation_model, segmentation_model_from_config
from .checkpoint import (
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from .config import apply_overrides, default_profile, load_profile
from .distributed import all_reduce_mean, barrier, init_distributed, unwrap_model
from .logging import MetricLogger, progress
from .seg_inference import predict_probs
from .seg_metrics import IGNORE_INDEX, SegMetrics

__all__ = [
    "build_model",
    "evaluate_checkpoint",
    "evaluate_segmentation",
    "lr_at",
    "model_complexity",
    "register_eval",
    "register_train",
    "resolve_config",
    "train_segmentation",
    "train_segmentation_torchrun",
]

_logger = logging.getLogger(__name__)

TASK = "seg"
_SIZE_RE = re.compile(r"_(tiny|small|base)_")


# ---------------------------------------------------------------------------------------------
# Configuration and model
# ---------------------------------------------------------------------------------------------


def resolve_config(profile: str | None = None, overrides: Sequence[str] = (), **explicit: Any) -> dict[str, Any]:
    """The preset of ``profile``, with the chosen head's recipe, then ``overrides`` and ``explicit``.

    Args:
        profile: ``"mini"`` or ``"full"``; default: the ``profile`` of ``./params.yaml``.
        overrides: ``"key=value"`` strings (``--set``); unknown keys raise before any work.
        **explicit: values given by their own flag (``backbone=``, ``head=``, ``iters=``, ...);
            ``None`` values are ignored.

    Returns:
        A flat config dict (``recipes`` kept for reference) with ``profile`` added.

    Raises:
        KeyError: an unknown key; ValueError: an unknown head or a malformed override.
    """
    profile = profile or default_profile()
    base = load_profile(TASK, profile)
    given = {k: v for k, v in explicit.items() if v is not None}
    unknown = sorted(set(given) - set(base))
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(base))}")
    first = apply_overrides(base, overrides)
    first.update(given)
    head = first["head"]
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}; got {head!r}")
    recipes = first.get("recipes") or {}
    cfg = copy.deepcopy(base)
    for key, value in (recipes.get(head) or {}).items():
        if key not in cfg:
            raise KeyError(f"recipes.{head}.{key} is not a config key; valid keys: {', '.join(sorted(base))}")
        cfg[key] = value
    cfg = apply_overrides(cfg, overrides)
    cfg.update(given)
    cfg["recipes"] = recipes
    cfg["profile"] = profile
    return cfg


def model_arguments(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(backbone name, keyword arguments of build_segmentation_model)`` from a config."""
    name = str(cfg["backbone"])
    bk: dict[str, Any] = {"img_size": int(cfg["pretrain_img_size"])}
    if cfg.get("patch_size"):
        bk["patch_size"] = int(cfg["patch_size"])
    m = _SIZE_RE.search(name)
    sizes = cfg.get("model_sizes") or {}
    if m and m.group(1) in sizes:
        bk.update(sizes[m.group(1)])
    if is_anchorformer(name):
        if cfg.get("num_anchors"):
            bk["num_anchors"] = int(cfg["num_anchors"])
        bk["attn_impl"] = cfg.get("attn_impl", "auto")
    kwargs = {
        "head": cfg["head"],
        "num_classes": int(cfg["num_classes"]),
        "pyramid_channels": int(cfg["pyramid_channels"]),
        "pyramid_norm": cfg["pyramid_norm"] or "",
        "head_channels": cfg.get("head_channels"),
        "aux_head": bool(cfg["aux_head"]),
        "aux_weight": float(cfg["aux_weight"]),
        "norm": cfg["norm"],
        "dropout": float(cfg["dropout"]),
        "drop_path_rate": float(cfg["drop_path"]),
        "backbone_kwargs": bk,
    }
    return name, kwargs


def build_model(cfg: Mapping[str, Any], init_checkpoint: str | os.PathLike | None = None) -> SegmentationModel:
    """The segmentation model of ``cfg``; the backbone from ``init_checkpoint`` (or ``cfg``'s) if any."""
    name, kwargs = model_arguments(cfg)
    ckpt = init_checkpoint if init_checkpoint is not None else cfg.get("init_checkpoint")
    if ckpt and not Path(ckpt).is_file():
        raise FileNotFoundError(f"init_checkpoint not found: {ckpt} (an E1 classification checkpoint)")
    return build_segmentation_model(name, checkpoint=ckpt or None, **kwargs)


def run_description(cfg: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """What a run is, for its ``metrics.json``: backbone, family, head, anchors M, crop size, profile."""
    name = str(cfg["backbone"])
    anchors = None
    if model is not None:
        anchors = next((int(m.num_anchors) for m in model.modules() if isinstance(m, AnchorAttention)), None)
    return {
        "backbone": name,
        "family": "AnchorFormer" if is_anchorformer(name) else "DeiT",
        "head": cfg["head"],
        "num_anchors": anchors,
        "crop_size": int(cfg["crop_size"]),
        "profile": cfg.get("profile"),
    }


def model_complexity(model: nn.Module, img_size: int | tuple[int, int] = 512) -> dict[str, Any]:
    """Params (millions) and GMACs of backbone + pyramid + decode head on one image (default 512²).

    The auxiliary head is training-only and not counted.
    """
    model = unwrap_model(model)
    macs = count_macs(model, img_size)
    params = count_params(model) - (count_params(model.aux_head) if getattr(model, "aux_head", None) else 0)
    return {"params_m": round(params / 1e6, 3), "gmacs": round(macs / 1e9, 3)}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _ade20k(root: str | os.PathLike, split: str, cfg: Mapping[str, Any], train: bool) -> Dataset:
    from ..data.ade20k import ADE20KSegmentation

    return ADE20KSegmentation(
        root, split, crop_size=int(cfg["crop_size"]), train=train, scale_range=tuple(cfg["scale_range"])
    )


class _SeededSamples(Dataset):
    """``dataset[(index, seed)]``: the sample drawn with the global RNGs seeded by ``seed``.

    The callers' generator states are restored afterwards, so the augmentation of every sample
    depends only on its seed (not on the worker or on what came before).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py, nps, ts = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(nps)
            torch.set_rng_state(ts)


class _TrainBatches:
    """Batch sampler of the training stream: iteration ``i`` -> this process's share of global batch ``i``.

    The stream is the concatenation of permutations of the dataset (pass p shuffled by
    ``(seed, p)``); global batch i is its positions ``[i B, (i + 1) B)``; process r of W takes
    every W-th of them from r. Each position j carries the augmentation seed ``(seed, j)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, pos: int) -> int:
        p, k = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != p:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
            self._perm = (p, torch.randperm(self.n, generator=g))
        return int(self._perm[1][k])

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            first = it * self.batch_size
            yield [
                (self._index(pos), (self.seed * 1_000_003 + pos) % 2**62)
                for pos in range(first + self.rank, first + self.batch_size, self.world)
            ]


def pad_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image (3, H, W), label (H, W)) pairs, padding to the largest size (0 / 255)."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = torch.zeros(len(batch), 3, h, w, dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long)
    for i, (img, lab) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        labels[i, : lab.shape[-2], : lab.shape[-1]] = lab
    return images, labels


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def lr_at(it: int, total: int, cfg: Mapping[str, Any]) -> float:
    """Learning rate at iteration ``it`` of ``total``: linear warm-up, then poly decay to ``min_lr``."""
    base, warm = float(cfg["lr"]), int(cfg["warmup_iters"] or 0)
    if it < warm:
        ratio = float(cfg["warmup_ratio"])
        return base * (ratio + (1.0 - ratio) * it / warm)
    span = max(1, total - warm)
    progress_ = min(1.0, (it - warm) / span)
    min_lr = float(cfg["min_lr"])
    return (base - min_lr) * (1.0 - progress_) ** float(cfg["poly_power"]) + min_lr


def _amp_context(cfg: Mapping[str, Any], device: torch.device) -> Any:
    enabled = bool(cfg.get("amp")) and (device.type == "cuda" or cfg.get("device") == "cpu")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _resolve_iters(cfg: Mapping[str, Any], n_train: int, iters: int | None, epochs: float | None) -> int:
    if iters is not None and epochs is not None:
        raise ValueError("give --iters or --epochs, not both")
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0; got {epochs}")
        return max(1, math.ceil(epochs * n_train / int(cfg["batch_size"])))
    total = int(iters if iters is not None else cfg["iters"])
    if total < 1:
        raise ValueError(f"iters must be >= 1; got {total}")
    return total


def train_segmentation(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: Mapping[str, Any],
    *,
    iters: int | None = None,
    epochs: float | None = None,
    resume: str = "auto",
    evaluate: bool | None = None,
    save_predictions: bool = True,
    max_eval_images: int | None = None,
) -> dict[str, Any]:
    """Train a segmentation model on ``data_root``'s training split; optionally evaluate it.

    Args:
        data_root: the ``ADEChallengeData2016`` folder.
        out_dir: the run's folder (created).
        cfg: a config from :func:`resolve_config`.
        iters: number of iterations (default ``cfg["iters"]``).
        epochs: passes over the training set, converted to iterations (instead of ``iters``).
        resume: ``"auto"`` (continue from the latest complete checkpoint in ``out_dir``),
            ``"none"`` (start afresh), or a checkpoint path.
        evaluate: evaluate on the validation split at the end (default ``cfg["eval_at_end"]``).
        save_predictions: write the predicted label maps when evaluating.
        max_eval_images: evaluate on the first N validation images only.

    Returns:
        ``{"iters", "train_time_s", "final_loss", "params_m", "gmacs", "checkpoint", "metrics"}``
        (``metrics``: those of :func:`evaluate_segmentation`, or ``None``).
    """
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _train(data_root, out_dir, cfg, iters, epochs, resume, evaluate, save_predictions, max_eval_images)
    finally:
        torch.set_num_threads(threads)


def _train(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: Mapping[str, Any],
    iters: int | None,
    epochs: float | None,
    resume: str,
    evaluate: bool | None,
    save_predictions: bool,
    max_eval_images: int | None,
) -> dict[str, Any]:
    out = Path(out_dir)
    info = init_distributed(cfg.get("device"))
    device = info.device
    bs = int(cfg["batch_size"])
    if bs % info.world_size:
        raise ValueError(f"batch_size {bs} (global) must be divisible by the {info.world_size} processes")
    if resume not in ("auto", "none") and not Path(resume).is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {resume}")
    train_set = _ade20k(data_root, "training", cfg, train=True)
    total = _resolve_iters(cfg, len(train_set), iters, epochs)  # type: ignore[arg-type]
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg)
    complexity = model_complexity(copy.deepcopy(model).to("meta"), 512)  # GMACs at 512², the field's convention
    model.to(device)
    from ..models.pyramid import param_groups_layer_decay

    groups = param_groups_layer_decay(
        model, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]), layer_decay=float(cfg["layer_decay"])
    )
    optimizer = torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=tuple(cfg["betas"]))

    start = 0
    ckpt_path = None if resume == "none" else (find_latest_checkpoint(out) if resume == "auto" else Path(resume))
    if ckpt_path is not None:
        state = load_training_checkpoint(ckpt_path)
        differences = _resume_differences(state, model.config, cfg, total)
        if differences and resume == "auto":
            _logger.warning(
                "not resuming from %s: it belongs to another run (%s); starting afresh", ckpt_path, differences
            )
            ckpt_path = None
        elif differences:
            raise ValueError(
                f"{ckpt_path}: checkpoint was written by another run ({differences}); "
                "use another --out, or --resume none to start afresh"
            )
    if ckpt_path is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        restore_rng_state(state["rng"])
        _logger.info("resumed from %s at iteration %d of %d", ckpt_path, start, total)

    train_model: nn.Module = model
    if info.is_distributed:
        if device.type == "cuda" and cfg["norm"] == "bn":
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = DataLoader(
        _SeededSamples(train_set),
        batch_sampler=_TrainBatches(len(train_set), bs, int(cfg["seed"]), start, total, info.rank, info.world_size),
        num_workers=int(cfg["num_workers"]),
        collate_fn=pad_collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(int(cfg["seed"])),  # leaves the global RNG (dropout) alone
    )
    logger = MetricLogger(out, enabled=info.is_main, resume_step=start if ckpt_path is not None else None)
    every = int(cfg["checkpoint_every"])
    log_every = max(1, int(cfg["log_every"]))
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    train_model.train()
    for it, (images, labels) in enumerate(progress(loader, desc="train seg", total=len(loader)), start=start):
        lr = lr_at(it, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        # the mean labelled-pixel count per process: the loss is the mean over the global batch
        normalizer = all_reduce_mean((labels != IGNORE_INDEX).sum().float())
        with _amp_context(cfg, device):
            losses = train_model(images, labels, normalizer)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it + 1}; lower lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("clip_grad"):
            nn.utils.clip_grad_norm_(model.parameters(), float(cfg["clip_grad"]))
        optimizer.step()
        done = it + 1
        if done % log_every == 0 or done == total:
            last = {k: float(all_reduce_mean(v.detach())) for k, v in losses.items()}
            logger.log({**{f"train/{k}": v for k, v in last.items()}, "train/lr": lr}, step=done)
            _logger.info("iter %d/%d  loss %.4f  lr %.3g", done, total, last["loss"], lr)
        if info.is_main and (done % every == 0 or done == total):
            _save_training_state(out, done, total, model, optimizer, cfg, int(cfg["keep_checkpoints"]))
    train_time = time.perf_counter() - t0
    barrier()
    final = out / "model.pth"
    if info.is_main:
        save_checkpoint(
            final, {"model": model.state_dict(), "model_config": model.config, "config": dict(cfg), "iteration": total}
        )
    summary = {
        "iters": total,
        "train_time_s": round(train_time, 2),
        "final_loss": last.get("loss"),
        **complexity,
        "checkpoint": str(final),
    }
    logger.summary({k: v for k, v in summary.items() if k != "checkpoint"})
    logger.close()
    metrics = None
    if cfg["eval_at_end"] if evaluate is None else evaluate:
        metrics = evaluate_segmentation(
            model,
            data_root,
            out,
            cfg,
            save_predictions=save_predictions,
            max_images=max_eval_images,
            extra={
                **run_description(cfg, model),
                "iters": total,
                "train_time_s": summary["train_time_s"],
                **complexity,
            },
        )
    return {**summary, "metrics": metrics}


# Keys that do not change what a run computes: a checkpoint may be resumed whatever their values.
_RESUME_FREE_KEYS = {
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",
    "threads",
    "eval_at_end",
    "device",
    "profile",
    "recipes",
    "test_mode",
    "test_crop_size",
    "test_stride",
    "test_scale",
    "test_scales",
    "test_flip",
}


def _resume_differences(
    state: Mapping[str, Any], model_config: Mapping[str, Any], cfg: Mapping[str, Any], total: int
) -> str:
    """Why a checkpoint cannot be resumed by this run ('' when it can)."""
    if state.get("model_config") != model_config:
        return f"another model: {state.get('model_config')} vs {dict(model_config)}"
    if int(state.get("total_iters", -1)) != total:
        return f"another length: {state.get('total_iters')} iterations vs {total}"
    old = state.get("config") or {}
    keys = sorted(k for k in set(old) | set(cfg) if k not in _RESUME_FREE_KEYS and old.get(k) != cfg.get(k))
    return "other settings: " + ", ".join(f"{k} {old.get(k)!r} vs {cfg.get(k)!r}" for k in keys) if keys else ""


def _save_training_state(
    out: Path, done: int, total: int, model: SegmentationModel, optimizer: Any, cfg: Mapping[str, Any], keep: int
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": done,
        "total_iters": total,
        "rng": capture_rng_state(),
        "config": dict(cfg),
        "model_config": model.config,
    }
    save_checkpoint(checkpoint_path(out, done), state)
    prune_checkpoints(out, keep)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _label_file(dataset: Any, index: int) -> Path:
    """The ground-truth file of sample ``index`` (for names of predictions and in errors)."""
    return Path(dataset.samples[index][1])


def save_label_map(pred: torch.Tensor, path: Path) -> None:
    """Write class indices (H, W) in [0, 150) as an ADE20K label PNG (values 1..150, 0 unused)."""
    arr = (pred.to(torch.int64) + 1).cpu().numpy()
    if arr.max(initial=1) > 255:
        raise ValueError(f"{path}: {int(arr.max())} classes do not fit an 8-bit label map")
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: Mapping[str, Any],
    *,
    split: str = "validation",
    save_predictions: bool = True,
    max_images: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """mIoU, mAcc and aAcc of ``model`` on a split, with the test settings of ``cfg``.

    Every image is predicted at its original size (resized to fit ``test_scale`` for the model,
    logits resized back) and compared with its ground truth, whose size it must match.

    Args:
        model: a :class:`SegmentationModel` (any device; moved to ``cfg["device"]``).
        data_root: the ``ADEChallengeData2016`` folder.
        out_dir: where ``metrics.json``, ``per_class.json`` and ``predictions/`` go (created).
        cfg: config with the ``test_*`` keys, ``num_classes``, ``device``, ``amp``.
        split: ``"validation"`` (default) or ``"training"``.
        save_predictions: write ``predictions/<ground-truth name>.png`` (values 1..150).
        max_images: only the first N images.
        extra: more entries for ``metrics.json`` (iterations, GMACs, ...).

    Returns:
        The contents of ``metrics.json``: ``mIoU``, ``mAcc``, ``aAcc`` (percent), ``num_images``,
        ``num_classes_evaluated``, ``eval_time_s`` and ``extra``.
    """
    info = init_distributed(cfg.get("device"))
    device = info.device
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = _ade20k(data_root, split, cfg, train=False)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))  # type: ignore[arg-type]
    num_classes = int(cfg["num_classes"])
    pred_tmp = out / ".predictions.tmp"
    if save_predictions and info.is_main:
        shutil.rmtree(pred_tmp, ignore_errors=True)
        pred_tmp.mkdir()
    barrier()
    model = unwrap_model(model).to(device).eval()
    metrics = SegMetrics(num_classes)
    t0 = time.perf_counter()
    for i in progress(range(info.rank, n, info.world_size), desc=f"eval seg {split}"):
        image, label = dataset[i]
        gt_file = _label_file(dataset, i)
        if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
            raise ValueError(
                f"{gt_file}: label map is {tuple(label.shape[-2:])} but its image is {tuple(image.shape[-2:])}; "
                "expected the same (H, W)"
            )
        with _amp_context(cfg, device):
            probs = predict_probs(
                model,
                image[None].to(device),
                num_classes,
                mode=cfg["test_mode"],
                crop_size=cfg["test_crop_size"],
                stride=cfg["test_stride"],
                test_scale=cfg["test_scale"],
                scales=cfg["test_scales"],
                flip=bool(cfg["test_flip"]),
                out_size=tuple(label.shape[-2:]),
            )
        pred = probs.argmax(1)[0].cpu()
        metrics.update(pred, label.long(), name=str(gt_file))
        if save_predictions:
            save_label_map(pred, pred_tmp / gt_file.name)
    metrics.all_reduce()
    result = metrics.compute()
    eval_time = time.perf_counter() - t0
    per_class = result.pop("per_class")
    names = getattr(dataset, "class_names", None)
    if names is not None:
        for row in per_class:
            row["name"] = names[row["class"]]
    summary = {
        **{k: result[k] for k in ("mIoU", "mAcc", "aAcc")},
        "num_images": n,
        "num_classes_evaluated": result["num_classes_evaluated"],
        "split": split,
        "eval_time_s": round(eval_time, 2),
        **dict(extra or {}),
    }
    barrier()
    if info.is_main:
        if save_predictions:
            shutil.rmtree(out / "predictions", ignore_errors=True)
            os.replace(pred_tmp, out / "predictions")
        write_json_atomic(out / "per_class.json", [r for r in per_class if r["gt_pixels"] or r["pred_pixels"]])
        write_json_atomic(out / "metrics.json", summary)
        _logger.info("%s: mIoU %.2f  mAcc %.2f  aAcc %.2f", split, summary["mIoU"], summary["mAcc"], summary["aAcc"])
    return summary


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Rebuild the model saved in ``checkpoint`` (``model.pth`` or a training checkpoint) and evaluate it.

    Test settings come from the checkpoint's config, then ``overrides`` (``--set test_flip=true``).
    ``kwargs`` go to :func:`evaluate_segmentation`.
    """
    state = load_training_checkpoint(checkpoint)
    missing = [k for k in ("model", "model_config", "config") if k not in state]
    if missing:
        raise KeyError(
            f"{checkpoint}: not a segmentation checkpoint (lacks {missing}); expected one written by train seg"
        )
    cfg = apply_overrides(state["config"], overrides)
    model = segmentation_model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    extra = {**run_description(cfg, model), "checkpoint": str(checkpoint), "iters": int(state.get("iteration", 0))}
    extra.update(model_complexity(copy.deepcopy(model).to("meta")))
    return evaluate_segmentation(model, data_root, out_dir, cfg, extra={**extra, **kwargs.pop("extra", {})}, **kwargs)


def train_segmentation_torchrun(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    profile: str | None = None,
    overrides: Sequence[str] = (),
    backbone: str | None = None,
    head: str | None = None,
    iters: int | None = None,
    resume: str = "auto",
    extra_torchrun_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``train seg`` under ``torchrun`` (several processes or GPUs) and return ``metrics.json``.

    The command is ``python -m torch.distributed.run --nproc_per_node N [--nnodes K ...] -m
    anchorformer.cli train seg ...``: what a notebook uses to train on several GPUs.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1 and not any(a.startswith(("--rdzv", "--master")) for a in extra_torchrun_args):
        cmd.append("--standalone")
    cmd += [*extra_torchrun_args, "-m", "anchorformer.cli", "train", "seg", "--data", str(data_root)]
    cmd += ["--out", str(out_dir), "--resume", resume]
    for flag, value in (("--profile", profile), ("--backbone", backbone), ("--head", head), ("--iters", iters)):
        if value is not None:
            cmd += [flag, str(value)]
    if overrides:
        cmd += ["--set", *overrides]
    _logger.info("launching %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return json.loads((Path(out_dir) / "metrics.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _train_cli(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.profile, args.set or (), backbone=args.backbone, head=args.head)
    result = train_segmentation(
        args.data,
        args.out,
        cfg,
        iters=args.iters,
        epochs=args.epochs,
        resume=args.resume,
        evaluate=False if args.no_eval else None,
        save_predictions=not args.no_predictions,
    )
    metrics = result["metrics"]
    if metrics is not None and int(os.environ.get("RANK", "0")) == 0:
        _logger.info("mIoU %.2f  mAcc %.2f  aAcc %.2f", metrics["mIoU"], metrics["mAcc"], metrics["aAcc"])
    return 0


def _eval_cli(args: argparse.Namespace) -> int:
    evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.out,
        args.set or (),
        split=args.split,
        save_predictions=not args.no_predictions,
        max_images=args.max_images,
    )
    return 0


def register_train(subparsers: Any) -> None:
    """Add ``train seg``."""
    p = subparsers.add_parser(
        "seg",
        help="train a Semantic FPN / UperNet segmentation model on ADE20K",
        description="Train on ROOT/images/training (ROOT: the ADEChallengeData2016 folder); evaluate at the end.",
    )
    p.add_argument("--data", required=True, help="the ADEChallengeData2016 folder")
    p.add_argument("--out", required=True, help="output folder (checkpoints, model.pth, metrics.json, predictions/)")
    p.add_argument("--backbone", help="backbone model name (default: the profile's)")
    p.add_argument("--head", choices=HEADS, help="decode head (default: the profile's)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--iters", type=int, help="training iterations")
    n.add_argument("--epochs", type=float, help="passes over the training set, converted to iterations")
    p.add_argument("--resume", default="auto", help="auto (latest checkpoint in --out), none, or a checkpoint path")
    p.add_argument("--profile", choices=("mini", "full"), help="recipe preset (default: params.yaml's profile)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", help="override preset keys")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate at the end")
    p.add_argument("--no-predictions", action="store_true", help="do not write predicted label maps")
    p.set_defaults(func=_train_cli)


def register_eval(subparsers: Any) -> None:
    """Add ``eval seg``."""
    p = subparsers.add_parser(
        "seg",
        help="evaluate a segmentation checkpoint on ADE20K (mIoU, mAcc, aAcc)",
        description="Writes OUT/metrics.json (mIoU, mAcc, aAcc), OUT/per_class.json and OUT/predictions/*.png.",
    )
    p.add_argument("--data", required=True, help="the ADEChallengeData2016 folder")
    p.add_argument("--checkpoint", required=True, help="model.pth or a training checkpoint written by train seg")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="validation", choices=("validation", "training"))
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument(
        "--set", action="extend", nargs="+", metavar="KEY=VALUE", help="override test settings, e.g. test_flip=true"
    )
    p.add_argument("--no-predictions", action="store_true", help="do not write predicted label maps")
    p.set_defaults(func=_eval_cli)
