"""The environment of the project's Jupyter kernel, as ``ipykernel install`` arguments.

``make env`` installs the kernel "anchorformer (.venv)" with the settings of the CPU numeric path
(``anchorformer/engine/numerics.py``: ATen, oneDNN and MKL on their AVX2 code, one OpenMP thread)
in its kernel spec, so that a notebook run in JupyterLab computes the bytes that the pipeline's
stages compute (``scripts/run_stage.py`` starts their kernels with the same settings). A kernel
cannot know which profile a notebook will run, so they hold in the full profile too; where the
path does not apply (not x86-64 with AVX2, or ``ANCHORFORMER_NUMERICS=native`` when ``make env``
installs the kernel) nothing is set.

Usage: ``python scripts/kernel_env.py`` prints ``--env NAME VALUE ...`` (nothing where the path
does not apply). Standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_stage import load_numerics  # noqa: E402


def kernel_env_args(env: Mapping[str, str] | None = None) -> list[str]:
    """``["--env", NAME, VALUE, ...]`` of the numeric path, or ``[]`` where it does not apply."""
    numerics = load_numerics()
    if not numerics.applies(os.environ if env is None else env):
        return []
    return [a for name, value in numerics.NUMERIC_ENV.items() for a in ("--env", name, value)]


if __name__ == "__main__":
    print(" ".join(kernel_env_args()))
