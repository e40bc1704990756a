"""Write a thin, papermill-parameterized notebook from a list of cells.

Usage from Python: ``make_notebook(path, parameters_source, [cell_source, ...])``. Cells whose
source starts with ``# NBVAL_CHECK_OUTPUT`` are compared strictly by nbval.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def make_notebook(path: str | Path, title_md: str, parameters: str, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell(title_md))
    p = nbformat.v4.new_code_cell(parameters)
    p.metadata["tags"] = ["parameters"]
    nb.cells.append(p)
    for src in cells:
        if src.startswith("#md "):
            nb.cells.append(nbformat.v4.new_markdown_cell(src[4:]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(src))
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i}"
    nbformat.validate(nb)
    Path(path).write_text(nbformat.writes(nb))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("import make_notebook from this file")
