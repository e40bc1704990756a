"""scripts/repro.py (make repro): stages side by side give what a serial ``dvc repro`` gives.

A scratch DVC repository holds a diamond of stages (a → b, c → d) and an exclusive one (e). Each
command records when it started and ended in a file outside the repository, so the tests see which
stages ran, and which overlapped.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("repro", ROOT / "scripts" / "repro.py")
repro = importlib.util.module_from_spec(_spec)
sys.modules["repro"] = repro
_spec.loader.exec_module(repro)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

# A stage's command: record the start, sleep, write OUT from the inputs (upper-cased), record the end;
# exit with $FAIL_STAGE's status when it names this stage.
STEP = textwrap.dedent(
    """
    import os, sys, time
    name, seconds, out, *inputs = sys.argv[1:]
    log = os.environ["STEP_LOG"]
    with open(log, "a") as f:
        f.write(f"{name} start {time.monotonic()}\\n")
    time.sleep(float(seconds))
    if os.environ.get("FAIL_STAGE") == name:
        sys.exit(3)
    text = name + ":" + "".join(open(p).read() for p in inputs).upper()
    with open(out, "w") as f:
        f.write(text)
    with open(log, "a") as f:
        f.write(f"{name} end {time.monotonic()}\\n")
    """
)


def _pipeline(step: Path) -> dict:
    def stage(name, seconds, deps, **extra):
        cmd = f"{sys.executable} {step} {name} {seconds} {name}.txt {' '.join(deps)}".strip()
        return {"cmd": cmd, "deps": [str(step), *deps], "outs": [f"{name}.txt"], **extra}

    return {
        "stages": {
            "a": stage("a", 0, ["src.txt"]),
            "b": stage("b", 2, ["a.txt"]),
            "c": stage("c", 2, ["a.txt", "c_extra.txt"]),
            "d": stage("d", 0, ["b.txt", "c.txt"]),
            "e": stage("e", 1, ["src.txt"], meta={"exclusive": True}),
        }
    }


def _env(log: Path, **extra) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "STEP_LOG": str(log),
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


def _repo(tmp_path: Path, name: str) -> Path:
    step = tmp_path / "step.py"
    step.write_text(STEP, encoding="utf-8")
    repo = tmp_path / name
    repo.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(_pipeline(step), sort_keys=False), encoding="utf-8")
    (repo / "src.txt").write_text("source", encoding="utf-8")
    (repo / "c_extra.txt").write_text("extra", encoding="utf-8")
    return repo


def _run(repo: Path, log: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "repro.py"), *args],
        cwd=repo,
        env=_env(log, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _spans(log: Path) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end) from the log; a stage without an end has end = inf."""
    spans: dict[str, list[float]] = {}
    if not log.exists():
        return {}
    for line in log.read_text().splitlines():
        name, what, t = line.split()
        spans.setdefault(name, [float("inf"), float("inf")])[0 if what == "start" else 1] = float(t)
    return {n: (s, e) for n, (s, e) in spans.items()}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]


