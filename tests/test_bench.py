"""anchorformer.bench: presets, measurements, targets, outputs, the CLI and the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anchorformer import bench
from anchorformer.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = [
    "op_tokens=[33,96]",
    "op_impls=[fused,reference,sdpa]",
    "model_sizes=[tiny]",
    "model_img_sizes=[32]",
    "model_train_img_sizes=[32]",
    "warmup=1",
    "repeats=2",
    "budget_s=0.1",
]


def test_presets_load_and_overrides_apply():
    for profile in ("mini", "full"):
        cfg = bench.bench_config(profile)
        assert set(cfg["op_impls"]) <= set(bench.OP_IMPLS) and cfg["op_tokens"]
    mini = bench.bench_config("mini")
    assert mini["dtype"] == "float32" and max(mini["op_tokens"]) <= 4096  # the CPU preset stays small
    assert mini["model_processes"] == ["fresh", "shared"] and mini["threads"] == 1 and mini["malloc"] == "tuned"
    assert bench.bench_config("full")["model_processes"][0] == "fresh"  # fresh processes by default
    with pytest.raises(ValueError, match="model_processes items"):
        bench.bench_config("mini", ["model_processes=[forked]"])
    with pytest.raises(ValueError, match="malloc must be one of"):
        bench.bench_config("mini", ["malloc=jemalloc"])
    # mini: S stops at 512², and only T (the targets' model) is measured again in a shared process
    assert mini["model_skip"] == ["small@1024"] and mini["model_shared_sizes"] == ["tiny"]
    with pytest.raises(ValueError, match="model_skip items are size@side"):
        bench.bench_config("mini", ["model_skip=[huge@1024]"])
    with pytest.raises(ValueError, match="model_shared_sizes must be null or a list of model_sizes"):
        bench.bench_config("mini", ["model_sizes=[tiny]", "model_shared_sizes=[small]"])
    full = bench.bench_config("full")
    assert full["model_skip"] == [] and full["model_shared_sizes"] is None
    assert (full["op_batch"], full["op_heads"], full["op_head_dim"], full["op_anchors"]) == (8, 6, 64, 30)
    assert full["op_tokens"] == [196, 1024, 4096, 16384, 65536] and full["dtype"] == "bfloat16"
    cfg = bench.bench_config("mini", "op_tokens=[64,128] repeats=2")
    assert cfg["op_tokens"] == [64, 128] and cfg["repeats"] == 2
    with pytest.raises(ValueError, match="op_token"):
        bench.bench_config("mini", ["op_token=[1]"])
    with pytest.raises(ValueError, match="dtype"):
        bench.bench_config("mini", ["dtype=float64"])
    with pytest.raises(ValueError, match="op_tokens.*list"):
        bench.bench_config("mini", ["op_tokens=64"])
    for profile in ("mini", "full"):  # every threshold given, and overridable by its dotted key
        assert set(bench.bench_config(profile)["reliability"]) == set(bench.RELIABILITY_KEYS)
    assert bench.bench_config("mini", ["reliability.max_spread=0.3"])["reliability"]["max_spread"] == 0.3
    with pytest.raises(ValueError, match=r"unknown reliability key\(s\) \['max_spred'\]"):
        bench.bench_config("mini", ["reliability.max_spred=0.3"])
    with pytest.raises(ValueError, match=r"reliability\.min_timed must be a number >= 1; got 0"):
        bench.bench_config("mini", ["reliability.min_timed=0"])
    with pytest.raises(ValueError, match=r"reliability\.tolerance must be a number >= 1.0"):
        bench.bench_config("mini", ["reliability.tolerance=0.5"])


def test_measure_times_interleaves_and_counts():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    out = bench.measure_times({"a": make("a"), "b": make("b")}, torch.device("cpu"), warmup=2, repeats=3, budget_s=10)
    assert calls == {"a": 5, "b": 5}
    assert out["a"]["n_timed"] == out["b"]["n_timed"] == 3
    assert 0 <= out["a"]["min_ms"] <= out["a"]["median_ms"]


def test_timing_stats_give_the_spread():
    stats = bench.timing_stats([12.0, 10.0, 11.0, 30.0, 10.0])
    assert (stats["median_ms"], stats["min_ms"], stats["max_ms"], stats["n_timed"]) == (11.0, 10.0, 30.0, 5)
    assert (stats["q1_ms"], stats["q3_ms"]) == (10.0, 12.0) and stats["spread"] == round(2 / 11, 4)
    assert bench.timing_stats([5.0, 7.0])["median_ms"] == 6.0
    assert bench.timing_stats([5.0])["spread"] is None  # one call has no spread
    with pytest.raises(ValueError, match="no timed calls"):
        bench.timing_stats([])


THRESHOLDS = {"min_timed": 2, "max_spread": 0.1, "max_wait": 1.25, "tolerance": 1.25}


def _model_row(family, mode, ms, *, img=224, spread=0.02, n_timed=5, cpu_ms=None, threads=1, process="fresh"):
    return {
        "family": family,
        "size": "T",
        "model": f"{family.lower()}_tiny",
        "img_size": img,
        "batch": 1,
        "mode": mode,
        "process": process,
        "dtype": "float32",
        "status": "ok",
        "median_ms": ms,
        "min_ms": ms * 0.98,
        "spread": spread,
        "n_timed": n_timed,
        "cpu_median_ms": ms if cpu_ms is None else cpu_ms,
        "threads": threads,
        "gmacs": 1.0 if family == "DeiT" else 0.8,
    }


def test_reliability_flags_spread_few_calls_and_waiting_for_the_core():
    rows = [
        _model_row("DeiT", "infer", 30.0),  # quiet: reliable
        _model_row("AnchorFormer", "infer", 25.0, spread=0.4),  # 40 % spread
        _model_row("DeiT", "infer", 300.0, img=512, n_timed=1, spread=None),  # one call
        _model_row("AnchorFormer", "infer", 200.0, img=512, cpu_ms=100.0),  # waited half the time
        _model_row("DeiT", "infer", 2000.0, img=1024, cpu_ms=1000.0, threads=2),  # two threads: not comparable
        {**_model_row("AnchorFormer", "infer", 1.0, img=1024), "status": "error: out of memory"},
    ]
    results = {"environment": {"device_type": "cpu"}, "models": rows}
    bench.assess_reliability(results, THRESHOLDS)
    assert [r.get("reliable") for r in rows] == [True, False, False, False, True, None]
    assert rows[0]["why"] == [] and rows[4]["why"] == []
    assert rows[1]["why"] == ["spread (q3 - q1) / median 40.0% > max_spread 10.0%"]
    assert rows[2]["why"] == ["1 timed call(s) < min_timed 2: no spread"]
    assert "waited for its core" in rows[3]["why"][0] and "200 ms vs CPU time 100 ms" in rows[3]["why"][0]
    assert "why" not in rows[5]  # not measured: nothing to assess
    looser = {**THRESHOLDS, "max_spread": 0.5, "max_wait": 3.0, "min_timed": 1}
    bench.assess_reliability(results, looser)  # the thresholds decide
    assert [r.get("reliable") for r in rows[:5]] == [True] * 5
    with pytest.raises(ValueError, match="reliability.max_wait must be a number >= 1.0"):
        bench.assess_reliability(results, {**THRESHOLDS, "max_wait": 0.5})


def test_reliability_flags_inconsistent_figures_and_the_targets_from_them():
    # the loaded machine: DeiT-T inference at 1,364 ms, its training step at 103.5 ms (same input)
    models = [
        _model_row("DeiT", "infer", 1364.0),
        _model_row("DeiT", "train", 103.5),
        _model_row("AnchorFormer", "infer", 30.0),
        _model_row("AnchorFormer", "train", 95.0),
        _model_row("DeiT", "infer", 60.0, process="shared"),  # another process: no pair with the train rows
        _model_row("AnchorFormer", "infer", 50.0, process="shared"),
    ]

    def op(impl, mode, n, ms):
        shape = {"batch": 1, "heads": 3, "head_dim": 64, "anchors": 30, "dtype": "float32"}
        return {"impl": impl, "mode": mode, "tokens": n, "status": "ok", "median_ms": ms, "n_timed": 5, **shape}

    operator = [
        op("reference", "fwd", 1024, 2.0),
        op("reference", "fwd_bwd", 1024, 1.0),  # forward slower than forward+backward
        op("reference", "fwd", 4096, 8.0),
        op("reference", "fwd_bwd", 4096, 24.0),
        op("sdpa", "fwd", 1024, 5.0),  # fewer tokens slower than more
        op("sdpa", "fwd", 4096, 3.0),
        op("sdpa", "fwd_bwd", 1024, 9.0),
        op("sdpa", "fwd_bwd", 4096, 8.0),  # within the tolerance (9 <= 1.25 x 8)
    ]
    results = {"environment": {"device_type": "cpu"}, "models": models, "operator": operator}
    bench.assess_reliability(results, THRESHOLDS)
    assert [r["reliable"] for r in models] == [False, False, True, True, True, True]
    (why,) = models[0]["why"]
    assert why == models[1]["why"][0]
    assert why == (
        "inference slower than a training step: DeiT-T 224² infer (fresh process) 1364 ms > 1.25 x "
        "DeiT-T 224² train (fresh process) 103.5 ms"
    )
    assert [r["reliable"] for r in operator] == [False, False, True, True, False, False, True, True]
    assert operator[0]["why"] == [
        "forward slower than forward+backward: reference fwd N=1024 2 ms > 1.25 x reference fwd_bwd N=1024 1 ms"
    ]
    assert operator[4]["why"] == ["fewer tokens slower than more: sdpa fwd N=1024 5 ms > 1.25 x sdpa fwd N=4096 3 ms"]

    # a target from a flagged figure keeps its value and claims nothing; the others still do
    targets = {t["target"]: t for t in bench.summarize_targets(results)}
    t224 = targets["AnchorFormer-T inference speed-up over DeiT-T, 224² (CPU, fresh process)"]
    assert t224["measured"] == round(1364.0 / 30.0, 3) and t224["met"] is None and t224["reliable"] is False
    assert t224["why"] == ["from unreliable figures: DeiT-T 224² infer (fresh process)"]
    shared = targets["AnchorFormer-T inference speed-up over DeiT-T, 224² (CPU, shared process)"]
    assert shared["met"] is True and shared["reliable"] is True and shared["why"] == []

    # the page marks them: no plain number for a flagged figure, no yes/no for its target
    md = bench.bench_markdown({**results, "config": {"reliability": THRESHOLDS}, "targets": list(targets.values())})
    assert "| DeiT-T | 224² | 1 | infer | eager | fresh | 1364.0 ⚠ |" in md
    assert "| AnchorFormer-T | 224² | 1 | infer | eager | fresh | 30.0 | 30.0 | 2% | — | — | ok |" in md
    assert "⚠ unreliable: inference slower than a training step" in md
    assert "| reference | fwd | 1024 | 2.000 ⚠ |" in md
    row = next(
        line
        for line in md.splitlines()
        if line.startswith("| AnchorFormer-T inference speed-up over DeiT-T, 224² (CPU, fresh")
    )
    assert "45.467 ⚠" in row and "| — (⚠ unreliable) |" in row and "| yes |" not in row and "| no |" not in row
    assert "6 of 14 measured figures flagged unreliable" in md


def test_peak_memory_on_cpu_sees_a_known_allocation():
    n = 2_000_000  # 8 MB of fp32

    def fn():
        x = torch.ones(n)
        return float(x.sum())

    peak = bench.measure_peak_bytes(fn, torch.device("cpu"))
    assert 4 * n <= peak < 4 * n + 1_000_000


def test_peak_memory_on_cpu_prints_no_profiler_or_cuda_noise():
    """kineto's USDT probe lines and its failed GPU probe stay off stderr (a fresh process: it logs once per process)."""
    code = (
        "import torch\n"
        "from anchorformer import bench\n"
        "for _ in range(2):\n"
        "    print(bench.measure_peak_bytes(lambda: float(torch.ones(1_000_000).sum()), torch.device('cpu')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = [int(x) for x in proc.stdout.split()]
    assert len(peaks) == 2 and all(4_000_000 <= p < 4_100_000 for p in peaks), peaks
    assert "USDT" not in proc.stderr and "gpuGetDeviceCount" not in proc.stderr, proc.stderr[-3000:]


def test_operator_benchmark_rows_on_cpu():
    rows = bench.operator_benchmark(
        [33, 96],
        batch=1,
        heads=2,
        head_dim=32,
        anchors=7,
        dtype=torch.float32,
        device=torch.device("cpu"),
        impls=["fused", "reference", "sdpa"],
        warmup=1,
        repeats=2,
        budget_s=0.1,
        sdpa_max_tokens=40,
    )
    assert len(rows) == 2 * 3 * 2
    by = {(r["impl"], r["mode"], r["tokens"]): r for r in rows}
    assert by[("fused", "fwd", 33)]["status"].startswith("skipped: the fused Triton kernels run on CUDA")
    assert by[("sdpa", "fwd", 96)]["status"].startswith("skipped: N > sdpa_max_tokens")
    for key in [("reference", "fwd", 33), ("reference", "fwd_bwd", 96), ("sdpa", "fwd_bwd", 33)]:
        r = by[key]
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["n_timed"] >= 1
        assert r["peak_bytes"] > 0 and r["io_bytes"] > 0
    r = by[("reference", "fwd", 96)]
    elem = 4
    assert r["io_bytes"] == (3 * 96 * 32 * 2 + 7 * 32) * elem  # qk, v, out + anchors
    assert r["peak_bytes"] >= r["io_bytes"]  # the inputs and the output are all alive at the end
    assert r["traffic_bytes"] == 3 * 96 * 32 * 2 * elem
    with pytest.raises(ValueError, match="unknown operator impls"):
        bench.operator_benchmark(
            [8],
            batch=1,
            heads=1,
            head_dim=16,
            anchors=2,
            dtype=torch.float32,
            device=torch.device("cpu"),
            impls=["flash"],
        )


@pytest.mark.slow
def test_compiled_reference_is_checked_against_eager():
    rows = bench.operator_benchmark(
        [40],
        batch=1,
        heads=2,
        head_dim=16,
        anchors=5,
        dtype=torch.float32,
        device=torch.device("cpu"),
        impls=["reference_compiled"],
        modes=["fwd"],
        warmup=1,
        repeats=1,
        budget_s=0.1,
        compile_dynamic=True,
    )
    (row,) = rows
    assert row["status"] == "ok" and row["check_ok"] is True and row["max_abs_err"] < 1e-5


def test_summarize_targets_cpu_and_gpu():
    def model(family, img, ms, gmacs, process="fresh", **kw):
        return {
            **kw,
            "family": family,
            "size": "T",
            "img_size": img,
            "mode": "infer",
            "status": "ok",
            "median_ms": ms,
            "min_ms": ms * 0.95,
            "gmacs": gmacs,
            "process": process,
        }

    models = [
        model("DeiT", 1024, 3000.0, 100.0),
        model("AnchorFormer", 1024, 700.0, 20.0),  # 4.29x of a 5x MAC ratio: 0.857
        model("DeiT", 512, 400.0, 20.0),
        model("AnchorFormer", 512, 200.0, 10.0),  # 2x of 2x: 1.0
        model("DeiT", 224, 35.0, 1.26),
        model("AnchorFormer", 224, 40.0, 1.0),
        # one thread: the CPU times decide (5x of 5x), not the wall-clock medians (3000 / 700)
        model("DeiT", 1024, 3000.0, 100.0, "shared", threads=1, cpu_median_ms=2500.0),
        model("AnchorFormer", 1024, 700.0, 20.0, "shared", threads=1, cpu_median_ms=500.0),
    ]
    targets = bench.summarize_targets({"environment": {"device_type": "cpu"}, "models": models})
    got = {t["target"]: (t["measured"], t["met"]) for t in targets}
    assert got == {
        "AnchorFormer-T inference speed-up over DeiT-T / MAC ratio, 512² (CPU, fresh process)": (1.0, True),
        "AnchorFormer-T inference speed-up over DeiT-T / MAC ratio, 1024² (CPU, fresh process)": (0.857, False),
        "AnchorFormer-T inference speed-up over DeiT-T, 224² (CPU, fresh process)": (0.875, False),
        "AnchorFormer-T inference speed-up over DeiT-T / MAC ratio, 512² (CPU, shared process)": (None, None),
        "AnchorFormer-T inference speed-up over DeiT-T / MAC ratio, 1024² (CPU, shared process)": (1.0, True),
        "AnchorFormer-T inference speed-up over DeiT-T, 224² (CPU, shared process)": (None, None),
    }
    assert "MAC ratio 5.00x" in targets[1]["note"]

    def op(impl, mode, n, ms, **kw):
        return {"impl": impl, "mode": mode, "tokens": n, "status": "ok", "median_ms": ms, **kw}

    operator = [
        op("reference", "fwd_bwd", 4096, 3.0),
        op("reference_compiled", "fwd_bwd", 4096, 1.2),
        op("fused", "fwd_bwd", 4096, 1.0),
        op("sdpa", "fwd_bwd", 16384, 50.0),
        op("fused", "fwd_bwd", 16384, 4.0),
        op("fused", "fwd", 16384, 1.0, kernel_gbps=3000.0),
        op("fused", "fwd", 65536, 4.0, kernel_gbps=1500.0, peak_over_io=1.05),
        op("fused", "fwd_bwd", 65536, 16.0, peak_over_io=1.3),
    ]
    env = {"device_type": "cuda", "peak_bandwidth_bytes_per_s": 3.35e12, "device": "H100"}
    got = {
        t["target"]: (t["measured"], t["met"])
        for t in bench.summarize_targets({"environment": env, "operator": operator})
    }
    assert got["fused fwd+bwd speed-up over eager reference, N=4096"] == (3.0, True)
    assert got["fused fwd+bwd speed-up over compiled reference, N=4096"] == (1.2, False)
    assert got["fused fwd+bwd speed-up over softmax attention (sdpa), N=16384"] == (12.5, False)  # >= 30x
    assert got["fused forward bandwidth / peak, N >= 16384 (worst N)"] == (round(1500 / 3350, 3), False)
    assert got["fused fwd peak memory / (inputs + outputs), N=65536"] == (1.05, True)
    assert got["fused fwd_bwd peak memory / (inputs + outputs), N=65536"] == (1.3, False)


@pytest.mark.slow
def test_cli_writes_json_markdown_and_figures(tmp_path):
    """The operator part through the command line (the notebook test below covers the models)."""
    argv = ["bench", "--profile", "mini", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "cpu_smoke"]
    argv += ["--only", "operator"]
    for item in TINY_OVERRIDES:
        argv += ["--set", item]
    assert cli_main(argv) == 0
    data = json.loads((tmp_path / "cpu_smoke.json").read_text())
    assert data["complete"] is True
    env = data["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["timm"] and env["triton"]
    assert data["config"]["op_tokens"] == [33, 96] and data["config"]["dtype"] == "float32"
    assert {(r["impl"], r["mode"], r["tokens"]) for r in data["operator"]} == {
        (i, m, n) for i in ("fused", "reference", "sdpa") for m in ("fwd", "fwd_bwd") for n in (33, 96)
    }
    assert data["models"] == [] and not (tmp_path / "cpu_smoke_models.png").exists()
    assert "| reference | fwd | 33 |" in (tmp_path / "cpu_smoke.md").read_text()
    assert (tmp_path / "cpu_smoke_operator.png").stat().st_size > 5000
    assert (tmp_path / "cpu_smoke_operator.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_cli_rejects_unknown_keys_and_missing_cuda(tmp_path, capsys):
    assert cli_main(["bench", "--out-dir", str(tmp_path), "--set", "op_tokenz=[1]"]) == 2
    assert "op_tokenz" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["bench", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.slow
def test_notebook_runs_with_its_smoke_defaults(tmp_path):
    out_dir = tmp_path / "bench"
    argv = [
        sys.executable,
        "-m",
        "papermill",
        "notebooks/02_benchmark.ipynb",
        str(tmp_path / "nb.ipynb"),
        "--cwd",
        ".",
        "-p",
        "out_dir",
        str(out_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out_dir / "bench.json").read_text())
    assert data["complete"] and data["operator"]
    fams = {(r["family"], r["mode"]): r for r in data["models"]}
    want = {(f, m) for f in ("DeiT", "AnchorFormer") for m in ("infer", "train")} | {("AnchorFormer fused", "infer")}
    assert set(fams) == want  # the preset's families; the fused inference form does not train
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["models"])
    fused = [(r["process"], r["size"], r["img_size"]) for r in data["fused"]]  # fused beside unfused, per process
    assert fused == [("fresh", "T", 64), ("shared", "T", 64)]
    assert [t["target"] for t in data["targets"]][0].startswith("AnchorFormer-T inference speed-up")
    assert set(data["summary"]) == {bench._slug(t["target"]) for t in data["targets"]}
    for stem in ("bench_operator", "bench_models"):
        assert (out_dir / f"{stem}.png").stat().st_size > 5000
        assert (out_dir / f"{stem}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


@pytest.mark.slow
def test_models_in_fresh_and_shared_processes():
    """Each configuration in its own process, then all in this one; the rows say which, with MACs."""
    common = dict(batch=1, anchors=4, dtype=torch.float32, device=torch.device("cpu"), repeats=1, budget_s=0.05)
    rows = []
    for process in ("fresh", "shared"):
        rows += bench.model_benchmark(["tiny"], [32], [], process=process, threads=1, malloc="tuned", **common)
    assert [(r["family"], r["process"]) for r in rows] == [
        ("DeiT", "fresh"),
        ("AnchorFormer", "fresh"),
        ("DeiT", "shared"),
        ("AnchorFormer", "shared"),
    ]
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["threads"] == 1 and r["gmacs"] > 0
        assert r["malloc"] == "tuned"
    # the counted MACs: AnchorFormer's attention is cheaper than DeiT's, the linear layers alike
    assert rows[1]["gmacs"] < rows[0]["gmacs"]
    with pytest.raises(ValueError, match="model process must be one of"):
        bench.model_benchmark(["tiny"], [32], [], process="forked", **common)
    # a skipped size@side is not measured; the other sides are
    kept = bench.model_benchmark(["tiny"], [32, 48], [], process="shared", skip=["tiny@32"], **common)
    assert {r["img_size"] for r in kept} == {48}
