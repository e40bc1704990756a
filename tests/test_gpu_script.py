"""benchmarks/gpu.sh: syntax, a clear message without the virtual environment, one budget for all."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")


def _run(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_missing_virtual_environment_is_a_clear_error(tmp_path):
    proc = _run({"PYTHON": str(tmp_path / "no-venv" / "bin" / "python")})
    assert proc.returncode == 2
    assert "no Python at" in proc.stderr and "make env" in proc.stderr


def test_dry_run_lists_every_part_under_its_cap(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    proc = _run({"PYTHON": str(fake), "DRY_RUN": "1", "OUT_DIR": str(tmp_path / "out"), "BUDGET_S": "600"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    caps = [int(line.split("at most ")[1].split(" s)")[0]) for line in proc.stdout.splitlines() if "would run" in line]
    parts = [line for line in proc.stdout.splitlines() if "would run" in line]
    assert any("anchorformer.cli bench --profile full" in p for p in parts)
    assert any("-m gpu and not slow" in p for p in parts)
    assert sum("anchorformer.cli train" in p for p in parts) == 3
    assert any("benchmarks/dry_runs.sh cuda" in p for p in parts)  # the full recipes' dry runs
    assert all(0 < c <= 300 for c in caps), caps
    assert not any(p.name.startswith("dry_run") for p in (ROOT / "benchmarks" / "results").iterdir())


def test_default_budget_is_eight_minutes_and_compiling_comes_after_the_kernel_tests(tmp_path):
    """The operator table and the eager models, the kernel tests and then the compiled models, in
    that order: their caps fit the default 480 s (the tasks and dry runs get only what is left)."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {"PYTHON": str(fake), "DRY_RUN": "1", "OUT_DIR": str(tmp_path / "out")}
    proc = _run({**env, "SKIP_TASKS": "", "SKIP_DRY_RUNS": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "budget 480 s" in proc.stdout
    parts = [line for line in proc.stdout.splitlines() if "would run" in line]
    caps = [int(line.split("at most ")[1].split(" s)")[0]) for line in parts]
    bench, tests, compiled = parts[1], parts[2], parts[3]  # parts[0]: the import check
    assert "bench --profile full" in bench and "model_exec=[eager]" in bench and "--only" not in bench
    assert "-m gpu and not slow" in tests
    assert "--only models" in compiled and "model_exec=[compiled,cudagraphs]" in compiled
    assert sum(caps[1:4]) <= 480 - 5, caps
    from anchorformer.bench import bench_config
    from anchorformer.cli import build_parser

    for line in (bench, compiled):  # the commands as the CLI parses them, and their presets as they load
        args = build_parser().parse_args(line.split("anchorformer.cli ")[1].split())
        cfg = bench_config(args.profile, args.set)
        assert cfg["model_sizes"] == ["tiny"] and cfg["model_processes"] == ["shared"] and args.device == "cuda"
    assert bench_config("full", args.set)["model_exec"] == ["compiled", "cudagraphs"] and args.only == "models"


@pytest.mark.slow
def test_the_whole_script_keeps_its_budget(tmp_path):
    """Every part hangs (a Python that sleeps): the script still ends within BUDGET_S."""
    fake = tmp_path / "python"
    # the import and CUDA checks pass; everything else (bench, tests, tasks) hangs
    fake.write_text('#!/bin/sh\ncase "$*" in\n  *"-c "*) echo Fake GPU; exit 0;;\nesac\nexec sleep 1000\n')
    fake.chmod(0o755)
    budget = 45
    t0 = time.monotonic()
    proc = _run({"PYTHON": str(fake), "BUDGET_S": str(budget), "OUT_DIR": str(tmp_path / "out")}, timeout=budget + 60)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed <= budget + 3, f"took {elapsed:.0f} s for a budget of {budget} s\n{proc.stdout}\n{proc.stderr}"
    assert "skipped" in proc.stdout + proc.stderr  # the parts after the hanging benchmark had no time left
