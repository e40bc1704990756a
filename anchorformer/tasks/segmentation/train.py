"""ADE20K semantic segmentation: training, evaluation and the ``train seg`` / ``eval seg`` commands (E6).

Shan et al., "AnchorFormer", arXiv 2505.16463, evaluate on ADE20K with Semantic FPN (T) and
UperNet (S); the recipes are the field's standard ones (the typed :class:`.recipe.SegRecipe`,
presets in ``anchorformer/configs/seg.yaml``): iteration-based training of 512² crops with AdamW
and a poly schedule (optionally after a linear warm-up), single-scale sliding-window testing at
the (2048, 512) scale, and mIoU, mAcc and aAcc over the 150 classes (:mod:`.metrics`). The run
folder, resume protocol, seeding and torchrun launch are the shared engine's
(:mod:`anchorformer.engine`); the backbone is built through
:func:`anchorformer.models.backbone_kwargs`, as in every task.

The loop runs on one CPU process, one GPU or many under ``torchrun`` (DDP, SyncBN in the heads
on CUDA). The training stream is deterministic: global batch ``i`` holds the same samples, with
the same augmentation seeds, whatever the number of processes or workers and whether the run
was resumed, so a run resumed from a checkpoint ends where an uninterrupted one does.

Outputs of a run in ``OUT``: ``checkpoints/checkpoint-NNNNNN.pth`` (every ``checkpoint_every``
iterations, atomically), ``model.pth`` (the final weights and the model config), ``dvclive/``
(curves), and after evaluation ``per_class.json``, ``predictions/*.png`` (ADE20K format: 1..150,
named like the ground truth) and ``metrics.json`` (``mIoU``, ``mAcc``, ``aAcc``, ...; written
last: its presence means the run finished).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ...engine.batching import plan_batch
from ...engine.checkpoint import (
    load_training_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_training_state,
)
from ...engine.distributed import all_reduce_mean, barrier, cleanup_distributed, init_distributed, unwrap_model
from ...engine.divergence import check_loss
from ...engine.launch import launch_if_several
from ...engine.logging import MetricLogger, progress
from ...engine.numerics import numeric_settings
from ...engine.recipe import RecipeError, load_preset, load_preset_with_entry, load_recipe
from ...engine.seeding import seed_everything
from ...engine.timings import RunClock, write_timings
from ...engine.trainer import TrainingRun, training_run
from ...io import write_json_atomic
from ...models.anchorformer import AnchorAttention
from ...models.checkpoint import safetensors_beside
from ...models.factory import backbone_kwargs, is_anchorformer
from ...models.segmentation import SegmentationModel, build_segmentation_model, segmentation_model_from_config
from ...ops.counting import count_macs, count_params
from .inference import predict_probs
from .metrics import IGNORE_INDEX, SegMetrics
from .recipe import SegRecipe

__all__ = [
    "SMOKE",
    "build_model",
    "evaluate_checkpoint",
    "evaluate_segmentation",
    "lr_at",
    "model_arguments",
    "model_complexity",
    "resolve_recipe",
    "run_description",
    "train",
]

_logger = logging.getLogger(__name__)

TASK = "seg"
# A seconds-long run on a few scenes (the notebook's smoke defaults and the tests' dry runs):
# two blocks of width 32 on 64x64 crops, 4 anchors.
SMOKE = [
    "model_sizes.tiny={embed_dim: 32, depth: 2, num_heads: 2}",
    "model_sizes.small={embed_dim: 32, depth: 2, num_heads: 2}",
    "num_anchors=4",
    "pyramid_channels=16",
    "head_channels=16",
    "crop_size=64",
    "batch_size=2",
    "test_crop_size=64",
    "test_stride=48",
    "test_scale=[256, 64]",
    "warmup_iters=0",
    "log_every=1",
]
# `--set dry_run=true`: any recipe, full included, for 4 iterations of 4 crops in micro-batches of 2
# (gradient accumulation; the warm-up of UperNet's recipe shortened to 2 iterations, then its poly
# schedule) and a sliding-window evaluation of 4 validation images, through every code path the
# recipe turns on (the head, the auxiliary head, layer-wise decay, checkpoints): the ViT shrunk to
# 2 blocks of width 32 (8x8 patches, 4 anchors), 64x64 crops, 16-channel pyramid and heads, all 150
# classes. The user's --set apply after these.
_DRY_VIT = "{embed_dim: 32, depth: 2, num_heads: 2}"
DRY_RUN = [
    f"model_sizes={{tiny: {_DRY_VIT}, small: {_DRY_VIT}, base: {_DRY_VIT}}}",
    "img_size=32",
    "patch_size=8",
    "num_anchors=4",
    "pyramid_channels=16",
    "head_channels=16",
    "crop_size=64",
    "iters=4",
    "batch_size=4",
    "device_batch=2",
    "recipes.upernet.warmup_iters=2",
    "test_crop_size=64",
    "test_stride=48",
    "test_scale=[256, 64]",
    "num_workers=0",
    "checkpoint_every=2",
    "keep_checkpoints=1",
    "log_every=1",
]
DRY_RUN_EVAL_IMAGES = 4  # validation images a dry run evaluates (unless max_eval_images says otherwise)
# a run's result files: removed before a (re)start, moved aside with --resume never --overwrite
RESULTS = ("metrics.json", "model.pth", "model.safetensors", "per_class.json", "predictions")
# keys of recipes stored before the typed recipe, and their names now
_OLD_KEYS = {"backbone": "model", "pretrain_img_size": "img_size"}


# ---------------------------------------------------------------------------------------------
# Configuration and model
# ---------------------------------------------------------------------------------------------


def _flag(source: str, flag: str) -> str:
    return flag if source == "cli" else f"{source}: {flag.lstrip('-')}"


def resolve_recipe(
    profile: str = "mini",
    overrides: Sequence[str] = (),
    model: str | None = None,
    head: str | None = None,
    iters: Any = None,
    source: str = "argument",
) -> SegRecipe:
    """The recipe: the ``profile`` preset with the chosen head's ``recipes`` entry, then
    ``overrides`` (``--set``), then ``model``/``head``/``iters``.

    The head is the one the preset, ``overrides`` and ``head`` choose together; its entry of
    ``recipes`` (itself subject to ``--set recipes.<head>.<key>=...``) replaces the preset's values,
    and ``overrides`` and the explicit values are applied over the result: ``--set`` and the flags
    always win over the head's recipe.

    Args:
        profile: ``"mini"`` or ``"full"``.
        overrides: ``"key=value"`` strings, values parsed as YAML; dotted keys reach into mappings.
        model: the backbone's name; default: the preset's.
        head: ``"fpn"`` or ``"upernet"``; default: the preset's.
        iters: training iterations; default: the head's recipe's.
        source: how ``model``/``head``/``iters`` arrived, for errors (the CLI passes ``"cli"`` so
            that errors name the flags; the pipeline's notebooks pass ``"params.yaml"``).

    Raises:
        RecipeError: an unknown key, a value of the wrong type or out of range (naming the key
            and where it came from).
    """
    preset, label = load_preset_with_entry(SegRecipe, profile, overrides, "head", head)
    explicit = {
        "model": (model, _flag(source, "--model")),
        "head": (head, _flag(source, "--head")),
        "iters": (iters, _flag(source, "--iters")),
    }
    recipe = load_recipe(SegRecipe, profile, overrides=overrides, explicit=explicit, preset=(preset, label))
    if recipe.dry_run and list(overrides)[: len(DRY_RUN)] != DRY_RUN:  # the reductions, then --set and the flags
        recipe = resolve_recipe(profile, [*DRY_RUN, *overrides], model=model, head=head, iters=iters, source=source)
    return recipe


def iters_for_epochs(epochs: Any, num_images: int, batch_size: int, where: str = "epochs") -> int:
    """Iterations of ``epochs`` passes over ``num_images`` training images in global batches of ``batch_size``.

    Raises:
        RecipeError: ``epochs`` is not a number > 0 (``where`` names the flag or argument).
    """
    ok = isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and math.isfinite(epochs) and epochs > 0
    if not ok:
        raise RecipeError(f"epochs={epochs!r} ({where}): expected a number > 0 (passes over the training set)")
    return max(1, math.ceil(epochs * num_images / int(batch_size)))


def model_arguments(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(backbone name, keyword arguments of build_segmentation_model)`` from a recipe."""
    name = str(cfg["model"])
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
        "backbone_kwargs": backbone_kwargs(name, cfg),
        "neck": cfg.get("neck") or "simple",
    }
    return name, kwargs


