"""Offline tuning of the fused kernels' launch configurations: measures, writes ``configs.json``.

The kernels never autotune on the call path: each call looks its launch parameters up in the
table (:mod:`.configs`). This tool fills the table for the GPU it runs on: for every kind of
launch (``fwd``: the forward; ``bwd``: the backward), N, B*H and dtype asked for, it times each
candidate (BLOCK_N, num_warps, num_stages) with ``triton.testing.do_bench`` (CUDA events,
warm-up, L2 flush) and records the fastest under the table's key (N and B*H buckets, dtype, head
dim tile, GPU name). Candidates that do not fit (shared memory, registers) are skipped. Entries
for other keys are kept (``--replace`` drops them).

Usage (on the GPU to tune for; a few minutes):

    python -m anchorformer.ops.anchor_attention.tune --n 197 1024 4096 16384 65536 --bh 48 768 \\
        --dtype bfloat16 float16 --d 64 --m 30

On the CPU under ``TRITON_INTERPRET=1`` it runs the same search with wall-clock timing (for
tests of the tool only: interpreter timings say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import configs

__all__ = ["CANDIDATES", "tune"]

_logger = logging.getLogger(__name__)

CANDIDATES = [
    {"BLOCK_N": bn, "num_warps": w, "num_stages": s} for bn, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3))
]


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: ``triton.testing.do_bench`` on a GPU, a short wall-clock loop otherwise."""
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100))

    def wall(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def tune(
    ns: Sequence[int],
    bhs: Sequence[int],
    dtypes: Sequence[str],
    *,
    d: int = 64,
    m: int = 30,
    candidates: Sequence[dict[str, int]] = CANDIDATES,
    out: Path = configs.TABLE_PATH,
    replace: bool = False,
    device: str | None = None,
) -> dict[str, dict[str, int]]:
    """Time every candidate for each (kind, N, B*H, dtype) and write the winners to ``out``.

    Args:
        ns: sequence lengths N; bhs: B*H products (H = 6 heads, B = B*H / 6 rounded up, at least 1).
        dtypes: ``float32``, ``bfloat16``, ``float16``.
        d: head dim D; m: anchors M.
        candidates: launch configurations to try.
        out: the table file (JSON with a ``configs`` mapping).
        replace: drop the table's other entries instead of keeping them.
        device: ``cuda`` (default when available) or ``cpu`` (interpreter only).

    Returns:
        The entries written by this run, key -> config.
    """
    from . import triton as fused

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = _timer(dev)
    gpu = fused._device_info(dev)[0]
    found: dict[str, dict[str, int]] = {}
    saved = configs.lookup_config
    try:
        for n, bh, dtype_name in itertools.product(ns, bhs, dtypes):
            dtype = getattr(torch, dtype_name)
            H = 6 if bh % 6 == 0 else 1
            B = max(1, bh // H)
            g = torch.Generator().manual_seed(0)
            qk, v, grad = (torch.randn(B, H, n, d, generator=g).to(dev, dtype) for _ in range(3))
            u = torch.randn(m, d, generator=g).to(dev, dtype)
            for kind in ("fwd", "bwd"):
                best = None
                for cand in candidates:

                    def lookup(k, *args, _kind=kind, _cand=cand):
                        return dict(_cand) if k == _kind else saved(k, *args)

                    fused.lookup_config = lookup  # the plan reads the table through this name
                    fused._PLANS.clear()
                    plan = fused.launch_plan(qk, v, u, True)
                    try:
                        _, ws = fused._forward(plan, qk, v, u)
                        if kind == "fwd":
                            fn = functools.partial(fused._forward, plan, qk, v, u)
                        else:
                            fn = functools.partial(fused._backward, plan, grad, qk, v, u, ws)
                        ms = timer(fn)
                    except Exception as e:  # does not fit: shared memory, registers  # pragma: no cover
                        _logger.info("skip %s %s: %s", kind, cand, str(e).splitlines()[0][:120])
                        continue
                    _logger.info("%s N=%d BH=%d %s %s: %.4f ms", kind, n, bh, dtype_name, cand, ms)
                    if best is None or ms < best[0]:
                        best = (ms, cand)
                if best is not None:
                    block_d = max(16, 1 << (d - 1).bit_length())
                    found[configs.config_key(kind, n, bh, dtype_name, gpu, block_d)] = dict(best[1])
    finally:
        fused.lookup_config = saved
        fused._PLANS.clear()
    table = {} if replace or not Path(out).exists() else json.loads(Path(out).read_text()).get("configs", {})
    table.update(found)
    doc = {
        "about": "Measured launch configurations of the fused anchor-attention kernels (see configs.py); "
        "written by python -m anchorformer.ops.anchor_attention.tune.",
        "configs": dict(sorted(table.items())),
    }
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    configs.load_table.cache_clear()
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[197, 1024, 4096, 16384, 65536], help="sequence lengths")
    p.add_argument("--bh", type=int, nargs="+", default=[48, 768], help="B*H products")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--d", type=int, default=64, help="head dim")
    p.add_argument("--m", type=int, default=30, help="anchors")
    p.add_argument("--out", type=Path, default=configs.TABLE_PATH, help="table file (default: the package's)")
    p.add_argument("--replace", action="store_true", help="drop the table's other entries")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = tune(args.n, args.bh, args.dtype, d=args.d, m=args.m, out=args.out, replace=args.replace)
    _logger.info("%d entries written to %s", len(found), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
