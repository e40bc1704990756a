"""Where AnchorFormer-T's CPU inference time goes besides its MACs: transient allocations and page faults.

For AnchorFormer-T (M = 30) at each side, one thread, batch 1, fp32:

- ``operator``: tensors allocated by one call of the anchor-attention operator on a layer's
  inputs (views of the packed projection, as the model makes them): count, bytes, the largest;
- ``model``: the same for one whole forward pass;
- ``faults``: minor page faults per forward, (a) in a fresh process, repeated, (b) timed in
  alternation with DeiT-T in the same process after the 224² and 512² models ran (the bench's
  history), (c) as (b) with glibc's mmap and trim thresholds fixed, when the script is re-run
  with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set (see README, CPU inference).

Each page fault maps a fresh 4 KiB page of a tensor that glibc returned to the system and then
took back (``mmap``/``munmap`` of large blocks, trimming of the heap); the count shows how much
of a forward pass's memory is first-touched anew on every call.

``--what op_share`` asks instead where the time over the MAC ratio goes. In one process with
glibc malloc tuned, in rounds of alternating calls (process CPU time, medians over the rounds):
DeiT-T; AnchorFormer-T, with the wall time of each anchor-attention call taken inside the model;
AnchorFormer-T with the operator replaced by a stand-in that costs nothing (returns one
preallocated output: the speed-up the model would have if the operator were free); AnchorFormer-T
with the operator compiled by ``torch.compile`` (inductor's fused C++); and the operator alone on
the model's shapes, in a loop of its own (caches warm).

Usage: python benchmarks/cpu_profile.py [--what allocations|op_share] [--img 512 1024] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anchorformer  # noqa: E402
from anchorformer.ops import anchor_attention  # noqa: E402


def allocations(fn) -> dict[str, float]:
    """Tensors allocated during one call of ``fn``: count, MiB, the largest in MiB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    sizes = [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]" and e["args"]["Bytes"] > 0]
    return {
        "count": len(sizes),
        "mib": round(sum(sizes) / 2**20, 2),
        "largest_mib": [round(s / 2**20, 2) for s in sorted(sizes, reverse=True)[:4]],
        "count_over_128kib": sum(s >= 128 * 1024 for s in sizes),
    }


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def model(name: str, img: int):
    torch.manual_seed(0)
    kw = {"num_anchors": 30} if name.startswith("anchorformer") else {}
    return anchorformer.create_model(name, img_size=img, num_classes=1000, **kw).eval()


def forward_faults_and_ms(m, x, repeats: int) -> tuple[list[int], list[float]]:
    fl, ms = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            f0, t0 = faults(), time.perf_counter()
            m(x)
            ms.append(round((time.perf_counter() - t0) * 1e3, 1))
            fl.append(faults() - f0)
    return fl, ms


