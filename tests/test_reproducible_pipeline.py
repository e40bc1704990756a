"""The same parameters and seed give the same bytes: a two-stage DVC pipeline, run twice.

A scratch DVC repository holds two stages built from the real ones: a classification run (notebook
10, smoke size) declaring the outputs ``cls-e1`` declares, and the classification results
(notebook 11) over it. ``dvc repro`` and then ``dvc repro --force`` must record the same hash for
every output in ``dvc.lock``; only the undeclared ``timings.json`` may differ. Pushed to a remote
and committed, a second clone's ``dvc pull`` restores every output, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_PREFIX = "outputs/cls/e1/${item.model}"
RESULTS_PREFIX = "outputs/cls/results"


def _outs(stage: dict, prefix: str, new: str) -> dict:
    """The stage's outs/metrics/plots with ``prefix`` replaced by ``new``."""
    moved = {}
    for key in ("outs", "metrics", "plots"):
        entries = []
        for entry in stage.get(key, []):
            if isinstance(entry, str):
                entries.append(entry.replace(prefix, new))
            else:
                ((path, opts),) = entry.items()
                entries.append({path.replace(prefix, new): opts})
        if entries:
            moved[key] = entries
    return moved


def _pipeline() -> dict:
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    runner = f"python3 {ROOT / 'scripts' / 'run_stage.py'}"
    train = {
        "cmd": f"{runner} {ROOT / 'notebooks' / '10_classification.ipynb'} run/10_classification.ipynb --cwd . "
        "-p out_dir run -p smoke 1",
        **_outs(real["cls-e1"], RUN_PREFIX, "run"),
    }
    results = {
        "cmd": f"{runner} {ROOT / 'notebooks' / '11_classification_results.ipynb'} "
        "res/11_classification_results.ipynb --cwd . -p out_dir res -p e1_dirs run",
        "deps": ["run"],  # the whole run folder: its timings.json is not hashed (.dvcignore)
        **_outs(real["cls-results"], RESULTS_PREFIX, "res"),
    }
    return {"stages": {"train": train, "results": results}}


def _hashes(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text(encoding="utf-8"))["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])}


def _dep_hashes(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text(encoding="utf-8"))["stages"]
    return {d["path"]: d["md5"] for s in stages.values() for d in s.get("deps", []) if "md5" in d}


def _dvc(repo: Path, *args: str) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_two_runs_of_a_two_stage_pipeline_give_the_same_hashes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(_pipeline(), sort_keys=False), encoding="utf-8")

    _dvc(repo, "repro")
    first = _hashes(repo / "dvc.lock")
    first_deps = _dep_hashes(repo / "dvc.lock")
    timings = json.loads((repo / "run" / "timings.json").read_text(encoding="utf-8"))
    _dvc(repo, "repro", "--force")
    second = _hashes(repo / "dvc.lock")
    # the folder the results stage depends on holds timings.json, which differs, yet hashes the same
    assert first_deps == _dep_hashes(repo / "dvc.lock") and "run" in first_deps

    # every output declared by the real stages is hashed, the checkpoint and weights included
    assert {"run/model.pth", "run/model.safetensors", "run/10_classification.ipynb", "run/checkpoints"} <= set(first)
    assert any(p.startswith("res/") for p in first)
    changed = sorted(p for p in first if first[p] != second.get(p))
    assert not changed, f"outputs that differ between two runs with the same seed: {changed}"
    # the timings are real, and kept apart from what DVC hashes
    assert timings["throughput"] > 0 and len(timings["epoch_time_s"]) == 1 and "machine" in timings
    metrics = json.loads((repo / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert not {"throughput", "train_time_s"} & set(metrics)
    assert "timings.json" not in first and "run/timings.json" not in first

    # pushed from here and committed, another clone pulls every output back
    _dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "store"))
    _dvc(repo, "push")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(git + ["commit", "-qm", "run"], cwd=repo, check=True, capture_output=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, capture_output=True)
    _dvc(clone, "pull")
    for path in second:
        a, b = repo / path, clone / path
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [Path()]
        for f in files:
            assert (b / f).read_bytes() == (a / f).read_bytes(), f"{path}/{f}"
