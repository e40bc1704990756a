"""``anchorformer bench``: speed and memory of anchor attention and of whole models (E4, measured).

AnchorFormer (Shan et al., Pattern Recognition Letters 2025, arXiv 2505.16463) claims attention
that is linear in the token count; this module measures it (REFERENCE §5, experiment E4):

- the operator, forward and forward+backward, time and peak memory against N, for the fused
  Triton kernels (``fused``, CUDA), the PyTorch reference in eager mode (``reference``) and
  under ``torch.compile`` (``reference_compiled``), and PyTorch's softmax attention
  ``scaled_dot_product_attention`` at the same B, H, N, D (``sdpa``; flash on CUDA in 16 bits);
- whole models: images/s for inference and for a training step (AdamW), AnchorFormer vs timm's
  DeiT (both distilled, class + distillation token) at T and S, at several image sizes;
- the targets of the issue that filed this benchmark, as measured ratios (``summarize_targets``).

Results are one JSON (environment: device, versions; configuration: shapes, dtype; rows) and
figures. The presets are in ``anchorformer/configs/bench.yaml`` (profiles ``mini`` and ``full``).

Letters: B batch, H heads, N tokens, D head dim, M anchors.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .io import atomic_write_text, write_json_atomic
from .tables import markdown_table

__all__ = [
    "OP_IMPLS",
    "OP_MODES",
    "assess_reliability",
    "bench_config",
    "bench_markdown",
    "check_reliability",
    "environment",
    "model_benchmark",
    "operator_benchmark",
    "plot_models",
    "plot_operator",
    "register",
    "run_benchmarks",
    "summarize_targets",
    "timing_stats",
]

log = logging.getLogger(__name__)

OP_IMPLS = ("fused", "reference", "reference_compiled", "sdpa")
OP_MODES = ("fwd", "fwd_bwd")
MODEL_SIZES = ("tiny", "small", "base")
LETTER = {"tiny": "T", "small": "S", "base": "B"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fused output vs the reference, in units of max(1, max|reference|), per dtype.
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Peak DRAM bandwidth (bytes/s) of cards whose properties do not give it.
_KNOWN_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}


# ---------------------------------------------------------------------------------------------
# Environment and measurement helpers
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else the CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"bench: device {device!r} requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"bench: device must be auto, cpu or cuda; got {device!r}")
    return dev


def peak_bandwidth(device: torch.device) -> float | None:
    """The GPU's peak DRAM bandwidth in bytes/s (2 transfers per memory clock), or None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    for name, bw in _KNOWN_BANDWIDTH.items():
        if name in props.name:
            return bw
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions and host facts recorded with every result."""
    import timm

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # the allocator's settings, which decide how transient tensors reach memory on the CPU
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - depends on the install
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            peak_bandwidth_bytes_per_s=peak_bandwidth(device),
            cuda=torch.version.cuda,
        )
    else:
        env["device"] = f"cpu ({env['cpu']}, {torch.get_num_threads()} threads)"
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(sorted_ms: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of sorted values (linear interpolation)."""

    def at(q: float) -> float:
        pos = q * (len(sorted_ms) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(sorted_ms) - 1)
        return sorted_ms[lo] + (pos - lo) * (sorted_ms[hi] - sorted_ms[lo])

    return at(0.25), at(0.5), at(0.75)


def timing_stats(ms: Sequence[float]) -> dict[str, Any]:
    """The spread of timed calls: median, min, max, quartiles and ``spread`` = (q3 - q1) / median.

    ``spread`` is None with fewer than two calls (one call has no spread).
    """
    ts = sorted(ms)
    if not ts:
        raise ValueError("timing_stats: no timed calls")
    q1, median, q3 = _quartiles(ts)
    return {
        "median_ms": median,
        "min_ms": ts[0],
        "max_ms": ts[-1],
        "q1_ms": q1,
        "q3_ms": q3,
        "spread": round((q3 - q1) / median, 4) if len(ts) > 1 and median > 0 else None,
        "n_timed": len(ts),
    }


