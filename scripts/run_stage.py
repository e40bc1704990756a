"""Run one notebook of the DVC pipeline: papermill, in the project's environment, with the log shown.

Every stage of ``dvc.yaml`` runs a notebook through this script::

    python3 scripts/run_stage.py notebooks/10_classification.ipynb outputs/cls/e1/T/10_classification.ipynb \\
        --cwd . -p out_dir outputs/cls/e1/T -p epochs 0 ...

It takes papermill's arguments (input, output, ``--cwd``, ``-p NAME VALUE``, ``-k KERNEL``; the
values typed as papermill types them) and adds four things:

1. **The environment.** Before anything else, with the standard library only, it checks that this
   interpreter has the pipeline's packages. If not, it runs itself again with the project's
   ``.venv/bin/python`` when that exists (so ``.venv/bin/dvc repro`` works without activating the
   environment), and otherwise stops with one line saying what to do (``make repro``, or
   ``source .venv/bin/activate``), exit status 2. The kernel that runs the notebook is this
   interpreter, whatever kernels are registered (a kernelspec named as the notebook's, in a
   temporary folder put first on ``JUPYTER_PATH``).
2. **Progress.** The cells' output and the package's log (``logging``: epochs, losses, metrics)
   stream to the terminal while the notebook runs; the log is not stored in the notebook.
3. **Determinism.** The executed notebook carries no timestamps: papermill's and nbclient's timing
   metadata (start and end times, durations) are removed and the injected parameters cell gets
   a fixed id, so the same parameters and seed give the same file when the printed values are
   the same.
4. **One numeric path.** Unless ``-p profile full``, the kernel starts with the CPU settings of
   ``anchorformer/engine/numerics.py`` in its environment (ATen, oneDNN and MKL on their AVX2
   code, one thread by default), so that any x86-64 machine with AVX2 computes the same bytes.
   They must be there before torch loads, hence here and not in the notebook.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
REQUIRED = ("papermill", "nbclient", "ipykernel", "torch", "timm")
REEXEC = "ANCHORFORMER_RUN_STAGE_FROM"  # set when this script ran itself again with .venv/bin/python
HINT = "run `make repro`, or `make env` once and then `source .venv/bin/activate` before `dvc repro` / `dvc exp run`"


def missing_modules(names=REQUIRED):
    """The modules of ``names`` this interpreter cannot import (standard library only)."""
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def restore_hint(stage, cwd=ROOT):
    """How to get a failed stage's previous outputs back, in words: ``dvc checkout STAGE`` restores
    the cached ones; the small ones kept by git (``cache: false``, which DVC removed before the
    run and cannot restore) come back with ``git checkout -- PATHS``, named here."""
    import subprocess

    if not stage:
        return ""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--deleted", "--", "outputs", "reports"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    hint = f"`dvc checkout {stage}` restores the stage's previous cached outputs"
    if listed:
        shown = " ".join(listed[:8]) + (" ..." if len(listed) > 8 else "")
        hint += f", `git checkout -- {shown}` its git-tracked ones ({len(listed)} removed)"
    return f" ({hint})"


def ensure_environment(argv):
    """Continue here, run again with ``.venv/bin/python``, or exit 2 with one line saying why."""
    missing = missing_modules()
    if not missing:
        return
    if os.path.isfile(VENV_PYTHON) and not os.environ.get(REEXEC):
        os.environ[REEXEC] = sys.executable
        os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__)] + list(argv))
    stage = os.environ.get("DVC_STAGE")
    restore = restore_hint(stage)
    sys.stderr.write(
        "run_stage.py: {} lacks {}; the pipeline runs in the project's environment: {}{}\n".format(
            sys.executable, ", ".join(missing), HINT, restore
        )
    )
    sys.exit(2)


if __name__ == "__main__":
    ensure_environment(sys.argv[1:])

# ---------------------------------------------------------------------------------------------
# From here on, the project's environment
# ---------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

KERNEL_STARTUP = Path(__file__).resolve().with_name("kernel_startup.py")
NUMERICS = Path(ROOT) / "anchorformer" / "engine" / "numerics.py"
TIMING_KEYS = ("start_time", "end_time", "duration")


def resolve_type(value: str) -> Any:
    """A ``-p`` value as papermill's command line types it: True/False/None, int, float, else str."""
    if value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[value]
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def strip_timing(nb: Any) -> Any:
    """``nb`` (a notebook node) without papermill's and nbclient's timestamps and durations, in place.

    The cell papermill inserts for the parameters gets a fixed id instead of its random one.
    """
    meta = nb.get("metadata", {}).get("papermill")
    if meta is not None:
        for key in TIMING_KEYS:
            meta.pop(key, None)
    for cell in nb.get("cells", []):
        cell_meta = cell.get("metadata", {})
        if "injected-parameters" in cell_meta.get("tags", []):
            cell["id"] = "injected-parameters"  # papermill gives the cell it inserts a random id
        cell_meta.pop("execution", None)  # nbclient: iopub.execute_input, shell.execute_reply, ...
        pm = cell_meta.get("papermill")
        if pm is not None:
            for key in TIMING_KEYS:
                pm.pop(key, None)
    return nb


