"""Launch configurations of the fused kernels: a table, looked up once per call shape.

Keys: the kind of launch (``fwd``: the forward kernels, ``bwd``: the backward ones), an N
bucket and a B*H bucket (powers of two: the smallest >= the value, within [16, 65536]), the
inputs' dtype (``float32``, ``bfloat16``, ``float16``) and the GPU's name as torch reports it
(``torch.cuda.get_device_name``). Values: ``BLOCK_N``, ``num_warps``, ``num_stages``.

``configs.json`` beside this module holds the measured entries, written offline by
``python -m anchorformer.ops.anchor_attention.tune`` (see ``tune.py``) on the GPU they are for;
a shape or GPU without an entry gets :data:`DEFAULTS` (the settings the kernels shipped with
before the table existed). Nothing here runs an autotuner or reads a clock.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["DEFAULTS", "INTERPRETER", "TABLE_PATH", "bucket", "config_key", "load_table", "lookup_config"]

TABLE_PATH = Path(__file__).with_name("configs.json")

# (kind, D <= 64?) -> config; the backward holds three N x D tiles, so it takes smaller ones at D > 64.
DEFAULTS = {
    ("fwd", True): {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ("fwd", False): {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    ("bwd", True): {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ("bwd", False): {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
}


# The Triton interpreter (tests on the CPU): small tiles, so that short sequences span several.
INTERPRETER = {"BLOCK_N": 16}


def bucket(x: int) -> int:
    """The smallest power of two >= x, clamped to [16, 65536] (plain integer arithmetic)."""
    return min(65536, max(16, 1 << (max(1, x) - 1).bit_length()))


def config_key(kind: str, n: int, bh: int, dtype: str, gpu: str, block_d: int) -> str:
    """The table's key for one launch: ``kind/N bucket/B*H bucket/dtype/D tile/GPU``."""
    return f"{kind}/{bucket(n)}/{bucket(bh)}/{dtype}/{block_d}/{gpu}"


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, dict[str, int]]:
    """The measured entries of :data:`TABLE_PATH` (empty when the file is absent), read once."""
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text()).get("configs", {})


def lookup_config(kind: str, n: int, bh: int, dtype: str, gpu: str, block_d: int) -> dict[str, int]:
    """The table's entry for this launch, else the default for its kind and head dim."""
    hit = load_table().get(config_key(kind, n, bh, dtype, gpu, block_d))
    if hit is not None:
        return dict(hit)
    return dict(INTERPRETER) if gpu == "interpreter" else dict(DEFAULTS[(kind, block_d <= 64)])
