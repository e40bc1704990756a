"""scripts/run_stage.py: how every DVC stage runs its notebook.

The environment check (one line, exit 2, or the project's .venv), papermill's typing of ``-p``
values, timestamps stripped, the package's log on the terminal and not in the notebook, and the
same notebook and figures from the same parameters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_stage.py"
_spec = importlib.util.spec_from_file_location("run_stage", SCRIPT)
run_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_stage)


def _commands() -> dict[str, str]:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: str(stage.get("do", stage)["cmd"]) for name, stage in raw["stages"].items()}


def test_every_stage_runs_its_notebook_through_the_runner():
    for name, cmd in _commands().items():
        assert cmd.startswith("python3 scripts/run_stage.py notebooks/"), f"stage {name!r}: {cmd[:80]}"
        assert "papermill" not in cmd and "mkdir" not in cmd, f"stage {name!r}: {cmd[:80]}"


@pytest.mark.parametrize("value", ["True", "False", "None", "0", "-3", "1e-4", "0.5", "", "a b", "1 2", "nan", "x=1"])
def test_parameters_are_typed_as_papermill_types_them(value):
    from papermill.cli import _resolve_type

    ours, theirs = run_stage.resolve_type(value), _resolve_type(value)
    assert type(ours) is type(theirs) and (ours == theirs or ours != ours), (value, ours, theirs)


def test_timestamps_are_stripped():
    nb = nbformat.v4.new_notebook()
    nb.metadata.papermill = {"start_time": "t", "end_time": "t", "duration": 1.0, "parameters": {"a": 1}}
    cell = nbformat.v4.new_code_cell("1")
    cell.metadata.papermill = {"start_time": "t", "end_time": "t", "duration": 1.0, "status": "completed"}
    cell.metadata.execution = {"iopub.execute_input": "t", "shell.execute_reply": "t"}
    injected = nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["injected-parameters"]})
    nb.cells = [cell, injected]
    run_stage.strip_timing(nb)
    assert injected.id == "injected-parameters"
    assert nb.metadata.papermill == {"parameters": {"a": 1}}
    assert nb.cells[0].metadata == {"papermill": {"status": "completed"}}
    nbformat.validate(nb)


def _fake_repo(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "run_stage.py")
    return tmp_path


def test_without_the_environment_one_line_says_what_to_do(tmp_path):
    """An interpreter without the packages (here: no site-packages) and no .venv: exit 2, one line."""
    repo = _fake_repo(tmp_path)
    env = {"PATH": os.environ.get("PATH", ""), "DVC_STAGE": "cls-e1@deit_tiny_patch16_224"}
    done = subprocess.run(
        [sys.executable, "-S", "scripts/run_stage.py", "in.ipynb", "out.ipynb"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks papermill" in lines[0], done.stderr
    assert "source .venv/bin/activate" in lines[0] and "make repro" in lines[0]
    assert "dvc checkout cls-e1@deit_tiny_patch16_224" in lines[0]


def test_without_the_environment_the_projects_venv_is_used(tmp_path):
    """.venv/bin/python exists: the runner continues with it (``.venv/bin/dvc repro`` without activating)."""
    repo = _fake_repo(tmp_path)
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"  # stands for the project's interpreter
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-S", "scripts/run_stage.py", "--help"],
        cwd=repo, env={"PATH": os.environ.get("PATH", "")}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: run_stage.py" in done.stdout


def _run_complexity(tmp_path: Path, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name
    argv = [
        sys.executable,
        str(SCRIPT),
        "notebooks/01_complexity.ipynb",
        str(out / "01_complexity.ipynb"),
        "--cwd",
        ".",
    ]
    for k, v in {
        "out_dir": str(out),
        "sizes": "tiny",
        "anchors": "16",
        "img_sizes": "224",
        "resolutions": "224 448",
    }.items():
        argv += ["-p", k, v]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


@pytest.mark.slow
def test_same_parameters_give_the_same_notebook_and_figures(tmp_path):
    first, a = _run_complexity(tmp_path, "a")
    _, b = _run_complexity(tmp_path, "b")
    # the cells' output streams to the terminal while the notebook runs
    assert "Executing Cell 5" in first.stderr and "Ending Cell 5" in first.stderr
    executed = nbformat.read(a / "01_complexity.ipynb", as_version=4)
    assert executed.metadata.kernelspec.name == "anchorformer"
    assert "start_time" not in executed.metadata.papermill
    assert not any("execution" in c.metadata or "start_time" in c.metadata.get("papermill", {}) for c in executed.cells)
    # a figure is shown in the notebook, not its paths
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))

    def digest(path: Path) -> str:
        text = path.read_bytes().replace(str(path.parent).encode(), b"OUT")  # the out_dir parameter differs
        return hashlib.sha256(text).hexdigest()

    for name in ("01_complexity.ipynb", "gmacs_vs_resolution.png", "gmacs_vs_resolution.svg", "complexity.json"):
        assert digest(a / name) == digest(b / name), name


def test_the_package_log_reaches_the_terminal_and_not_the_notebook(tmp_path):
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "anchorformer", "display_name": "x", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import logging\nlogging.getLogger('anchorformer.test').info('epoch %d/8 loss 0.5', x)"
        ),
        nbformat.v4.new_code_cell("print('printed', x)"),
        nbformat.v4.new_code_cell(
            "import anchorformer.console as c\nfrom anchorformer.engine.logging import progress\n"
            "print('kernel', c.in_interactive_kernel(), c.show_progress())\nfor _ in progress(range(3)): pass"
        ),
    ]
    nbformat.write(nb, tmp_path / "in.ipynb")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "in.ipynb", "sub/out.ipynb", "-p", "x", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "anchorformer.test: epoch 3/8 loss 0.5" in done.stderr
    assert "printed 3" in done.stderr
    out = nbformat.read(tmp_path / "sub" / "out.ipynb", as_version=4)
    texts = [o.get("text", "") for c in out.cells for o in c.get("outputs", [])]
    assert "printed 3\n" in texts and not any("epoch" in t for t in texts)
    # no progress bar (a widget or text) in a stage's notebook: nothing there depends on the clock
    assert "kernel False False\n" in texts
    assert not any(o.get("output_type") == "display_data" for c in out.cells for o in c.get("outputs", []))


def test_make_env_registers_the_kernel_inside_the_venv_and_lab_runs_as_root():
    makefile = (ROOT / "Makefile").read_text()
    assert "ipykernel install --sys-prefix --name anchorformer" in makefile and "--user" not in makefile
    assert "env: $(STAMP) $(KERNEL) $(LAB_OVERRIDES)" in makefile
    lab = makefile[makefile.index("\nlab:") :]
    assert "$(LAB_FLAGS)" in lab.splitlines()[2] and "--allow-root" in makefile
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "lab", "VENV=/nonexistent", "LAB_FLAGS=--allow-root"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Lab serves the repository (the report, outputs/, the README open from its file browser) and opens on notebooks/
    want = f'/nonexistent/bin/jupyter lab --ServerApp.root_dir="{ROOT}" --ServerApp.default_url=/lab/tree/notebooks --allow-root'
    assert done.stdout.strip().splitlines()[-1] == want, done.stdout
