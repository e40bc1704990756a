"""Keep the notebooks in their stored form: the source, and the outputs nbval compares, nothing else.

The notebooks in ``notebooks/`` are the source (edit them in JupyterLab, lint them with ruff).
Stored, each has:

- notebook metadata: the project's kernelspec (``anchorformer``) and the language name only;
- code cells without outputs or execution counts, except the cells marked ``# NBVAL_CHECK_OUTPUT``
  (or tagged ``nbval-check-output``): those keep their text outputs (``stream``, ``execute_result``,
  consecutive streams merged) with execution count 1, which nbval compares with a fresh run;
- cell metadata: the tags only (``parameters`` for papermill, nbval's tags);
- exactly one cell tagged ``parameters``, followed by the cell that moves to the repository root.

Usage (from anywhere in the repository)::

    python scripts/clean_notebooks.py --check                 # exit 1 when a notebook is not clean
    python scripts/clean_notebooks.py --write [NOTEBOOK ...]  # clean in place (default: all)
    python scripts/clean_notebooks.py --store-outputs NOTEBOOK ...
        # run with the smoke defaults from the repository root (papermill), keep the checked outputs
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CHECK_MARKER = "NBVAL_CHECK_OUTPUT"
CHECK_TAG = "nbval-check-output"
# the project's kernel: `make env` registers it inside .venv; the stages run it with their own
# interpreter (scripts/run_stage.py), nbval with the current one (--nbval-current-env)
KERNELSPEC = {"display_name": "anchorformer (.venv)", "language": "python", "name": "anchorformer"}
KEPT_OUTPUTS = ("stream", "execute_result")


def is_checked(cell: nbformat.NotebookNode) -> bool:
    """Whether nbval compares the outputs of ``cell`` (``--nbval-lax``)."""
    if cell.cell_type != "code":
        return False
    marked = any(line.strip().lstrip("#").strip() == CHECK_MARKER for line in cell.source.splitlines())
    return marked or CHECK_TAG in cell.metadata.get("tags", [])


def _text_outputs(outputs: list) -> list:
    kept = []
    for out in outputs:
        if out.get("output_type") not in KEPT_OUTPUTS:
            continue
        out = copy.deepcopy(out)
        if out["output_type"] == "stream":
            text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
            if kept and kept[-1]["output_type"] == "stream" and kept[-1]["name"] == out["name"]:
                kept[-1]["text"] += text
                continue
            out["text"] = text
        else:
            out["execution_count"] = 1
            out["metadata"] = {}
        kept.append(out)
    return kept


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` in its stored form (a copy)."""
    nb = copy.deepcopy(nb)
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        cell.metadata = nbformat.from_dict({"tags": list(tags)} if tags else {})
        cell.source = cell.source.rstrip("\n")
        if cell.cell_type == "code":
            checked = is_checked(cell)
            cell.outputs = _text_outputs(cell.outputs) if checked else []
            cell.execution_count = 1 if checked and cell.outputs else None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            if not cell.get("attachments"):
                cell.pop("attachments", None)
    used = {c.get("id") for c in nb.cells}
    for i, cell in enumerate(nb.cells):  # nbformat 4.5 cells have ids; give the missing ones a free cell-N
        if not cell.get("id"):
            n = i
            while f"cell-{n}" in used:
                n += 1
            cell.id = f"cell-{n}"
            used.add(cell.id)
    return nb


def structure_problems(nb: nbformat.NotebookNode) -> list[str]:
    """What is wrong with the cells papermill and the working directory rely on."""
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        return [f"expected exactly one cell tagged 'parameters', found {len(params)}"]
    i = params[0]
    after = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
    if after is None or after.cell_type != "code" or not moves_to_root(after.source):
        return [f"cell {i + 1}, after the parameters, must move to the repository root: os.chdir(project_root())"]
    return []


def moves_to_root(source: str) -> bool:
    """Whether ``source`` calls ``os.chdir(project_root())`` at its top level."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (
            isinstance(call, ast.Call)
            and ast.unparse(call.func) == "os.chdir"
            and len(call.args) == 1
            and ast.unparse(call.args[0]) == "project_root()"
        ):
            return True
    return False


def stored_text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def problems(path: Path) -> list[str]:
    """Why ``path`` is not in its stored form (empty when it is)."""
    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    found = structure_problems(nb)
    if stored_text(clean(nb)) != text:
        found.append("not clean (outputs, execution counts or metadata): run python scripts/clean_notebooks.py --write")
    return found


def store_outputs(path: Path) -> None:
    """Run ``path`` with its smoke defaults from the repository root and keep the checked cells' outputs."""
    import papermill

    spec = importlib.util.spec_from_file_location("run_stage", Path(__file__).with_name("run_stage.py"))
    run_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_stage)

    nb = nbformat.read(path, as_version=4)
    with run_stage.kernel_of_this_interpreter(KERNELSPEC["name"]) as kernel:
        executed = papermill.execute_notebook(str(path), None, cwd=str(ROOT), kernel_name=kernel, progress_bar=False)
    ran = {c.id: c for c in executed.cells}
    for cell in nb.cells:
        if is_checked(cell):
            cell.outputs = ran[cell.id].outputs
    path.write_text(stored_text(clean(nb)), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a notebook is not in its stored form")
    mode.add_argument("--write", action="store_true", help="clean the notebooks in place")
    mode.add_argument("--store-outputs", action="store_true", help="run, keep the checked outputs, clean")
    p.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = p.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    bad = 0
    for path in paths:
        if args.store_outputs:
            store_outputs(path)
        elif args.write:
            text = path.read_text(encoding="utf-8")
            new = stored_text(clean(nbformat.reads(text, as_version=4)))
            if new != text:
                path.write_text(new, encoding="utf-8")
                print(f"{path}: cleaned")
        for problem in structure_problems(nbformat.read(path, as_version=4)) if not args.check else problems(path):
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {problem}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
