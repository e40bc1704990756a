"""pyproject.toml and environment.yml list the same packages with the same pins."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pins() -> tuple[dict[str, str], dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for group in project["optional-dependencies"].values() for r in group]
    pyproject = {_name(r): r.replace(" ", "") for r in reqs}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    return pyproject, conda


def test_same_packages_and_pins():
    pyproject, conda = _pins()
    assert set(pyproject) == set(conda), (
        f"only in pyproject.toml: {sorted(set(pyproject) - set(conda))}; "
        f"only in environment.yml: {sorted(set(conda) - set(pyproject))}"
    )
    differing = {k: (pyproject[k], conda[k]) for k in pyproject if pyproject[k] != conda[k]}
    assert not differing, f"pins differ (pyproject, environment.yml): {differing}"


def test_platform_pins_and_python():
    pyproject, _ = _pins()
    assert pyproject["torch"] == "torch==2.14.1"
    assert pyproject["torchvision"] == "torchvision==0.29.1"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    assert "-e ." in next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci.splitlines()[-1]
    assert "make test" in readme and "make repro" in readme
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()