@contextlib.contextmanager
def kernel_of_this_interpreter(name: str) -> Iterator[str]:
    """A kernelspec ``name`` that starts this interpreter, first on ``JUPYTER_PATH`` while inside.

    The kernel prints the package's log to the terminal (``kernel_startup.py``) and nothing of
    it into the notebook.
    """
    with tempfile.TemporaryDirectory(prefix="anchorformer-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / name
        spec_dir.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        argv.append(f"--IPKernelApp.exec_files={json.dumps([str(KERNEL_STARTUP)])}")
        spec = {"argv": argv, "display_name": "anchorformer (.venv)", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp] + ([old] if old else []))
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def load_numerics() -> Any:
    """``anchorformer/engine/numerics.py``, loaded by path (standard library only: no torch here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("anchorformer_numerics", NUMERICS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def numeric_environment(enabled: bool = True) -> Iterator[dict[str, str]]:
    """This process's environment, with the numeric path's settings while inside when ``enabled``
    (the kernel papermill starts inherits it). Yields the settings it set."""
    if not enabled:
        yield {}
        return
    numerics = load_numerics()
    settings = numerics.missing_settings()
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def notebook_kernel(path: str | Path) -> str:
    """The kernelspec name stored in the notebook ``path`` (``anchorformer`` when it names none)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return nb.get("metadata", {}).get("kernelspec", {}).get("name") or "anchorformer"


def run(
    notebook: str | Path,
    output: str | Path,
    parameters: dict[str, Any],
    cwd: str | Path | None = None,
    kernel: str | None = None,
    log_output: bool = True,
    numerics: bool | None = None,
) -> None:
    """Execute ``notebook`` into ``output`` with ``parameters`` (papermill), then strip its timestamps.

    The output folder is created. The output is written (without timestamps) also when a cell
    fails, and the error is raised. ``numerics`` (default: unless ``parameters["profile"]`` is
    ``"full"``): the kernel follows the numeric path of ``anchorformer/engine/numerics.py``.
    """
    import nbformat
    import papermill

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    if numerics is None:
        numerics = parameters.get("profile") != "full"
    with numeric_environment(numerics), kernel_of_this_interpreter(kernel or notebook_kernel(notebook)) as name:
        try:
            papermill.execute_notebook(
                str(notebook),
                str(output),
                parameters=parameters,
                cwd=None if cwd is None else str(cwd),
                kernel_name=name,
                log_output=log_output,
                progress_bar=False,
            )
        finally:
            if Path(output).is_file():
                nb = nbformat.read(str(output), as_version=4)
                nbformat.write(strip_timing(nb), str(output))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook", help="the notebook to run")
    p.add_argument("output", help="the executed notebook (its folder is created)")
    p.add_argument("--cwd", default=None, help="the kernel's working directory")
    p.add_argument("-p", "--parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("-k", "--kernel", default=None, help="kernelspec name (default: the notebook's)")
    p.add_argument("--no-log-output", action="store_true", help="do not echo the cells' output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from papermill.exceptions import PapermillExecutionError

    params = {name: resolve_type(value) for name, value in args.parameters}
    try:
        run(args.notebook, args.output, params, args.cwd, args.kernel, log_output=not args.no_log_output)
    except PapermillExecutionError as e:
        print(f"run_stage.py: {args.notebook} failed in cell {e.exec_count}: {e.ename}: {e.evalue}", file=sys.stderr)
        print(
            f"run_stage.py: the executed notebook, with the traceback, is {args.output}"
            + restore_hint(os.environ.get("DVC_STAGE")),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
