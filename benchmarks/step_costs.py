"""Training-step cost of the standard models at their full recipes' per-device batch.

Each run builds the model exactly as its task does for the full recipe (classification: AnchorFormer
and DeiT T/S at 224², 128 images per device; detection: Mask R-CNN over the AnchorFormer-T and
DeiT-T backbones on 1333x800 images, 2 per device; segmentation: Semantic FPN over the T backbones
and UperNet over the S backbones on 512² crops, 2 per device; plus the forward pass of DeiT's
teacher RegNetY-16GF at 128 images, the extra cost of a distilled run), feeds random inputs
(random boxes and masks for the detector, random labels for the segmenters) and times ``--steps``
optimizer steps (AdamW, bf16 autocast on CUDA as the recipes) after ``--warmup`` steps. It writes
the median and fastest step time, images per second and the peak memory of the device
(``torch.cuda.max_memory_allocated``; none on the CPU) as JSON. The README's GPU-hours table is
computed from the newest ``step_costs_cuda_*.json`` (``benchmarks/cost_table.py``).

``--tiny`` shrinks every model, image and batch so that the same code runs on a CPU in seconds
(what the tests run); its numbers are not costs.

Usage: python benchmarks/step_costs.py [--device cuda|cpu] [--tiny] [--steps 20] [--warmup 5] --out FILE
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("step_costs")

CLS_MODELS = ("anchorformer_tiny_patch16_224", "deit_tiny_patch16_224", "anchorformer_small_patch16_224", "deit_small_patch16_224")  # fmt: skip
DET_BACKBONES = ("anchorformer_tiny_patch16_224", "deit_tiny_patch16_224")
SEG_RUNS = (
    ("anchorformer_tiny_patch16_224", "fpn"),
    ("deit_tiny_patch16_224", "fpn"),
    ("anchorformer_small_patch16_224", "upernet"),
    ("deit_small_patch16_224", "upernet"),
)
COCO_SIZE = (800, 1333)  # (H, W) of the detection inputs
TEACHER = "regnety_160"

TINY_SIZES = "{tiny: {embed_dim: 32, depth: 2, num_heads: 2}, small: {embed_dim: 48, depth: 2, num_heads: 3}}"
TINY = {
    "cls": ["img_size=32", "batch_size=2", f"model_sizes={TINY_SIZES}", "num_anchors=4"],
    "det": ["batch_size=1", f"model_sizes={TINY_SIZES}", "num_anchors=4", "out_channels=16", "representation_size=32",
            "mask_head_layers=1", "mask_head_channels=8", "min_size=64", "max_size=96"],
    "seg": ["crop_size=64", "device_batch=2", f"model_sizes={TINY_SIZES}", "num_anchors=4", "pyramid_channels=16",
            "head_channels=16"],
}  # fmt: skip
TINY_DET_SIZE = (64, 96)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], amp: bool, device: torch.device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def _cls_runs(device: torch.device, tiny: bool) -> list[tuple[dict[str, Any], Callable[[], None]]]:
    from timm.loss import SoftTargetCrossEntropy

    from anchorformer.tasks.classification.train import build_classifier, classifier_kwargs, resolve_recipe

    runs = []
    for name in CLS_MODELS:
        cfg = resolve_recipe(profile="full", model=name, overrides=TINY["cls"] if tiny else [])
        batch, size = int(cfg.batch_size), int(cfg.img_size)
        model = build_classifier(name, classifier_kwargs(name, cfg, 1000)).to(device).train()
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.softmax(torch.randn(batch, 1000, device=device), 1)  # Mixup/CutMix's soft targets
        crit = SoftTargetCrossEntropy()
        step = _train_step(model, lambda m=model, x=x, y=y, c=crit: c(m(x), y), device.type == "cuda", device)
        runs.append(({"task": "cls", "name": name, "model": name, "img": [size, size], "batch": batch}, step))
    cfg = resolve_recipe(profile="full", model=CLS_MODELS[0], overrides=TINY["cls"] if tiny else [])
    batch, size = int(cfg.batch_size), int(cfg.img_size)
    teacher_name = "regnety_002" if tiny else TEACHER  # the smallest RegNetY stands in when tiny
    teacher = build_classifier(teacher_name, {"num_classes": 1000})
    teacher = teacher.to(device).eval().requires_grad_(False)
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def teacher_step() -> None:
        with torch.no_grad(), autocast:
            teacher(x)

    meta = {"task": "cls", "name": "teacher forward", "model": teacher_name, "img": [size, size], "batch": batch}
    runs.append((meta, teacher_step))
    return runs


def _det_runs(device: torch.device, tiny: bool) -> list[tuple[dict[str, Any], Callable[[], None]]]:
    from anchorformer.models.detection import build_detector
    from anchorformer.tasks.detection.train import detector_config, resolve_recipe

    h, w = TINY_DET_SIZE if tiny else COCO_SIZE
    g = torch.Generator().manual_seed(0)
    runs = []
    for name in DET_BACKBONES:
        cfg = resolve_recipe(profile="full", model=name, overrides=TINY["det"] if tiny else [])
        det_cfg, _ = detector_config(cfg, 80)
        model = build_detector(det_cfg).to(device).train()
        batch = int(cfg.batch_size)
        images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(batch)]
        targets = []
        for _ in range(batch):  # 7 objects an image, COCO's mean
            xy = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = 16 + torch.rand(7, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
            boxes = torch.cat([xy, xy + wh], 1)
            masks = torch.zeros(7, h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            labels = torch.randint(1, 81, (7,), generator=g)
            targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})

        def loss(m=model, images=images, targets=targets) -> torch.Tensor:
            return sum(m(images, targets).values())

        step = _train_step(model, loss, bool(cfg.amp) and device.type == "cuda", device)
        runs.append(({"task": "det", "name": name, "model": name, "img": [h, w], "batch": batch}, step))
    return runs


def _seg_runs(device: torch.device, tiny: bool) -> list[tuple[dict[str, Any], Callable[[], None]]]:
    from anchorformer.tasks.segmentation.train import build_model, resolve_recipe

    runs = []
    for name, head in SEG_RUNS:
        cfg = resolve_recipe(profile="full", model=name, head=head, overrides=TINY["seg"] if tiny else [])
        model = build_model(cfg).to(device).train()
        batch, size = int(cfg.device_batch or cfg.batch_size), int(cfg.crop_size)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 150, (batch, size, size), device=device)
        step = _train_step(model, lambda m=model, x=x, y=y: m(x, y)["loss"], bool(cfg.amp) and device.type == "cuda", device)  # fmt: skip
        runs.append(({"task": "seg", "name": f"{name}:{head}", "model": name, "head": head, "img": [size, size], "batch": batch}, step))  # fmt: skip
    return runs


def measure(device: str = "cuda", *, tiny: bool = False, steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Time every standard model's training step; the JSON document described in the module docstring."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_costs: --device cuda but no CUDA device is visible (use --device cpu --tiny)")
    torch.manual_seed(0)
    rows = []
    for build in (_cls_runs, _det_runs, _seg_runs):
        for meta, step in build(dev, tiny):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                times = _time_steps(step, dev, steps, warmup)
            except torch.OutOfMemoryError as e:
                rows.append({**meta, "status": f"out of memory: {str(e).splitlines()[0]}"})
                log.warning("%s: out of memory", meta["name"])
                continue
            median = statistics.median(times)
            row = {
                **meta,
                "status": "ok",
                "step_ms": round(median * 1e3, 3),
                "step_ms_min": round(min(times) * 1e3, 3),
                "images_per_s": round(meta["batch"] / median, 2),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
                if dev.type == "cuda"
                else None,
            }
            rows.append(row)
            log.info("%s: %.1f ms a step of %d images", meta["name"], row["step_ms"], meta["batch"])
            del step
    return {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_type": dev.type,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "tiny": tiny,
        "steps": steps,
        "warmup": warmup,
        "dtype": "bfloat16 autocast" if dev.type == "cuda" else "float32",
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="shrunk models and inputs (a CPU check of the code path)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    doc = measure(args.device, tiny=args.tiny, steps=args.steps, warmup=args.warmup)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    log.info("wrote %s", out)
    return 0 if all(r["status"] == "ok" for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