def test_two_at_a_time_records_what_a_serial_dvc_repro_records(tmp_path):
    parallel, serial = _repo(tmp_path, "parallel"), _repo(tmp_path, "serial")
    log = tmp_path / "parallel.log"
    done = _run(parallel, log, "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=serial, env=_env(tmp_path / "serial.log"), check=True,
        capture_output=True,
    )  # fmt: skip
    # the same lock entries (hashes of every dep and out), whatever the order they were written in
    assert _lock(parallel) == _lock(serial)
    assert (parallel / "d.txt").read_text() == "d:B:A:SOURCEC:A:SOURCEEXTRA"

    spans = _spans(log)
    assert set(spans) == set("abcde")
    assert _overlap(spans["b"], spans["c"]), spans  # independent stages ran side by side
    assert spans["a"][1] <= min(spans["b"][0], spans["c"][0]) and max(spans["b"][1], spans["c"][1]) <= spans["d"][0]
    assert not any(_overlap(spans["e"], spans[n]) for n in "abcd"), spans  # the exclusive stage ran alone
    # every line a stage printed carries its name; the summary says how many stages ran
    assert "[b" in done.stdout and "Running stage 'b'" in done.stdout
    assert "5 stages up to date, 5 of them run by DVC, 2 at a time" in done.stdout
    # the stages' seconds are kept as next time's scheduling hints
    assert set(yaml.safe_load((parallel / repro.SECONDS_FILE).read_text())) == set("abcde")

    # a second run runs nothing; a changed dep reruns its stage and what depends on it, only
    log.unlink()
    again = _run(parallel, log)
    assert again.returncode == 0 and "Data and pipelines are up to date." in again.stdout
    assert _spans(log) == {}
    (parallel / "c_extra.txt").write_text("changed", encoding="utf-8")
    again = _run(parallel, log, "-j", "2")
    assert again.returncode == 0 and "5 stages up to date, 2 of them run by DVC" in again.stdout
    assert set(_spans(log)) == {"c", "d"}
    # targets: a stage and what it depends on; --force reruns them
    log.unlink()
    assert _run(parallel, log, "-f", "b").returncode == 0
    assert set(_spans(log)) == {"a", "b"}


def test_a_failed_stage_stops_the_pipeline_and_names_itself(tmp_path):
    repo = _repo(tmp_path, "repo")
    log = tmp_path / "log"
    done = _run(repo, log, "-j", "2", FAIL_STAGE="c")
    assert done.returncode != 0, done.stdout + done.stderr
    assert "exited with 3" in done.stdout and "stage c failed (exit status" in done.stdout
    spans = _spans(log)
    assert "d" not in spans and spans["c"][1] == float("inf")  # c never ended; d never started
    assert "not run:" in done.stdout and "d" in done.stdout.split("not run:")[1]
    assert "c" not in _lock(repo)  # DVC recorded nothing for the failed stage
    # fixed, the next run finishes only what is left
    log.unlink()
    assert _run(repo, log, "-j", "2").returncode == 0
    assert set(_spans(log)) <= {"c", "d", "e"} and {"c", "d"} <= set(_spans(log))


def test_scheduling_order_and_arguments(tmp_path):
    stages = {"a": (set(), False), "b": ({"a"}, False), "c": ({"a"}, False), "d": ({"b", "c"}, False)}
    # the heaviest chain first: c weighs more than b, so c starts first once a is done
    prio = repro.priorities(stages, {"a": 1, "b": 5, "c": 50, "d": 1})
    assert prio == {"a": 52, "b": 6, "c": 51, "d": 1}
    sched = repro.Scheduler(tmp_path, stages, 2, ["dvc"], False, {"b": 5, "c": 50})
    assert sched.ready({"a"}, {"a"}) == ["c", "b"]
    assert sched.command("c") == ["dvc", "--wait-for-lock", "repro", "--single-item", "c"]
    # targets take what they depend on; a foreach group's name stands for its items
    assert set(repro.select(stages, ["b"])) == {"a", "b"}
    assert repro.descendants(stages, {"b"}) == {"b", "d"} and repro.descendants(stages, {"a"}) == set(stages)
    grouped = {"x": (set(), False), "g@1": ({"x"}, False), "g@2": (set(), False)}
    assert set(repro.select(grouped, ["g"])) == {"x", "g@1", "g@2"}
    with pytest.raises(SystemExit, match="no stage named 'zz'"):
        repro.select(stages, ["zz"])
    # auto: one stage per core for the mini profile, one at a time for the full profile (GPUs)
    (tmp_path / "params.yaml").write_text("profile: full\n")
    assert repro.default_jobs(tmp_path) == 1
    (tmp_path / "params.yaml").write_text("profile: mini\n")
    assert repro.default_jobs(tmp_path) == max(1, os.cpu_count() or 1)
    with pytest.raises(SystemExit):
        repro.main(["--jobs", "zero", "--repo", str(tmp_path)])
