"""One CPU numeric path for the mini profile: the same bytes on any x86-64 machine with AVX2.

PyTorch, MKL and oneDNN pick their vectorised code at run time from the CPU they find, and the
code paths round differently: on a CPU with AVX-512 ATen's ``gelu``/``softmax`` kernels and
oneDNN's convolutions give other last bits than on a CPU with AVX2 only, and a few thousand
optimizer steps carry those bits into every loss, metric and weight; a reduction on 2 threads
gives other bits than on 1 or 4. The
settings below hold every x86-64 machine with AVX2 (Intel's since Haswell, 2013; AMD's since
Excavator and Zen) to the AVX2 path:

=========================  ================  ===================================================
variable                   value             what it pins
=========================  ================  ===================================================
``ATEN_CPU_CAPABILITY``    ``avx2``          ATen's vectorised kernels (elementwise, softmax,
                                             norms, reductions; sleef's math)
``ONEDNN_MAX_CPU_ISA``     ``AVX2``          oneDNN's kernels (convolutions, pooling)
``MKL_CBWR``               ``AVX2,STRICT``   MKL's code branch (sgemm: ``Linear``, ``matmul``):
                                             the same on Intel and AMD CPUs
``OMP_NUM_THREADS``        ``1``             the default thread count of torch and MKL:
                                             reductions split the same way on a machine with
                                             2 or 64 cores
=========================  ================  ===================================================

NumPy's own dispatched loops (``exp``, ``sin``, ... under ``NPY_DISABLE_CPU_FEATURES``) also round
otherwise on AVX-512, but no stage computes a result through them, so they are left alone.

Each is read once, when its library first computes, so they are set in the environment of a new
process: :func:`numeric_env` gives that environment, ``scripts/run_stage.py`` starts each stage's
kernel in it, and the ``anchorformer`` command runs itself again in it for the mini profile
(:func:`reexec_argv`). A run records :func:`numeric_settings` in its ``metrics.json`` (the same on
every machine that follows the path); the machine's own capability goes to ``timings.json``
(:func:`native_capability`).

``ANCHORFORMER_NUMERICS=native`` leaves the libraries to pick their fastest code (results then
depend on the CPU). On other architectures (arm64), and on the rare x86-64 CPUs without AVX2, none
of these settings can hold and nothing is set: results there are reproducible on the same kind of
machine, not equal to the AVX2 path's.

This module uses the standard library only (``scripts/run_stage.py`` loads it without torch).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

__all__ = [
    "NUMERIC_ENV",
    "OPT_OUT",
    "applies",
    "missing_settings",
    "native_capability",
    "numeric_env",
    "numeric_settings",
    "reexec_argv",
]

NUMERIC_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "OMP_NUM_THREADS": "1",
}
OPT_OUT = "ANCHORFORMER_NUMERICS"  # "native": leave the libraries their own choice of code
_REEXEC = "ANCHORFORMER_NUMERICS_REEXEC"  # set in a process the command started again
X86_64 = ("x86_64", "amd64")


def applies(env: Mapping[str, str] | None = None, machine: str | None = None) -> bool:
    """Whether the settings apply: an x86-64 machine with AVX2, and no ``ANCHORFORMER_NUMERICS=native``.

    ``machine`` names another machine's architecture (its AVX2 then taken for granted); by default
    this one's, whose CPU must have AVX2 (ATen would run AVX2 code on a CPU without it and crash).
    """
    env = os.environ if env is None else env
    arch = (machine or platform.machine()).lower()
    if arch not in X86_64 or env.get(OPT_OUT, "").strip().lower() == "native":
        return False
    return machine is not None or native_capability() in ("AVX2", "AVX512")


def numeric_env(env: Mapping[str, str] | None = None, machine: str | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with :data:`NUMERIC_ENV` set, when it applies.

    A value already in ``env`` is replaced: the path is the same for everyone or it is no path.
    """
    out = dict(os.environ if env is None else env)
    if applies(out, machine):
        out.update(NUMERIC_ENV)
    return out


def missing_settings(env: Mapping[str, str] | None = None, machine: str | None = None) -> dict[str, str]:
    """The settings ``env`` lacks or sets otherwise (name: wanted value); empty when it follows the path."""
    env = os.environ if env is None else env
    if not applies(env, machine):
        return {}
    return {k: v for k, v in NUMERIC_ENV.items() if env.get(k) != v}


def numeric_settings() -> dict[str, Any]:
    """What a run records in its results: the path it followed, the same on every machine that follows it.

    ``{"path": "avx2", "env": {...}}`` when the settings are in this process's environment,
    ``{"path": "native", "machine": ...}`` otherwise (opted out, started without them, or not x86-64).
    """
    if applies() and not missing_settings():
        return {"path": "avx2", "env": dict(NUMERIC_ENV)}
    return {"path": "native", "machine": platform.machine().lower()}


def native_capability() -> str:
    """The CPU's own best vector extension as this process sees it (for ``timings.json``, not results):
    ``AVX512``, ``AVX2`` (x86-64), or the machine name elsewhere. Reads ``/proc/cpuinfo``; no torch."""
    arch = platform.machine().lower()
    if arch not in X86_64:
        return arch
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "AVX512"
    return "AVX2" if "avx2" in flags else "pre-AVX2"


def reexec_argv(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]] | None:
    """How a command must start again to follow the path: ``(argv, env)``, or ``None`` when it already does.

    ``argv`` is the command's full argument vector to run again (e.g. ``[python, -m, anchorformer.cli,
    ...]``). ``None`` also when the process was itself started again, so that it never loops.
    """
    env = os.environ if env is None else env
    if not missing_settings(env) or env.get(_REEXEC):
        return None
    return list(argv), {**numeric_env(env), _REEXEC: "1"}
