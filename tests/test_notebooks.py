"""The notebooks: stored clean, linted, and run top to bottom wherever they are started.

DVC runs them with papermill from the repository root (``--cwd .``); JupyterLab and nbval
(``make test``) start them in ``notebooks/``. The cell after the parameters moves to the
repository root, so the relative paths of the parameters mean the same in both.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("clean_notebooks", ROOT / "scripts" / "clean_notebooks.py")
clean_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clean_notebooks)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path: Path):
    """No outputs but the checked ones, no execution counts, minimal metadata, the expected cells."""
    assert clean_notebooks.problems(path) == []


def test_every_notebook_moves_to_the_root_with_the_same_cell():
    cells = {}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        cells[path.name] = nb.cells[i + 1].source
    assert len(set(cells.values())) == 1, f"the cells after the parameters differ: {json.dumps(cells, indent=1)}"


def test_clean_keeps_checked_outputs_and_drops_the_rest():
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "x", "display_name": "X"}, "widgets": {}})
    params = nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["parameters"], "collapsed": True})
    plain = nbformat.v4.new_code_cell("print(a)", execution_count=3)
    plain.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    checked = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(a)\na", execution_count=4)
    checked.outputs = [
        nbformat.v4.new_output("stream", text="1\n"),
        nbformat.v4.new_output("stream", text="2\n"),
        nbformat.v4.new_output("display_data", data={"image/png": "AAAA"}),
        nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=4),
    ]
    nb.cells = [params, plain, checked]
    del plain["id"]
    nb.nbformat_minor = 4
    out = clean_notebooks.clean(nb)
    assert out.nbformat_minor == 5 and len({c.id for c in out.cells}) == 3
    assert out.metadata == {"kernelspec": clean_notebooks.KERNELSPEC, "language_info": {"name": "python"}}
    assert out.cells[0].metadata == {"tags": ["parameters"]}
    assert out.cells[1].outputs == [] and out.cells[1].execution_count is None
    assert out.cells[2].execution_count == 1
    assert [o.output_type for o in out.cells[2].outputs] == ["stream", "execute_result"]
    assert out.cells[2].outputs[0].text == "1\n2\n" and out.cells[2].outputs[1].execution_count == 1
    assert clean_notebooks.clean(out) == out
    assert clean_notebooks.structure_problems(out) == [
        "cell 1, after the parameters, must move to the repository root: os.chdir(project_root())"
    ]


def test_notebooks_pass_ruff():
    """What `make lint` checks of the notebooks (ruff reads .ipynb files itself)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    files = [str(p) for p in NOTEBOOKS]
    for args in (["check"], ["format", "--check"]):
        res = subprocess.run([ruff, *args, *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"ruff {' '.join(args)} notebooks/*.ipynb:\n{res.stdout}{res.stderr}"


def _run(notebook: Path, cwd: Path, out: Path, **parameters) -> nbformat.NotebookNode:
    """Execute ``notebook`` with papermill in a kernel started in ``cwd`` (papermill's ``--cwd``)."""
    import papermill

    try:
        papermill.execute_notebook(
            str(notebook), str(out), parameters=parameters, cwd=str(cwd), progress_bar=False, kernel_name="python3"
        )
    except papermill.PapermillExecutionError as e:
        pytest.fail(f"{notebook.name} started in {cwd} failed in cell {e.exec_count}: {e.ename}: {e.evalue}")
    return nbformat.read(out, as_version=4)


@pytest.mark.parametrize("start", [".", "notebooks"], ids=["from-root", "from-notebooks"])
def test_notebook_paths_are_relative_to_the_root_wherever_it_starts(start: str, tmp_path: Path):
    """The cheapest notebook with a relative output folder, started at the root (DVC) and in notebooks/ (JupyterLab)."""
    rel = Path("outputs") / "smoke" / f"cwd_{Path(start).name or 'root'}"
    shutil.rmtree(ROOT / rel, ignore_errors=True)
    try:
        _run(
            ROOT / "notebooks" / "01_complexity.ipynb",
            ROOT / start,
            tmp_path / "out.ipynb",
            out_dir=str(rel),
            sizes="tiny",
            anchors="8",
            img_sizes="224",
            resolutions="224",
        )
        assert (ROOT / rel / "complexity.json").is_file()
        assert not (ROOT / "notebooks" / "outputs").exists()
    finally:
        shutil.rmtree(ROOT / rel, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_from_the_root(path: Path, tmp_path: Path):
    """Every notebook with its smoke defaults from the repository root, as DVC runs it (nbval covers notebooks/)."""
    _run(path, ROOT, tmp_path / path.name)
