"""Write a thin, papermill-parameterized notebook from a list of cells.

Usage from Python: ``make_notebook(path, title_markdown, parameters_source, [cell_source, ...])``.
A cell moving to the repository root follows the parameters cell. Cells whose source starts
with ``# NBVAL_CHECK_OUTPUT`` are compared strictly by nbval; ``#md `` starts a markdown cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

CHECK = "# NBVAL_CHECK_OUTPUT"
CHDIR = (
    "import os\n\n"
    "from anchorformer.paths import project_root\n\n"
    "os.chdir(project_root())  # the paths above are relative to the repository root"
)


def make_notebook(path: str | Path, title_md: str, parameters: str, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell(title_md))
    p = nbformat.v4.new_code_cell(parameters)
    p.metadata["tags"] = ["parameters"]
    nb.cells.append(p)
    # papermill (--cwd .) starts at the repository root, JupyterLab and nbval in notebooks/:
    # the paths of the parameters cell are relative to the repository root in all three.
    nb.cells.append(nbformat.v4.new_code_cell(CHDIR))
    for src in cells:
        if src.startswith("#md "):
            nb.cells.append(nbformat.v4.new_markdown_cell(src[4:]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(src))
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i}"
    nbformat.validate(nb)
    Path(path).write_text(nbformat.writes(nb))
    if any(CHECK in c.source for c in nb.cells if c.cell_type == "code"):
        store_checked_outputs(path)


def store_checked_outputs(path: str | Path) -> None:
    """Run the notebook with its smoke defaults and keep the outputs of the cells nbval compares.

    ``pytest --nbval-lax`` compares the outputs of cells marked ``# NBVAL_CHECK_OUTPUT`` with the
    stored ones; every other cell is stored without outputs.
    """
    import papermill

    path = Path(path)
    root = path.resolve().parents[1]
    executed = papermill.execute_notebook(str(path), None, cwd=str(root), progress_bar=False)
    nb = nbformat.read(path, as_version=4)
    for cell, ran in zip(nb.cells, executed.cells):
        if cell.cell_type == "code" and CHECK in cell.source:
            cell.outputs = [o for o in ran.outputs if o.get("output_type") in ("stream", "execute_result")]
            cell.execution_count = 1  # nbval compares only cells marked as run
            for o in cell.outputs:
                if o.get("output_type") == "execute_result":
                    o["execution_count"] = 1
    path.write_text(nbformat.writes(nb))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("import make_notebook from this file")
