"""COCO detection and instance segmentation: training and evaluation (REFERENCE E5).

The full profile is the standard Mask R-CNN 1x schedule with a plain backbone and ViTDet's
simple feature pyramid: 12 epochs, AdamW (lr 1e-4 at 16 images per step, weight decay 0.05),
linear warm-up then x0.1 at epochs 8 and 11, shorter side 800 (longer at most 1333),
horizontal flips; evaluation with pycocotools on ``val2017`` (:mod:`.coco_eval`). The mini
profile runs the same code on the embedded mini set in minutes on a CPU
(``anchorformer/configs/det.yaml``).

"Comparable FLOPs": with ``match_macs_of`` set to another backbone, the run's input scale is
chosen so that its backbone's MACs at 1333x800 x scale equal that backbone's at 1333x800
(:func:`anchorformer.models.detection.comparable_input_scale`); the scale multiplies
``min_size`` and ``max_size``.

Command line: ``anchorformer train det --data ROOT --out DIR [--profile mini|full] [--set k=v]``
and ``anchorformer eval det --data ROOT --checkpoint PATH --out DIR``; both run under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..data.coco import CocoDetection, RandomHorizontalFlip, detection_collate
from ..models.detection import DetectorConfig, build_detector, comparable_input_scale, sanitize_targets
from ..models.pyramid import SimpleFeaturePyramid, backbone_macs, param_groups_layer_decay
from .checkpoint import (
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from .coco_eval import detections_to_coco, evaluate_coco, metric_keys, write_json_atomic
from .config import apply_overrides, default_profile, load_profile
from .distributed import DistInfo, barrier, cleanup_distributed, init_distributed, unwrap_model
from .logging import MetricLogger, progress

__all__ = [
    "COCO_SIZE",
    "backbone_kwargs",
    "detector_config",
    "evaluate_checkpoint",
    "evaluate_detector",
    "load_detector",
    "predict",
    "register_eval",
    "register_train",
    "train_detection",
    "train_detection_torchrun",
]

_logger = logging.getLogger(__name__)

COCO_SIZE = (800, 1333)  # (H, W) at which backbone GMACs are reported


# ---------------------------------------------------------------------------------------------
# configuration -> model
# ---------------------------------------------------------------------------------------------


def backbone_kwargs(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``create_model`` arguments of backbone ``name`` under the recipe ``cfg``.

    ``img_size`` (the pre-training size the position embeddings belong to), ``patch_size``,
    the shape of ``model_sizes[size]`` for the size word (tiny/small/base) in ``name``,
    ``num_anchors`` (AnchorFormer only) and ``model_kwargs``.
    """
    kw: dict[str, Any] = {"img_size": int(cfg["img_size"])}
    if cfg.get("patch_size"):
        kw["patch_size"] = int(cfg["patch_size"])
    for size, shape in (cfg.get("model_sizes") or {}).items():
        if f"_{size}_" in f"_{name}_":
            kw.update(shape)
    if name.startswith("anchor"):
        if cfg.get("num_anchors"):
            kw["num_anchors"] = int(cfg["num_anchors"])
        if cfg.get("attn_impl"):
            kw["attn_impl"] = cfg["attn_impl"]
    kw.update(cfg.get("model_kwargs") or {})
    return kw


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
    name = cfg["backbone"]
    kw = backbone_kwargs(cfg, name)
    pyr = _meta_pyramid(name, kw)
    full_macs = backbone_macs(pyr, COCO_SIZE)
    scale = float(cfg.get("input_scale") or 1.0)
    info: dict[str, Any] = {"backbone": name, "backbone_gmacs_full": full_macs / 1e9}
    if cfg.get("match_macs_of"):
        other = str(cfg["match_macs_of"])
        # Match at the input size the recipe actually trains on (1333x800 in full; the mini sets'
        # small images in mini, where 1333x800 would be far outside the regime the runs see).
        match_size = tuple(int(v) for v in (cfg.get("match_size") or COCO_SIZE))
        target = backbone_macs(_meta_pyramid(other, backbone_kwargs(cfg, other)), match_size)
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
        )
    )
    return det, info


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _coco_dataset(root: str | os.PathLike, split: str, transforms: Any = None) -> CocoDetection:
    return CocoDetection(root, split, transforms=transforms)


