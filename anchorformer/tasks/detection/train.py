"""COCO detection and instance segmentation: training and evaluation (REFERENCE E5).

The full profile is the standard Mask R-CNN 1x schedule with a plain backbone and ViTDet's
simple feature pyramid: 12 epochs, AdamW (lr 1e-4 at 16 images per step, weight decay 0.05),
linear warm-up then x0.1 at epochs 8 and 11, shorter side 800 (longer at most 1333),
horizontal flips; evaluation with pycocotools on ``val2017`` (:mod:`.coco_eval`). The mini
profile runs the same code on the embedded mini set in minutes on a CPU
(``anchorformer/configs/det.yaml``).

``recipe: lsj`` is ViTDet's own recipe (``recipes.lsj`` of the preset applied over it): large-scale
jitter of the training images (:class:`anchorformer.data.coco.LargeScaleJitter`, resized to the
``max_size`` square times U(``lsj_scale``), cropped to it), the detector's own training resize
off, batches padded to the square (ViTDet's square pad), evaluation at the longer side
``max_size``. ``window_size`` > 0 windows the backbone's attention (:mod:`anchorformer.models.windowed`).

"Comparable FLOPs": with ``match_macs_of`` set to another backbone, the run's input scale is
chosen so that its backbone's MACs at 1333x800 x scale equal that backbone's at 1333x800
(:func:`anchorformer.models.detection.comparable_input_scale`); the scale multiplies
``min_size`` and ``max_size``.

The recipe is the typed :class:`.recipe.DetRecipe`; run folder, resume protocol, seeding and
torchrun launch are the shared engine's. Command line: ``anchorformer train det --data ROOT --out
DIR [--model NAME] [--profile mini|full] [--set k=v]...`` and ``anchorformer eval det --data ROOT
--checkpoint PATH --out DIR``; both run under torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from ...data.coco import CocoDetection, Compose, LargeScaleJitter, RandomHorizontalFlip, detection_collate
from ...engine.batching import plan_batch
from ...engine.checkpoint import load_training_checkpoint, restore_rng_state, save_training_state
from ...engine.distributed import DistInfo, barrier, cleanup_distributed, init_distributed, unwrap_model
from ...engine.divergence import check_loss
from ...engine.launch import launch_if_several
from ...engine.logging import MetricLogger, progress
from ...engine.preempt import ResumableSampler
from ...engine.recipe import load_preset_with_entry, load_recipe
from ...engine.seeding import seed_everything, seed_worker
from ...engine.timings import TIMINGS, RunClock, format_seconds, write_timings
from ...engine.trainer import TrainingRun, finish_run, training_run
from ...models.detection import DetectorConfig, build_detector, comparable_input_scale, sanitize_targets
from ...models.factory import backbone_kwargs
from ...models.pyramid import SimpleFeaturePyramid, backbone_macs, param_groups_layer_decay
from .coco_eval import detections_to_coco, evaluate_coco, metric_keys, write_json_atomic
from .recipe import DetRecipe

__all__ = [
    "COCO_SIZE",
    "SMOKE",
    "detector_config",
    "evaluate_checkpoint",
    "evaluate_detector",
    "load_detector",
    "predict",
    "resolve_recipe",
    "train",
]

_logger = logging.getLogger(__name__)

COCO_SIZE = (800, 1333)  # (H, W) at which backbone GMACs are reported


# ---------------------------------------------------------------------------------------------
# configuration -> model
# ---------------------------------------------------------------------------------------------


def resolve_recipe(
    *,
    profile: str = "mini",
    overrides: Sequence[str] = (),
    model: str | None = None,
    epochs: Any = None,
    source: str = "argument",
) -> DetRecipe:
    """The recipe: the ``profile`` preset with the chosen ``recipes`` entry, then ``overrides``
    (``--set``), then ``model``/``epochs``.

    The training recipe (``recipe: 1x | lsj``) is the one the preset and ``overrides`` choose
    together; its entry of ``recipes`` replaces the preset's values, and ``overrides`` and the
    explicit values are applied over the result. ``epochs`` shorter than the preset's schedule
    keeps the lr steps that fit (or one at the end).

    Raises:
        RecipeError: an unknown key, a value of the wrong type or out of range.
    """
    flag = (lambda f: f) if source == "cli" else (lambda f: f"{source}: {f.lstrip('-')}")
    explicit: dict[str, tuple[Any, str]] = {"model": (model, flag("--model")), "epochs": (epochs, flag("--epochs"))}
    preset, label = load_preset_with_entry(DetRecipe, profile, overrides, "recipe")
    recipe = load_recipe(
        DetRecipe, profile, overrides=overrides, explicit={"model": explicit["model"]}, preset=(preset, label)
    )
    if recipe.dry_run:  # the dry run's reductions first, the user's --set and flags over them
        recipe = load_recipe(
            DetRecipe,
            profile,
            overrides=[*DRY_RUN, *overrides],
            explicit={"model": explicit["model"]},
            preset=(preset, label),
        )
    if epochs is not None:
        steps = [s for s in recipe.lr_steps if isinstance(epochs, int) and s <= epochs] or [epochs]
        recipe = recipe.replace(flag("--epochs"), epochs=epochs, lr_steps=steps)
    return recipe


def _meta_pyramid(name: str, kwargs: Mapping[str, Any]) -> SimpleFeaturePyramid:
    with torch.device("meta"):
        return SimpleFeaturePyramid(name, 8, (1.0,), backbone_kwargs=dict(kwargs))


def detector_config(cfg: Mapping[str, Any], num_classes: int) -> tuple[DetectorConfig, dict[str, Any]]:
    """The :class:`DetectorConfig` of a recipe, with the comparable-FLOPs input scale applied.

    Returns:
        ``(config, info)`` with ``info``: ``input_scale``, ``backbone_gmacs`` (the backbone at
        1333x800 x scale), ``backbone_gmacs_full`` (at 1333x800) and, when matching,
        ``matched_to`` and ``matched_gmacs``.
    """
    name = cfg["model"]
    kw = backbone_kwargs(name, cfg)
    pyr = _meta_pyramid(name, kw)
    full_macs = backbone_macs(pyr, COCO_SIZE)
    scale = float(cfg.get("input_scale") or 1.0)
    info: dict[str, Any] = {"backbone": name, "backbone_gmacs_full": full_macs / 1e9}
    if cfg.get("match_macs_of"):
        other = str(cfg["match_macs_of"])
        # Match at the input size the recipe actually trains on (1333x800 in full; the mini sets'
        # small images in mini, where 1333x800 would be far outside the regime the runs see).
        match_size = tuple(int(v) for v in (cfg.get("match_size") or COCO_SIZE))
        target = backbone_macs(_meta_pyramid(other, backbone_kwargs(other, cfg)), match_size)
        scale, _ = comparable_input_scale(pyr, target, match_size)
        info.update(matched_to=other, matched_gmacs=target / 1e9)
    size = (round(COCO_SIZE[0] * scale), round(COCO_SIZE[1] * scale))
    info.update(input_scale=scale, backbone_gmacs=backbone_macs(pyr, size) / 1e9)
    # GMACs at the size the comparable-FLOPs pairing uses (the size the runs train on), x scale
    ms = tuple(int(v) for v in (cfg.get("match_size") or COCO_SIZE))
    info.update(
        match_size=list(ms),
        backbone_gmacs_match=backbone_macs(pyr, (max(1, round(ms[0] * scale)), max(1, round(ms[1] * scale)))) / 1e9,
    )
    det = DetectorConfig.from_dict(
        dict(
            backbone=name,
            num_classes=num_classes,
            detector=cfg["detector"],
            backbone_kwargs=kw,
            drop_path_rate=float(cfg["drop_path"]),
            grad_checkpointing=bool(cfg["grad_checkpointing"]),
            out_channels=int(cfg["out_channels"]),
            norm=cfg["norm"],
            min_size=max(16, round(int(cfg["min_size"]) * scale)),
            max_size=max(16, round(int(cfg["max_size"]) * scale)),
            anchor_sizes=tuple(cfg["anchor_sizes"]),
            aspect_ratios=tuple(cfg["aspect_ratios"]),
            rpn_conv_depth=int(cfg["rpn_conv_depth"]),
            rpn_pre_nms_top_n_train=int(cfg["rpn_pre_nms_top_n_train"]),
            rpn_post_nms_top_n_train=int(cfg["rpn_post_nms_top_n_train"]),
            rpn_pre_nms_top_n_test=int(cfg["rpn_pre_nms_top_n_test"]),
            rpn_post_nms_top_n_test=int(cfg["rpn_post_nms_top_n_test"]),
            rpn_batch_size_per_image=int(cfg["rpn_batch_size_per_image"]),
            box_head=cfg["box_head"],
            representation_size=int(cfg["representation_size"]),
            box_batch_size_per_image=int(cfg["box_batch_size_per_image"]),
            box_score_thresh=float(cfg["box_score_thresh"]),
            box_detections_per_img=int(cfg["box_detections_per_img"]),
            mask_head_layers=int(cfg["mask_head_layers"]),
            mask_head_channels=int(cfg["mask_head_channels"]),
            **_recipe_resizing(cfg, scale),
        )
    )
    return det, info


def _recipe_resizing(cfg: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """The detector's resizing under ``recipe: lsj`` (the data pipeline sizes the training
    images, batches are padded to the square); nothing under 1x (the detector's defaults)."""
    if cfg.get("recipe", "1x") != "lsj":
        return {}
    return {"train_resize": False, "size_divisible": max(16, round(int(cfg["max_size"]) * scale))}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _coco_dataset(root: str | os.PathLike, split: str, transforms: Any = None, on_bad: str = "fail") -> CocoDetection:
    return CocoDetection(root, split, transforms=transforms, on_bad=on_bad)


def _collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = detection_collate(batch)
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def _to_device(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


@torch.no_grad()
def predict(
    model: nn.Module, images: Sequence[torch.Tensor], device: torch.device | str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """Detections for (3, H, W) images in [0, 1]: boxes in the images' pixels, masks (K, 1, H, W)."""
    was = model.training
    model.eval()
    try:
        out = model([im.to(device) for im in images])
    finally:
        model.train(was)
    return [{k: v.cpu() for k, v in o.items()} for o in out]


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    num_workers: int = 0,
    out_dir: str | os.PathLike | None = None,
    write_metrics: bool = True,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Run ``model`` over ``dataset`` and evaluate with pycocotools.

    Args:
        model: a detector from :func:`anchorformer.models.detection.build_detector`.
        dataset: a ``CocoDetection`` (or a ``Subset`` of one) without resizing transforms:
            detections must be in the annotation's pixel coordinates.
        device: where the model runs.
        batch_size: images per forward pass (per process). Images of a batch are padded to a
            common size and a ViT's global attention sees the padding, so only batch size 1
            gives each image's detections independently of the others.
        num_workers: data loader workers.
        out_dir: when given, ``detections.json`` and (with ``write_metrics``) ``metrics.json``
            are written there (by the main process, atomically).
        write_metrics: write ``metrics.json`` too.
        dist_info: shard the images over processes and gather the detections on rank 0.

    Returns:
        ``bbox_*`` (and ``segm_*`` for Mask R-CNN) metrics in percent; empty on other ranks.
    """
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    coco, cat_ids = base.coco, list(base.cat_ids)
    indices = list(range(len(dataset)))
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info and dist_info.is_distributed else (0, 1)
    shard = Subset(dataset, indices[rank::world])
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    model.eval()
    records: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for images, targets in progress(loader, desc="eval det"):
        outputs = model([im.to(device) for im in images])
        ids = [int(t["image_id"]) for t in targets]
        image_ids += ids
        records += detections_to_coco([{k: v.cpu() for k, v in o.items()} for o in outputs], ids, cat_ids)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (records, image_ids))
        records = [r for rs, _ in gathered for r in rs]
        image_ids = [i for _, ids in gathered for i in ids]
    if rank != 0:
        return {}
    heads = getattr(unwrap_model(model), "roi_heads", None)
    iou_types = ("bbox", "segm") if heads is not None and heads.has_mask() else ("bbox",)
    metrics = evaluate_coco(coco, records, iou_types=iou_types, img_ids=image_ids)
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "detections.json", records, indent=None)
        if write_metrics:
            write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a detector from ``model.pth`` or a training checkpoint written by :func:`train`.

    Returns:
        ``(model, state)``; ``state["detector_config"]`` and ``state["cat_ids"]`` describe it.

    Raises:
        FileNotFoundError: no such file. ValueError: not a detection checkpoint.
    """
    state = load_training_checkpoint(path)
    if "detector_config" not in state or "model" not in state:
        raise ValueError(
            f"{path}: not a detection checkpoint (expected keys 'model' and 'detector_config'; got {sorted(state)})"
        )
    cfg = DetectorConfig.from_dict(state["detector_config"])
    cfg.drop_path_rate = 0.0
    model = build_detector(cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the detector: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.to(device).eval(), state


def evaluate_checkpoint(
    data_root: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "val",
    batch_size: int = 1,
    num_workers: int = 0,
    max_images: int | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """``eval det``: evaluate a saved detector on ``split`` of the COCO folder ``data_root``.

    Writes ``metrics.json`` (``bbox_AP`` ... ``segm_APl``, percent) and ``detections.json``
    (COCO results format) into ``out_dir``.
    """
    info = init_distributed(device)
    try:
        model, state = load_detector(checkpoint, info.device)
        dataset = _coco_dataset(data_root, split)
        if list(dataset.cat_ids) != list(state.get("cat_ids", dataset.cat_ids)):
            raise ValueError(
                f"{checkpoint}: trained on categories {state.get('cat_ids')} but {data_root} ({split}) has {list(dataset.cat_ids)}"
            )
        if max_images:
            dataset = Subset(dataset, range(min(int(max_images), len(dataset))))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return evaluate_detector(
            model,
            dataset,
            device=info.device,
            batch_size=batch_size,
            num_workers=num_workers,
            out_dir=out_dir,
            dist_info=info,
        )
    finally:
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _lr_lambda(warmup_iters: int, warmup_factor: float, milestones: Sequence[int], gamma: float):
    def f(it: int) -> float:
        scale = gamma ** sum(it >= m for m in milestones)
        if it < warmup_iters:
            alpha = it / max(1, warmup_iters)
            scale *= warmup_factor * (1 - alpha) + alpha
        return scale

    return f


def _check_data_root(data: Path) -> None:
    if not (data / "annotations").is_dir():
        raise FileNotFoundError(
            f"{data}: no annotations/ folder; expected annotations/instances_{{train,val}}2017.json and {{train,val}}2017/"
        )


# a finished run's files (run.json, the recipe, is written when training starts: rewritten by a resumed run)
RESULTS = ("metrics.json", "model.pth", "model.safetensors", "detections.json")


def train(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | None = None,
    *,
    profile: str = "mini",
    overrides: Sequence[str] = (),
    epochs: Any = None,
    backbone_checkpoint: str | os.PathLike | None = None,
    resume: str = "auto",
    overwrite: bool = False,
    if_different: str = "refuse",
    nproc_per_node: int | str = 1,
    nnodes: int = 1,
    torchrun_args: Sequence[str] = (),
    source: str = "argument",
) -> dict[str, Any]:
    """Train a detector on COCO ``train2017`` of ``data``, then evaluate on ``val2017``.

    Args:
        data: the COCO folder (``annotations/``, ``train2017/``, ``val2017/``).
        out_dir: run folder: ``checkpoints/`` (per epoch, resumable), ``dvclive/``,
            ``model.pth`` (final weights + config), ``detections.json``, ``metrics.json``
            (AP numbers in percent, backbone GMACs, times) and ``run.json`` (the recipe).
        model: the backbone's name; default the profile's.
        profile, overrides, epochs, resume, overwrite, if_different, nproc_per_node, nnodes,
            torchrun_args, source: as for :func:`anchorformer.tasks.classification.train`. A
            resumed run may have more epochs (and lr steps) than the checkpoint's.
        backbone_checkpoint: classification weights (E1) for the backbone; overrides the
            recipe's ``backbone_checkpoint``. Ignored when resuming.

    Returns:
        The final metrics (empty on processes other than rank 0).
    """
    recipe = resolve_recipe(profile=profile, overrides=overrides, model=model, epochs=epochs, source=source)
    if backbone_checkpoint is not None:
        recipe = recipe.replace("backbone_checkpoint", backbone_checkpoint=str(backbone_checkpoint))
    data = Path(data)
    _check_data_root(data)
    launched = launch_if_several(
        TASK, data, out_dir, nproc_per_node=nproc_per_node, nnodes=nnodes, torchrun_args=torchrun_args,
            device=recipe.device,
        model=model, profile=profile, overrides=list(overrides), epochs=epochs, resume=resume, overwrite=overwrite,
        if_different=if_different, backbone_checkpoint=backbone_checkpoint,
    )  # fmt: skip
    if launched is not None:
        return launched
    train_set, _, base = _datasets(recipe, data)  # both splits readable before anything starts
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(train_set) < recipe.batch_size * world:
        raise ValueError(
            f"{base.img_dir} holds {len(train_set)} training images"
            + (f" (max_train_images={recipe.max_train_images})" if recipe.max_train_images else "")
            + f", fewer than one global batch of {recipe.batch_size * world} (batch_size={recipe.batch_size} x "
            f"{world} process(es)); lower batch_size"
        )
    det_cfg, _ = detector_config(recipe, int(base.num_classes))
    with training_run(
        recipe, out_dir, resume=resume, overwrite=overwrite, if_different=if_different, results=RESULTS,
        differences=differences(recipe, det_cfg),
    ) as run:  # fmt: skip
        return _train(run, data, recipe.backbone_checkpoint)


TASK = "det"
# A seconds-long run on a few mini images (the notebook's smoke defaults and the tests' dry runs).
SMOKE = [
    "epochs=1",
    "lr_steps=[1]",
    "max_train_images=8",
    "max_eval_images=4",
    "warmup_iters=2",
    "model_sizes.tiny.embed_dim=48",
    "model_sizes.tiny.depth=2",
    "num_anchors=8",
    "out_channels=32",
    "representation_size=64",
    "mask_head_layers=1",
    "mask_head_channels=16",
    "min_size=96",
    "max_size=120",
]


# `--set dry_run=true`: any recipe, full included, for 3 optimizer steps (3 epochs of one step of 4
# images in micro-batches of 2: gradient accumulation; warm-up, then the lr steps after epochs 1
# and 2) and an evaluation on 2 images, through every code path the recipe turns on (layer-wise lr
# decay, the 4conv1fc box head, the 4-layer mask head, LayerNorm pyramid, checkpoints): the ViT
# shrunk to 2 blocks of width 32 (8x8 patches, 4 anchors), 96-128 px inputs, narrow heads and
# fewer proposals. The user's --set apply after these.
_DRY_VIT = "{embed_dim: 32, depth: 2, num_heads: 2}"
DRY_RUN = [
    f"model_sizes={{tiny: {_DRY_VIT}, small: {_DRY_VIT}, base: {_DRY_VIT}}}",
    "img_size=32",
    "patch_size=8",
    "num_anchors=4",
    "epochs=3",
    "lr_steps=[1, 2]",
    "warmup_iters=2",
    "global_batch=4",
    "batch_size=2",
    "max_train_images=4",
    "max_eval_images=2",
    "min_size=96",
    "max_size=128",
    "match_size=[96, 128]",
    "out_channels=32",
    "representation_size=64",
    "mask_head_channels=16",
    "rpn_pre_nms_top_n_train=200",
    "rpn_post_nms_top_n_train=100",
    "rpn_pre_nms_top_n_test=100",
    "rpn_post_nms_top_n_test=50",
    "rpn_batch_size_per_image=64",
    "box_batch_size_per_image=64",
    "box_detections_per_img=20",
    "num_workers=0",
    "log_every=1",
    "keep_checkpoints=1",
]


def _check_backbone_checkpoint(path: Any, backbone: str) -> None:
    """A classification ``model.pth`` that names its model must name this backbone."""
    if path is None or isinstance(path, Mapping):
        return
    state = load_training_checkpoint(path)
    name = state.get("model_name")
    if name is not None and name != backbone:
        raise ValueError(f"backbone checkpoint {path} holds a {name}, but the detector's backbone is {backbone}")


def _datasets(cfg: DetRecipe, data_root: Path) -> tuple[Any, Any, Any]:
    """(train set, val set, the train set's CocoDetection); both splits are read before training."""
    hflip = float(cfg.hflip)
    steps: list[Any] = [RandomHorizontalFlip(hflip)] if hflip > 0 else []  # flip first, as ViTDet
    if cfg.recipe == "lsj":
        scale = float(detector_config(cfg, 1)[1]["input_scale"])
        steps.append(LargeScaleJitter(max(16, round(int(cfg.max_size) * scale)), cfg.lsj_scale))
    transforms = None if not steps else steps[0] if len(steps) == 1 else Compose(steps)
    train_set = _coco_dataset(data_root, "train", transforms=transforms, on_bad=cfg.on_bad)
    val_set = _coco_dataset(data_root, str(cfg.eval_split))  # evaluation always fails on a bad file
    if list(train_set.cat_ids) != list(val_set.cat_ids):
        raise ValueError(f"{data_root}: train and val categories differ: {train_set.cat_ids} vs {val_set.cat_ids}")
    if cfg.max_train_images:
        train_set = Subset(train_set, range(min(int(cfg.max_train_images), len(train_set))))
    if cfg.max_eval_images:
        val_set = Subset(val_set, range(min(int(cfg.max_eval_images), len(val_set))))
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    return train_set, val_set, base


def _train(run: TrainingRun, data_root: Path, backbone_ckpt: Any) -> dict[str, Any]:
    cfg, out, info = run.recipe, run.out, run.dist
    t_start = time.perf_counter()
    seed = int(cfg["seed"])
    seed_everything(seed + info.rank)
    device = info.device
    train_set, val_set, base = _datasets(cfg, data_root)
    run.watch_bad_files(base)
    run.check_files(train_set, val_set)  # every file read, decoded before the first step
    num_classes = int(base.num_classes)
    det_cfg, macs_info = detector_config(cfg, num_classes)
    _check_backbone_checkpoint(backbone_ckpt, det_cfg.backbone)
    latest = run.state
    model = build_detector(det_cfg, checkpoint=None if latest else backbone_ckpt).to(device)
    _logger.info(
        "%s %s: backbone %.2f GMACs at 1333x800 x %.3f (%.2f at full size); min_size %d, max_size %d",
        det_cfg.detector, det_cfg.backbone, macs_info["backbone_gmacs"], macs_info["input_scale"],
        macs_info["backbone_gmacs_full"], det_cfg.min_size, det_cfg.max_size,
    )  # fmt: skip

    plan = plan_batch(cfg.global_batch, int(cfg["batch_size"]), info.world_size)
    plan.log(_logger)
    lr = float(cfg["lr"]) * plan.global_batch / float(cfg["lr_batch"])
    groups = param_groups_layer_decay(
        model, lr=lr, weight_decay=float(cfg["weight_decay"]), layer_decay=float(cfg["layer_decay"])
    )
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    sampler = (
        DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
        if info.is_distributed
        else None
    )
    gen = torch.Generator()
    # the order of DataLoader(shuffle=True, generator=gen); a resumed epoch skips what it trained on
    order = ResumableSampler(sampler if sampler is not None else RandomSampler(train_set, generator=gen))
    loader = DataLoader(
        train_set,
        batch_size=plan.per_device,
        sampler=order,
        num_workers=int(cfg.get("num_workers", 0)),
        collate_fn=_collate,
        drop_last=False,
        generator=gen,
        worker_init_fn=seed_worker,
        pin_memory=bool(cfg.get("pin_memory", False)) and device.type == "cuda",
        persistent_workers=False,
    )
    epochs = int(cfg["epochs"])
    accum = plan.accum_steps
    if len(loader) < accum:
        raise ValueError(
            f"{len(train_set)} training images make {len(loader)} batch(es) of {plan.per_device} per process, "
            f"fewer than one global batch of {plan.global_batch} ({accum} accumulation steps)"
        )
    iters_per_epoch = len(loader) // accum  # optimizer steps: a last incomplete accumulation is left out
    micro_batches = iters_per_epoch * accum
    total_iters = epochs * iters_per_epoch
    milestones = [int(s) * iters_per_epoch for s in cfg["lr_steps"]]
    lr_at = _lr_lambda(int(cfg["warmup_iters"]), float(cfg["warmup_factor"]), milestones, float(cfg["lr_gamma"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start_epoch, it, epoch_step = 0, 0, 0
    if latest is not None:
        state = latest
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, it = int(state["epoch"]), int(state["iteration"])
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * lr_at(it)  # this run's schedule (it may have more epochs)
        epoch_step = int(state.get("epoch_step", 0))  # optimizer steps done inside the next epoch
        restore_rng_state(run.own_rng(state["rng"]))
        _logger.info("resumed from %s (epoch %d, iteration %d)", run.start.checkpoint, start_epoch, it)
        run.resumed_at(it)
    train_model: nn.Module = model
    if info.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
        )
    use_amp = bool(cfg.get("amp", False)) and device.type == "cuda"
    clip = cfg.get("clip_grad")
    log_every = max(1, int(cfg.get("log_every", 20)))
    logger = MetricLogger.for_run(out, info.is_main, latest, it)
    with_masks = det_cfg.detector == "mask_rcnn"
    if info.is_main:
        write_json_atomic(
            out / "run.json",
            {"config": cfg.to_dict(), "detector_config": det_cfg.to_dict(), **macs_info, **plan.record(), "lr": lr},
        )

    def save(epochs_done: int, steps_in: int, sums: Mapping[str, float], count: int) -> Path | None:
        """The training state after iteration ``it`` (``steps_in`` optimizer steps into the epoch
        after ``epochs_done``), written by rank 0 (called on every rank)."""
        rng = run.rng_state()
        if not info.is_main:
            return None
        return save_training_state(
            out,
            it,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epochs_done,
                "iteration": it,
                "epoch_step": steps_in,
                "epoch_sums": dict(sums),  # the running means of the epoch's log lines
                "epoch_count": count,
                "rng": rng,
                "logged": logger.rows,  # the curves, rewritten from here on resume
                "detector_config": det_cfg.to_dict(),
                "cat_ids": list(base.cat_ids),
                "config": cfg.to_dict(),
                "code_versions": run.code_versions(it),
            },
            int(cfg.keep_checkpoints),
        )

    clock = RunClock(total_iters, it)  # the ETA counts optimizer steps
    preemption = run.preemption()
    with preemption:
        for epoch in range(start_epoch, epochs):
            train_model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            gen.manual_seed(seed + epoch)  # the same order after a resume
            first = epoch_step * accum if epoch == start_epoch else 0  # micro-batches trained before a stop
            order.skip = first * plan.per_device
            sums: dict[str, float] = defaultdict(float)
            count = 0
            if first:
                sums.update(latest.get("epoch_sums") or {})
                count = int(latest.get("epoch_count") or 0)
            optimizer.zero_grad(set_to_none=True)
            batches = progress(
                loader,
                desc=f"det epoch {epoch + 1}/{epochs}",
                total=micro_batches - first,
                unit="img",
                unit_scale=loader.batch_size or 1,
            )
            for j, (images, targets) in enumerate(batches, start=first):
                if j >= micro_batches:
                    break
                images = [im.to(device, non_blocking=True) for im in images]
                targets = _to_device(sanitize_targets(targets, with_masks=with_masks), device)
                step_now = (j + 1) % accum == 0
                sync = nullcontext() if step_now or not hasattr(train_model, "no_sync") else train_model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        losses = train_model(images, targets)
                    loss = sum(losses.values())
                    check_loss(loss, f"iteration {it + 1} (epoch {epoch + 1})", losses)
                    (loss / accum if accum > 1 else loss).backward()
                count += 1
                for k, v in losses.items():
                    sums[k] += float(v.detach())
                sums["loss"] += float(loss.detach())
                if not step_now:
                    continue
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                it += 1
                if it % log_every == 0 or it == total_iters:
                    logger.log(
                        {f"train/{k}": v / count for k, v in sums.items()} | {"lr": optimizer.param_groups[-1]["lr"]},
                        step=it,
                    )
                    clock.lap(it)
                    batches.set_postfix(
                        loss=f"{sums['loss'] / count:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.3g}"
                    )
                    _logger.info(
                        "epoch %d it %d/%d loss %.4f (%s)",
                        epoch + 1,
                        it,
                        total_iters,
                        sums["loss"] / count,
                        clock.progress(),
                    )
                if preemption.poll() and j + 1 < micro_batches:  # the epoch's end writes its own checkpoint
                    path = save(epoch, (j + 1) // accum, sums, count)
                    preemption.saved()
                    if preemption.stopping:
                        preemption.stop(it, path)
            logger.log({"epoch": epoch + 1, "train/epoch_loss": sums["loss"] / max(1, count)}, step=it)
            path = save(epoch + 1, 0, {}, 0)
            preemption.saved()
            barrier()
            if preemption.stopping:
                preemption.stop(it, path)
    train_seconds = clock.elapsed

    t_eval = time.perf_counter()
    metrics = evaluate_detector(
        model,
        val_set,
        device=device,
        batch_size=int(cfg.get("eval_batch_size", 1)),
        num_workers=int(cfg.get("num_workers", 0)),
        out_dir=out,
        write_metrics=False,  # written last, with the run's other numbers
        dist_info=info,
    )
    eval_seconds = time.perf_counter() - t_eval
    if not info.is_main:
        finish_run(run, {})
        return {}
    weights = {"model": model.state_dict(), "detector_config": det_cfg.to_dict(), "cat_ids": list(base.cat_ids)}
    metrics_all: dict[str, Any] = {
        **metrics,
        "backbone_gmacs": round(macs_info["backbone_gmacs"], 4),
        "backbone_gmacs_full": round(macs_info["backbone_gmacs_full"], 4),
        "backbone_gmacs_match": round(macs_info["backbone_gmacs_match"], 4),
        "match_size": "x".join(str(v) for v in macs_info["match_size"]),  # (H)x(W)
        "input_scale": round(macs_info["input_scale"], 4),
        "min_size": det_cfg.min_size,
        "epochs": epochs,
        "iterations": it,
        **plan.record(),
        "lr": lr,
        "bad_files": len(run.bad_files()),  # training files skipped (on_bad: skip)
        "degenerate_boxes": int(base.num_degenerate),  # training annotations dropped for an empty box
        "code_versions": run.code_versions(it),  # each segment's code: {version, from_step, to_step}
    }
    timings = {
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "first_iteration": clock.start + 1,  # a resumed run times the iterations it ran
    }
    write_timings(out, timings, ran=clock.ran)
    _logger.info(
        "trained in %s, evaluated in %s (%s)",
        format_seconds(train_seconds),
        format_seconds(eval_seconds),
        out / TIMINGS,
    )
    logger.summary(metrics_all)
    logger.close()
    finish_run(run, metrics_all, weights)
    return metrics_all


def differences(recipe: DetRecipe, det_cfg: DetectorConfig) -> Any:
    """Why a checkpoint cannot be resumed by a run of ``recipe`` building ``det_cfg`` (none: it can)."""

    def why(state: Mapping[str, Any]) -> list[str]:
        found = recipe.differences(state.get("config") or {})
        if state.get("detector_config") != det_cfg.to_dict():
            found.append("another detector")
        return found

    return why


# ---------------------------------------------------------------------------------------------
# command line (the common flags are anchorformer.cli's)
# ---------------------------------------------------------------------------------------------

TRAIN_HELP = "train Mask R-CNN / RetinaNet on COCO (E5)"
EVAL_HELP = "evaluate a detector on COCO (box and mask AP)"


def add_train_arguments(p: Any) -> None:
    p.add_argument("--backbone-checkpoint", default=None, help="E1 classification checkpoint for the backbone")


def add_eval_arguments(p: Any) -> None:
    p.add_argument("--split", default="val", help="split (default: val -> val2017)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (1: independent of padding)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)


def cli_train(args: Any) -> dict[str, Any]:
    """``anchorformer train det``."""
    metrics = train(
        args.data, args.out, args.model, profile=args.profile, overrides=args.overrides, epochs=args.epochs,
        backbone_checkpoint=args.backbone_checkpoint, resume=args.resume, overwrite=args.overwrite, if_different=args.if_different, source="cli",
    )  # fmt: skip
    if metrics:
        print(json.dumps({k: metrics[k] for k in metrics if k in metric_keys()}, indent=2))
    return metrics


def cli_eval(args: Any) -> dict[str, Any]:
    """``anchorformer eval det``."""
    if args.overrides:
        raise ValueError("eval det takes no --set; the detector's settings come from its checkpoint")
    metrics = evaluate_checkpoint(
        args.data, args.checkpoint, args.out, split=args.split, batch_size=args.batch_size,
        num_workers=args.workers, max_images=args.max_images, device=args.device,
    )  # fmt: skip
    if metrics:
        print(json.dumps(metrics, indent=2))
    return metrics