class CpuTimer:
    """The CPU clock of the benchmarks: ``torch.utils.benchmark.Timer`` (at torch's current thread
    count; its ``timeit`` clock without its per-measurement warm-up calls), one call per
    measurement, with the process's CPU time of the same call beside it."""

    kind = "cpu"

    def warmup(self, fn: Callable[[], Any], calls: int) -> None:
        for _ in range(calls):
            fn()

    def calls_per_round(self, repeats: int) -> int:
        return 1  # one call of each function per round: the finest alternation

    def time(self, fn: Callable[[], Any], calls: int) -> tuple[list[float], list[float]]:
        """Wall-clock ms of each of ``calls`` calls, and the process's CPU ms of each."""
        from torch.utils.benchmark import Timer

        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        wall, cpu = [], []
        for _ in range(calls):
            c = time.process_time()
            # Timer.timeit(1) would first make two untimed calls of its own, tripling the cost of a
            # model step: the harness warms up once, so each call is timed by the Timer's clock alone.
            wall.append(timer._timeit(1) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
        return wall, cpu

    def kernel_ms(self, fn: Callable[[], Any], calls: int) -> float | None:
        return None  # no device to be idle: every figure is host time


class CudaTimer:
    """The GPU clock: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed in
    between, warm-up), or ``do_bench_cudagraph`` (``cuda_graph``: the calls captured into one CUDA
    graph and replayed, each value the mean call of a replay); the device's busy time from the
    profiler's kernel records."""

    kind = "cuda"
    ROUNDS = 4  # alternations of the compared functions; each gets repeats / ROUNDS calls per round

    def __init__(self, device: torch.device, cuda_graph: bool = False) -> None:
        self.device, self.cuda_graph = device, cuda_graph
        self._estimate_ms: dict[int, float] = {}

    def warmup(self, fn: Callable[[], Any], calls: int) -> None:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        self._estimate_ms[id(fn)] = max(start.elapsed_time(end), 1e-3)

    def calls_per_round(self, repeats: int) -> int:
        return max(1, -(-repeats // self.ROUNDS))

    def time(self, fn: Callable[[], Any], calls: int) -> tuple[list[float], None]:
        from triton.testing import do_bench, do_bench_cudagraph

        rep = calls * self._estimate_ms.get(id(fn), 1.0)  # do_bench times about rep / (its estimate) calls
        if self.cuda_graph:
            return list(do_bench_cudagraph(fn, rep=rep, return_mode="all")), None
        return list(do_bench(fn, warmup=0, rep=rep, return_mode="all")), None

    def kernel_ms(self, fn: Callable[[], Any], calls: int) -> float | None:
        """Device-busy ms per call: the union of the kernels' (and copies') intervals over ``calls`` calls."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(self.device)
        with _quiet_kineto(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(self.device)
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
        return union_length(spans) / 1e3 / calls if spans else None


def union_length(spans: Sequence[tuple[float, float]]) -> float:
    """Total length covered by the intervals ``spans`` (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def default_timer(device: torch.device, cuda_graph: bool = False) -> CpuTimer | CudaTimer:
    """:class:`CudaTimer` for CUDA devices, :class:`CpuTimer` otherwise."""
    return CudaTimer(device, cuda_graph) if device.type == "cuda" else CpuTimer()


def measure_times(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    timer: Any = None,
) -> dict[str, dict[str, Any]]:
    """Time in ms of each of ``fns``, alternated, with its spread (``timer``: :func:`default_timer`).

    Each function gets :func:`timing_stats` of its timed calls (median, min, max, quartiles,
    relative spread, ``n_timed``) and ``warmup_s``. On the CPU also the process's CPU time of
    each call (``cpu_median_ms``, ``cpu_min_ms``) and torch's thread count (``threads``): on one
    thread the CPU time equals the wall time of a quiet machine and does not count the time the
    process waits while others' jobs run on its core.

    ``warmup`` untimed calls of each, then rounds in which each function is timed in turn. CPU:
    one call each per round, at most ``repeats`` rounds, stopping early once the timed calls have
    taken ``budget_s`` seconds per function (at least one round). GPU: ``repeats / 4`` calls each
    per round (``do_bench``), until each has ``repeats`` timed calls. Alternating lets compared
    functions share the same machine conditions.
    """
    timer = timer if timer is not None else default_timer(device)
    first_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        timer.warmup(fn, max(1, warmup))
        _sync(device)
        first_s[name] = time.perf_counter() - t0
    per_round = timer.calls_per_round(repeats)
    max_rounds = max(1, repeats) if per_round == 1 else 2 * -(-repeats // per_round)
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu_times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    for _ in range(max_rounds):
        for name, fn in fns.items():
            ms, cpu = timer.time(fn, per_round)
            times[name] += ms
            cpu_times[name] += cpu or []
            spent += sum(ms) / 1e3
        if per_round == 1 and spent >= budget_s * len(fns):
            break
        if per_round > 1 and min(len(t) for t in times.values()) >= repeats:
            break
    out = {}
    for name, ts in times.items():
        out[name] = {**timing_stats(ts), "warmup_s": first_s[name]}
        if cpu_times[name]:
            cs = sorted(cpu_times[name])
            out[name].update(cpu_median_ms=_quartiles(cs)[1], cpu_min_ms=cs[0], threads=torch.get_num_threads())
    return out


def measure_time(
    fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, budget_s: float, timer: Any = None
) -> dict[str, Any]:
    """:func:`measure_times` of one function."""
    return measure_times({"fn": fn}, device, warmup=warmup, repeats=repeats, budget_s=budget_s, timer=timer)["fn"]


def measure_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``fn``, above what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the allocator events of the PyTorch profiler
    (tensors only, like the CUDA number), summed in time order; the profiler runs with its
    C++ log (kineto) silenced (:func:`_quiet_kineto`), and no trace is exported (exporting
    probes for GPUs).
    """
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_kineto(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    allocated = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        allocated += e.nbytes()  # > 0 an allocation, < 0 a free
        peak = max(peak, allocated)
    return int(peak)


# kineto's levels: 0 verbose, 1 info, 2 warning, 3 stage, 4 error, 5 USDT probes; 6 logs nothing.
_KINETO_SILENT = "6"


@contextlib.contextmanager
def _quiet_kineto():
    """No kineto log lines on stderr during the profiler's first use in this process.

    kineto, the profiler's C++ library, prints its ``USDT`` probe lines (``profiler_start``,
    ``profiler_stop``) at every profiled call, and on a machine without a GPU an error line
    (``gpuGetDeviceCount failed``) when it looks for one; it reads ``KINETO_LOG_LEVEL`` once,
    when the profiler first starts in a process. A level the user set is kept.
    """
    if "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = _KINETO_SILENT
    try:
        yield
    finally:
        os.environ.pop("KINETO_LOG_LEVEL", None)


@contextlib.contextmanager
def _recompile_limit(limit: int):
    """Let torch.compile keep one graph per shape (the default limit of 8 would fall back to eager)."""
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: limit}):
        yield


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# The operator
# ---------------------------------------------------------------------------------------------


def _fused_unavailable(device: torch.device) -> str | None:
    """Why the fused kernels cannot be timed here, or None."""
    if device.type != "cuda":
        return "skipped: the fused Triton kernels run on CUDA (the CPU interpreter is not a benchmark)"
    try:
        from .ops.anchor_attention import triton as _  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"skipped: triton unavailable ({e})"
    return None


def operator_benchmark(
    tokens: Sequence[int],
    *,
    batch: int,
    heads: int,
    head_dim: int,
    anchors: int,
    dtype: torch.dtype,
    device: torch.device,
    impls: Sequence[str] = OP_IMPLS,
    modes: Sequence[str] = OP_MODES,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 3.0,
    sdpa_max_tokens: int = 65536,
    compile_dynamic: bool = False,
    check_tokens: int = 4096,
    on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time and peak memory of anchor attention (and softmax attention) against N.

    Args:
        tokens: the N to measure.
        batch, heads, head_dim, anchors: B, H, D, M; one shared (M, D) anchor set.
        dtype: of qk, v and the anchors.
        impls: any of :data:`OP_IMPLS`; modes: any of :data:`OP_MODES` (``fwd`` runs without
            autograd, ``fwd_bwd`` returns the gradients of qk, v and the anchors).

    Returns:
        One row per (N, impl, mode): ``status`` ("ok", "skipped: ..." or "error: ..."),
        ``median_ms``, ``min_ms``, ``n_timed``, ``peak_bytes`` (allocated at the peak above what
        existed before the inputs were made, inputs included), ``io_bytes`` (inputs and outputs:
        qk, v, anchors, out; plus dO and the three gradients for ``fwd_bwd``), ``peak_over_io``,
        ``traffic_bytes`` (minimum DRAM traffic: read qk and v, write out; backward: read qk, v,
        dO, write dqk, dv), ``gbps`` (traffic / time); fused rows add ``kernel_traffic_bytes``
        and ``kernel_gbps`` (what the two-pass kernels actually move: qk is read twice forward,
        qk and dO twice backward) and ``max_abs_err`` against the reference for N <= ``check_tokens``.
    """
    from .ops.anchor_attention import anchor_attention
    from .ops.anchor_attention.reference import anchor_attention_reference

    bad = [i for i in impls if i not in OP_IMPLS] + [m for m in modes if m not in OP_MODES]
    if bad:
        raise ValueError(f"bench: unknown operator impls/modes {bad}; impls: {OP_IMPLS}, modes: {OP_MODES}")
    compiled = (
        torch.compile(anchor_attention_reference, dynamic=compile_dynamic) if "reference_compiled" in impls else None
    )
    B, H, D, M = batch, heads, head_dim, anchors
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[dict[str, Any]] = []
    fused_skip = _fused_unavailable(device) if "fused" in impls else None

    def op_for(impl: str) -> Callable[..., torch.Tensor]:
        if impl == "fused":
            return lambda qk, v, u: anchor_attention(qk, v, u, impl="triton")
        if impl == "reference":
            return anchor_attention_reference
        if impl == "reference_compiled":
            return compiled
        return lambda qk, v, u: F.scaled_dot_product_attention(qk, qk, v)  # softmax(qk qk^T / sqrt(D)) v

    with _recompile_limit(64):
        for N in tokens:
            g = torch.Generator(device=device).manual_seed(N)
            qk = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
            v = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
            u = (torch.randn(M, D, device=device, generator=g) * D**-0.5).to(dtype)
            dout = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
            want = None
            if N <= check_tokens and any(i in impls for i in ("fused", "reference_compiled")):
                with torch.no_grad():
                    want = anchor_attention_reference(qk, v, u).float()
            for impl in impls:
                for mode in modes:
                    row: dict[str, Any] = {
                        "impl": impl,
                        "mode": mode,
                        "tokens": N,
                        "batch": B,
                        "heads": H,
                        "head_dim": D,
                        "anchors": None if impl == "sdpa" else M,
                        "dtype": str(dtype).removeprefix("torch."),
                    }
                    rows.append(row)
                    if impl == "fused" and fused_skip:
                        row["status"] = fused_skip
                        continue
                    if impl == "sdpa" and N > sdpa_max_tokens:
                        row["status"] = f"skipped: N > sdpa_max_tokens={sdpa_max_tokens}"
                        continue
                    row.update(
                        _measure_op(
                            op_for(impl),
                            impl,
                            mode,
                            qk,
                            v,
                            u,
                            dout,
                            device,
                            want,
                            elem,
                            warmup=warmup,
                            repeats=repeats,
                            budget_s=budget_s,
                        )
                    )
                    log.info(
                        "operator %s %s N=%d: %s",
                        impl,
                        mode,
                        N,
                        f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else row["status"],
                    )
            del qk, v, u, dout, want
            if on_progress is not None:
                on_progress(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _measure_op(op, impl, mode, qk, v, u, dout, device, want, elem, *, warmup, repeats, budget_s):
    """One operator row: time, memory, traffic and (fused, compiled) the check against the reference."""
    B, H, N, D = qk.shape
    inputs = [qk, v] if impl == "sdpa" else [qk, v, u]
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return op(qk, v, u)

        io = _nbytes(*inputs) + _nbytes(qk)  # + out
        traffic = 3 * B * H * N * D * elem
        kernel_traffic = 4 * B * H * N * D * elem
    else:
        leaves = [t.detach().requires_grad_(True) for t in inputs]

        def fn():
            out = op(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None)
            return torch.autograd.grad(out, leaves, dout)

        io = 2 * _nbytes(*inputs) + 2 * _nbytes(qk)  # inputs, out, dO, gradients
        traffic = (3 + 5) * B * H * N * D * elem
        kernel_traffic = (4 + 7) * B * H * N * D * elem
    row: dict[str, Any] = {"status": "ok"}
    try:
        row.update(measure_time(fn, device, warmup=warmup, repeats=repeats, budget_s=budget_s))
        extra = measure_peak_bytes(fn, device)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "error: out of memory"}
    except RuntimeError as e:  # record and go on: one failing configuration should not lose the rest
        log.exception("operator %s %s N=%d failed", impl, mode, N)
        return {"status": f"error: {str(e).splitlines()[0][:300]}"}
    # `extra` is on top of what existed before the call: add the call's inputs (and dO).
    peak = extra + _nbytes(*inputs) + (_nbytes(dout) if mode == "fwd_bwd" else 0)
    seconds = row["median_ms"] / 1e3
    row.update(
        peak_bytes=peak,
        io_bytes=io,
        peak_over_io=round(peak / io, 4),
        traffic_bytes=traffic,
        gbps=round(traffic / seconds / 1e9, 3),
    )
    if impl == "fused":
        row.update(kernel_traffic_bytes=kernel_traffic, kernel_gbps=round(kernel_traffic / seconds / 1e9, 3))
    if want is not None and impl in ("fused", "reference_compiled"):
        with torch.no_grad():
            err = (op(qk, v, u).float() - want).abs().max().item()
        tol = CHECK_TOL.get(qk.dtype, 1e-4) * max(1.0, want.abs().max().item())
        row.update(max_abs_err=err, check_ok=bool(err <= tol))
    return row


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


# The model families the whole-model benchmark can time, by the name a preset selects them with
# (`model_families`): the timm model name for a size word, whether it takes `num_anchors`, whether it
# runs in the exact inference form (`fuse_for_inference()`; inference only), and its modes.
MODEL_FAMILIES: dict[str, dict[str, Any]] = {
    "DeiT": {"model": "deit_{}_distilled_patch16_224", "anchors": False, "fused": False, "modes": ("infer", "train")},
    "AnchorFormer": {
        "model": "anchorformer_{}_distilled_patch16_224",
        "anchors": True,
        "fused": False,
        "modes": ("infer", "train"),
    },
    "AnchorFormer fused": {
        "model": "anchorformer_{}_distilled_patch16_224",
        "anchors": True,
        "fused": True,
        "modes": ("infer",),
    },
    # E10's peers (models/peers.py), at their published summary-token counts: inference only
    "Agent": {"model": "agent_deit_{}_patch16_224", "anchors": False, "fused": False, "modes": ("infer",)},
    "Nystrom": {"model": "nystrom_deit_{}_patch16_224", "anchors": False, "fused": False, "modes": ("infer",)},
    "FLatten": {"model": "flatten_deit_{}_patch16_224", "anchors": False, "fused": False, "modes": ("infer",)},
    "ISAB": {"model": "isab_deit_{}_patch16_224", "anchors": False, "fused": False, "modes": ("infer",)},
}
DEFAULT_FAMILIES = {"DeiT": None, "AnchorFormer": None}  # family: sizes (None: every size measured)


def check_families(families: Any, where: str = "bench") -> dict[str, list[str] | None]:
    """``families`` as ``{family: sizes or None}``; a list of names means every size. Unknown names: ValueError."""
    if isinstance(families, (list, tuple)):
        families = {f: None for f in families}
    if not isinstance(families, dict) or not families:
        raise ValueError(f"{where}: model_families must be a mapping family: sizes (or null); got {families!r}")
    for family, sizes in families.items():
        if family not in MODEL_FAMILIES:
            raise ValueError(f"{where}: unknown model family {family!r}; expected one of {sorted(MODEL_FAMILIES)}")
        if sizes is not None and not (isinstance(sizes, list) and set(sizes) <= set(MODEL_SIZES)):
            raise ValueError(f"{where}: model_families.{family} must be null or a list of {MODEL_SIZES}; got {sizes!r}")
    return {f: None if sizes is None else list(sizes) for f, sizes in families.items()}


def _batch_for(batch: int | dict[Any, int], img: int) -> int:
    """Images per step at side ``img``: ``batch[img]`` when ``batch`` maps sides to batches, else
    ``batch`` images at 224² and below, scaled by (224 / img)² above (about as many tokens per step), >= 1."""
    if isinstance(batch, dict):
        found = batch.get(img, batch.get(str(img)))
        if found is None:
            raise ValueError(f"bench: no batch for side {img} in {batch}")
        return int(found)
    return max(1, round(batch * min(1.0, (224 / img) ** 2)))


MODEL_PROCESSES = ("fresh", "shared")
MALLOC_MODES = ("default", "tuned")
# How a model runs: eager; torch.compile (default mode); compiled and replayed as CUDA graphs (GPU:
# do_bench_cudagraph captures the compiled calls into one graph).
EXEC_MODES = ("eager", "compiled", "cudagraphs")
HOST_BOUND = 0.9  # a GPU figure whose device was busy for less than this fraction of its time is host-bound


def model_benchmark(
    sizes: Sequence[str],
    img_sizes: Sequence[int],
    train_img_sizes: Sequence[int],
    *,
    batch: int | dict[Any, int],
    anchors: int,
    dtype: torch.dtype,
    device: torch.device,
    train_batch: int | dict[Any, int] | None = None,
    families: dict[str, list[str] | None] | Sequence[str] | None = None,
    exec_modes: Sequence[str] = ("eager",),
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 3.0,
    process: str = "fresh",
    threads: int | None = None,
    malloc: str = "default",
    skip: Sequence[str] = (),
    timer: Any = None,
    on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Images/s of each model family (:data:`MODEL_FAMILIES`) at each size and side, alternated.

    Inference runs under ``torch.inference_mode``; a training step is forward, cross-entropy on
    both heads, backward and an AdamW step. On CUDA with a 16-bit ``dtype`` both run under
    autocast to it. Within one (size, side, mode, exec mode) configuration the families are timed
    in alternation (:func:`measure_times`): on the CPU with ``torch.utils.benchmark``, on a GPU with
    ``triton.testing.do_bench`` (``do_bench_cudagraph`` for ``cudagraphs``), where each figure also
    gets the fraction of its time the GPU was busy (``gpu_busy``; below :data:`HOST_BOUND`:
    ``host_bound``).

    Args:
        batch: images per inference step: a number at 224² (scaled down by the tokens above), or
            ``{side: batch}``; ``train_batch`` the same for training steps (None: ``batch``).
        families: ``{family: sizes or None}`` or family names (default: DeiT and AnchorFormer).
        exec_modes: any of :data:`EXEC_MODES` (``compiled`` and ``cudagraphs``: ``torch.compile``).
        process: ``"fresh"``: each (size, side) configuration in a new Python process, so that
            no earlier configuration has shaped the allocator's state (on the CPU, glibc's
            mmap and trim thresholds move with the sizes freed before); ``"shared"``: all of them
            in this process, one after another, as a server of several resolutions runs them.
        threads: torch's CPU threads during the measurements (None: leave as is).
        malloc: ``"tuned"``: on the CPU, fix glibc malloc's mmap and trim thresholds first
            (:func:`anchorformer.ops.cpu.tune_glibc_malloc`; in a shared process it stays set);
            ``"default"``: glibc's dynamic thresholds.
        skip: ``"size@side"`` configurations left out (e.g. ``"small@1024"``).
        timer: the clock (:func:`default_timer` of the device when None; tests pass their own; a
            shared process only).

    Returns:
        One row per (size, side, mode, exec mode, family): ``family``, ``fused``, ``size`` (T/S/B),
        ``img_size``, ``tokens``, ``batch``, ``mode`` (``infer``/``train``), ``exec``, ``process``,
        ``threads``, ``malloc``, ``gmacs`` (per image, every matmul counted, the fused form for a
        fused family), ``median_ms``, ``min_ms``, ``images_per_s``, ``gpu_busy`` and
        ``host_bound`` (GPU), ``peak_bytes`` (CUDA, eager).
    """
    for s in sizes:
        if s not in MODEL_SIZES:
            raise ValueError(f"bench: unknown model size {s!r}; expected one of {MODEL_SIZES}")
    if process not in MODEL_PROCESSES:
        raise ValueError(f"bench: model process must be one of {MODEL_PROCESSES}; got {process!r}")
    if malloc not in MALLOC_MODES:
        raise ValueError(f"bench: malloc must be one of {MALLOC_MODES}; got {malloc!r}")
    bad = [m for m in exec_modes if m not in EXEC_MODES]
    if bad or not exec_modes:
        raise ValueError(f"bench: exec modes must be a non-empty list of {EXEC_MODES}; got {list(exec_modes)}")
    if timer is not None and process == "fresh":
        raise ValueError("bench: a custom timer runs in this process only (process='shared')")
    fams = check_families(DEFAULT_FAMILIES if families is None else families)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        here = [f for f, only in fams.items() if only is None or size in only]
        for img in sorted(set(img_sizes) | set(train_img_sizes)):
            if f"{size}@{img}" in skip or not here:
                continue
            job = {
                "size": size,
                "img": img,
                "modes": [m for m, sides in (("infer", img_sizes), ("train", train_img_sizes)) if img in sides],
                "families": here,
                "exec_modes": list(exec_modes),
                "batch": _batch_for(batch, img),
                "train_batch": _batch_for(batch if train_batch is None else train_batch, img),
                "anchors": anchors,
                "dtype": str(dtype).removeprefix("torch."),
                "device": str(device),
                "warmup": warmup,
                "repeats": repeats,
                "budget_s": budget_s,
                "threads": threads,
                "malloc": malloc,
            }
            new = _models_in_fresh_process(job) if process == "fresh" else _models_at(**job, timer=timer)
            for row in new:
                row["process"] = process
                spec = MODEL_FAMILIES[row["family"]]
                row["gmacs"] = _gmacs(row["model"], img, anchors if spec["anchors"] else None, spec["fused"])
                log.info(
                    "model %s-%s %d² %s %s (%s process): %s",
                    row["family"],
                    row["size"],
                    img,
                    row["mode"],
                    row.get("exec", "eager"),
                    process,
                    f"{row['median_ms']:.1f} ms" if row["status"] == "ok" else row["status"],
                )
            rows += new
            if on_progress is not None:
                on_progress(rows)
    return rows


@functools.lru_cache(maxsize=64)
def _gmacs(model: str, img: int, anchors: int | None, fused: bool = False) -> float:
    """GMACs of one image through ``model`` at ``img``², counted on the meta device."""
    from .complexity import model_complexity

    kw = {} if anchors is None else {"num_anchors": anchors}
    return model_complexity(model, img, fused=fused, **kw)["gmacs"]


def _models_in_fresh_process(job: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`_models_at` in a new Python process (``python -m anchorformer.bench JOB.json OUT.json``)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job_path.write_text(json.dumps(job))
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        cmd = [sys.executable, "-m", "anchorformer.bench", str(job_path), str(out_path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == 0 and out_path.exists():
            return json.loads(out_path.read_text())
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    log.error("model benchmark process for %s failed (exit %d):\n%s", job, proc.returncode, proc.stderr[-3000:])
    return [
        {
            "family": family,
            "fused": MODEL_FAMILIES[family]["fused"],
            "size": LETTER[job["size"]],
            "model": MODEL_FAMILIES[family]["model"].format(job["size"]),
            "img_size": job["img"],
            "tokens": (job["img"] // 16) ** 2 + 2,
            "mode": mode,
            "exec": ex,
            "status": f"error: process exited {proc.returncode}: {err}",
        }
        for mode in job["modes"]
        for ex in job["exec_modes"]
        for family in job["families"]
        if mode in MODEL_FAMILIES[family]["modes"]
    ]


def _build_family(family: str, size: str, img: int, anchors: int, dev: torch.device) -> torch.nn.Module:
    """One model of ``family`` at ``size`` and ``img``², seeded, on ``dev`` (fused: in eval mode, folded)."""
    from .models import create_model

    spec = MODEL_FAMILIES[family]
    torch.manual_seed(0)
    kw = {"num_anchors": anchors} if spec["anchors"] else {}
    model = create_model(spec["model"].format(size), img_size=img, num_classes=1000, **kw).to(dev)
    return model.fuse_for_inference() if spec["fused"] else model


def _models_at(
    *,
    size: str,
    img: int,
    modes: Sequence[str],
    batch: int,
    anchors: int,
    dtype: str,
    device: str,
    warmup: int,
    repeats: int,
    budget_s: float,
    threads: int | None,
    malloc: str = "default",
    families: Sequence[str] = tuple(DEFAULT_FAMILIES),
    exec_modes: Sequence[str] = ("eager",),
    train_batch: int | None = None,
    timer: Any = None,
) -> list[dict[str, Any]]:
    """The rows of one (size, side) configuration, measured in this process."""
    from .ops.cpu import tune_glibc_malloc

    dev = torch.device(device)
    tuned = malloc == "tuned" and dev.type == "cpu" and tune_glibc_malloc()
    torch_dtype = DTYPES[dtype]
    autocast_on = dev.type == "cuda" and torch_dtype != torch.float32
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        models = {family: _build_family(family, size, img, anchors, dev) for family in families}
        rows: list[dict[str, Any]] = []
        for mode in modes:
            n_batch = batch if mode == "infer" else (train_batch or batch)
            x = torch.randn(n_batch, 3, img, img, device=dev)
            y = torch.randint(0, 1000, (n_batch,), device=dev)
            here = [f for f in families if mode in MODEL_FAMILIES[f]["modes"]]
            for ex in exec_modes:
                rows += _time_families(
                    {f: models[f] for f in here},
                    mode,
                    ex,
                    x,
                    y,
                    dev,
                    autocast_on=autocast_on,
                    dtype=torch_dtype,
                    warmup=warmup,
                    repeats=repeats,
                    budget_s=budget_s,
                    timer=timer,
                    common={
                        "size": LETTER[size],
                        "img_size": img,
                        "tokens": (img // 16) ** 2 + 2,
                        "batch": n_batch,
                        "mode": mode,
                        "exec": ex,
                        "dtype": dtype if autocast_on else "float32",
                        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                        "malloc": "tuned" if tuned else "default",
                    },
                    names={f: MODEL_FAMILIES[f]["model"].format(size) for f in here},
                )
            del x, y
        del models
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return rows
    finally:
        torch.set_num_threads(before)


def _time_families(
    models: dict[str, torch.nn.Module],
    mode: str,
    ex: str,
    x: torch.Tensor,
    y: torch.Tensor,
    dev: torch.device,
    *,
    autocast_on: bool,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    budget_s: float,
    timer: Any,
    common: dict[str, Any],
    names: dict[str, str],
) -> list[dict[str, Any]]:
    """The families' steps of one (mode, exec mode), timed in alternation: one row per family."""
    status = "ok"
    timings: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], Any]] = {}
    try:
        steps = {
            family: _model_step(model, mode, x, y, autocast_on, dtype, compiled=ex != "eager")
            for family, model in models.items()
        }
        clock = timer if timer is not None else default_timer(dev, cuda_graph=ex == "cudagraphs")
        timings = measure_times(steps, dev, warmup=warmup, repeats=repeats, budget_s=budget_s, timer=clock)
        for family, step in steps.items():
            kernel = clock.kernel_ms(step, 3)
            if kernel is not None:
                busy = kernel / timings[family]["median_ms"]
                timings[family].update(gpu_busy=round(busy, 4), host_bound=bool(busy < HOST_BOUND))
    except torch.OutOfMemoryError:
        timings, status = {}, "error: out of memory"
        torch.cuda.empty_cache()
    except Exception as e:  # record and go on: one failing mode (a compile error, a capture) keeps the rest
        if dev.type == "cpu" and ex == "eager" and timer is None:
            raise
        log.exception("model %s %s failed", mode, ex)
        timings, status = {}, f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    rows = []
    for family in models:
        row: dict[str, Any] = {
            "family": family,
            "fused": MODEL_FAMILIES[family]["fused"],
            "model": names[family],
            **common,
            "status": status,
            **timings.get(family, {}),
        }
        if status == "ok":
            row["images_per_s"] = round(common["batch"] / (row["median_ms"] / 1e3), 3)
            if dev.type == "cuda" and common["exec"] == "eager":
                row["peak_bytes"] = measure_peak_bytes(steps[family], dev)
        rows.append(row)
    return rows


def _model_step(
    model: torch.nn.Module,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast_on: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    *,
    compiled: bool = False,
) -> Callable[[], Any]:
    """One inference call, or one training step (forward, cross-entropy on every head, backward, AdamW).

    ``autocast_on``: under CUDA autocast to ``dtype``. ``compiled``: the model through
    ``torch.compile`` (the optimizer step stays eager; ``capturable`` AdamW on CUDA, so that
    ``do_bench_cudagraph`` can capture a whole step).
    """
    net = torch.compile(model) if compiled else model

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=dtype) if autocast_on else contextlib.nullcontext()

    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast():
                return net(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=x.device.type == "cuda")

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = net(x)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            loss = sum(F.cross_entropy(o.float(), y) for o in outs) / len(outs)
        loss.backward()
        opt.step()

    return train


