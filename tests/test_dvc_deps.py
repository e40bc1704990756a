"""dvc.yaml: each stage depends on every package file its notebooks import (scripts/dvc_deps.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dvc_deps", ROOT / "scripts" / "dvc_deps.py")
dvc_deps = importlib.util.module_from_spec(_spec)
sys.modules["dvc_deps"] = dvc_deps  # dataclasses look their module up
_spec.loader.exec_module(dvc_deps)


def test_every_stage_depends_on_the_modules_its_notebooks_import():
    bad = [s for s in dvc_deps.derive(ROOT) if not s.ok]
    report = "\n".join(f"{s.name}: missing {s.missing}, extra {s.extra}" for s in bad)
    assert not bad, f"dvc.yaml deps out of date (run python scripts/dvc_deps.py --write):\n{report}"


# A small repository: a notebook importing one function of a package with a lazy import, a relative
# import, a subpackage, a module run with -m, and a config file read through a loader.
PACKAGE = {
    "pkg/__init__.py": '"""The package."""\n',
    "pkg/api.py": (
        "from .sub import helper\n\n"
        "TASK = 'train'\n\n"
        "def run():\n"
        "    from pkg.config import load\n"
        "    cmd = ['python', '-m', 'pkg.cli']\n"
        "    return helper(load(TASK)), cmd\n"
    ),
    "pkg/sub/__init__.py": "from .impl import helper\n",
    "pkg/sub/impl.py": "def helper(x):\n    return x\n",
    "pkg/config.py": (
        "from pathlib import Path\n\n"
        "DIR = Path(__file__).parent / 'configs'\n\n"
        "def load(task):\n    return (DIR / f'{task}.yaml').read_text()\n"
    ),
    "pkg/cli.py": "import importlib\n\nimportlib.import_module('pkg.unused')\n",
    "pkg/unused.py": "X = 1\n",
    "pkg/other.py": "import pkg.unused\n",
    "pkg/configs/train.yaml": "a: 1\n",
    "pkg/configs/eval.yaml": "a: 2\n",
}
NEEDED = [
    "pkg/__init__.py",
    "pkg/api.py",
    "pkg/cli.py",
    "pkg/config.py",
    "pkg/configs/train.yaml",
    "pkg/sub",
    "pkg/unused.py",
]
DVC_YAML = """\
# the pipeline
stages:
  one:  # a stage
    cmd: >-
      papermill nb/one.ipynb out/one.ipynb --cwd .
      -p x 1
    deps:
      - nb/one.ipynb
      - pkg/api.py  # the entry point
      - pkg/other.py
      - out/earlier
    outs:
      - out/one.ipynb
  many:
    foreach: [a, b]
    do:
      cmd: papermill nb/one.ipynb out/${item}.ipynb
      deps:
        - nb/one.ipynb
        - pkg
        - ${item}/in.json
      outs:
        - out/${item}.ipynb
  shell:
    cmd: echo hi
    deps:
      - pkg/other.py
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for rel, text in PACKAGE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%matplotlib inline\nx = 1"),
        nbformat.v4.new_code_cell("from pkg.api import run\n\nrun()"),
    ]
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / "one.ipynb")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


def test_derive_follows_lazy_relative_and_run_imports_and_loaded_configs(repo: Path):
    got = {s.name: s for s in dvc_deps.derive(repo, "pkg")}
    assert set(got) == {"one", "many"}  # `shell` runs no notebook: left alone
    one = got["one"]
    assert one.derived == ["nb/one.ipynb", *NEEDED, "out/earlier"]
    assert "pkg/config.py" in one.missing and "pkg/configs/train.yaml" in one.missing
    assert "pkg/sub/impl.py" in one.missing and "pkg/__init__.py" in one.missing
    assert one.extra == ["pkg/other.py"]
    many = got["many"]
    assert many.derived == ["nb/one.ipynb", *NEEDED, "${item}/in.json"]
    assert set(many.extra) == {"pkg/configs/eval.yaml", "pkg/other.py"}
    assert not many.missing


def test_check_fails_on_a_missing_module_and_write_fixes_it_in_place(repo: Path, capsys: pytest.CaptureFixture):
    args = ["--package", "pkg", "--root", str(repo)]
    assert dvc_deps.main(["--check", *args]) == 1
    out = capsys.readouterr().out
    assert "missing: pkg/config.py" in out and "extra:   pkg/other.py" in out

    assert dvc_deps.main(["--write", *args]) == 0
    text = (repo / "dvc.yaml").read_text()
    assert text.startswith("# the pipeline\nstages:\n  one:  # a stage\n")
    assert "      - pkg/api.py  # the entry point\n" in text  # kept lines keep their comments
    assert "      - pkg/other.py\n" in text.split("  shell:")[1]  # a stage without notebooks is untouched
    before, after = yaml.safe_load(DVC_YAML), yaml.safe_load(text)
    assert after["stages"]["one"]["deps"] == ["nb/one.ipynb", *NEEDED, "out/earlier"]
    for name in ("one", "many"):
        body = after["stages"][name].get("do", after["stages"][name])
        body.pop("deps")
        (before["stages"][name].get("do", before["stages"][name])).pop("deps")
    assert json.dumps(before) == json.dumps(after)  # nothing but deps changed
    capsys.readouterr()
    assert dvc_deps.main(["--check", *args]) == 0, capsys.readouterr().out

    # a new import in a package module makes the check fail again
    (repo / "pkg" / "sub" / "impl.py").write_text("from ..other import *\n\ndef helper(x):\n    return x\n")
    assert dvc_deps.main(["--check", *args]) == 1
    assert "missing: pkg/other.py" in capsys.readouterr().out