def _collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = detection_collate(batch)
    return list(images), list(targets)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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
    """Rebuild a detector from ``model.pth`` or a training checkpoint written by :func:`train_detection`.

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
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike,
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


def _check_cfg(cfg: Mapping[str, Any]) -> None:
    required = [
        "backbone", "img_size", "detector", "epochs", "batch_size", "lr", "lr_batch", "weight_decay",
        "layer_decay", "warmup_iters", "warmup_factor", "lr_steps", "lr_gamma", "min_size", "max_size", "seed",
    ]  # fmt: skip
    missing = [k for k in required if k not in cfg]
    if missing:
        raise KeyError(f"detection config lacks {missing}; see anchorformer/configs/det.yaml")
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got {cfg['epochs']}, {cfg['batch_size']}")
    if any(not 0 < int(s) <= int(cfg["epochs"]) for s in cfg["lr_steps"]):
        raise ValueError(f"lr_steps {cfg['lr_steps']} must be epochs in 1..{cfg['epochs']}")


def train_detection(
    cfg: Mapping[str, Any],
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backbone_checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Train a detector on COCO ``train2017`` of ``data_root``, then evaluate on ``val2017``.

    Args:
        cfg: a recipe (``anchorformer/configs/det.yaml`` section, after overrides).
        data_root: the COCO folder (``annotations/``, ``train2017/``, ``val2017/``).
        out_dir: run folder: ``checkpoints/`` (per epoch, resumable), ``dvclive/``,
            ``model.pth`` (final weights + config), ``detections.json``, ``metrics.json``
            (AP numbers in percent, backbone GMACs, times) and ``run.json`` (the config).
        backbone_checkpoint: classification weights (E1) for the backbone; overrides
            ``cfg["backbone_checkpoint"]``. Ignored when resuming.
        resume: continue from the newest complete checkpoint in ``out_dir`` when it was written
            by the same recipe (execution settings, ``epochs`` and ``lr_steps`` may differ);
            otherwise, or with ``resume=False``, the folder's checkpoints are removed and the
            run starts afresh.

    Returns:
        The final metrics (empty on processes other than rank 0).
    """
    _check_cfg(cfg)
    out = Path(out_dir)
    info = init_distributed(cfg.get("device"))
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _train(
            dict(cfg), Path(data_root), out, backbone_checkpoint or cfg.get("backbone_checkpoint"), resume, info
        )
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


