"""The environment: compatible ranges in pyproject.toml, exact versions in requirements.lock, and
`make env` and environment.yml installing from the lock."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from lockfile import LOCK, closure, project_requirements, read_lock
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"kernels", "export", "pipeline", "notebooks", "dev"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_library_dependencies_are_ranges_and_the_pipeline_is_extra():
    project = _project()
    deps = {
        canonicalize_name(r.split(">")[0].split("<")[0].split("=")[0].split(";")[0]): r for r in project["dependencies"]
    }
    assert set(deps) == {"torch", "torchvision", "timm", "safetensors"}, deps
    assert not [r for r in project["dependencies"] if "==" in r], "the model's dependencies are ranges, not pins"
    extras = project["optional-dependencies"]
    assert EXTRAS <= set(extras)
    joined = {k: " ".join(v) for k, v in extras.items()}
    assert "triton" in joined["kernels"] and "sys_platform == 'linux'" in joined["kernels"]
    for name in ("dvc", "dvclive", "papermill", "pycocotools", "scikit-image"):
        assert name in joined["pipeline"], name
    for name in ("jupyterlab", "nbval", "ipywidgets"):
        assert name in joined["notebooks"], name
    for name in ("pytest", "ruff"):
        assert name in joined["dev"], name
    for name in ("onnx", "onnxscript", "onnxruntime"):
        assert name in joined["export"], name


def test_lock_pins_every_requirement_within_its_range():
    pins = read_lock()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"{req} is not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{LOCK.name} pins {name}=={pins[name]}, not {req}"


def test_lock_is_the_closure_of_the_installed_environment():
    """Every package the requirements pull in is locked at the version installed here, and nothing else."""
    try:
        want = {name: version for name, (_, version) in closure(project_requirements()).items()}
    except metadata.PackageNotFoundError as e:
        pytest.fail(f"{e} is required but not installed: run `make env`")
    pins = read_lock()
    assert sorted(set(want) - set(pins)) == [], f"needed but not in {LOCK.name}: rerun tests/lockfile.py"
    assert sorted(set(pins) - set(want)) == [], f"in {LOCK.name} but not needed: rerun tests/lockfile.py"
    differ = {n: (pins[n], want[n]) for n in pins if pins[n] != want[n]}
    assert not differ, f"lock vs installed versions differ (lock, installed): {differ}"


def test_make_env_and_conda_install_from_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.lock" in makefile and "pyproject.toml requirements.lock" in makefile
    assert (
        f"EXTRAS := {','.join(sorted(EXTRAS, key=['kernels', 'export', 'pipeline', 'notebooks', 'dev'].index))}"
        in makefile
    )
    assert "pip download" in makefile and "timm" in makefile  # timm's own tests, from its sdist
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip_section[0] == "-r requirements.lock"
    assert pip_section[1].startswith("-e .[") and set(pip_section[1][5:-1].split(",")) == EXTRAS


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci.splitlines()[-1]
    assert "make test" in readme and "make repro" in readme
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()


def _kernel_env_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_env", ROOT / "scripts" / "kernel_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_projects_kernel_computes_on_the_numeric_path():
    """The kernel JupyterLab starts for the notebooks ("anchorformer (.venv)", installed by
    ``make env``), started as Lab starts it: ATen on its AVX2 code, one thread, MKL's AVX2 branch,
    as the pipeline's stages compute (where the path applies; else nothing pinned)."""
    from jupyter_client.manager import start_new_kernel

    kernel_env = _kernel_env_module()
    numerics = kernel_env.load_numerics()
    assert kernel_env.kernel_env_args({"ANCHORFORMER_NUMERICS": "native"}) == []
    km, kc = start_new_kernel(kernel_name="anchorformer")  # NoSuchKernel: run `make env`
    out: list[str] = []
    try:
        code = "import os, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))"
        kc.execute_interactive(
            code,
            timeout=120,
            output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None,
        )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    capability, mkl = "".join(out).split()
    if numerics.applies():
        assert (capability, mkl) == ("AVX2", "AVX2,STRICT"), out
    else:
        assert mkl == "None", out