# ---------------------------------------------------------------------------------------------
# Reliability: figures that their own spread or the other figures contradict
# ---------------------------------------------------------------------------------------------

# The thresholds, as `reliability:` in configs/bench.yaml gives them (every key required there).
RELIABILITY_KEYS = {
    "min_timed": "timed calls a figure needs to have a spread at all (fewer: flagged)",
    "max_spread": "largest (q3 - q1) / median over the timed calls",
    "max_wait": "largest wall-clock / CPU-time median on one CPU thread (above: the process waited for its core)",
    "tolerance": "a figure of less work may take at most this times a figure of more work",
}


def check_reliability(cfg: Any, where: str = "bench config") -> dict[str, float]:
    """``cfg`` (the preset's ``reliability`` mapping) checked: every key of :data:`RELIABILITY_KEYS`, numbers."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: reliability must be a mapping of {sorted(RELIABILITY_KEYS)}; got {cfg!r}")
    unknown = sorted(set(cfg) - set(RELIABILITY_KEYS))
    missing = sorted(set(RELIABILITY_KEYS) - set(cfg))
    if unknown or missing:
        what = ", ".join(f"{k} reliability key(s) {v}" for k, v in (("unknown", unknown), ("missing", missing)) if v)
        raise ValueError(f"{where}: {what}; expected {sorted(RELIABILITY_KEYS)}")
    lows = {"min_timed": 1, "max_spread": 0.0, "max_wait": 1.0, "tolerance": 1.0}
    for key, low in lows.items():
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low:
            raise ValueError(f"{where}: reliability.{key} must be a number >= {low}; got {v!r}")
    if not isinstance(cfg["min_timed"], int):
        raise ValueError(f"{where}: reliability.min_timed must be an integer; got {cfg['min_timed']!r}")
    return dict(cfg)


def _label(r: dict[str, Any]) -> str:
    """A row as a reader names it: ``DeiT-T 224² infer (fresh process)``, ``reference fwd N=4096``."""
    if "family" in r:
        process = f" ({r['process']} process)" if r.get("process") else ""
        return f"{r['family']}-{r['size']} {r['img_size']}² {r['mode']}{process}"
    return f"{r['impl']} {r['mode']} N={r['tokens']}"


def _flag(r: dict[str, Any], why: str) -> None:
    r["reliable"] = False
    if why not in r["why"]:
        r["why"].append(why)


def _less_work_not_slower(pairs, tolerance: float) -> None:
    """Flag both rows of each (less work, more work) pair where the first takes over ``tolerance`` x the second."""
    for light, heavy, what in pairs:
        if light["median_ms"] > tolerance * heavy["median_ms"]:
            why = (
                f"{what}: {_label(light)} {light['median_ms']:.4g} ms > {tolerance:g} x "
                f"{_label(heavy)} {heavy['median_ms']:.4g} ms"
            )
            _flag(light, why)
            _flag(heavy, why)


def assess_reliability(results: dict[str, Any], thresholds: dict[str, float]) -> None:
    """Mark each measured row of ``results`` ``reliable`` or not, with the reasons in ``why`` (in place).

    A row is unreliable when its own timings say so: fewer than ``min_timed`` timed calls (no
    spread), a relative spread (q3 - q1) / median above ``max_spread``, or, on one CPU thread, a
    wall-clock median above ``max_wait`` x the CPU-time median (the process waited while other
    jobs ran on its core). Two rows are both unreliable when they contradict each other: less
    work taking more than ``tolerance`` x the time of more work of the same shapes, namely an
    inference call against a training step of the same model, process and input, an operator's
    forward against its forward+backward, and an operator at N against the same at a larger N.
    A loaded machine shows as these flags; rows not measured (skipped, errors) get none.
    """
    t = check_reliability(thresholds, "assess_reliability")
    op = [r for r in results.get("operator", []) if r.get("status") == "ok"]
    models = [r for r in results.get("models", []) if r.get("status") == "ok"]
    for r in op + models:
        r["reliable"], r["why"] = True, []
        n = r.get("n_timed", 0)
        if n < t["min_timed"]:
            _flag(r, f"{n} timed call(s) < min_timed {t['min_timed']}: no spread")
        if r.get("spread") is not None and r["spread"] > t["max_spread"]:
            _flag(r, f"spread (q3 - q1) / median {r['spread']:.1%} > max_spread {t['max_spread']:.1%}")
        cpu = r.get("cpu_median_ms")
        if r.get("threads") == 1 and cpu and r["median_ms"] > t["max_wait"] * cpu:
            _flag(
                r,
                f"wall clock {r['median_ms']:.4g} ms vs CPU time {cpu:.4g} ms on one thread "
                f"(> max_wait {t['max_wait']:g} x): the process waited for its core",
            )
    pairs = []
    same_model = ("family", "size", "img_size", "batch", "process", "dtype")
    for a in models:
        for b in models:
            if a["mode"] == "infer" and b["mode"] == "train" and all(a.get(k) == b.get(k) for k in same_model):
                pairs.append((a, b, "inference slower than a training step"))
    same_op = ("impl", "batch", "heads", "head_dim", "anchors", "dtype")
    for a in op:
        for b in op:
            if not all(a.get(k) == b.get(k) for k in same_op):
                continue
            if a["tokens"] == b["tokens"] and a["mode"] == "fwd" and b["mode"] == "fwd_bwd":
                pairs.append((a, b, "forward slower than forward+backward"))
            if a["mode"] == b["mode"] and a["tokens"] < b["tokens"]:
                pairs.append((a, b, "fewer tokens slower than more"))
    _less_work_not_slower(pairs, t["tolerance"])


# ---------------------------------------------------------------------------------------------
# Targets, tables, figures
# ---------------------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def summarize_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as measured values (``met`` is None when not measured in this run).

    GPU (one H100/H200, bf16, B=8, H=6, D=64, M=30): fused forward+backward >= 2x faster than
    the eager reference and >= 1.3x than the compiled reference at N=4096, >= 30x faster than
    softmax attention at N=16384; the fused forward at >= 70% of peak bandwidth for N >= 16384;
    peak memory at N=65536 within 1.2x of inputs plus outputs. CPU, per model process state
    (fresh, shared): AnchorFormer-T's inference speed-up over DeiT-T at least 0.95x their MAC
    ratio at 512² and 1024² (a CPU's speed-up is bounded by it: the linear layers are the same),
    and not slower at 224².

    A target computed from a row that :func:`assess_reliability` marked unreliable keeps its
    measured value but claims nothing: ``met`` is None, ``reliable`` False and ``why`` names the
    rows.
    """
    op = results.get("operator", [])
    models = results.get("models", [])
    env = results.get("environment", {})
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float | None,
        threshold: float,
        higher_is_better: bool = True,
        note: str = "",
        sources: Sequence[dict[str, Any] | None] = (),
    ) -> None:
        met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
        bad = [_label(r) for r in sources if r is not None and r.get("reliable") is False]
        out.append(
            {
                "target": name,
                "measured": None if value is None else round(value, 3),
                "threshold": threshold,
                "met": None if bad else met,
                "reliable": not bad,
                "why": [f"from unreliable figures: {', '.join(bad)}"] if bad else [],
                "device": env.get("device"),
                "note": note,
            }
        )

    def ratio(n: int, mode: str, slow: str, fast: str) -> tuple[float | None, list[dict[str, Any] | None]]:
        a, b = _find(op, impl=slow, mode=mode, tokens=n), _find(op, impl=fast, mode=mode, tokens=n)
        return (a["median_ms"] / b["median_ms"] if a and b else None), [a, b]

    if env.get("device_type") == "cuda":
        value, rows = ratio(4096, "fwd_bwd", "reference", "fused")
        add("fused fwd+bwd speed-up over eager reference, N=4096", value, 2.0, sources=rows)
        value, rows = ratio(4096, "fwd_bwd", "reference_compiled", "fused")
        add("fused fwd+bwd speed-up over compiled reference, N=4096", value, 1.3, sources=rows)
        value, rows = ratio(16384, "fwd_bwd", "sdpa", "fused")
        add("fused fwd+bwd speed-up over softmax attention (sdpa), N=16384", value, 30.0, sources=rows)
        peak = env.get("peak_bandwidth_bytes_per_s")
        fwd = [
            r
            for r in op
            if r.get("status") == "ok" and r["impl"] == "fused" and r["mode"] == "fwd" and r["tokens"] >= 16384
        ]
        frac = min(r["kernel_gbps"] * 1e9 / peak for r in fwd) if fwd and peak else None
        add(
            "fused forward bandwidth / peak, N >= 16384 (worst N)",
            frac,
            0.7,
            note=f"peak {peak / 1e9:.0f} GB/s" if peak else "peak bandwidth unknown",
            sources=fwd,
        )
        for mode in OP_MODES:
            r = _find(op, impl="fused", mode=mode, tokens=65536)
            add(
                f"fused {mode} peak memory / (inputs + outputs), N=65536",
                r["peak_over_io"] if r else None,
                1.2,
                higher_is_better=False,  # allocator statistics, not timed: the timings' flags do not apply
            )
        # whole models, both compiled (timm's benchmark: bf16 autocast, batch 256 / 32 / 16)
        for img, mode, threshold in (
            (224, "infer", 1.05),
            (224, "train", 1.10),
            (1024, "infer", 2.7),
            (1024, "train", 3.0),
        ):
            d, a = (
                _find(models, family=f, size="T", img_size=img, mode=mode, exec="compiled")
                for f in ("DeiT", "AnchorFormer")
            )
            add(
                f"AnchorFormer-T {mode} speed-up over DeiT-T, {img}², both compiled (GPU)",
                d["median_ms"] / a["median_ms"] if d and a else None,
                threshold,
                note=f"batch {a['batch']}, GPU busy {_fmt(d.get('gpu_busy'), '.2f')} / {_fmt(a.get('gpu_busy'), '.2f')}"
                if d and a
                else "",
                sources=[d, a],
            )
    else:
        processes = [p for p in MODEL_PROCESSES if any(r.get("process", "shared") == p for r in models)]
        for process in processes:
            for img, threshold, vs_macs in ((512, 0.95, True), (1024, 0.95, True), (224, 1.0, False)):
                d, a = (
                    _find(
                        [r for r in models if r.get("process", "shared") == process],
                        family=f,
                        size="T",
                        img_size=img,
                        mode="infer",
                    )
                    for f in ("DeiT", "AnchorFormer")
                )
                # one thread: the process's CPU time, which the machine's other jobs do not inflate
                key = "cpu_median_ms" if d and a and d.get("threads") == 1 and "cpu_median_ms" in d else "median_ms"
                speedup = d[key] / a[key] if d and a else None
                macs = d["gmacs"] / a["gmacs"] if d and a and d.get("gmacs") and a.get("gmacs") else None
                note = (
                    f"glibc malloc {a.get('malloc', 'default')}; speed-up {speedup:.2f}x ({key}: {a[key]:.1f} vs "
                    f"{d[key]:.1f}; wall-clock medians {d['median_ms'] / a['median_ms']:.2f}x, fastest runs "
                    f"{d['min_ms'] / a['min_ms']:.2f}x), MAC ratio {_fmt(macs, '.2f')}x"
                    if d and a
                    else ""
                )
                if vs_macs:
                    add(
                        f"AnchorFormer-T inference speed-up over DeiT-T / MAC ratio, {img}² (CPU, {process} process)",
                        speedup / macs if speedup and macs else None,
                        threshold,
                        note=note,
                        sources=[d, a],
                    )
                else:
                    add(
                        f"AnchorFormer-T inference speed-up over DeiT-T, {img}² (CPU, {process} process)",
                        speedup,
                        threshold,
                        note=note,
                        sources=[d, a],
                    )
    return out


