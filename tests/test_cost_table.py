"""The cost table: ``benchmarks/dry_runs.sh cuda`` measures the standard models' training steps
(``benchmarks/step_costs.py``), and the README's GPU-hours table is what ``benchmarks/cost_table.py``
computes from the newest measurement (or, without one, the stated estimate)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDARD = {
    ("cls", "anchorformer_tiny_patch16_224"), ("cls", "deit_tiny_patch16_224"),
    ("cls", "anchorformer_small_patch16_224"), ("cls", "deit_small_patch16_224"), ("cls", "teacher forward"),
    ("det", "anchorformer_tiny_patch16_224"), ("det", "deit_tiny_patch16_224"),
    ("seg", "anchorformer_tiny_patch16_224:fpn"), ("seg", "deit_tiny_patch16_224:fpn"),
    ("seg", "anchorformer_small_patch16_224:upernet"), ("seg", "deit_small_patch16_224:upernet"),
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cost_table():
    return _module("cost_table")


def test_the_readme_table_is_the_generated_one(cost_table):
    table = cost_table.build_table()
    assert cost_table.readme_block() == table
    if cost_table.newest("step_costs_cuda_*.json") is None:  # this round: no CUDA step costs yet
        assert table.startswith("**An estimate, not a measurement**") and "NVIDIA_H200_20261129.json" in table
    assert table.count("\n| `") == 19  # 4 + 4 distilled + the T ablations + E10 + the seeds + 4 det + 4 seg


def _fake_measurement(results: Path, device: str = "NVIDIA Z100", tiny: bool = False) -> dict:
    """A step_costs document as the script writes it, with round numbers."""
    runs = []
    for i, (task, name) in enumerate(sorted(STANDARD)):
        row = {"task": task, "name": name, "batch": 128 if task == "cls" else 2, "status": "ok"}
        row.update(step_ms=100.0 + 10 * i, peak_memory_gb=1.0 + i)
        runs.append(row)
    doc = {"environment": {"device": device, "device_type": "cuda"}, "tiny": tiny, "steps": 20, "dtype": "bf16", "runs": runs}  # fmt: skip
    (results / "step_costs_cuda_20990101.json").write_text(json.dumps(doc))
    return doc


def test_the_newest_measurement_makes_the_table(cost_table, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    cost_table.ROOT = tmp_path  # paths in the note are relative to it
    try:
        doc = _fake_measurement(results)
        table = cost_table.build_table(results)
    finally:
        cost_table.ROOT = ROOT
    assert table.startswith("Measured on one NVIDIA Z100 (results/step_costs_cuda_20990101.json")
    row = next(r for r in doc["runs"] if r["name"] == "deit_small_patch16_224" and r["task"] == "cls")
    hours = row["step_ms"] / 1e3 / 128 * 300 * 1_281_167 / 3600  # 300 epochs of ImageNet-1k
    line = next(ln for ln in table.splitlines() if ln.startswith("| `cls-e1` DeiT-S |"))
    assert (
        line
        == f"| `cls-e1` DeiT-S | 1 | 300 epochs | {hours:,.0f} | {hours / 8:,.1f} | {row['peak_memory_gb']:.1f} GB |"
    )
    seg = next(r for r in doc["runs"] if r["name"] == "deit_small_patch16_224:upernet")
    hours = seg["step_ms"] / 1e3 / 2 * 160_000 * 16 / 3600  # 160k iterations of 16 crops
    assert f"| `seg@deit_s_upernet` | 1 | 160k iterations | {hours:,.0f} | {hours / 8:,.1f} |" in table
    assert table.endswith("(measured rates).")
    (results / "step_costs_cuda_20990101.json").unlink()
    _fake_measurement(results, tiny=True)
    with pytest.raises(ValueError, match="the tiny form measures no cost"):
        cost_table.build_table(results)


def test_step_costs_tiny_form_runs_every_standard_model_on_the_cpu():
    step_costs = _module("step_costs")
    doc = step_costs.measure("cpu", tiny=True, steps=1, warmup=0)
    assert doc["tiny"] is True and doc["environment"]["device_type"] == "cpu"
    assert {(r["task"], r["name"]) for r in doc["runs"]} == STANDARD
    for r in doc["runs"]:
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["peak_memory_gb"] is None, r
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3), rel=1e-2)


@pytest.mark.slow
def test_dry_runs_script_writes_the_step_costs(tmp_path):
    """``benchmarks/dry_runs.sh cpu`` with ``ONLY=costs``: the script's own path to the JSON."""
    env = dict(os.environ, ONLY="costs", RESULTS=str(tmp_path), PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python"
    subprocess.run(["bash", "benchmarks/dry_runs.sh", "cpu"], cwd=ROOT, env=env, check=True, timeout=900)
    (out,) = tmp_path.glob("step_costs_cpu_*.json")
    doc = json.loads(out.read_text())
    assert doc["steps"] == 2 and {(r["task"], r["name"]) for r in doc["runs"]} == STANDARD
