"""ImageNet classification: training and evaluation (experiments E1, E2, E3).

The DeiT recipe (Touvron et al., ICML 2021; REFERENCE §5 E1) on timm's parts: AdamW through
``timm.optim.create_optimizer_v2`` (no weight decay on biases, norms, tokens, position embeddings
and anchors), cosine schedule with warm-up per update (``timm.scheduler.create_scheduler_v2``),
Mixup/CutMix with label smoothing (``timm.data.Mixup``, soft-target cross-entropy), RandAugment and
random erasing (``timm.data.create_transform``), repeated augmentation (``RepeatAugSampler``),
EMA (``timm.utils.ModelEmaV3``) and DeiT distillation (:mod:`.distillation`). The recipe is the
typed :class:`.recipe.ClsRecipe`; the run folder, resume protocol, seeding and torchrun launch are
the shared engine's (:mod:`anchorformer.engine`). Evaluation reports
top-1/top-5 after resize-then-centre-crop, plus params, GMACs (:func:`anchorformer.count_macs`)
and measured throughput.

Runs as one process or under ``torchrun`` (DDP; gloo on the CPU). Every epoch writes an atomic
checkpoint (model, optimizer, scheduler, scaler, EMA, RNG states, epoch); ``resume="auto"`` (the
default) continues from the latest one. Each epoch reseeds Python, NumPy and torch from (seed, epoch, rank)
and the sampler from (seed, epoch), so on the CPU a resumed run ends with the same metrics as an
uninterrupted one.

Outputs in ``out_dir``: ``metrics.json`` (written last: its presence means the run finished),
``model.pth`` (weights and how to rebuild the model), ``history.json`` (per-epoch values),
``dvclive/`` (curves), ``checkpoints/checkpoint-NNNNNN.pth``: the same bytes for the same recipe
and seed on the CPU. The throughput, the seconds per epoch and the machine go to
``timings.json`` (:mod:`anchorformer.engine.timings`), which DVC does not hash.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from ...engine.batching import plan_batch
from ...engine.checkpoint import load_training_checkpoint, restore_rng_state, save_training_state
from ...engine.distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, unwrap_model
from ...engine.divergence import check_loss
from ...engine.launch import launch_if_several
from ...engine.logging import MetricLogger, progress
from ...engine.preempt import Preemption, ResumableSampler
from ...engine.recipe import load_preset, load_recipe
from ...engine.seeding import epoch_seed, seed_everything, seed_worker
from ...engine.timings import TIMINGS, RunClock, format_seconds, write_timings
from ...engine.trainer import TrainingRun, finish_run, training_run
from ...io import write_json_atomic
from ...models import create_model, load_checkpoint
from ...models.checkpoint import CheckpointMismatchError
from ...models.factory import backbone_kwargs, is_anchorformer
from ...ops.counting import count_macs, count_params
from .anchors import entropy_probe, kmeans_anchors_from_first_batch, optimizer_params
from .distillation import DistillationLoss
from .intervals import PREDICTIONS, predictions_record
from .recipe import ClsRecipe

__all__ = [
    "SMOKE",
    "build_classifier",
    "classifier_kwargs",
    "evaluate",
    "evaluate_checkpoint",
    "measure_throughput",
    "resolve_recipe",
    "train",
]

_logger = logging.getLogger(__name__)

TASK = "cls"
# A seconds-long run on a tiny set (the notebooks' smoke defaults and the dry runs of the tests):
# one block of width 32 on 32x32 images, 4 anchors.
SMOKE = [
    "img_size=32",
    "patch_size=8",
    "model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}",
    "num_anchors=4",
    "batch_size=8",
    "lr_batch=8",
    "warmup_epochs=0",
    "throughput_batch_size=2",
    "throughput_iters=1",
    "num_workers=0",
]
RESULTS = ("metrics.json", "model.pth", "model.safetensors", "history.json")  # a finished run's files
# `--set dry_run=true`: any recipe, full included, for 4 optimizer steps (2 epochs of 2 steps of 16
# images in micro-batches of 4: gradient accumulation) and an evaluation on 20 images, through every
# code path the recipe turns on (RandAugment, Mixup/CutMix, repeated augmentation, random erasing,
# EMA, distillation, warm-up and cosine schedule, autocast, checkpoints); the ViT shrunk to 2 blocks
# of width 32 at 32x32 with 8x8 patches and 4 anchors. The user's --set apply after these.
DRY_RUN = [
    "img_size=32",
    "patch_size=8",
    "model_sizes={tiny: {embed_dim: 32, depth: 2, num_heads: 2}, small: {embed_dim: 32, depth: 2, num_heads: 2}, "
    "base: {embed_dim: 32, depth: 2, num_heads: 2}}",
    "num_anchors=4",
    "epochs=2",
    "warmup_epochs=1",
    "global_batch=16",
    "batch_size=4",
    "accum_steps=1",
    "max_train_images=32",
    "max_eval_images=20",
    "eval_batch_size=10",
    "throughput_batch_size=2",
    "throughput_iters=1",
    "num_workers=0",
    "log_every=1",
    "keep_checkpoints=1",
]
# DeiT's teacher: the timm architecture and the weights DeiT distils from (82.9% top-1 on ImageNet).
DEIT_TEACHER = {"model": "regnety_160", "weights": "regnety_160.deit_in1k", "top1": 82.9}


# ---------------------------------------------------------------------------------------------
# Configuration and models
# ---------------------------------------------------------------------------------------------


def resolve_recipe(
    *,
    profile: str = "mini",
    overrides: Sequence[str] = (),
    model: str | None = None,
    epochs: Any = None,
    source: str = "argument",
) -> ClsRecipe:
    """The recipe: the ``profile`` preset, then ``overrides`` (``--set``), then ``model``/``epochs``.

    Args:
        source: how ``model``/``epochs`` arrived, for errors (the CLI passes the flags;
            the pipeline's notebooks pass ``"params.yaml"``).

    Raises:
        RecipeError: an unknown key, a value of the wrong type or out of range (naming the key
            and where it came from).
    """
    explicit = {"model": (model, _flag(source, "--model")), "epochs": (epochs, _flag(source, "--epochs"))}
    recipe = load_recipe(ClsRecipe, profile, overrides=overrides, explicit=explicit)
    if recipe.dry_run:  # the dry run's reductions first, the user's --set and flags over them
        recipe = load_recipe(ClsRecipe, profile, overrides=[*DRY_RUN, *overrides], explicit=explicit)
    return recipe


def _flag(source: str, flag: str) -> str:
    return flag if source == "cli" else f"{source}: {flag.lstrip('-')}"


def classifier_kwargs(name: str, recipe: ClsRecipe, num_classes: int) -> dict[str, Any]:
    """The ``create_model`` arguments of ``name`` under ``recipe``: the backbone's
    (:func:`anchorformer.models.backbone_kwargs`), ``num_classes`` and ``drop_path_rate``."""
    kw: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": float(recipe.drop_path)}
    kw.update(backbone_kwargs(name, recipe))
    return kw


def _check_model_name(name: str) -> None:
    if not (is_anchorformer(name) or timm.is_model(name)):
        close = sorted(n for n in timm.list_models(f"*{name.split('_')[0]}*"))[:8] if name else []
        raise ValueError(f"unknown model {name!r}: not an AnchorFormer variant nor a timm model (similar: {close})")


def build_classifier(name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """``create_model(name, **model_kwargs)`` with the name checked first.

    Raises:
        ValueError: an unknown model name, or arguments the model does not take.
    """
    _check_model_name(name)
    try:
        return create_model(name, **model_kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r} does not take the arguments {sorted(model_kwargs)}: {e}") from e


def _resolve_distillation(cfg: dict[str, Any], model: nn.Module) -> str:
    distilled = hasattr(unwrap_model(model), "head_dist")
    kind = cfg["distillation"]
    if kind == "auto":
        return "hard" if distilled else "none"
    if kind == "none" and distilled:
        raise ValueError(f"model {cfg['model']!r} is distilled (two heads): set distillation to soft or hard")
    if kind != "none" and not distilled:
        raise ValueError(
            f"distillation={kind!r} needs a distilled model (*_distilled_*); {cfg['model']!r} has one head"
        )
    return kind


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pth", ".pt", ".bin", ".safetensors"))


def build_teacher(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    """The frozen teacher: a checkpoint written by :func:`train_classification`, or a timm model name.

    Raises:
        FileNotFoundError: ``teacher`` is a path that does not exist.
        ValueError: the teacher predicts another number of classes, or cannot be built.
    """
    spec = str(cfg["teacher"] or "")
    if not spec:
        raise ValueError("distillation needs a teacher: set teacher to a timm model name or a checkpoint path")
    if _looks_like_path(spec) or Path(spec).is_file():
        if cfg.get("teacher_checkpoint"):
            _logger.info("teacher %s is a train-cls checkpoint: teacher_checkpoint is not used", spec)
        state = load_training_checkpoint(spec)
        if "model_name" not in state or "model" not in state:
            raise ValueError(
                f"teacher checkpoint {spec}: expected a model.pth written by `anchorformer train cls` (keys model_name, model)"
            )
        teacher = build_classifier(state["model_name"], dict(state["model_kwargs"]))
        _load_weights(teacher, state["model"], spec)
    else:
        kwargs = {"num_classes": num_classes, **(cfg["teacher_kwargs"] or {})}
        if cfg["teacher_pretrained"]:  # timm's weights (needs them in the hub cache when offline)
            build_classifier(spec, {})  # checks the name
            teacher = create_model(spec, pretrained=True, **kwargs)
        else:
            path = _teacher_file(cfg)
            teacher = build_classifier(spec, kwargs)
            _load_weights(teacher, str(path), f"teacher_checkpoint={path}")
    out_classes = getattr(teacher, "num_classes", None)
    if out_classes is not None and out_classes != num_classes:
        raise ValueError(f"teacher {spec} predicts {out_classes} classes; the dataset has {num_classes}")
    teacher.eval().requires_grad_(False)
    return teacher


def _teacher_file(cfg: Any) -> Path:
    """The local weights file of a named teacher (``teacher_checkpoint``), checked to exist.

    Raises:
        FileNotFoundError: not set, or no such file; the message names the parameter, the
            expected model and how to obtain the file.
    """
    spec, value = str(cfg["teacher"]), cfg.get("teacher_checkpoint")
    deit = spec == DEIT_TEACHER["model"]
    expected = (
        f"DeiT's teacher RegNetY-16GF, timm {DEIT_TEACHER['weights']} ({DEIT_TEACHER['top1']}% top-1 on ImageNet)"
        if deit
        else f"the weights of the timm model {spec}"
    )
    how = (
        f"on a machine with internet access: `hf download timm/{DEIT_TEACHER['weights']} model.safetensors "
        f"--local-dir DIR` (or `timm.create_model('{DEIT_TEACHER['weights']}', pretrained=True)` and "
        "`safetensors.torch.save_file(model.state_dict(), FILE)`), then copy the file there"
        if deit
        else "a .safetensors or .pth state dict of that model"
    )
    if not value:
        raise FileNotFoundError(
            f"teacher_checkpoint is not set: the distilled runs need {expected} in a local file, named by "
            f"teacher_checkpoint (params.yaml cls.teacher_checkpoint, or --set teacher_checkpoint=FILE); {how}"
        )
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher_checkpoint={value}: no such file; expected {expected} (params.yaml cls.teacher_checkpoint, "
            f"or --set teacher_checkpoint=FILE); {how}"
        )
    return path


def _load_weights(model: nn.Module, source: Any, where: str) -> None:
    try:
        load_checkpoint(model, source, strict=True)
    except CheckpointMismatchError as e:
        raise ValueError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _transforms(cfg: dict[str, Any]) -> tuple[Any, Any]:
    from ...data.imagenet import build_imagenet_transform

    train_tf = build_imagenet_transform(
        True,
        cfg["img_size"],
        no_aug=bool(cfg["no_aug"]),
        scale=tuple(cfg["scale"]),
        hflip=float(cfg["hflip"]),
        color_jitter=float(cfg["color_jitter"]),
        auto_augment=cfg["auto_augment"],
        interpolation=cfg["train_interpolation"],
        re_prob=float(cfg["reprob"]),
        re_mode=cfg["remode"],
        re_count=int(cfg["recount"]),
        crop_pct=float(cfg["crop_pct"]),  # used by no_aug
    )
    eval_tf = build_imagenet_transform(
        False, cfg["img_size"], crop_pct=float(cfg["crop_pct"]), interpolation=cfg["eval_interpolation"]
    )
    return train_tf, eval_tf


def _loader(dataset: Dataset, batch_size: int, sampler: Any, cfg: dict[str, Any], drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=int(cfg["num_workers"]),
        pin_memory=bool(cfg["pin_memory"]) and torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        persistent_workers=False,
    )


def _eval_loader(dataset: Dataset, cfg: dict[str, Any], dist_info: DistInfo) -> DataLoader:
    if dist_info.is_distributed:  # an exact shard per rank: no padding, no sample counted twice
        dataset = Subset(dataset, list(range(dist_info.rank, len(dataset), dist_info.world_size)))
    return _loader(dataset, int(cfg["eval_batch_size"]), SequentialSampler(dataset), cfg, drop_last=False)


def _set_sampler_epoch(sampler: Any, epoch: int, seed: int) -> None:
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed + epoch)  # the order DistributedSampler would give


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------


def _autocast(device: torch.device, cfg: dict[str, Any]) -> Any:
    if not cfg["amp"]:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, cfg["amp_dtype"]))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    cfg: dict[str, Any] | None = None,
    *,
    per_image: bool = False,
) -> dict[str, Any]:
    """Top-1, top-5 (percent) and cross-entropy of ``model`` over ``loader``, summed over processes.

    Args:
        per_image: also return ``correct``, a bool tensor (n_local,) of this process's top-1 hits in the
            loader's order (:func:`_gather_correct` puts the processes' shards back in dataset order).

    Returns:
        ``{"top1", "top5", "loss", "n"}`` (and ``"correct"``).
    """
    cfg = cfg or {"amp": False, "amp_dtype": "bfloat16", "channels_last": False}
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    hits: list[torch.Tensor] = []
    for images, target in progress(loader, desc="eval"):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if cfg.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg):
            logits = model(images)
        logits = logits.float()
        if per_image:
            hits.append((logits.topk(1, dim=1).indices[:, 0] == target).cpu())  # (B,) top-1 hit, as accuracy()
        k = min(5, logits.shape[1])
        acc1, acc5 = accuracy(logits, target, topk=(1, k))
        n = target.shape[0]
        totals += torch.tensor(
            [
                round(float(acc1) * n / 100),
                round(float(acc5) * n / 100),
                float(F.cross_entropy(logits, target, reduction="sum")),
                n,
            ],
            dtype=torch.float64,
        )
    model.train(was_training)
    totals = all_reduce_sum(totals.to(device)).cpu()
    n = max(float(totals[3]), 1.0)
    out: dict[str, Any] = {
        "top1": 100.0 * float(totals[0]) / n,
        "top5": 100.0 * float(totals[1]) / n,
        "loss": float(totals[2]) / n,
        "n": int(totals[3]),
    }
    if per_image:
        out["correct"] = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    return out


def _gather_correct(correct: torch.Tensor, total: int, dist_info: DistInfo) -> torch.Tensor:
    """Every process's top-1 hits (its shard of :func:`_eval_loader`: indices rank, rank + world, ...) as
    one bool tensor (total,) in dataset order."""
    full = torch.zeros(total, dtype=torch.float64)
    full[dist_info.rank :: dist_info.world_size] = correct.to(torch.float64)
    return all_reduce_sum(full.to(dist_info.device)).cpu() > 0.5


def _eval_files(dataset: Dataset) -> list[str]:
    """The evaluated files in evaluation order, relative to the split folder (class/file)."""
    indices: list[int] = list(range(len(dataset)))  # type: ignore[arg-type]
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    root = Path(dataset.root)  # type: ignore[attr-defined]
    return [Path(dataset.samples[i][0]).relative_to(root).as_posix() for i in indices]  # type: ignore[attr-defined]


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    img_size: int,
    device: torch.device,
    *,
    batch_size: int = 64,
    iters: int = 30,
    warmup: int = 2,
    cfg: dict[str, Any] | None = None,
) -> float:
    """Images per second of ``model``'s evaluation forward pass on ``batch_size`` random images."""
    cfg = cfg or {"amp": False, "amp_dtype": "bfloat16", "channels_last": False}
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if cfg.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, cfg):
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    model.train(was_training)
    return batch_size * iters / max(elapsed, 1e-9)


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    accum: int,
    updates: int,
    criterion: DistillationLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    ema: ModelEmaV3 | None,
    mixup: Any,
    cfg: dict[str, Any],
    device: torch.device,
    epoch: int,
    num_updates: int,
    preemption: Preemption | None = None,
    save: Callable[[int, int, torch.Tensor, int], Path | None] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float], int]:
    """One epoch of ``updates`` optimizer steps of ``accum`` micro-batches each.

    After each step, ``preemption.poll()`` may ask for a checkpoint inside the epoch:
    ``save(num_updates, steps done in the epoch, loss sum, micro-batches)`` writes it, and on a
    signal the run stops there. ``resume`` (a mid-epoch checkpoint) continues such an epoch: the
    samples of its ``epoch_step`` steps are skipped and the generators restored after the
    loader's pass has drawn its seed, as the uninterrupted epoch had them.
    """
    model.train()
    n_batches = updates * accum  # whole optimizer steps: a last incomplete accumulation is left out
    first = int(resume["epoch_step"]) * accum if resume else 0
    loss_sum = resume["epoch_loss_sum"].clone() if resume else torch.zeros((), dtype=torch.float64)
    steps = int(resume["epoch_steps"]) if resume else 0
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.skip = first * int(loader.batch_size or 1)
    elif first:
        raise ValueError("a mid-epoch resume needs the loader's sampler to be a ResumableSampler")
    optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)  # draws the pass's worker seed from the epoch's generators
    if resume:
        restore_rng_state(resume["rng"])
    bar = progress(
        batches, desc=f"epoch {epoch + 1}", total=n_batches - first, unit="img", unit_scale=loader.batch_size or 1
    )
    for i, (images, target) in enumerate(bar, start=first):
        if i >= n_batches:
            break
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup is not None:
            images, target = mixup(images, target)
        if cfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        do_step = (i + 1) % accum == 0 or i + 1 == n_batches
        sync = nullcontext() if do_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device, cfg):
                outputs = model(images)
                loss = criterion(images, outputs, target)
            loss_value = check_loss(loss, f"epoch {epoch + 1}, step {i + 1}")
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if do_step:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["clip_grad"]))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(unwrap_model(model), step=num_updates)
        loss_sum += loss_value
        steps += 1
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
        if cfg["log_every"] and (i + 1) % int(cfg["log_every"]) == 0:
            _logger.info(
                "epoch %d step %d/%d loss %.4f lr %.3g",
                epoch + 1,
                i + 1,
                n_batches,
                loss_value,
                optimizer.param_groups[0]["lr"],
            )
        # the epoch's end writes its own checkpoint
        if do_step and preemption is not None and preemption.poll() and i + 1 < n_batches:
            path = save(num_updates, (i + 1) // accum, loss_sum, steps) if save is not None else None
            preemption.saved()
            if preemption.stopping:
                preemption.stop(num_updates, path)
    mean = all_reduce_mean((loss_sum / max(steps, 1)).to(device)).item()
    return {"train_loss": mean, "lr": optimizer.param_groups[0]["lr"]}, num_updates


def _base_criterion(cfg: dict[str, Any], mixup_active: bool) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
    if cfg["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=float(cfg["smoothing"]))
    return nn.CrossEntropyLoss()


def _check_data_root(data: Path) -> list[str]:
    from ...data.imagenet import find_imagenet_classes

    classes = find_imagenet_classes(data, "train")
    find_imagenet_classes(data, "val")
    return classes


def train(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | None = None,
    *,
    profile: str = "mini",
    overrides: Sequence[str] = (),
    epochs: Any = None,
    resume: str = "auto",
    overwrite: bool = False,
    if_different: str = "refuse",
    nproc_per_node: int | str = 1,
    nnodes: int = 1,
    torchrun_args: Sequence[str] = (),
    source: str = "argument",
) -> dict[str, Any]:
    """Train a classifier on the ImageFolder set ``data`` and evaluate it; write ``out_dir``.

    Args:
        data: folder with ``train/`` and ``val/`` (ImageNet or the mini set).
        out_dir: the run's folder (created).
        model: model name; default the profile's ``model``.
        profile: ``"mini"`` or ``"full"``.
        overrides: ``"key=value"`` strings (see ``anchorformer/configs/cls.yaml``).
        epochs: shorthand for ``epochs=N``.
        resume: ``"auto"`` (the latest checkpoint in ``out_dir``, if any), ``"never"`` (a fresh
            start; a folder holding an earlier run is refused unless ``overwrite``) or a path.
        overwrite: with ``resume="never"``, move an earlier run's files to ``previous-<time>/``.
        if_different: ``"refuse"`` or ``"restart"``: what ``resume="auto"`` does with a checkpoint
            of another recipe or code version (:func:`anchorformer.engine.run.open_run`).
        nproc_per_node, nnodes, torchrun_args: more than one process runs the same training
            under ``torchrun`` (``anchorformer train cls`` in each process).
        source: where ``model``/``epochs`` came from, named in errors.

    Returns:
        The metrics written to ``out_dir/metrics.json`` (``top1``, ``top5``, ``loss``,
        ``train_loss``, ``params``, ``gmacs``, ``throughput``, ..., ``config``).

    Raises:
        RecipeError, ValueError, FileNotFoundError: bad recipe, model name or data layout,
            raised before any training starts. RunFolderError: the folder is in use or holds
            another run.
    """
    recipe = resolve_recipe(profile=profile, overrides=overrides, model=model, epochs=epochs, source=source)
    data, out_dir = Path(data), Path(out_dir)
    classes = _check_data_root(data)
    launched = launch_if_several(
        TASK, data, out_dir, nproc_per_node=nproc_per_node, nnodes=nnodes, torchrun_args=torchrun_args,
            device=recipe.device,
        model=model, profile=profile, overrides=list(overrides), epochs=epochs, resume=resume, overwrite=overwrite,
        if_different=if_different,
    )  # fmt: skip
    if launched is not None:
        return launched
    model_kwargs = classifier_kwargs(recipe.model, recipe, len(classes))
    _check_model_name(recipe.model)  # before the run folder is made
    if _needs_teacher_file(recipe):
        _teacher_file(recipe)
    with training_run(
        recipe, out_dir, resume=resume, overwrite=overwrite, if_different=if_different, results=RESULTS
    ) as run:
        return _train(run, data, classes, model_kwargs)


def _needs_teacher_file(recipe: ClsRecipe) -> bool:
    distilled = recipe.distillation in ("soft", "hard") or (
        recipe.distillation == "auto" and "distilled" in recipe.model
    )
    spec = str(recipe.teacher or "")
    return (
        distilled
        and bool(spec)
        and not (_looks_like_path(spec) or Path(spec).is_file())
        and not recipe.teacher_pretrained
    )


def _first(dataset: Dataset, n: int | None) -> Dataset:
    """``n`` images spread evenly over ``dataset`` (every class of a sorted ImageFolder), or all of it."""
    size = len(dataset)  # type: ignore[arg-type]
    if not n or n >= size:
        return dataset
    return Subset(dataset, [i * size // n for i in range(n)])


def _train(run: TrainingRun, data: Path, classes: list[str], model_kwargs: dict[str, Any]) -> dict[str, Any]:
    from ...data.imagenet import build_imagenet_dataset, build_imagenet_sampler, build_mixup

    cfg, dist_info, out_dir, resume_state = run.recipe, run.dist, run.out, run.state
    device = dist_info.device
    num_classes = len(classes)
    seed = int(cfg["seed"])
    seed_everything(seed)
    net = build_classifier(cfg["model"], model_kwargs)
    kind = _resolve_distillation(cfg, net)
    teacher = build_teacher(cfg, num_classes).to(device) if kind != "none" else None

    train_tf, eval_tf = _transforms(cfg)
    train_ds = _first(
        build_imagenet_dataset(data, "train", transform=train_tf, on_bad=cfg["on_bad"]), cfg["max_train_images"]
    )
    run.watch_bad_files(train_ds)
    # evaluation always fails on a bad file
    val_ds = _first(build_imagenet_dataset(data, "val", transform=eval_tf), cfg["max_eval_images"])
    run.check_files(train_ds, val_ds)  # every file read, decoded before the first step
    plan = plan_batch(cfg["global_batch"], cfg["batch_size"], dist_info.world_size, cfg["accum_steps"])
    global_batch = plan.global_batch
    if len(train_ds) < global_batch:
        raise ValueError(
            f"{data / 'train'} holds {len(train_ds)} images, fewer than one global batch of {global_batch} "
            f"(batch_size={cfg['batch_size']} x {dist_info.world_size} process(es)); lower batch_size"
        )
    sampler = build_imagenet_sampler(
        train_ds,
        training=True,
        repeated_aug=bool(cfg["repeated_aug"]),
        num_replicas=dist_info.world_size,
        rank=dist_info.rank,
        seed=seed,
    )
    train_loader = _loader(train_ds, plan.per_device, ResumableSampler(sampler), cfg, drop_last=True)
    val_loader = _eval_loader(val_ds, cfg, dist_info)
    mixup = build_mixup(
        num_classes,
        mixup_alpha=float(cfg["mixup"]),
        cutmix_alpha=float(cfg["cutmix"]),
        prob=float(cfg["mixup_prob"]),
        switch_prob=float(cfg["mixup_switch_prob"]),
        mode=cfg["mixup_mode"],
        label_smoothing=float(cfg["smoothing"]),
    )
    criterion = DistillationLoss(
        _base_criterion(cfg, mixup is not None),
        teacher,
        kind,
        float(cfg["distillation_alpha"]),
        float(cfg["distillation_tau"]),
    )

    net.to(device)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    if resume_state is None and cfg["anchor_init"] == "kmeans":  # a resumed run keeps its trained anchors
        _logger.info(
            "anchors: k-means of the first batch in %d layers",
            kmeans_anchors_from_first_batch(net, train_loader, device, seed),
        )
    lr = float(cfg["lr"]) * global_batch / cfg["lr_batch"]
    opt_kwargs: dict[str, Any] = {}
    if "adam" in cfg["opt"] or "lamb" in cfg["opt"]:
        opt_kwargs["eps"] = float(cfg["opt_eps"])
    if cfg["opt"] in ("sgd", "momentum", "nesterov"):
        opt_kwargs["momentum"] = float(cfg["momentum"])
    params = optimizer_params(net, float(cfg["weight_decay"]), float(cfg["anchor_lr_mult"]))
    optimizer = create_optimizer_v2(
        params, opt=cfg["opt"], lr=lr, weight_decay=float(cfg["weight_decay"]), **opt_kwargs
    )
    updates_per_epoch = max(1, len(train_loader) // plan.accum_steps)  # whole optimizer steps only
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg["sched"],
        num_epochs=cfg["epochs"],
        warmup_epochs=int(cfg["warmup_epochs"]),
        warmup_lr=float(cfg["warmup_lr"]),
        min_lr=float(cfg["min_lr"]),
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    use_scaler = cfg["amp"] and cfg["amp_dtype"] == "float16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    ema = ModelEmaV3(net, decay=float(cfg["ema_decay"])) if cfg["ema"] else None

    start_epoch, num_updates, history = 0, 0, []
    teacher_eval: dict[str, float] | None = None
    probe = entropy_probe(net, val_ds, device) if dist_info.is_main else None  # E9: a fixed validation batch
    entropy_init = probe.measure() if probe is not None else None
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume_state["model_ema"])
        restore_rng_state(run.own_rng(resume_state["rng"]))
        start_epoch, num_updates = int(resume_state["epoch"]), int(resume_state["num_updates"])
        run.resumed_at(num_updates)
        history = list(resume_state["history"])
        teacher_eval = resume_state.get("teacher_eval")
        entropy_init = resume_state.get("entropy_init")
        _set_sampler_epoch(sampler, start_epoch, seed)
    if teacher is not None and teacher_eval is None:  # the teacher's own top-1, measured once per run
        teacher_eval = evaluate(teacher, val_loader, device, cfg)
        _logger.info(
            "teacher %s: top-1 %.2f on %d validation images", cfg["teacher"], teacher_eval["top1"], teacher_eval["n"]
        )

    train_model: nn.Module = net
    if cfg["compile"]:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    if dist_info.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device] if device.type == "cuda" else None
        )

    logger = MetricLogger.for_run(out_dir, dist_info.is_main, resume_state, start_epoch)
    plan.log(_logger)
    _logger.info(
        "training %s (%s) on %d images, %d classes, %d epochs, global batch %d, lr %.3g, distillation %s, %d process(es)",
        cfg["model"],
        model_kwargs,
        len(train_ds),
        num_classes,
        cfg["epochs"],
        global_batch,
        lr,
        kind,
        dist_info.world_size,
    )

    def training_state(epochs_done: int, updates: int, rng: dict[str, Any]) -> dict[str, Any]:
        state = {
            "epoch": epochs_done,
            "num_updates": updates,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "history": history,
            "logged": logger.rows,  # the curves, rewritten from here on resume
            "config": cfg.to_dict(),
            "model_name": cfg["model"],
            "model_kwargs": model_kwargs,
            "classes": classes,
            "teacher_eval": teacher_eval,
            "entropy_init": entropy_init,
            "code_versions": run.code_versions(updates),
        }
        if ema is not None:
            state["model_ema"] = ema.module.state_dict()
        return state

    def save_within(epoch: int) -> Callable[[int, int, torch.Tensor, int], Path | None]:
        def save(updates: int, epoch_step: int, loss_sum: torch.Tensor, steps: int) -> Path | None:
            rng = run.rng_state()  # every rank's
            if not dist_info.is_main:
                return None
            state = training_state(epoch, updates, rng)
            state.update(epoch_step=epoch_step, epoch_loss_sum=loss_sum.detach().cpu().clone(), epoch_steps=steps)
            return save_training_state(out_dir, epoch, state, int(cfg["keep_checkpoints"]), within=epoch_step)

        return save

    within = None
    if resume_state is not None and resume_state.get("epoch_step"):  # stopped inside an epoch
        within = {**resume_state, "rng": run.own_rng(resume_state["rng"])}
    clock = RunClock(cfg["epochs"], start_epoch)
    val: dict[str, float] = {}
    preemption = run.preemption()
    with preemption:
        for epoch in range(start_epoch, cfg["epochs"]):
            seed_everything(epoch_seed(seed, epoch, dist_info.rank))
            _set_sampler_epoch(sampler, epoch, seed)
            stats, num_updates = _train_one_epoch(
                train_model,
                train_loader,
                plan.accum_steps,
                updates_per_epoch,
                criterion,
                optimizer,
                scheduler,
                scaler,
                ema,
                mixup,
                cfg,
                device,
                epoch,
                num_updates,
                preemption,
                save_within(epoch),
                within if epoch == start_epoch else None,
            )
            row: dict[str, Any] = {"epoch": epoch + 1, **stats}
            last = epoch + 1 == cfg["epochs"]
            if last or (epoch + 1) % cfg["eval_every"] == 0:
                val = evaluate(net, val_loader, device, cfg, per_image=last)
                row.update(top1=val["top1"], top5=val["top5"], val_loss=val["loss"])
                if ema is not None:
                    row["top1_ema"] = evaluate(ema.module, val_loader, device, cfg)["top1"]
            if probe is not None:
                row.update(probe.measure())
            clock.lap(epoch + 1)
            history.append(row)
            logger.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            _logger.info(
                "epoch %d/%d: %s (%s)",
                epoch + 1,
                cfg["epochs"],
                {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                clock.progress(),
            )
            path, rng = None, run.rng_state()
            if dist_info.is_main:
                path = save_training_state(
                    out_dir, epoch + 1, training_state(epoch + 1, num_updates, rng), int(cfg["keep_checkpoints"])
                )
            preemption.saved()
            barrier()
            if preemption.stopping:
                preemption.stop(num_updates, path)

    if "correct" not in val:  # resumed a finished run: evaluate the final weights
        val = evaluate(net, val_loader, device, cfg, per_image=True)
    # image by image (predictions.json): the report pairs runs over the same images
    correct = _gather_correct(val["correct"], len(val_ds), dist_info)  # type: ignore[arg-type]
    metrics: dict[str, Any] = {}
    if dist_info.is_main:
        bare = unwrap_model(net)
        params = count_params(bare)
        macs = count_macs(bare, cfg["img_size"])
        throughput = measure_throughput(
            bare,
            cfg["img_size"],
            device,
            batch_size=int(cfg["throughput_batch_size"]),
            iters=int(cfg["throughput_iters"]),
            cfg=cfg,
        )
        final = history[-1] if history else {}
        metrics = {
            "model": cfg["model"],
            "top1": val["top1"],
            "top5": val["top5"],
            "loss": val["loss"],
            "train_loss": final.get("train_loss"),
            "params": params,
            "params_m": round(params / 1e6, 4),
            "macs": macs,
            "gmacs": round(macs / 1e9, 5),
            "img_size": cfg["img_size"],
            "num_anchors": getattr(_first_anchor_attention(bare), "num_anchors", None),
            "num_classes": num_classes,
            "val_images": val["n"],
            "epochs": cfg["epochs"],
            "distillation": kind,
            **plan.record(),
            "lr": lr,
            "bad_files": len(run.bad_files()),  # training files skipped (on_bad: skip)
            "code_versions": run.code_versions(num_updates),  # each segment's code: {version, from_step, to_step}
            "config": cfg.to_dict(),
        }
        if teacher_eval is not None:
            metrics.update(teacher=cfg["teacher"], teacher_top1=teacher_eval["top1"], teacher_top5=teacher_eval["top5"])
        if "top1_ema" in final:
            metrics["top1_ema"] = final["top1_ema"]
        if probe is not None:  # E9: entropies at the start and the end, against uniform attention
            metrics["entropy"] = probe.summary(entropy_init)
        final_state = {
            "model": net.state_dict(),
            "model_name": cfg["model"],
            "model_kwargs": model_kwargs,
            "classes": classes,
            "epoch": cfg["epochs"],
            "config": cfg.to_dict(),
        }
        if ema is not None:
            final_state["model_ema"] = ema.module.state_dict()
        write_json_atomic(out_dir / "history.json", history)
        write_json_atomic(out_dir / PREDICTIONS, predictions_record(correct.numpy(), _eval_files(val_ds)))
        timings = {
            "throughput": round(throughput, 2),
            "train_time_s": round(clock.elapsed, 2),
            "epoch_time_s": clock.laps,
            "first_epoch": start_epoch + 1,  # a resumed run times the epochs it ran
        }
        write_timings(out_dir, timings, ran=clock.ran)
        _logger.info(
            "throughput %.1f img/s, trained %s (%s)", throughput, format_seconds(clock.elapsed), out_dir / TIMINGS
        )
        logger.summary({k: v for k, v in metrics.items() if k not in ("config", "model")})
        logger.close()
    finish_run(run, metrics, final_state if dist_info.is_main else None)
    if dist_info.is_main:
        _logger.info("done: top1 %.2f top5 %.2f (%s)", metrics["top1"], metrics["top5"], out_dir / "metrics.json")
    return metrics


def _first_anchor_attention(model: nn.Module) -> Any:
    from ...models import AnchorAttention

    return next((m for m in model.modules() if isinstance(m, AnchorAttention)), None)


# ---------------------------------------------------------------------------------------------
# Evaluation of a checkpoint
# ---------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | None = None,
    profile: str = "mini",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``data/val``; write ``out_dir/metrics.json``.

    A ``model.pth`` or training checkpoint written by :func:`train` carries its model and recipe
    (``--set`` still applies, e.g. ``eval_batch_size``); other weights (timm, the official
    AnchorFormer code) need ``model`` and use the profile's recipe.

    Raises:
        FileNotFoundError: missing checkpoint or data folder.
        ValueError: the weights do not fit the model, or the classes differ from the checkpoint's.
    """
    data, out_dir, checkpoint = Path(data), Path(out_dir), Path(checkpoint)
    classes = _check_data_root(data)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    state = load_training_checkpoint(checkpoint) if checkpoint.suffix != ".safetensors" else {}
    if "model_name" in state and model in (None, state["model_name"]):
        stored = {k: v for k, v in dict(state["config"]).items() if k != "profile"}
        preset, _ = load_preset(TASK, profile)  # keys the checkpoint predates (on_bad, ...): the profile's values
        if "global_batch" not in stored:
            stored["global_batch"] = None  # before global_batch: batch_size x processes x accum_steps
        stored.update({k: preset[k] for k in ClsRecipe.keys() if k not in stored and k in preset})
        cfg = load_recipe(ClsRecipe, profile, overrides=overrides, preset=(stored, f"{checkpoint} (its recipe)"))
        if state.get("classes") and list(state["classes"]) != classes:
            raise ValueError(
                f"{checkpoint} was trained on classes {state['classes'][:5]}...; {data / 'val'} has {classes[:5]}..."
            )
        name, kwargs, weights = state["model_name"], dict(state["model_kwargs"]), state["model"]
    else:
        if model is None:
            raise ValueError(f"{checkpoint} does not name its model: pass --model")
        cfg = resolve_recipe(profile=profile, overrides=overrides, model=model)
        name = model
        kwargs = classifier_kwargs(name, cfg, len(classes))
        weights = state if state else checkpoint
    from ...engine.distributed import cleanup_distributed, init_distributed

    dist_info = init_distributed(cfg["device"])
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        net = build_classifier(name, kwargs)
        _load_weights(net, weights, str(checkpoint))
        net.to(dist_info.device)
        _, eval_tf = _transforms(cfg)
        from ...data.imagenet import build_imagenet_dataset

        val_ds = build_imagenet_dataset(data, "val", transform=eval_tf)
        val = evaluate(net, _eval_loader(val_ds, cfg, dist_info), dist_info.device, cfg)
        metrics: dict[str, Any] = {}
        if dist_info.is_main:
            macs = count_macs(net, cfg["img_size"])
            params = count_params(net)
            metrics = {
                "model": name,
                "checkpoint": str(checkpoint),
                "top1": val["top1"],
                "top5": val["top5"],
                "loss": val["loss"],
                "params": params,
                "params_m": round(params / 1e6, 4),
                "macs": macs,
                "gmacs": round(macs / 1e9, 5),
                "img_size": cfg["img_size"],
                "num_classes": len(classes),
                "val_images": val["n"],
                "config": cfg.to_dict(),
            }
            throughput = measure_throughput(
                net,
                cfg["img_size"],
                dist_info.device,
                batch_size=int(cfg["throughput_batch_size"]),
                iters=int(cfg["throughput_iters"]),
                cfg=cfg,
            )
            out_dir.mkdir(parents=True, exist_ok=True)
            write_timings(out_dir, {"throughput": round(throughput, 2)})
            write_json_atomic(out_dir / "metrics.json", metrics)
        return metrics
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------
# Command line (the common flags are anchorformer.cli's)
# ---------------------------------------------------------------------------------------------

TRAIN_HELP = "train an image classifier (DeiT recipe; E1-E3)"
EVAL_HELP = "evaluate a classifier checkpoint (top-1, top-5, GMACs, throughput)"


def cli_train(args: Any) -> dict[str, Any]:
    """``anchorformer train cls``."""
    return train(
        args.data, args.out, args.model, profile=args.profile, overrides=args.overrides, epochs=args.epochs,
        resume=args.resume, overwrite=args.overwrite, if_different=args.if_different, source="cli",
    )  # fmt: skip


def cli_eval(args: Any) -> dict[str, Any]:
    """``anchorformer eval cls``."""
    m = evaluate_checkpoint(
        args.data, args.checkpoint, args.out, model=args.model, profile=args.profile, overrides=args.overrides
    )
    if m:
        shown = {k: m[k] for k in ("model", "top1", "top5", "loss", "params", "gmacs")}
        timings = Path(args.out) / TIMINGS
        if timings.is_file():
            shown["throughput"] = json.loads(timings.read_text(encoding="utf-8")).get("throughput")
        print(json.dumps(shown))
    return m
