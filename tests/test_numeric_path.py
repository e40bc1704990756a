"""One CPU numeric path: a small pipeline writes the committed bytes on any x86-64 machine with AVX2.

``scripts/numeric_hashes.py`` runs a CNN classification run, one detection iteration block and one
segmentation block through the ``anchorformer`` command (which sets the settings of
``anchorformer/engine/numerics.py`` itself in the mini profile) and hashes their results;
``tests/numeric_hashes.json`` holds the hashes. A machine that computes otherwise fails here, naming
the outputs that changed, instead of changing the pipeline's results silently. The slow tests check
the other side: this machine made to compute as a CPU with AVX2 only (by the libraries' own
switches, without the project's settings) writes the same bytes, and on a machine with AVX-512 the
libraries' own choice of code does not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from pathlib import Path

import pytest

from anchorformer.engine import numerics

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("numeric_hashes", ROOT / "scripts" / "numeric_hashes.py")
numeric_hashes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(numeric_hashes)

# The switches that make this machine compute as one with AVX2 only, independent of the project's
# settings (MKL_ENABLE_INSTRUCTIONS caps MKL's instruction set instead of pinning its code branch).
AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OMP_NUM_THREADS": "1",
}
WEIGHTS_AND_OUTPUTS = ("model.safetensors", "detections.json", "predictions", "per_class.json", "history.json")

needs_avx2 = pytest.mark.skipif(
    platform.machine().lower() not in numerics.X86_64 or numerics.native_capability() not in ("AVX2", "AVX512"),
    reason="the committed hashes are those of the x86-64 AVX2 path",
)


def _fail_message(problems: list[str], what: str) -> str:
    return (
        f"{what}: {len(problems)} outputs of scripts/numeric_hashes.py differ from tests/numeric_hashes.json "
        f"(this machine: {platform.machine()}, {numerics.native_capability()}; the numeric path: "
        "anchorformer/engine/numerics.py):\n" + "\n".join(problems)
    )


def _outputs(hashes: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in hashes.items() if k.endswith(WEIGHTS_AND_OUTPUTS)}


def test_settings_are_set_once_and_recorded():
    env = numerics.numeric_env({"PATH": "/bin", "ATEN_CPU_CAPABILITY": "avx512"}, machine="x86_64")
    assert {k: env[k] for k in numerics.NUMERIC_ENV} == numerics.NUMERIC_ENV and env["PATH"] == "/bin"
    assert numerics.missing_settings(env, machine="x86_64") == {}
    assert numerics.missing_settings({}, machine="x86_64") == numerics.NUMERIC_ENV
    # arm64 and the opt-out: nothing set, nothing missing
    assert numerics.numeric_env({"PATH": "/bin"}, machine="aarch64") == {"PATH": "/bin"}
    assert numerics.missing_settings({"ANCHORFORMER_NUMERICS": "native"}, machine="x86_64") == {}
    # a command started again with the settings never starts again
    argv, env2 = numerics.reexec_argv(["python", "-m", "anchorformer.cli"], env={"PATH": "/bin"}) or ([], {})
    if platform.machine().lower() in numerics.X86_64:
        assert argv == ["python", "-m", "anchorformer.cli"] and numerics.reexec_argv(argv, env2) is None
    assert set(numeric_hashes.SETTINGS) == set(numerics.NUMERIC_ENV)


@needs_avx2
def test_small_pipeline_writes_the_committed_bytes(mini_data, tmp_path):
    got = numeric_hashes.run_pipeline(mini_data, tmp_path)  # started without the settings
    metrics = json.loads((tmp_path / "seg" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["numerics"] == {"path": "avx2", "env": numerics.NUMERIC_ENV}, "the command did not set the path"
    timings = json.loads((tmp_path / "det" / "timings.json").read_text(encoding="utf-8"))
    assert timings["machine"]["aten_capability"] == "AVX2"
    problems = numeric_hashes.compare(numeric_hashes.load_expected(), got)
    assert not problems, _fail_message(problems, "a machine that computes otherwise")


@pytest.mark.slow
@needs_avx2
def test_emulated_avx2_only_machine_writes_the_same_bytes(mini_data, tmp_path):
    env = {**os.environ, **AVX2_ONLY, "ANCHORFORMER_NUMERICS": "native"}  # the libraries' switches, not ours
    got = _outputs(numeric_hashes.run_pipeline(mini_data, tmp_path, env))
    problems = numeric_hashes.compare(_outputs(numeric_hashes.load_expected()), got)
    assert not problems, _fail_message(problems, "this machine as one with AVX2 only")


@pytest.mark.slow
@pytest.mark.skipif(numerics.native_capability() != "AVX512", reason="needs a CPU with AVX-512")
def test_avx512_code_writes_other_bytes(mini_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in numerics.NUMERIC_ENV}
    got = _outputs(numeric_hashes.run_pipeline(mini_data, tmp_path, {**env, "ANCHORFORMER_NUMERICS": "native"}))
    changed = numeric_hashes.compare(_outputs(numeric_hashes.load_expected()), got)
    assert changed, "AVX-512 code wrote the AVX2 path's bytes: the hashes would not catch another machine"


def test_stage_kernels_start_on_the_path_unless_full(tmp_path):
    import subprocess
    import sys

    import nbformat

    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "anchorformer", "display_name": "x", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'mini'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import os, torch\nfrom anchorformer.engine.numerics import NUMERIC_ENV, numeric_settings\n"
            "print('SEEN', {k: os.environ.get(k) for k in NUMERIC_ENV}, torch.backends.cpu.get_cpu_capability(), "
            "numeric_settings()['path'])"
        ),
    ]
    nbformat.write(nb, tmp_path / "in.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in numerics.NUMERIC_ENV}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_stage.py"), "in.ipynb", "out.ipynb", "-p", "profile", "mini"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = next(line for line in done.stderr.splitlines() if line.startswith("SEEN"))
    if numerics.applies(env):
        assert seen == f"SEEN {numerics.NUMERIC_ENV} AVX2 avx2", seen
    # the full profile (GPUs) is left as it is
    with _run_stage_module().numeric_environment(enabled=False) as settings:
        assert settings == {} and all(os.environ.get(k) == env.get(k) for k in numerics.NUMERIC_ENV)


def _run_stage_module():
    spec = importlib.util.spec_from_file_location("run_stage", ROOT / "scripts" / "run_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