def build_model(cfg: Mapping[str, Any], init_checkpoint: str | os.PathLike | None = None) -> SegmentationModel:
    """The segmentation model of ``cfg``; the backbone from ``init_checkpoint`` (or ``cfg``'s) if any."""
    name, kwargs = model_arguments(cfg)
    ckpt = init_checkpoint if init_checkpoint is not None else cfg.get("init_checkpoint")
    if ckpt and not Path(ckpt).is_file():
        raise FileNotFoundError(f"init_checkpoint not found: {ckpt} (an E1 classification checkpoint)")
    return build_segmentation_model(name, checkpoint=ckpt or None, **kwargs)


def run_description(
    cfg: Mapping[str, Any], model: nn.Module | None = None, profile: str | None = None
) -> dict[str, Any]:
    """What a run is, for its ``metrics.json``: backbone, family, head, anchors M, crop size, profile."""
    name = str(cfg["model"])
    anchors = None
    if model is not None:
        anchors = next((int(m.num_anchors) for m in model.modules() if isinstance(m, AnchorAttention)), None)
    return {
        "backbone": name,
        "family": "AnchorFormer" if is_anchorformer(name) else "DeiT",
        "head": cfg["head"],
        "neck": cfg.get("neck") or "simple",
        "num_anchors": anchors,
        "crop_size": int(cfg["crop_size"]),
        "profile": profile,
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


def _ade20k(root: str | os.PathLike, split: str, cfg: Mapping[str, Any], train: bool, on_bad: str = "fail") -> Dataset:
    from ...data.ade20k import ADE20KSegmentation

    return ADE20KSegmentation(
        root, split, crop_size=int(cfg["crop_size"]), train=train, scale_range=tuple(cfg["scale_range"]), on_bad=on_bad
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
        seed_everything(seed)
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


def train(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | None = None,
    *,
    profile: str = "mini",
    overrides: Sequence[str] = (),
    epochs: Any = None,
    iters: Any = None,
    head: str | None = None,
    resume: str = "auto",
    overwrite: bool = False,
    if_different: str = "refuse",
    evaluate: bool | None = None,
    save_predictions: bool = True,
    max_eval_images: int | None = None,
    nproc_per_node: int | str = 1,
    nnodes: int = 1,
    torchrun_args: Sequence[str] = (),
    source: str = "argument",
) -> dict[str, Any]:
    """Train a segmentation model on ``data``'s training split and evaluate it; write ``out_dir``.

    Args:
        data: the ``ADEChallengeData2016`` folder (ADE20K or the mini set).
        out_dir: the run's folder (created).
        model: the backbone's name; default: the profile's ``model``.
        profile: ``"mini"`` or ``"full"``.
        overrides: ``"key=value"`` strings (see ``anchorformer/configs/seg.yaml``).
        epochs: passes over the training set, converted to iterations (instead of ``iters``).
        iters: training iterations; default: the recipe's (the head's).
        head: ``"fpn"`` or ``"upernet"``; default: the profile's.
        resume: ``"auto"`` (the latest checkpoint in ``out_dir``, if any), ``"never"`` (a fresh
            start; a folder holding an earlier run is refused unless ``overwrite``) or a path.
        overwrite: with ``resume="never"``, move an earlier run's files to ``previous-<time>/``.
        if_different: ``"refuse"`` or ``"restart"``: what ``resume="auto"`` does with a checkpoint
            of another recipe or code version (:func:`anchorformer.engine.run.open_run`).
        evaluate: evaluate on the validation split at the end; default: the recipe's ``eval_at_end``.
        save_predictions: write the predicted label maps when evaluating.
        max_eval_images: evaluate on the first N validation images only.
        nproc_per_node, nnodes, torchrun_args: more than one process runs the same training
            under ``torchrun`` (``anchorformer train seg`` in each process).
        source: where ``model``/``head``/``iters``/``epochs`` came from, named in errors.

    Returns:
        When evaluated, the metrics written to ``out_dir/metrics.json`` (``mIoU``, ``mAcc``,
        ``aAcc``, ``num_images``, ``backbone``, ``head``, ``iters``, ``params_m``, ``gmacs``, ...);
        otherwise the training summary (``iters``, ``final_loss``, ``params_m``, ``gmacs``,
        ``checkpoint``). The seconds go to ``out_dir/timings.json``, apart from the results.

    Raises:
        RecipeError, ValueError, FileNotFoundError: bad recipe, iterations, model name or data
            layout, raised before any training starts. RunFolderError: the folder is in use or
            holds another run.
    """
    if iters is not None and epochs is not None:
        both = "--iters or --epochs" if source == "cli" else f"iters or epochs ({source})"
        raise RecipeError(f"give {both}, not both")
    recipe = resolve_recipe(profile, overrides, model=model, head=head, iters=iters, source=source)
    data, out_dir = Path(data), Path(out_dir)
    if recipe.dry_run and max_eval_images is None:
        max_eval_images = DRY_RUN_EVAL_IMAGES
    # both splits' layouts are checked before any work (evaluation always fails on a bad file)
    train_set = _ade20k(data, "training", recipe, train=True, on_bad=recipe.on_bad)
    _ade20k(data, "validation", recipe, train=False)
    n_train = len(train_set)  # type: ignore[arg-type]
    if n_train < recipe.batch_size:
        raise ValueError(
            f"{data / 'images' / 'training'} holds {n_train} images with a label map, fewer than one global "
            f"batch of {recipe.batch_size} (batch_size); lower batch_size"
        )
    if epochs is not None:
        where = _flag(source, "--epochs")
        passes = iters_for_epochs(epochs, n_train, recipe.batch_size, where)
        recipe = recipe.replace(where, iters=passes)
    try:
        launched = launch_if_several(
            TASK, data, out_dir, nproc_per_node=nproc_per_node, nnodes=nnodes, torchrun_args=torchrun_args,
            device=recipe.device,
            model=model, profile=profile, epochs=epochs, iters=iters, head=head,
            overrides=[*overrides, *(["eval_at_end=true"] if evaluate else [])], resume=resume, overwrite=overwrite,
            if_different=if_different, no_eval=evaluate is False, no_predictions=not save_predictions,
            max_eval_images=max_eval_images,
        )  # fmt: skip
    except FileNotFoundError:  # no metrics.json: the run was not evaluated
        if recipe.eval_at_end if evaluate is None else bool(evaluate):
            raise
        return {"iters": recipe.iters, "checkpoint": str(out_dir / "model.pth")}
    if launched is not None:
        return launched

    init = recipe.init_checkpoint
    if init and not Path(init).is_file():
        raise FileNotFoundError(f"init_checkpoint not found: {init} (an E1 classification checkpoint)")
    with torch.device("meta"):  # checks the model's name and arguments before the run folder is made
        model_config = build_model(recipe, init_checkpoint="").config  # nothing allocated, no weights read

    def differences(state: Mapping[str, Any]) -> list[str]:
        """Why checkpoint ``state`` cannot be resumed by this run (empty: it can)."""
        why = []
        if state.get("model_config") != model_config:
            why.append(f"another model: {state.get('model_config')} vs {model_config}")
        if int(state.get("total_iters", -1)) != recipe.iters:
            why.append(f"another length: {state.get('total_iters')} iterations vs {recipe.iters}")
        return why + recipe.differences(state.get("config") or {})

    with training_run(
        recipe, out_dir, resume=resume, overwrite=overwrite, if_different=if_different, results=RESULTS,
        differences=differences,
    ) as run:  # fmt: skip
        return _train(run, data, train_set, profile, evaluate, save_predictions, max_eval_images)


def _train_step(
    train_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    it: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    total: int,
    cfg: SegRecipe,
    device: torch.device,
    plan: Any,
    logger: MetricLogger,
    clock: RunClock,
    last: dict[str, float],
) -> dict[str, float]:
    """One optimizer step (iteration ``it``, 0-based) on a global batch: images (B, 3, H, W) and
    labels (B, H, W) of this process's share; returns the last logged losses."""
    lr = lr_at(it, total, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    # the mean labelled-pixel count per process: the loss is the mean over the global batch
    normalizer = all_reduce_mean((labels != IGNORE_INDEX).sum().float())
    optimizer.zero_grad(set_to_none=True)
    # micro-batches of the process's share: each loss is its pixels' sum / normalizer, so the
    # accumulated gradient is the whole share's (no division by accum)
    losses: dict[str, torch.Tensor] = {}
    for k in range(plan.accum_steps):
        part = slice(k * plan.per_device, (k + 1) * plan.per_device)
        last_part = k + 1 == plan.accum_steps
        sync = nullcontext() if last_part or not hasattr(train_model, "no_sync") else train_model.no_sync()
        with sync:
            with _amp_context(cfg, device):
                micro = train_model(images[part], labels[part], normalizer)
            check_loss(micro["loss"], f"iteration {it + 1}")
            micro["loss"].backward()
        losses = micro if not losses else {key: losses[key] + v.detach() for key, v in micro.items()}
    if cfg.clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), float(cfg.clip_grad))
    optimizer.step()
    done = it + 1
    if done % max(1, int(cfg.log_every)) == 0 or done == total:
        last = {k: float(all_reduce_mean(v.detach())) for k, v in losses.items()}
        logger.log({**{f"train/{k}": v for k, v in last.items()}, "train/lr": lr}, step=done)
        clock.lap(done)
        _logger.info("iter %d/%d  loss %.4f  lr %.3g  (%s)", done, total, last["loss"], lr, clock.progress())
    return last


def _train(
    run: TrainingRun,
    data: Path,
    train_set: Dataset,
    profile: str,
    evaluate: bool | None,
    save_predictions: bool,
    max_eval_images: int | None,
) -> dict[str, Any]:
    cfg, info, out, resume_state = run.recipe, run.dist, run.out, run.state
    assert isinstance(cfg, SegRecipe)
    run.watch_bad_files(train_set)
    val_set: Dataset | None = None
    if cfg.eval_at_end if evaluate is None else evaluate:
        val_set = _ade20k(data, "validation", cfg, train=False)
        if max_eval_images is not None:
            val_set = Subset(val_set, range(min(len(val_set), int(max_eval_images))))  # type: ignore[arg-type]
    run.check_files(train_set, val_set)  # every file read, decoded before the first step
    device = info.device
    per_device = cfg.device_batch or math.ceil(int(cfg.batch_size) / info.world_size)
    plan = plan_batch(int(cfg.batch_size), per_device, info.world_size)
    bs = plan.global_batch
    total = int(cfg.iters)

    seed = int(cfg.seed)
    seed_everything(seed)
    model = build_model(cfg)
    complexity = model_complexity(copy.deepcopy(model).to("meta"), 512)  # GMACs at 512², the field's convention
    model.to(device)
    from ...models.pyramid import param_groups_layer_decay

    groups = param_groups_layer_decay(
        model, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), layer_decay=float(cfg.layer_decay)
    )
    optimizer = torch.optim.AdamW(groups, lr=float(cfg.lr), betas=tuple(cfg.betas))

    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start = int(resume_state["iteration"])
        restore_rng_state(run.own_rng(resume_state["rng"]))
        _logger.info("resumed from %s at iteration %d of %d", run.start.checkpoint, start, total)
        run.resumed_at(start)

    train_model: nn.Module = model
    if info.is_distributed:
        if device.type == "cuda" and cfg.norm == "bn":
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    n_train = len(train_set)  # type: ignore[arg-type]
    loader = DataLoader(
        _SeededSamples(train_set),
        batch_sampler=_TrainBatches(n_train, bs, seed, start, total, info.rank, info.world_size),
        num_workers=int(cfg.num_workers),
        collate_fn=pad_collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG (dropout) alone
    )
    logger = MetricLogger.for_run(out, info.is_main, resume_state, start)
    every = int(cfg.checkpoint_every)
    plan.log(_logger)
    _logger.info(
        "training %s + %s on %d images, %d iterations of %d crops, %d process(es)",
        cfg.model, cfg.head, n_train, total, bs, info.world_size,
    )  # fmt: skip
    clock = RunClock(total, start)
    last = _last_logged_losses((resume_state or {}).get("logged") or [])  # a finished run resumed: its final loss
    train_model.train()
    preemption = run.preemption()
    with preemption:
        per_process = max(1, bs // info.world_size)  # images per iteration on this process
        bar = progress(loader, desc="train seg", total=len(loader), unit="img", unit_scale=per_process)
        for it, (images, labels) in enumerate(bar, start=start):
            last = _train_step(
                train_model, model, optimizer, it, images, labels, total, cfg, device, plan, logger, clock, last
            )
            done = it + 1
            if last and (done % max(1, int(cfg.log_every)) == 0 or done == total):
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
            why = preemption.poll()
            path, due = None, done % every == 0 or done == total or why
            rng = run.rng_state() if due else None  # every rank's
            if info.is_main and due:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "iteration": done,
                    "total_iters": total,
                    "rng": rng,
                    "logged": logger.rows,  # the curves, rewritten from here on resume
                    "config": cfg.to_dict(),
                    "model_config": model.config,
                    "profile": profile,
                    "code_versions": run.code_versions(done),
                }
                path = save_training_state(out, done, state, int(cfg.keep_checkpoints))
            if due:
                preemption.saved()
            if preemption.stopping:
                preemption.stop(done, path)
    timings = {"train_time_s": round(clock.elapsed, 2), "first_iteration": start + 1}  # a resumed run times its part
    barrier()
    final = out / "model.pth"
    if info.is_main:
        weights = {"model": model.state_dict(), "model_config": model.config, "config": cfg.to_dict()}
        save_checkpoint(final, {**weights, "iteration": total, "profile": profile})
        safetensors_beside(final)
    summary = {
        "iters": total,
        "final_loss": last.get("loss"),
        **plan.record(),
        "bad_files": len(run.bad_files()),  # training files skipped (on_bad: skip)
        **complexity,
        "code_versions": run.code_versions(total),  # each segment's code: {version, from_step, to_step}
        "checkpoint": str(final),
    }
    logger.summary({k: v for k, v in summary.items() if k not in ("checkpoint", "code_versions")})
    logger.close()
    if not (cfg.eval_at_end if evaluate is None else evaluate):
        if info.is_main:
            write_timings(out, timings, ran=clock.ran)
        return summary
    # metrics.json comes last (after per_class.json and predictions/): its presence means the run finished
    return evaluate_segmentation(
        model,
        data,
        out,
        cfg,
        save_predictions=save_predictions,
        max_images=max_eval_images,
        timings=timings,
        keep_timings=not clock.ran,
        extra={
            **run_description(cfg, model, profile),
            **plan.record(),
            "iters": total,
            "bad_files": summary["bad_files"],
            **complexity,
            "code_versions": summary["code_versions"],
        },
    )


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


