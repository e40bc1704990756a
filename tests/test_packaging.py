"""The package alone: build the wheel, install it with no extras into a fresh virtual environment,
create and run a model there.

Offline and quick: the fresh environment (no system site-packages) sees only the closure of the
wheel's own requirements (torch, timm and what they need), linked from the running environment
through a ``.pth`` file; pip installs the wheel with ``--no-index`` and must find every declared
requirement already satisfied. Nothing of the pipeline (DVC, papermill, scikit-image, ...) is
there, so importing or running the model must not need it.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from lockfile import closure
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("dvc", "dvclive", "papermill", "skimage", "pycocotools", "matplotlib", "jupyterlab", "nbval", "onnx")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources (no build/ or egg-info left in the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "anchorformer", src / "anchorformer", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("anchorformer-*.whl")
    return wheel


def _link_requirements(requires: list[str], into: Path) -> None:
    """Link the installed distributions that ``requires`` needs (their files' top-level entries)."""
    into.mkdir()
    reqs = [Requirement(r) for r in requires if "extra ==" not in r]
    for dist_name, _ in closure(reqs).values():
        dist = metadata.distribution(dist_name)
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or (into / top).exists():
                continue
            (into / top).symlink_to(Path(dist.locate_file(top)).resolve())


@pytest.mark.slow
def test_wheel_installs_and_runs_without_extras(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.parser.Parser().parsestr(
            zf.read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
        )
    assert "anchorformer/configs/cls.yaml" in names and "anchorformer/models/anchorformer.py" in names
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert core and not [r for r in core if "==" in r], f"the model's requirements are ranges: {core}"
    assert {"kernels", "export", "pipeline", "notebooks", "dev"} <= set(meta.get_all("Provides-Extra"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _link_requirements(core, tmp_path / "deps")
    (site / "_anchorformer_test_deps.pth").write_text(str(tmp_path / "deps") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q", str(wheel)]
    _run(install, env=env, cwd=tmp_path)

    script = textwrap.dedent(
        f"""
        import importlib.util, pathlib, sys
        import torch, timm
        import anchorformer
        assert pathlib.Path(anchorformer.__file__).is_relative_to({str(site)!r}), anchorformer.__file__
        absent = [m for m in {ABSENT!r} if importlib.util.find_spec(m) is not None]
        assert not absent, f"pipeline packages in the bare environment: {{absent}}"
        model = timm.create_model("anchorformer_tiny_distilled_patch16_224", img_size=64, depth=2, num_classes=3)
        with torch.no_grad():
            out = model.eval()(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        model = anchorformer.create_model("anchorformer_tiny_patch16_224", device="meta")
        assert all(p.is_meta for p in model.parameters())
        print("ok", anchorformer.__version__)
        """
    )
    proc = _run([str(python), "-c", script], env=env, cwd=tmp_path)
    assert proc.stdout.strip().startswith("ok"), proc.stdout


def test_without_triton_auto_falls_back_and_triton_is_a_clear_error():
    """Without the ``kernels`` extra: "auto" runs the reference, "triton" says what is missing."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch, anchorformer
        x = torch.randn(1, 3, 32, 32)
        model = anchorformer.create_model("anchorformer_tiny_patch16_224", img_size=32, depth=1, attn_impl="auto")
        assert model.eval()(x).shape == (1, 1000)
        model.set_attn_impl("triton")
        try:
            model(x)
        except ValueError as e:
            assert "needs the triton package" in str(e), e
            print("ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("ANCHORFORMER_ATTN_IMPL", None)
    proc = _run([sys.executable, "-c", script], env=env, cwd=ROOT)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
