"""Host time of the fused anchor-attention operator's wrapper, with its kernels stubbed.

Every Triton kernel of ``anchorformer.ops.anchor_attention.triton`` is replaced by a stub whose
launch does nothing, so what is timed is the Python around the kernels: input checks, the
launch plan, allocations, the autograd node, the launch calls themselves (not Triton's own
launch machinery, which is the same for any wrapper). Runs on the CPU under the Triton
interpreter's switch (``TRITON_INTERPRET=1``, set here before triton is imported), which only
lets CPU tensors through the wrapper: no kernel ever runs.

Cases, fp32, B 2, H 3, N 197, D 64, M 30 (a DeiT-T layer at 224², batch 2), inputs requiring
grad: ``forward`` (one call), ``forward_backward`` (a call, then its autograd node's backward
called directly: the wrapper's own host time), ``inference`` (one call under
``torch.no_grad``). Targets: forward <= 10 µs, forward+backward <= 25 µs. For scale:
``forward_backward_autograd`` (the same through ``torch.autograd.grad``), ``autograd_floor``
(``torch.autograd.grad`` of ``x * 2``: the engine's cost around any one-node graph), and
``sdpa_forward_backward`` (PyTorch's scaled-dot-product attention forward+backward on the same
(B, H, N, D) on the CPU, kernels included).

Timed with ``torch.utils.benchmark`` (``blocked_autorange``, medians), one thread, on the
thread's CPU clock (``time.thread_time``): on a loaded machine the wall clock counts the time
the process waits for a core, the CPU clock does not (caches shared with other processes still
slow it). The figures depend on the machine and its load: the JSON records both.

``--baseline REF`` times the package as of git revision REF the same way, in a child process
started right after (its ``anchorformer/`` extracted with ``git archive`` to a temporary folder),
and records both side by side.

Usage: python benchmarks/op_host_time.py [--out benchmarks/results/op_host_time_cpu_DATE.json]
       [--min-run-time 1] [--baseline REF]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors pass the wrapper's device check

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import benchmark  # noqa: E402

TARGETS_US = {"forward": 10.0, "forward_backward": 25.0}
SHAPE = dict(B=2, H=3, N=197, D=64, M=30)


class _StubLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs) -> None:
        return None


def stub_kernels(module) -> list[str]:
    """Replace every Triton kernel in ``module``'s namespace by a stub; returns their names."""
    from triton.runtime.interpreter import InterpretedFunction

    names = [n for n, obj in vars(module).items() if isinstance(obj, InterpretedFunction) and n.endswith("_kernel")]
    for n in names:
        setattr(module, n, _StubLaunch(n))
    return names


def measure(min_run_time: float) -> dict:
    """Median microseconds per case (kernels stubbed), and what was stubbed."""
    from anchorformer.ops.anchor_attention import triton as fused

    stubbed = stub_kernels(fused)
    B, H, N, D, M = (SHAPE[k] for k in ("B", "H", "N", "D", "M"))
    g = torch.Generator().manual_seed(0)
    qk, v, grad = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    u = torch.randn(M, D, generator=g)
    leaves = [t.requires_grad_(True) for t in (qk, v, u)]
    f = fused.anchor_attention_triton

    def forward():
        return f(*leaves)

    def forward_backward():  # the wrapper's two halves: the call, then its autograd node's backward
        return f(*leaves).grad_fn.apply(grad)

    def forward_backward_autograd():
        return torch.autograd.grad(f(*leaves), leaves, grad)

    x = torch.randn(B, H, N, D, generator=g).requires_grad_(True)

    def autograd_floor():  # what torch.autograd.grad costs around any one-node graph
        return torch.autograd.grad(x * 2.0, (x,), grad)

    def inference():
        with torch.no_grad():
            return f(*leaves)

    q, k, vv = (torch.randn(B, H, N, D, generator=g).requires_grad_(True) for _ in range(3))

    def sdpa_forward_backward():
        return torch.autograd.grad(F.scaled_dot_product_attention(q, k, vv), (q, k, vv), grad)

    cases = {
        "forward": forward,
        "forward_backward": forward_backward,
        "inference": inference,
        "forward_backward_autograd": forward_backward_autograd,
        "autograd_floor": autograd_floor,
        "sdpa_forward_backward": sdpa_forward_backward,
    }
    results = {}
    for name, fn in cases.items():
        for _ in range(50):  # warm-up: plans cached, allocator warm
            fn()
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1, timer=time.thread_time)
        m = timer.blocked_autorange(min_run_time=min_run_time)
        results[name] = {"median_us": round(m.median * 1e6, 2), "iqr_us": round(m.iqr * 1e6, 2), "runs": len(m.times)}
    return {"stubbed_kernels": sorted(stubbed), "cases": results}


def baseline(ref: str, min_run_time: float) -> dict:
    """``measure`` for the package as of git revision ``ref``, in a child process."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "pkg.tar"
        subprocess.run(["git", "archive", "-o", str(archive), ref, "anchorformer"], cwd=repo, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        env = dict(os.environ, PYTHONPATH=tmp)
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import op_host_time as m; "
            "import torch; torch.set_num_threads(1); print('RESULT ' + json.dumps(m.measure(float(sys.argv[2]))))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(min_run_time)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        res = json.loads(line[len("RESULT ") :])
    rev = subprocess.run(["git", "rev-parse", "--short", ref], cwd=repo, capture_output=True, text=True, check=True)
    return {"revision": rev.stdout.strip(), **res}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per case (torch.utils.benchmark)")
    p.add_argument("--baseline", default=None, help="git revision to time the same way, for comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    res = measure(args.min_run_time)
    base = baseline(args.baseline, args.min_run_time) if args.baseline else None
    import triton

    report = {
        "what": "host time of anchor_attention_triton with every Triton launch stubbed (no kernel runs)",
        "clock": "thread CPU time (time.thread_time), medians of torch.utils.benchmark blocked_autorange",
        "shape": dict(SHAPE, dtype="float32"),
        "targets_us": TARGETS_US,
        "met": {k: res["cases"][k]["median_us"] <= t for k, t in TARGETS_US.items()},
        **res,
        "baseline": base,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
