"""The whole-model benchmark's harness: the families alternate, every figure gets its timed steps
and (on a GPU) its busy fraction, the fused inference form is measured beside the unfused model,
and the GPU path runs on the CPU through a scripted clock standing in for do_bench and the profiler."""

from __future__ import annotations

import pytest
import torch

from anchorformer import bench

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedGpuClock:
    """The interface of bench.CudaTimer: do_bench's calls per round, a step time and a busy time
    per model (looked up by the order the harness first warms the steps up); every call runs."""

    kind = "cuda"

    def __init__(self, step_ms, kernel_ms):
        self.step_ms, self.kernel = step_ms, kernel_ms
        self.order: list[int] = []  # which step each timed round ran, in order
        self.fns: list = []  # kept alive, so that no two steps share an id

    def index(self, fn):
        return next(i for i, f in enumerate(self.fns) if f is fn)

    def warmup(self, fn, calls):
        if not any(f is fn for f in self.fns):
            self.fns.append(fn)
        for _ in range(calls):
            fn()

    def calls_per_round(self, repeats):
        return bench.CudaTimer.calls_per_round(bench.CudaTimer.__new__(bench.CudaTimer), repeats)

    def time(self, fn, calls):
        i = self.index(fn)
        self.order.append(i)
        for _ in range(calls):
            fn()
        return [self.step_ms[i % len(self.step_ms)]] * calls, None

    def kernel_ms(self, fn, calls):
        fn()
        return self.kernel[self.index(fn) % len(self.kernel)]


def test_gpu_harness_alternates_counts_steps_and_flags_host_bound_figures():
    """Batch per side, >= 20 timed steps in 4 alternations, the busy fraction, the host-bound flag."""
    clock = ScriptedGpuClock(step_ms=[10.0, 8.0, 6.0], kernel_ms=[9.5, 6.0, 5.7])
    families = {"DeiT": None, "AnchorFormer": None, "AnchorFormer fused": None}
    rows = bench.model_benchmark(
        ["tiny"], [32], [32], batch={32: 3}, train_batch={32: 2}, families=families, anchors=4,
        dtype=torch.float32, device=torch.device("cpu"), warmup=1, repeats=20, budget_s=0.0,
        process="shared", timer=clock,
    )  # fmt: skip
    infer = [r for r in rows if r["mode"] == "infer"]
    train = [r for r in rows if r["mode"] == "train"]
    assert [r["family"] for r in infer] == ["DeiT", "AnchorFormer", "AnchorFormer fused"]
    assert [r["family"] for r in train] == ["DeiT", "AnchorFormer"]  # the fused form does not train
    assert {r["batch"] for r in infer} == {3} and {r["batch"] for r in train} == {2}
    assert all(r["n_timed"] >= 20 and r["exec"] == "eager" and r["status"] == "ok" for r in rows)
    # rounds alternate the families: 3 inference steps, then 2 training steps, round-robin
    assert clock.order[:12] == [0, 1, 2] * 4 and clock.order[12:20] == [3, 4] * 4
    by = {(r["family"], r["mode"]): r for r in rows}
    assert by["DeiT", "infer"]["gpu_busy"] == 0.95 and not by["DeiT", "infer"]["host_bound"]
    assert by["AnchorFormer", "infer"]["gpu_busy"] == 0.75 and by["AnchorFormer", "infer"]["host_bound"]
    assert by["AnchorFormer fused", "infer"]["images_per_s"] == 500.0  # 3 images / 6 ms
    assert by["AnchorFormer fused", "infer"]["fused"] and by["AnchorFormer fused", "infer"]["gmacs"] > 0
    md = bench.bench_markdown({"models": rows, "config": {"repeats": 20}})
    assert "0.75 host-bound" in md and "0.95 |" in md


def test_union_length_counts_overlaps_once():
    assert bench.union_length([]) == 0
    assert bench.union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0