def fused_comparison(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AnchorFormer and its exact inference form side by side, each against DeiT of the same size.

    For every (process, exec mode, size, side) where DeiT, AnchorFormer and AnchorFormer fused
    were timed in inference: each one's speed-up over DeiT (on one CPU thread from the CPU-time
    medians, else from the wall-clock medians), its MAC ratio (DeiT's GMACs over its own), the
    speed-up over the MAC ratio, and the fused form's speed-up over the unfused one. ``reliable``
    is False when any of the three figures is flagged.
    """
    out = []
    ok = [r for r in models if r.get("status") == "ok" and r.get("mode") == "infer"]
    keys = sorted(
        {(r.get("process", "shared"), r.get("exec", "eager"), r["size"], r["img_size"]) for r in ok},
        key=lambda k: (MODEL_PROCESSES.index(k[0]) if k[0] in MODEL_PROCESSES else 9, k[1], "TSB".index(k[2]), k[3]),
    )
    for process, ex, size, img in keys:
        here = [r for r in ok if (r.get("process", "shared"), r.get("exec", "eager")) == (process, ex)]
        d, a, f = (
            _find(here, family=fam, size=size, img_size=img) for fam in ("DeiT", "AnchorFormer", "AnchorFormer fused")
        )
        if not (d and a and f):
            continue
        key = (
            "cpu_median_ms" if all(r.get("threads") == 1 and r.get("cpu_median_ms") for r in (d, a, f)) else "median_ms"
        )
        row: dict[str, Any] = {
            "process": process,
            "exec": ex,
            "size": size,
            "img_size": img,
            "batch": a.get("batch"),
            "time": key,
        }
        for name, r in (("unfused", a), ("fused", f)):
            speedup = d[key] / r[key]
            macs = d["gmacs"] / r["gmacs"] if d.get("gmacs") and r.get("gmacs") else None
            row.update(
                {
                    f"{name}_speedup": round(speedup, 3),
                    f"{name}_mac_ratio": None if macs is None else round(macs, 3),
                    f"{name}_over_macs": None if macs is None else round(speedup / macs, 3),
                }
            )
        row["fused_over_unfused"] = round(a[key] / f[key], 3)
        row["reliable"] = not any(r.get("reliable") is False for r in (d, a, f))
        out.append(row)
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


UNRELIABLE = "⚠"  # after a figure flagged by assess_reliability, in the tables


def _shown(value: Any, spec: str, r: dict[str, Any]) -> str:
    """A measured cell: the value, marked when its row is unreliable."""
    text = _fmt(value, spec)
    return f"{text} {UNRELIABLE}" if r.get("reliable") is False and value is not None else text


def _flags(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return r.get("status", "")
    if r.get("reliable") is False:
        return f"{UNRELIABLE} unreliable: " + "; ".join(r.get("why", []))
    return "ok" if r.get("reliable") else "ok (not assessed)"


def bench_markdown(results: dict[str, Any], name: str | None = None) -> str:
    """The benchmark for people: the machine, the tables with their flags, the targets (``{name}.md``).

    Every figure depends on the machine and its load, so this page is a timing file, rewritten
    by each run; a figure flagged by :func:`assess_reliability` is marked ⚠ with its reasons, and
    a target computed from one claims nothing. ``name``: the stem of the figures beside the page
    (``{name}_operator.png``, ``{name}_models.png``), linked when their part ran.
    """
    env, cfg = results.get("environment", {}), results.get("config", {})
    lines = [
        "# E4 · Measured: time and memory",
        "",
        "Machine-dependent: every figure below depends on the machine and on what else ran on it, and each run of "
        "the `bench` stage (notebook `02_benchmark`, or `anchorformer bench`) rewrites this page, its JSON and "
        f"figures. Written {env.get('date', 'at an unrecorded date')}."
        + ("" if results.get("complete", True) else " **Incomplete run.**"),
        "",
        "## Machine",
        "",
    ]
    shown_env = {k: env[k] for k in sorted(env, key=lambda k: k != "device") if k != "date"}  # the device first
    lines.append(markdown_table([{"key": k, "value": v} for k, v in shown_env.items()], ["key", "value"], ["", ""]))
    rows = [r for part in ("operator", "models") for r in results.get(part, []) if r.get("status") == "ok"]
    flagged = [r for r in rows if r.get("reliable") is False]
    rel = cfg.get("reliability") or {}
    lines += [
        "## Reliability",
        "",
        f"{len(flagged)} of {len(rows)} measured figures flagged unreliable ({UNRELIABLE}). A figure is flagged when "
        f"it has fewer than {rel.get('min_timed', '—')} timed calls, when its spread (q3 − q1) / median exceeds "
        f"{_fmt(rel.get('max_spread'), '.0%')}, when on one CPU thread its wall clock exceeds "
        f"{rel.get('max_wait', '—')}× its CPU time (the process waited for its core), or when less work took more "
        f"than {rel.get('tolerance', '—')}× the time of more work (inference against a training step, forward "
        "against forward+backward, N against a larger N). Thresholds: `reliability` in "
        "`anchorformer/configs/bench.yaml`. A target computed from a flagged figure is not claimed met or unmet.",
        "",
    ]
    op = results.get("operator", [])
    if op:
        lines += [
            "## The anchor-attention operator",
            "",
            f"{cfg.get('dtype')}, B = {cfg.get('op_batch')}, H = {cfg.get('op_heads')}, D = {cfg.get('op_head_dim')}, "
            f"M = {cfg.get('op_anchors')}; median of up to {cfg.get('repeats')} timed calls; spread = (q3 − q1) / "
            "median; peak over the inputs and outputs of the call; GB/s: the call's DRAM traffic over its time (fused: "
            "the traffic the kernels make).",
            "",
        ]
        ok = [
            {
                **r,
                "ms": _shown(r.get("median_ms"), ".3f", r),
                "spread_shown": _fmt(r.get("spread"), ".0%"),
                "peak_mib": None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20,
                "gbps_shown": _shown(r.get("kernel_gbps", r.get("gbps")), ".1f", r),
                "flags": _flags(r),
            }
            for r in op
            if r.get("status") == "ok"
        ]
        lines.append(
            markdown_table(
                ok,
                ["impl", "mode", "tokens", "ms", "spread_shown", "peak_mib", "peak_over_io", "gbps_shown", "flags"],
                ["impl", "mode", "N", "ms (median)", "spread", "peak MiB", "peak / io", "GB/s", "status"],
                digits={"peak_mib": 1, "peak_over_io": 2},
            )
        )
        skipped: dict[tuple[str, str], None] = {}
        for r in op:
            if r.get("status") != "ok":
                skipped.setdefault((r["impl"], r["status"]), None)
        lines += [f"Not measured, `{impl}`: {why}." for impl, why in skipped]
        if name:
            lines += ["", f"![The operator: time and peak memory against N]({name}_operator.png)"]
        lines.append("")
    models = results.get("models", [])
    if models:
        lines += [
            "## Whole models: DeiT vs AnchorFormer (distilled variants)",
            "",
            f"M = {cfg.get('model_anchors')}; inference and a training step (AdamW); median of the timed calls "
            f"(CPU: up to {cfg.get('repeats')}, `torch.utils.benchmark`; GPU: at least {cfg.get('repeats')}, "
            "`triton.testing.do_bench`, `do_bench_cudagraph` for `cudagraphs`), the families in alternation. "
            "`AnchorFormer fused`: `model.fuse_for_inference()`, the exact inference form. GPU busy: the fraction "
            f"of the figure's time the GPU ran kernels (below {HOST_BOUND:g}: host-bound).",
            "",
        ]
        shown = [
            {
                **r,
                "label": f"{r['family']}-{r['size']}",
                "image": f"{r['img_size']}²",
                "ms": _shown(r.get("median_ms"), ".1f", r),
                "cpu_ms": _fmt(r.get("cpu_median_ms"), ".1f"),
                "spread_shown": _fmt(r.get("spread"), ".0%"),
                "ips": _shown(r.get("images_per_s"), ".2f", r),
                "exec_mode": r.get("exec", "eager"),
                "busy": _fmt(r.get("gpu_busy"), ".2f") + (" host-bound" if r.get("host_bound") else ""),
                "flags": _flags(r),
            }
            for r in models
        ]
        lines.append(
            markdown_table(
                shown,
                ["label", "image", "batch", "mode", "exec_mode", "process", "ms", "cpu_ms", "spread_shown", "ips"]
                + ["busy", "flags"],
                ["model", "image", "batch", "mode", "exec", "process", "ms (median)", "CPU ms", "spread", "images/s"]
                + ["GPU busy", "status"],
            )
        )
        fused = results.get("fused") or []
        if fused:
            lines += [
                "",
                "### The exact inference form: fused and unfused against DeiT",
                "",
                "Inference; speed-up over DeiT of the same size (one CPU thread: from the CPU-time medians), the MAC "
                "ratio (DeiT's GMACs over the model's, every matmul counted), and their quotient (on a CPU the MAC "
                "ratio bounds the speed-up); the last column is the fused form's speed-up over the unfused model.",
                "",
                markdown_table(
                    [
                        {
                            **r,
                            "image": f"{r['img_size']}²",
                            **{
                                k: _fmt(r[k], ".2f") + (f" {UNRELIABLE}" if not r["reliable"] else "")
                                for k in ("unfused_speedup", "fused_speedup", "fused_over_unfused")
                            },
                        }
                        for r in fused
                    ],
                    ["size", "image", "batch", "exec", "process", "unfused_speedup", "unfused_mac_ratio"]
                    + [
                        "unfused_over_macs",
                        "fused_speedup",
                        "fused_mac_ratio",
                        "fused_over_macs",
                        "fused_over_unfused",
                    ],
                    ["size", "image", "batch", "exec", "process", "unfused ×", "unfused MAC ratio", "unfused / MACs"]
                    + ["fused ×", "fused MAC ratio", "fused / MACs", "fused / unfused"],
                    digits=3,
                ),
            ]
        if name:
            lines += [f"![Whole models: throughput against resolution]({name}_models.png)", ""]
    targets = results.get("targets", [])
    if targets:
        rows = []
        for t in targets:
            unreliable = t.get("reliable") is False
            met = "—" if t["met"] is None else ("yes" if t["met"] else "no")
            rows.append(
                {
                    "target": t["target"],
                    "measured": _shown(t["measured"], ".3f", t),
                    "threshold": t["threshold"],
                    "met": f"— ({UNRELIABLE} unreliable)" if unreliable else met,
                    "note": "; ".join([*t.get("why", []), *([t["note"]] if t.get("note") else [])]),
                }
            )
        lines += [
            "## Targets",
            "",
            markdown_table(rows, ["target", "measured", "threshold", "met", "note"]),
        ]
    return "\n".join(lines).rstrip() + "\n"


def plot_operator(rows: list[dict[str, Any]]) -> Any:
    """Time (top) and peak memory (bottom) against N, forward and forward+backward, per impl."""
    from .viz import plt

    modes = [m for m in OP_MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(2, max(1, len(modes)), figsize=(5.5 * max(1, len(modes)), 7), squeeze=False)
    for j, mode in enumerate(modes):
        for i, impl in enumerate(OP_IMPLS):
            pts = sorted(
                (r["tokens"], r["median_ms"], r["peak_bytes"])
                for r in rows
                if r["impl"] == impl and r["mode"] == mode and r.get("status") == "ok"
            )
            if not pts:
                continue
            n, ms, peak = zip(*pts)
            axes[0, j].plot(n, ms, "o-", color=f"C{i}", label=impl)
            axes[1, j].plot(n, [p / 2**20 for p in peak], "o-", color=f"C{i}", label=impl)
        axes[0, j].set_title(f"anchor attention, {'forward' if mode == 'fwd' else 'forward + backward'}")
        axes[0, j].set_ylabel("time (ms)")
        axes[1, j].set_ylabel("peak memory (MiB)")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_models(rows: list[dict[str, Any]]) -> Any:
    """Images/s against image side, DeiT (dashed) vs AnchorFormer (solid) and its fused form (dotted),
    per size and mode: the eager rows of the first model process measured."""
    from .viz import plt

    process = next((r.get("process", "fresh") for r in rows), "fresh")
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(5.5 * max(1, len(modes)), 4), squeeze=False)
    sizes = sorted({r["size"] for r in rows}, key="TSB".index)
    for j, mode in enumerate(modes):
        ax = axes[0, j]
        for i, size in enumerate(sizes):
            for family, style in (("DeiT", "s--"), ("AnchorFormer", "o-"), ("AnchorFormer fused", "^:")):
                pts = sorted(
                    (r["img_size"], r["images_per_s"])
                    for r in rows
                    if r["mode"] == mode
                    and r["size"] == size
                    and r["family"] == family
                    and r.get("status") == "ok"
                    and r.get("exec", "eager") == "eager"
                    and r.get("process", "fresh") == process
                )
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{family}-{size}")
        ax.set_title("inference" if mode == "infer" else "training step")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (pixels)")
        ax.set_ylabel("images / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Running a preset
# ---------------------------------------------------------------------------------------------


def bench_config(profile: str, overrides: Sequence[str] | str | None = None) -> dict[str, Any]:
    """The preset of ``profile`` from ``configs/bench.yaml`` with ``key=value`` overrides.

    ``overrides`` may be one string of whitespace-separated items (shell quoting respected).
    """
    from .engine.recipe import apply_overrides, load_preset

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    cfg, _ = load_preset("bench", profile)
    apply_overrides(cfg, {}, overrides, list(cfg))
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"bench config: dtype must be one of {sorted(DTYPES)}; got {cfg['dtype']!r}")
    keys = ("op_tokens", "op_impls", "op_modes", "model_sizes", "model_img_sizes", "model_train_img_sizes")
    for key in (*keys, "model_processes", "model_skip"):
        if not isinstance(cfg[key], list):
            raise ValueError(f"bench config: {key} must be a list, e.g. {key}=[a,b]; got {cfg[key]!r}")
    shared = cfg["model_shared_sizes"]
    if shared is not None and not (isinstance(shared, list) and set(shared) <= set(cfg["model_sizes"])):
        raise ValueError(
            f"bench config: model_shared_sizes must be null or a list of model_sizes {cfg['model_sizes']}; got {shared!r}"
        )
    for item in cfg["model_skip"]:
        size, _, side = str(item).partition("@")
        if size not in MODEL_SIZES or not side.isdigit():
            raise ValueError(f"bench config: model_skip items are size@side, e.g. small@1024; got {item!r}")
    if cfg["malloc"] not in MALLOC_MODES:
        raise ValueError(f"bench config: malloc must be one of {MALLOC_MODES}; got {cfg['malloc']!r}")
    bad = [p for p in cfg["model_processes"] if p not in MODEL_PROCESSES]
    if bad:
        raise ValueError(f"bench config: model_processes items must be in {MODEL_PROCESSES}; got {bad}")
    cfg["model_families"] = check_families(cfg["model_families"], "bench config")
    if not isinstance(cfg["model_exec"], list) or not cfg["model_exec"] or set(cfg["model_exec"]) - set(EXEC_MODES):
        raise ValueError(
            f"bench config: model_exec must be a non-empty list of {EXEC_MODES}; got {cfg['model_exec']!r}"
        )
    for key in ("model_batch", "model_train_batch"):
        b = cfg[key]
        ok = (key == "model_train_batch" and b is None) or (isinstance(b, int) and not isinstance(b, bool) and b >= 1)
        if isinstance(b, dict):
            ok = all(str(k).isdigit() and isinstance(v, int) and v >= 1 for k, v in b.items())
            missing = [side for side in (*cfg["model_img_sizes"], *cfg["model_train_img_sizes"]) if side not in b]
            if ok and missing:
                raise ValueError(f"bench config: {key} gives no batch for the side(s) {missing}; got {b!r}")
        if not ok:
            raise ValueError(f"bench config: {key} must be an integer >= 1 or a mapping side: batch; got {b!r}")
    cfg["reliability"] = check_reliability(cfg.get("reliability"))
    return cfg


def _slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "_" for c in text.replace("²", "").replace(">=", "min"))
    return "_".join(w for w in keep.split("_") if w)


def run_benchmarks(
    out_dir: str | Path,
    cfg: dict[str, Any],
    *,
    device: str = "auto",
    parts: Sequence[str] = ("operator", "models"),
    name: str = "bench",
) -> dict[str, Any]:
    """Run the benchmarks of ``cfg`` and write ``{name}.json``, ``{name}.md`` and the figures.

    The JSON is rewritten (atomically) after each part with ``"complete": false`` until the
    end, so an interrupted run leaves its finished measurements, marked as incomplete.

    Args:
        out_dir: created if missing.
        cfg: from :func:`bench_config`.
        device: ``auto``, ``cpu`` or ``cuda``.
        parts: ``operator`` and/or ``models``.
        name: stem of the output files.

    With ``cfg["threads"]`` set, the CPU runs on that many torch threads (fresh model processes too).

    Returns:
        ``{"environment", "config", "operator", "models", "targets", "summary", "complete"}``;
        each measured row with ``reliable`` and ``why`` (:func:`assess_reliability`).
    """
    dev = resolve_device(device)
    threads_before = torch.get_num_threads()
    if cfg.get("threads") and dev.type == "cpu":
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run(out_dir, cfg, dev, parts, name)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    out_dir: str | Path, cfg: dict[str, Any], dev: torch.device, parts: Sequence[str], name: str
) -> dict[str, Any]:
    from .viz import save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg["dtype"]]
    results: dict[str, Any] = {
        "environment": environment(dev),
        "config": dict(cfg),
        "operator": [],
        "models": [],
        "targets": [],
        "complete": False,
    }
    json_path = out / f"{name}.json"
    write_json_atomic(json_path, results)
    t0 = time.perf_counter()
    if "operator" in parts:
        results["operator"] = operator_benchmark(
            cfg["op_tokens"],
            batch=cfg["op_batch"],
            heads=cfg["op_heads"],
            head_dim=cfg["op_head_dim"],
            anchors=cfg["op_anchors"],
            dtype=dtype,
            device=dev,
            impls=cfg["op_impls"],
            modes=cfg["op_modes"],
            warmup=cfg["warmup"],
            repeats=cfg["repeats"],
            budget_s=cfg["budget_s"],
            sdpa_max_tokens=cfg["sdpa_max_tokens"],
            compile_dynamic=cfg["compile_dynamic"],
            check_tokens=cfg["check_tokens"],
            on_progress=lambda rows: write_json_atomic(json_path, {**results, "operator": rows}),
        )
        results["operator_seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(json_path, results)
        save_figure(plot_operator(results["operator"]), out / f"{name}_operator")
    if "models" in parts:
        t1 = time.perf_counter()
        results["models"] = []
        shared_sizes = cfg["model_shared_sizes"]
        for process in cfg["model_processes"]:
            done = list(results["models"])
            results["models"] = done + model_benchmark(
                shared_sizes if process == "shared" and shared_sizes is not None else cfg["model_sizes"],
                cfg["model_img_sizes"],
                cfg["model_train_img_sizes"],
                batch=cfg["model_batch"],
                train_batch=cfg["model_train_batch"],
                families=cfg["model_families"],
                exec_modes=cfg["model_exec"],
                anchors=cfg["model_anchors"],
                dtype=dtype,
                device=dev,
                warmup=cfg["warmup"],
                repeats=cfg["repeats"],
                budget_s=cfg["budget_s"],
                process=process,
                threads=cfg["threads"],
                malloc=cfg["malloc"],
                skip=cfg["model_skip"],
                on_progress=lambda rows, done=done: write_json_atomic(json_path, {**results, "models": done + rows}),
            )
        results["models_seconds"] = round(time.perf_counter() - t1, 1)
        write_json_atomic(json_path, results)
        save_figure(plot_models(results["models"]), out / f"{name}_models")
    assess_reliability(results, cfg["reliability"])
    results["targets"] = summarize_targets(results)
    results["fused"] = fused_comparison(results["models"])
    # Flat numbers: each target's measured value by a short key.
    results["summary"] = {_slug(t["target"]): t["measured"] for t in results["targets"]}
    results["complete"] = True
    atomic_write_text(out / f"{name}.md", bench_markdown(results, name))
    write_json_atomic(json_path, results)
    flagged = [_label(r) for r in (*results["operator"], *results["models"]) if r.get("reliable") is False]
    if flagged:
        log.warning("%d figure(s) flagged unreliable (see %s): %s", len(flagged), out / f"{name}.md", flagged)
    return results


def _main(args: argparse.Namespace) -> int:
    cfg = bench_config(args.profile, args.set)
    parts = ("operator", "models") if args.only == "all" else (args.only,)
    results = run_benchmarks(args.out_dir, cfg, device=args.device, parts=parts, name=args.name)
    for t in results["targets"]:
        log.info("target: %s = %s (threshold %s, met: %s)", t["target"], t["measured"], t["threshold"], t["met"])
    log.info("wrote %s", Path(args.out_dir) / f"{args.name}.json")
    return 0


def register(subparsers: Any) -> None:
    """Add ``anchorformer bench`` to the command line."""
    p = subparsers.add_parser(
        "bench",
        help="operator and whole-model benchmarks (E4): JSON, markdown and figures",
        description="Time and peak memory of anchor attention (fused, reference, compiled reference, softmax "
        "attention) against N, and images/s of AnchorFormer vs DeiT. Presets: anchorformer/configs/bench.yaml.",
    )
    p.add_argument("--profile", choices=("mini", "full"), default="mini", help="preset (default: mini)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out-dir", default="outputs/bench", help="folder for the JSON, markdown and figures")
    p.add_argument("--name", default="bench", help="stem of the output files (NAME.json, NAME.md, NAME_*.png)")
    p.add_argument("--only", choices=("all", "operator", "models"), default="all", help="run one part only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset key")
    p.set_defaults(func=_main)


def _worker(job_path: str, out_path: str) -> int:
    """Entry of a fresh model-benchmark process: rows of one configuration, as JSON."""
    logging.basicConfig(level=logging.WARNING)
    rows = _models_at(**json.loads(Path(job_path).read_text()))
    write_json_atomic(Path(out_path), rows)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_worker(*sys.argv[1:3]))
