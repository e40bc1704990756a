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
    full = bench.bench_config("full")
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


def test_peak_memory_on_cpu_sees_a_known_allocation():
    n = 2_000_000  # 8 MB of fp32

    def fn():
        x = torch.ones(n)
        return float(x.sum())

    peak = bench.measure_peak_bytes(fn, torch.device("cpu"))
    assert 4 * n <= peak < 4 * n + 1_000_000


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
    assert set(fams) == {(f, m) for f in ("DeiT", "AnchorFormer") for m in ("infer", "train")}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["models"])
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
