"""dvc.yaml, params.yaml and the notebooks agree; a stage's command (scripts/run_stage.py) runs as written."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def resolved_stages() -> dict[str, dict]:
    """Every stage of dvc.yaml with foreach/matrix expanded and ${...} interpolated, by DVC itself."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {}
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue
            params = []
            for dep in stage.deps:
                if hasattr(dep, "params"):
                    params.extend(dep.params or [])
            stages[stage.name] = {
                "cmd": stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
                "params": params,
                "deps": [str(Path(d.def_path)) for d in stage.deps if not hasattr(d, "params")],
                "outs": [str(Path(o.def_path)) for o in stage.outs],  # outs, metrics and plots
            }
    return stages


def papermill_calls(cmd: str) -> list[tuple[str, str, dict[str, str]]]:
    """(input notebook, output notebook, {-p name: value}) for each notebook run in ``cmd``.

    A run is ``papermill IN OUT ...`` or ``python3 scripts/run_stage.py IN OUT ...`` (papermill's arguments).
    """
    calls = []
    for part in cmd.split("&&"):
        words = shlex.split(part)
        if words and Path(words[0]).name.startswith("python") and len(words) > 1:
            words = words[1:]  # python3 scripts/run_stage.py ...
        if not words or Path(words[0]).name not in ("papermill", "run_stage.py"):
            continue
        positional = [
            w for i, w in enumerate(words[1:], 1) if not w.startswith("-") and not words[i - 1].startswith("-")
        ]
        params = {}
        for i, w in enumerate(words):
            if w in ("-p", "--parameters"):
                params[words[i + 1]] = words[i + 2]
        calls.append((positional[0], positional[1], params))
    return calls


def parameter_names(notebook: Path) -> set[str]:
    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}"
    names = set()
    for line in cells[0].source.splitlines():
        line = line.split("#")[0]
        if "=" in line and not line.startswith((" ", "\t")):
            names.add(line.split("=")[0].strip())
    return names


def _lookup(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


STAGES = resolved_stages()


def test_every_stage_parameter_exists_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.get("profile") in ("mini", "full")
    for name, stage in STAGES.items():
        for p in stage["params"]:
            assert _lookup(params, p), f"stage {name!r} names parameter {p!r}, which params.yaml lacks"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_notebook_exists_and_takes_the_stage_parameters(name):
    for notebook, out, passed in papermill_calls(STAGES[name]["cmd"]):
        path = ROOT / notebook
        assert path.is_file(), f"stage {name!r} runs {notebook}, which does not exist"
        declared = parameter_names(path)
        unknown = set(passed) - declared
        assert not unknown, f"stage {name!r} passes {sorted(unknown)} that {notebook}'s parameters cell lacks"
        assert out.endswith(".ipynb")


def test_complexity_stage_command_runs_as_written(tmp_path):
    """The papermill command of the `complexity` stage, with smoke parameters and a temp folder."""
    (notebook, out, passed) = papermill_calls(STAGES["complexity"]["cmd"])[0]
    smoke = {
        **passed,
        "out_dir": str(tmp_path / "complexity"),
        "sizes": "tiny",
        "anchors": "16",
        "img_sizes": "224",
        "resolutions": "224 448",
    }
    argv = [sys.executable, "scripts/run_stage.py", notebook, str(tmp_path / Path(out).name), "--cwd", "."]
    for k, v in smoke.items():
        argv += ["-p", k, v]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(argv, cwd=ROOT, check=True, env=env, capture_output=True, timeout=600)
    tables = json.loads((tmp_path / "complexity" / "complexity.json").read_text())
    assert [r["img_size"] for r in tables["resolution"]] == [224, 448]
    assert {r["num_anchors"] for r in tables["models"]} == {None, 16}
    assert (tmp_path / "complexity" / "gmacs_vs_resolution.png").stat().st_size > 1000
    executed = nbformat.read(tmp_path / Path(out).name, as_version=4)
    assert not any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))


def test_bench_timings_stay_out_of_dvc_and_the_report():
    """The bench stage's files are timings: no DVC outs (nothing hashed), no stage reads them, git keeps them."""
    bench = STAGES["bench"]
    assert bench["outs"] == [] and bench["deps"] and "bench" in bench["params"]
    assert ("outputs/bench/02_benchmark.ipynb" in bench["cmd"]) and ("-p out_dir outputs/bench" in bench["cmd"])
    for name, stage in STAGES.items():
        assert not any(Path(d).parts[:2] == ("outputs", "bench") for d in stage["deps"]), name
        assert not any(Path(o).parts[:2] == ("outputs", "bench") for o in stage["outs"]), name
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["bench.json", "bench.md", "bench_operator.png", "bench_models.svg", "02_benchmark.ipynb"]
    paths = [f"outputs/bench/{n}" for n in names]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "", f"git ignores {done.stdout.split()}"  # 1: none ignored