def op_share(img: int, rounds: int) -> dict[str, object]:
    """The anchor-attention operator's share of AnchorFormer-T's inference time at ``img``² (see
    the module's docstring, ``--what op_share``): the bench's interleaved timing, its CPU times."""
    from anchorformer.bench import measure_time, measure_times
    from anchorformer.complexity import model_complexity
    from anchorformer.models import anchorformer as af_module

    reference = sys.modules["anchorformer.ops.anchor_attention.reference"]
    attend = af_module._attend
    deit, af = model("deit_tiny_distilled_patch16_224", img), model("anchorformer_tiny_distilled_patch16_224", img)
    x = torch.randn(1, 3, img, img)
    N, H, D = (img // 16) ** 2 + 2, 3, 64
    op_s: list[float] = []  # every operator call of the timed AnchorFormer-T forwards

    def timed(*args):
        t0 = time.perf_counter()
        out = attend(*args)
        op_s.append(time.perf_counter() - t0)
        return out

    free_out = torch.zeros(1, N, H, D).transpose(1, 2)  # the operator's token-major output, made once
    compiled = torch.compile(reference._reference_autograd, dynamic=False)
    variants = {
        "deit": (deit, attend),
        "anchorformer": (af, timed),
        "anchorformer_free_operator": (af, lambda *args: free_out),
        "anchorformer_compiled_operator": (af, lambda qk, v, u, normalize, impl: compiled(qk, v, u, normalize)),
    }

    def forward(m, fn):
        def call():
            af_module._attend = fn
            return m(x)

        return call

    cpu = torch.device("cpu")
    qkv = torch.randn(1, N, 2, H, D)
    qk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views, as in the model
    u = af.blocks[0].attn.anchors.detach()
    try:
        with torch.inference_mode():  # two warm-up calls each; the first compiled call compiles
            timings = measure_times(
                {k: forward(*mf) for k, mf in variants.items()}, cpu, warmup=2, repeats=rounds, budget_s=math.inf
            )
            alone = measure_time(
                lambda: anchor_attention(qk, v, u, impl="reference"),
                cpu,
                warmup=10,
                repeats=10 * rounds,
                budget_s=math.inf,
            )
    finally:
        af_module._attend = attend
    op_calls = op_s[-rounds * len(af.blocks) :]  # the timed rounds' calls, not the warm-up's
    op_ms = statistics.median(op_calls) * 1e3
    macs = (
        model_complexity("deit_tiny_distilled_patch16_224", img)["gmacs"]
        / model_complexity("anchorformer_tiny_distilled_patch16_224", img, num_anchors=30)["gmacs"]
    )
    med = {k: t["cpu_median_ms"] for k, t in timings.items()}
    speedups = {k: med["deit"] / med[k] for k in med if k != "deit"}
    return {
        "rounds": rounds,
        "mac_ratio": round(macs, 3),
        "cpu_median_ms": {k: round(v, 1) for k, v in med.items()},
        "speedup_over_deit": {k: round(v, 3) for k, v in speedups.items()},
        "speedup_over_mac_ratio": {k: round(v / macs, 3) for k, v in speedups.items()},
        "operator_ms_per_call_in_model": round(op_ms, 3),
        "operator_ms_per_call_alone": round(alone["median_ms"], 3),
        "operator_share_of_model": round(op_ms * len(af.blocks) / med["anchorformer"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=("allocations", "op_share"), default="allocations")
    p.add_argument("--img", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--repeats", type=int, default=3, help="forward passes (allocations) or rounds (op_share)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    report: dict[str, object] = {"torch": torch.__version__, "threads": 1}
    if args.what == "op_share":
        from anchorformer.ops.cpu import tune_glibc_malloc

        report["malloc"] = "tuned" if tune_glibc_malloc() else "default"
        for img in args.img:
            report[str(img)] = op_share(img, args.repeats)
        _write(report, args.out)
        return
    for img in args.img:
        af = model("anchorformer_tiny_distilled_patch16_224", img)
        x = torch.randn(1, 3, img, img)
        N, H, D = (img // 16) ** 2 + 2, 3, 64
        qkv = torch.randn(1, N, 2, H, D)
        qk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views, as in the model
        u = torch.randn(30, D)
        with torch.inference_mode():
            af(x)
            anchor_attention(qk, v, u, impl="reference")
            op = allocations(lambda qk=qk, v=v, u=u: anchor_attention(qk, v, u, impl="reference"))
            whole = allocations(lambda af=af, x=x: af(x))
        fresh = forward_faults_and_ms(af, x, args.repeats)
        report[str(img)] = {"operator": op, "model": whole, "faults_fresh": fresh[0], "ms_fresh": fresh[1]}
        del af
    # The bench's history: the smaller sides first, then DeiT-T and AnchorFormer-T in alternation.
    for img in args.img:
        deit, af = model("deit_tiny_distilled_patch16_224", img), model("anchorformer_tiny_distilled_patch16_224", img)
        x = torch.randn(1, 3, img, img)
        rows = {"deit": ([], []), "anchorformer": ([], [])}
        for _ in range(args.repeats):
            for key, m in (("deit", deit), ("anchorformer", af)):
                f, t = forward_faults_and_ms(m, x, 1)
                rows[key][0].extend(f)
                rows[key][1].extend(t)
        report[str(img)]["faults_alternating"] = {k: v[0] for k, v in rows.items()}
        report[str(img)]["ms_alternating"] = {k: v[1] for k, v in rows.items()}
    _write(report, args.out)


def _write(report: dict[str, object], out: Path | None) -> None:
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
