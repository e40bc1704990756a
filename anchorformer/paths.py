"""Where the repository is, so that notebooks behave the same wherever they are started.

papermill (``--cwd .``) runs notebooks from the repository root, JupyterLab and nbval from
``notebooks/``. Every notebook starts with ``os.chdir(project_root())`` so that the paths in its
parameters cell (``data/mini``, ``outputs/...``) mean the same thing in all three.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_root"]


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``dvc.yaml``.

    Raises:
        FileNotFoundError: no such folder up to the file-system root.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run from inside the anchorformer repository")
