"""The README's Python blocks run as printed, each in a fresh interpreter in an empty folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)
# what each block is about (its first import of the package), and the slow ones (a CPU, seconds to minutes)
SLOW = ("anchorformer.export", "create_feature_extractor")


def _id(block: str) -> str:
    return "export" if "export_model" in block else "operator" if "anchor_attention" in block else "model"


def test_the_readme_has_its_python_blocks():
    assert sorted(map(_id, BLOCKS)) == ["export", "model", "operator"]


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=_id(b), marks=[pytest.mark.slow] if any(s in b for s in SLOW) else []) for b in BLOCKS],
)
def test_readme_block_runs_as_printed(block: str, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr[-4000:]}"