def test_fused_family_measured_beside_the_unfused_model_on_the_cpu():
    """The real CPU clock (torch.utils.benchmark), T only for the fused form: fewer MACs counted."""
    families = {"DeiT": None, "AnchorFormer": None, "AnchorFormer fused": ["tiny"]}
    rows = bench.model_benchmark(
        ["tiny"], [48], [], batch=1, families=families, anchors=4, dtype=torch.float32,
        device=torch.device("cpu"), repeats=2, budget_s=0.05, process="shared", threads=1,
    )  # fmt: skip
    by = {r["family"]: r for r in rows}
    assert set(by) == {"DeiT", "AnchorFormer", "AnchorFormer fused"}
    assert all(r["status"] == "ok" and r["n_timed"] == 2 and r["cpu_median_ms"] > 0 for r in rows)
    assert "gpu_busy" not in by["DeiT"]  # no device to be idle on the CPU
    assert by["AnchorFormer fused"]["gmacs"] < by["AnchorFormer"]["gmacs"] < by["DeiT"]["gmacs"]
    with pytest.raises(ValueError, match="unknown model family 'Fused'"):
        bench.model_benchmark(["tiny"], [48], [], batch=1, families=["Fused"], anchors=4,
                              dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="exec modes must be"):
        bench.model_benchmark(["tiny"], [48], [], batch=1, exec_modes=["jit"], anchors=4,
                              dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip


def test_fused_comparison_and_the_gpu_model_targets():
    def row(family, img, ms, gmacs, **kw):
        return {"family": family, "size": "T", "img_size": img, "mode": "infer", "status": "ok", "median_ms": ms,
                "gmacs": gmacs, "process": "fresh", "exec": "eager", "batch": 1, **kw}  # fmt: skip

    models = [
        row("DeiT", 1024, 3000.0, 100.0),
        row("AnchorFormer", 1024, 750.0, 20.0),  # 4x of 5x
        row("AnchorFormer fused", 1024, 600.0, 16.0, reliable=False),  # 5x of 6.25x
        row("DeiT", 224, 30.0, 1.26),  # no fused row at 224²: no comparison there
        row("AnchorFormer", 224, 30.0, 1.0),
    ]
    (got,) = bench.fused_comparison(models)
    assert (got["unfused_speedup"], got["unfused_mac_ratio"], got["unfused_over_macs"]) == (4.0, 5.0, 0.8)
    assert (got["fused_speedup"], got["fused_mac_ratio"], got["fused_over_macs"]) == (5.0, 6.25, 0.8)
    assert got["fused_over_unfused"] == 1.25 and got["reliable"] is False and got["time"] == "median_ms"
    md = bench.bench_markdown({"models": models, "fused": [got], "config": {}})
    assert "### The exact inference form" in md and "5.00 ⚠" in md

    gpu = [
        {**row("DeiT", 224, 20.0, 1.3, gpu_busy=0.97), "exec": "compiled", "batch": 256},
        {**row("AnchorFormer", 224, 18.0, 1.1, gpu_busy=0.93), "exec": "compiled", "batch": 256},
        {**row("DeiT", 224, 10.0, 1.3), "exec": "eager", "batch": 256},  # eager rows do not count
    ]
    targets = bench.summarize_targets({"environment": {"device_type": "cuda"}, "models": gpu})
    got_t = {t["target"]: (t["measured"], t["met"]) for t in targets}
    assert got_t["AnchorFormer-T infer speed-up over DeiT-T, 224², both compiled (GPU)"] == (1.111, True)
    assert got_t["AnchorFormer-T train speed-up over DeiT-T, 1024², both compiled (GPU)"] == (None, None)


def test_presets_select_families_modes_and_batches():
    full, mini = bench.bench_config("full"), bench.bench_config("mini")
    assert full["model_exec"] == ["eager", "compiled", "cudagraphs"] and mini["model_exec"] == ["eager"]
    assert full["model_batch"] == {224: 256, 1024: 32} and full["model_train_batch"] == {224: 256, 1024: 16}
    assert full["repeats"] >= 20 and full["reliability"]["min_timed"] >= 20
    assert mini["model_families"]["AnchorFormer fused"] == ["tiny"] and mini["model_batch"] == 1
    with pytest.raises(ValueError, match="model_batch gives no batch for the side"):
        bench.bench_config("full", ["model_img_sizes=[224,512]"])
    with pytest.raises(ValueError, match="unknown model family"):
        bench.bench_config("mini", ["model_families=[Swin]"])
    with pytest.raises(ValueError, match="model_exec must be"):
        bench.bench_config("mini", ["model_exec=[fast]"])


@pytest.mark.slow
def test_compiled_exec_mode_runs_through_the_harness_on_the_cpu():
    """The GPU's compiled modes on the CPU: torch.compile of DeiT and the fused form, timed by the scripted clock."""
    clock = ScriptedGpuClock(step_ms=[2.0, 1.0], kernel_ms=[1.9, 0.5])
    rows = bench.model_benchmark(
        ["tiny"], [32], [], batch=2, families=["DeiT", "AnchorFormer fused"], exec_modes=["compiled"], anchors=4,
        dtype=torch.float32, device=torch.device("cpu"), warmup=1, repeats=4, budget_s=0.0, process="shared",
        timer=clock,
    )  # fmt: skip
    assert [(r["family"], r["exec"], r["status"]) for r in rows] == [
        ("DeiT", "compiled", "ok"),
        ("AnchorFormer fused", "compiled", "ok"),
    ]
    assert rows[1]["host_bound"] and not rows[0]["host_bound"]
