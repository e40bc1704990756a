"""params.yaml is kept in the form DVC writes back, so that `dvc exp run -S key=value` changes one line."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_round_trip_leaves_params_yaml_unchanged(tmp_path):
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    with modify_yaml(path):
        pass
    diff = list(difflib.unified_diff((ROOT / "params.yaml").read_text().splitlines(), path.read_text().splitlines()))
    assert not diff, "params.yaml is not in the form DVC writes back:\n" + "\n".join(diff[:40])


@pytest.mark.parametrize(
    "override", ["anchor_maps.anchors_shown=3", "profile=full", "cls.epochs=2", "det.overrides='lr=2e-4'"]
)
def test_set_param_changes_one_line(tmp_path, override):
    """What `dvc exp run -S OVERRIDE` does to params.yaml (DVC's apply_overrides) before it runs."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_overrides(path, [override])
    before, after = (ROOT / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [line for line in difflib.ndiff(before, after) if line[:1] in "+-"]
    assert len(before) == len(after) and len(changed) == 2, "\n".join(changed)
    assert override.split("=", 1)[1].strip("'") in changed[1]