def _last_logged_losses(rows: Sequence[Any]) -> dict[str, float]:
    """The losses of the last logged training row (``train/<name>``, the learning rate aside)."""
    for _, values in reversed(rows):
        losses = {k.removeprefix("train/"): v for k, v in values.items() if k.startswith("train/") and k != "train/lr"}
        if losses:
            return losses
    return {}


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
    timings: Mapping[str, Any] | None = None,
    keep_timings: bool = False,
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
        timings: more entries for ``timings.json`` (the training's seconds), written beside
            ``metrics.json`` with the evaluation's seconds and the machine.
        keep_timings: leave an existing ``timings.json`` (a finished run resumed trained nothing).

    Returns:
        The contents of ``metrics.json``: ``mIoU``, ``mAcc``, ``aAcc`` (percent), ``num_images``,
        ``num_classes_evaluated`` and ``extra``.
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
        **dict(extra or {}),
        "numerics": numeric_settings(),
    }
    barrier()
    if info.is_main:
        if save_predictions:
            shutil.rmtree(out / "predictions", ignore_errors=True)
            os.replace(pred_tmp, out / "predictions")
        write_json_atomic(out / "per_class.json", [r for r in per_class if r["gt_pixels"] or r["pred_pixels"]])
        write_timings(out, {**dict(timings or {}), "eval_time_s": round(eval_time, 2)}, ran=not keep_timings)
        write_json_atomic(out / "metrics.json", summary)
        _logger.info("%s: mIoU %.2f  mAcc %.2f  aAcc %.2f", split, summary["mIoU"], summary["mAcc"], summary["aAcc"])
    return summary