def train_detection_torchrun(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    nproc_per_node: int,
    profile: str | None = None,
    overrides: Sequence[str] = (),
    nnodes: int = 1,
    extra_torchrun_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``train det`` under ``torchrun`` (one process per GPU) and return its metrics.

    The command is ``python -m torch.distributed.run --nproc_per_node N [--standalone] -m
    anchorformer.cli train det --data ROOT --out DIR [--profile P] --set k=v ...``.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={int(nproc_per_node)}",
        f"--nnodes={int(nnodes)}",
    ]
    if int(nnodes) == 1 and not any(a.startswith(("--rdzv", "--master")) for a in extra_torchrun_args):
        cmd.append("--standalone")
    cmd += [
        *extra_torchrun_args,
        "-m",
        "anchorformer.cli",
        "train",
        "det",
        "--data",
        str(data_root),
        "--out",
        str(out_dir),
    ]
    if profile:
        cmd += ["--profile", profile]
    for item in overrides:
        cmd += ["--set", item]
    _logger.info("launching %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return json.loads((Path(out_dir) / "metrics.json").read_text(encoding="utf-8"))


def _check_backbone_checkpoint(path: Any, backbone: str) -> None:
    """A classification ``model.pth`` that names its model must name this backbone."""
    if path is None or isinstance(path, Mapping):
        return
    state = load_training_checkpoint(path)
    name = state.get("model_name")
    if name is not None and name != backbone:
        raise ValueError(f"backbone checkpoint {path} holds a {name}, but the detector's backbone is {backbone}")


def _train(
    cfg: dict[str, Any], data_root: Path, out: Path, backbone_ckpt: Any, resume: bool, info: DistInfo
) -> dict[str, Any]:
    t_start = time.perf_counter()
    seed = int(cfg["seed"])
    _seed_everything(seed + info.rank)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "detections.json", "model.pth"):
            (out / stale).unlink(missing_ok=True)  # never leave a previous run's results looking current
    barrier()
    device = info.device
    hflip = float(cfg.get("hflip", 0.5))
    train_set = _coco_dataset(data_root, "train", transforms=RandomHorizontalFlip(hflip) if hflip > 0 else None)
    val_set = _coco_dataset(data_root, str(cfg.get("eval_split", "val")))
    if list(train_set.cat_ids) != list(val_set.cat_ids):
        raise ValueError(f"{data_root}: train and val categories differ: {train_set.cat_ids} vs {val_set.cat_ids}")
    if cfg.get("max_train_images"):
        train_set = Subset(train_set, range(min(int(cfg["max_train_images"]), len(train_set))))
    if cfg.get("max_eval_images"):
        val_set = Subset(val_set, range(min(int(cfg["max_eval_images"]), len(val_set))))
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    num_classes = int(base.num_classes)

    det_cfg, macs_info = detector_config(cfg, num_classes)
    _check_backbone_checkpoint(backbone_ckpt, det_cfg.backbone)
    latest = _resumable_checkpoint(out, cfg, det_cfg, info) if resume else None
    if latest is None and info.is_main:
        _clear_checkpoints(out)
    barrier()
    model = build_detector(det_cfg, checkpoint=None if latest else backbone_ckpt).to(device)
    _logger.info(
        "%s %s: backbone %.2f GMACs at 1333x800 x %.3f (%.2f at full size); min_size %d, max_size %d",
        det_cfg.detector, det_cfg.backbone, macs_info["backbone_gmacs"], macs_info["input_scale"],
        macs_info["backbone_gmacs_full"], det_cfg.min_size, det_cfg.max_size,
    )  # fmt: skip

    global_batch = int(cfg["batch_size"]) * info.world_size
    lr = float(cfg["lr"]) * global_batch / float(cfg["lr_batch"])
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
    loader = DataLoader(
        train_set,
        batch_size=int(cfg["batch_size"]),
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=int(cfg.get("num_workers", 0)),
        collate_fn=_collate,
        drop_last=False,
        generator=gen,
        worker_init_fn=_worker_init,
        pin_memory=bool(cfg.get("pin_memory", False)) and device.type == "cuda",
        persistent_workers=False,
    )
    epochs = int(cfg["epochs"])
    iters_per_epoch = len(loader)
    total_iters = epochs * iters_per_epoch
    milestones = [int(s) * iters_per_epoch for s in cfg["lr_steps"]]
    lr_at = _lr_lambda(int(cfg["warmup_iters"]), float(cfg["warmup_factor"]), milestones, float(cfg["lr_gamma"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start_epoch, it = 0, 0
    if latest is not None:
        state = load_training_checkpoint(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, it = int(state["epoch"]), int(state["iteration"])
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * lr_at(it)  # this run's schedule (it may have more epochs)
        restore_rng_state(state["rng"])
        _logger.info("resumed from %s (epoch %d, iteration %d)", latest, start_epoch, it)
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
    logger = MetricLogger(out, enabled=info.is_main, resume_step=it if latest is not None else None)
    with_masks = det_cfg.detector == "mask_rcnn"
    if info.is_main:
        write_json_atomic(out / "run.json", {"config": cfg, "detector_config": det_cfg.to_dict(), **macs_info})

    t_train = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        train_model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        gen.manual_seed(seed + epoch)  # the same order after a resume
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for images, targets in progress(loader, desc=f"det epoch {epoch + 1}/{epochs}"):
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _to_device(sanitize_targets(targets, with_masks=with_masks), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = train_model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at iteration {it} (epoch {epoch + 1}): {dict((k, float(v)) for k, v in losses.items())}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
            optimizer.step()
            scheduler.step()
            it += 1
            count += 1
            for k, v in losses.items():
                sums[k] += float(v.detach())
            sums["loss"] += float(loss.detach())
            if it % log_every == 0 or it == total_iters:
                logger.log(
                    {f"train/{k}": v / count for k, v in sums.items()} | {"lr": optimizer.param_groups[-1]["lr"]},
                    step=it,
                )
                _logger.info("epoch %d it %d/%d loss %.4f", epoch + 1, it, total_iters, sums["loss"] / count)
        logger.log({"epoch": epoch + 1, "train/epoch_loss": sums["loss"] / max(1, count)}, step=it)
        if info.is_main:
            save_checkpoint(
                checkpoint_path(out, it),
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "iteration": it,
                    "rng": capture_rng_state(),
                    "detector_config": det_cfg.to_dict(),
                    "cat_ids": list(base.cat_ids),
                    "config": _plain(cfg),
                },
            )
            prune_checkpoints(out, int(cfg.get("keep_checkpoints", 1)))
        barrier()
    train_seconds = time.perf_counter() - t_train

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
        return {}
    save_checkpoint(
        out / "model.pth",
        {"model": model.state_dict(), "detector_config": det_cfg.to_dict(), "cat_ids": list(base.cat_ids)},
    )
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
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    logger.summary(metrics_all)
    logger.close()
    write_json_atomic(out / "metrics.json", metrics_all)
    return metrics_all


# Recipe keys that may differ between a run and its resumption (execution, and a longer schedule).
_RESUME_FREE = {
    "device", "threads", "num_workers", "pin_memory", "log_every", "keep_checkpoints", "eval_batch_size",
    "max_eval_images", "eval_split", "epochs", "lr_steps", "backbone_checkpoint",
}  # fmt: skip


def _resumable_checkpoint(out: Path, cfg: Mapping[str, Any], det_cfg: DetectorConfig, info: DistInfo) -> Path | None:
    """The newest checkpoint in ``out`` if it was written by the same recipe, else None (with a warning)."""
    latest = find_latest_checkpoint(out)
    if latest is None:
        return None
    state = load_training_checkpoint(latest)
    old = {k: v for k, v in (state.get("config") or {}).items() if k not in _RESUME_FREE}
    new = {k: v for k, v in _plain(cfg).items() if k not in _RESUME_FREE}
    if state.get("detector_config") == det_cfg.to_dict() and old == new:
        return latest
    if info.is_main:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        _logger.warning(
            "%s was written by another configuration (differs in %s); starting afresh", latest, diff or ["detector"]
        )
    return None


def _clear_checkpoints(out: Path) -> None:
    """Remove the checkpoints of an earlier run in ``out`` (a fresh start must not resume from them later)."""
    folder = out / "checkpoints"
    if folder.is_dir():
        for p in folder.glob("checkpoint-*.pth"):
            p.unlink()


def _plain(obj: Any) -> Any:
    """Config values as checkpoint-safe primitives (tuples -> lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def register_train(subparsers: Any) -> None:
    """Add ``train det`` to the ``train`` subcommands."""
    p = subparsers.add_parser("det", help="train Mask R-CNN / RetinaNet on COCO (E5)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", required=True, help="COCO root (annotations/, train2017/, val2017/)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--profile", choices=("mini", "full"), default=None, help="recipe preset (default: params.yaml's profile)"
    )
    p.add_argument("--backbone", default=None, help="backbone model name (overrides the preset)")
    p.add_argument("--backbone-checkpoint", default=None, help="E1 classification checkpoint for the backbone")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT has checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset key (value parsed as YAML); repeatable")  # fmt: skip
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_profile("det", args.profile or default_profile())
    cfg = apply_overrides(cfg, args.overrides)
    if args.backbone:
        cfg["backbone"] = args.backbone
    if args.epochs:
        cfg["epochs"] = args.epochs
        cfg["lr_steps"] = [s for s in cfg["lr_steps"] if s <= args.epochs] or [args.epochs]
    data = Path(args.data)
    if not (data / "annotations").is_dir():
        raise FileNotFoundError(
            f"{data}: no annotations/ folder; expected annotations/instances_{{train,val}}2017.json and {{train,val}}2017/"
        )
    metrics = train_detection(
        cfg, data, args.out, backbone_checkpoint=args.backbone_checkpoint, resume=not args.no_resume
    )
    if metrics:
        print(json.dumps({k: metrics[k] for k in metrics if k in metric_keys()}, indent=2))
    return 0


def register_eval(subparsers: Any) -> None:
    """Add ``eval det`` to the ``eval`` subcommands."""
    p = subparsers.add_parser("det", help="evaluate a detector on COCO (box and mask AP)")
    p.add_argument("--data", required=True, help="COCO root")
    p.add_argument("--checkpoint", required=True, help="model.pth or a training checkpoint of `train det`")
    p.add_argument("--out", required=True, help="folder for metrics.json and detections.json")
    p.add_argument("--split", default="val", help="split (default: val -> val2017)")
    p.add_argument(
        "--batch-size", type=int, default=1, help="images per forward pass (1: independent of batch padding)"
    )
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    metrics = evaluate_checkpoint(
        args.checkpoint, args.data, args.out, split=args.split, batch_size=args.batch_size,
        num_workers=args.workers, max_images=args.max_images, device=args.device,
    )  # fmt: skip
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0
