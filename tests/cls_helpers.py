"""A tiny ImageFolder set and a tiny recipe for the classification tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Three classes told apart by colour, 16x16 pixels: a model of one block learns them in a few steps.
COLOURS = {"n001": (220, 40, 40), "n002": (40, 200, 40), "n003": (40, 60, 220)}

TINY = [
    "img_size=16",
    "patch_size=4",
    "model_sizes.tiny={embed_dim: 32, depth: 1, num_heads: 2}",
    "num_anchors=4",
    "batch_size=8",
    "lr_batch=8",
    "lr=3.0e-3",
    "warmup_epochs=0",
    "scale=[0.8, 1.0]",
    "eval_batch_size=16",
    "throughput_batch_size=2",
    "throughput_iters=1",
    "device=cpu",
    "num_workers=0",
    "log_every=1000",
]


def make_tiny_imagefolder(root: Path, train_per_class: int = 8, val_per_class: int = 4, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<class>/*.png`` (noisy solid colours); return ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for wnid, rgb in COLOURS.items():
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.normal(0, 25, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{wnid}_{i}.png")
    return root