def _stored_recipe(config: Mapping[str, Any], profile: str) -> dict[str, Any]:
    """A checkpoint's recipe as :class:`SegRecipe` keys: without ``profile``, old key names renamed,
    keys it predates taken from the ``profile`` preset (they are the values its model was built with)."""
    stored = {_OLD_KEYS.get(k, k): copy.deepcopy(v) for k, v in dict(config).items() if k != "profile"}
    missing = [k for k in SegRecipe.keys() if k not in stored]
    if missing:
        preset, label = load_preset(TASK, profile)
        _logger.info("the checkpoint's recipe predates %s: taken from %s", missing, label)
        stored.update({k: preset[k] for k in missing if k in preset})
    return stored


def evaluate_checkpoint(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    model: str | None = None,
    profile: str = "mini",
    split: str = "validation",
    save_predictions: bool = True,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Rebuild the model saved in ``checkpoint`` (``model.pth`` or a training checkpoint) and evaluate it.

    The model comes from the checkpoint's model config; the test settings from its recipe, then
    ``overrides`` (``--set test_flip=true``). Writes ``out_dir/metrics.json``, ``per_class.json``
    and ``predictions/`` (:func:`evaluate_segmentation`).

    Args:
        data: the ``ADEChallengeData2016`` folder.
        checkpoint: a ``model.pth`` or ``checkpoint-N.pth`` written by :func:`train`.
        out_dir: the output folder (created).
        overrides: ``"key=value"`` strings applied over the checkpoint's recipe.
        model: the backbone's name, if given it must be the checkpoint's.
        profile: the preset that supplies the keys a checkpoint written before the typed recipe lacks.
        split, save_predictions, max_images: as for :func:`evaluate_segmentation`.

    Raises:
        FileNotFoundError: missing checkpoint or data folder. ValueError: not a segmentation
            checkpoint, or another backbone than ``model``. RecipeError: a bad override.
    """
    state = load_training_checkpoint(checkpoint)
    missing = [k for k in ("model", "model_config", "config") if k not in state]
    if missing:
        raise ValueError(
            f"{checkpoint}: not a segmentation checkpoint (lacks {missing}); expected one written by train seg"
        )
    stored = _stored_recipe(state["config"], profile)
    cfg = load_recipe(SegRecipe, profile, overrides=overrides, preset=(stored, f"{checkpoint} (its recipe)"))
    name = state["model_config"].get("backbone")
    if model is not None and model != name:
        raise ValueError(f"{checkpoint} holds a {name} backbone, not {model}; omit --model or pass {name}")
    run_profile = state.get("profile") or dict(state["config"]).get("profile")
    init_distributed(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        net = segmentation_model_from_config(state["model_config"])
        net.load_state_dict(state["model"])
        extra = {
            **run_description(cfg, net, run_profile),
            "checkpoint": str(checkpoint),
            "iters": int(state.get("iteration", 0)),
            **model_complexity(copy.deepcopy(net).to("meta")),
        }
        return evaluate_segmentation(
            net, data, out_dir, cfg, split=split, save_predictions=save_predictions, max_images=max_images, extra=extra
        )
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------
# Command line (the common flags are anchorformer.cli's)
# ---------------------------------------------------------------------------------------------

TRAIN_HELP = "train a Semantic FPN / UperNet segmentation model on ADE20K (E6)"
EVAL_HELP = "evaluate a segmentation checkpoint on ADE20K (mIoU, mAcc, aAcc)"


def add_train_arguments(p: Any) -> None:
    """``train seg``'s own flags (``--epochs N`` converts N passes over the training set to iterations)."""
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the recipe's, per head)")
    p.add_argument("--head", default=None, metavar="fpn|upernet", help="decode head (default: the profile's)")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate at the end")
    p.add_argument("--no-predictions", action="store_true", help="do not write predicted label maps")
    p.add_argument("--max-eval-images", type=int, default=None, help="evaluate the first N validation images only")


def add_eval_arguments(p: Any) -> None:
    """``eval seg``'s own flags."""
    p.add_argument("--split", default="validation", choices=("validation", "training"))
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--no-predictions", action="store_true", help="do not write predicted label maps")


def cli_train(args: Any) -> dict[str, Any]:
    """``anchorformer train seg``."""
    return train(
        args.data, args.out, args.model, profile=args.profile, overrides=args.overrides, epochs=args.epochs,
        iters=args.iters, head=args.head, resume=args.resume, overwrite=args.overwrite, if_different=args.if_different,
        evaluate=False if args.no_eval else None, save_predictions=not args.no_predictions,
        max_eval_images=args.max_eval_images, source="cli",
    )  # fmt: skip


def cli_eval(args: Any) -> dict[str, Any]:
    """``anchorformer eval seg``."""
    m = evaluate_checkpoint(
        args.data, args.checkpoint, args.out, overrides=args.overrides, model=args.model, profile=args.profile,
        split=args.split, save_predictions=not args.no_predictions, max_images=args.max_images,
    )  # fmt: skip
    if m and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: m[k] for k in ("backbone", "head", "mIoU", "mAcc", "aAcc", "num_images")}))
    return m
