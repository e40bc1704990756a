"""Reproduce the DVC pipeline running independent stages side by side: what ``make repro`` runs.

``dvc repro`` runs one stage at a time, and every mini-profile stage trains on one thread, so on a
machine with several cores most of them idle. This script runs the same pipeline with up to
``--jobs`` stages at once::

    python scripts/repro.py                 # every stage that needs it; --jobs from the profile
    python scripts/repro.py --jobs 1        # one at a time, in the order dvc repro would pick
    python scripts/repro.py -f cls-e9       # force cls-e9's stages (and only those)
    python scripts/repro.py --dry           # the stages and the order it would start them in

Each stage is run by DVC itself, ``dvc --wait-for-lock repro --single-item STAGE``, once all the
stages it depends on have finished: DVC decides whether it changed, restores it from the run cache
or runs its command, hashes its outputs and writes its entry of ``dvc.lock``, exactly as a plain
``dvc repro`` would. DVC releases the repository's lock while a stage's command runs, so two
commands overlap while the bookkeeping stays serial. Every output is the same bytes as a serial
``dvc repro`` gives (each run seeds itself and fixes its threads; tests/test_repro_parallel.py
compares ``dvc.lock``), so the order and the overlap change only the wall time.

Scheduling:

- ``--jobs``: ``auto`` (the default, or ``$REPRO_JOBS``) is the number of CPU cores for the mini
  profile, whose stages use one thread each, and 1 for the full profile, whose stages take all
  the GPUs (``torchrun``) and must not share them.
- A stage whose ``meta`` in ``dvc.yaml`` says ``exclusive: true`` (the benchmark: it measures
  time) runs alone: no other stage starts while it runs, and it starts once the others finished.
- Among the stages that are ready, the one with the longest chain of work after it starts first:
  each stage weighs the seconds it took last time on this machine (``.dvc/tmp/repro-seconds.json``,
  untracked) or a minute when unknown, so the long detection and segmentation runs are not left
  to the end.
- Each line a stage prints is prefixed with its name. The first failure stops new stages from
  starting; the running ones finish (a killed training run resumes from its checkpoint), and the
  command exits with the failed stage's status, naming it.
- First one ``dvc status``: a stage it reports unchanged, with nothing changed upstream of it, is
  not handed to DVC (``--force`` hands every selected stage). At the end ``dvc status`` must report
  the pipeline up to date; otherwise the command fails and shows what changed (a plain
  ``dvc repro`` then reruns it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECONDS_FILE = Path(".dvc") / "tmp" / "repro-seconds.json"
DEFAULT_SECONDS = 60.0


def find_repo(start: Path) -> Path:
    """The DVC repository holding ``start`` (a folder with ``.dvc/``, looking upwards), or else
    the one this script belongs to: ``python path/to/scripts/repro.py`` works from anywhere."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return ROOT


def check_yaml(repo_dir: Path) -> None:
    """``dvc.yaml`` and ``params.yaml`` parse; otherwise one line naming the file and the line."""
    import yaml

    for name in ("dvc.yaml", "params.yaml"):
        path = repo_dir / name
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise SystemExit(f"repro.py: {where}: not valid YAML ({what})") from None


def load_pipeline(repo_dir: Path):
    """The pipeline's stages: ``{name: (upstream names, exclusive)}`` in ``dvc.yaml`` order.

    Only stages with a command; stages of ``.dvc`` files (no command) are data, not work.
    """
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it depends on
        stages = {}
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue
            upstream = {s.addressing for s in graph.successors(stage) if getattr(s, "cmd", None)}
            meta = getattr(stage, "meta", None) or {}
            if not isinstance(meta, dict):
                raise SystemExit(f"repro.py: dvc.yaml: stage {stage.addressing}: meta must be a mapping, got {meta!r}")
            stages[stage.addressing] = (upstream, bool(meta.get("exclusive", False)))
            for dep in getattr(stage, "deps", []):
                if str(dep.def_path).endswith(".ipynb"):
                    _NOTEBOOK_STAGES.setdefault(Path(dep.def_path).stem, []).append(stage.addressing)
    return stages


# notebook name (``10_classification``) -> the stages that run it, filled by load_pipeline
_NOTEBOOK_STAGES: dict[str, list[str]] = {}


def select(stages: dict, targets: list[str]) -> dict:
    """``stages`` restricted to ``targets`` and what they depend on (all of them when empty).

    A target is a stage's name or a foreach group's name (``cls-e9`` stands for every ``cls-e9@…``).
    """
    if not targets:
        return stages
    wanted, todo = set(), []
    for target in targets:
        hits = [n for n in stages if n == target or n.split("@", 1)[0] == target]
        if not hits:  # a notebook (notebooks/10_classification.ipynb, 10_classification): its stages
            hits = [n for n in _NOTEBOOK_STAGES.get(Path(target).stem, []) if n in stages]
        if not hits:
            raise SystemExit(f"repro.py: no stage named {target!r} in dvc.yaml (stages: {', '.join(stages)})")
        todo.extend(hits)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(stages[name][0])
    return {n: (up & wanted, ex) for n, (up, ex) in stages.items() if n in wanted}


def descendants(stages: dict, names: set[str]) -> set[str]:
    """``names`` and every stage that depends on one of them, directly or not."""
    found, grew = set(names), True
    while grew:
        more = {n for n, (upstream, _) in stages.items() if upstream & found} - found
        found |= more
        grew = bool(more)
    return found


def dvc_status(repo_dir: Path, dvc: list[str], targets: Iterable[str] = ()) -> dict:
    """``dvc status --json`` of ``targets`` (all stages when empty): what changed, by stage."""
    done = subprocess.run([*dvc, "status", "--json", *targets], cwd=repo_dir, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stdout.write(done.stdout + done.stderr)
        raise SystemExit(f"repro.py: dvc status failed (exit status {done.returncode})")
    return json.loads(done.stdout or "{}")


def changed_stages(repo_dir: Path, dvc: list[str], stages: dict) -> set[str]:
    """The stages ``dvc status`` reports changed, and all downstream of them (which may change once
    those ran; each decides for itself when its turn comes)."""
    return descendants(stages, set(dvc_status(repo_dir, dvc)) & set(stages))


def priorities(stages: dict, seconds: dict) -> dict[str, float]:
    """Each stage's weight plus the heaviest chain of stages that depend on it."""
    downstream: dict[str, list[str]] = {n: [] for n in stages}
    for name, (upstream, _) in stages.items():
        for up in upstream:
            downstream[up].append(name)
    memo: dict[str, float] = {}

    def chain(name: str) -> float:
        if name not in memo:
            memo[name] = float(seconds.get(name, DEFAULT_SECONDS)) + max(
                (chain(d) for d in downstream[name]), default=0.0
            )
        return memo[name]

    return {n: chain(n) for n in stages}


def default_jobs(repo_dir: Path) -> int:
    """``auto``: the CPU cores for the mini profile (one thread per stage), 1 for the full one."""
    import yaml

    params = repo_dir / "params.yaml"
    profile = "mini"
    if params.is_file():
        profile = (yaml.safe_load(params.read_text(encoding="utf-8")) or {}).get("profile", "mini")
    return 1 if profile == "full" else max(1, os.cpu_count() or 1)


def _stream(proc: subprocess.Popen, name: str, lock: threading.Lock, width: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[{name:<{width}}] {line}")
            sys.stdout.flush()


class Scheduler:
    def __init__(self, repo_dir: Path, stages: dict, jobs: int, dvc: list[str], force: bool, seconds: dict):
        self.repo_dir = repo_dir
        self.stages = stages
        self.jobs = jobs
        self.dvc = dvc
        self.force = force
        self.seconds = seconds
        self.priority = priorities(stages, seconds)
        self.order = list(stages)  # dvc.yaml order breaks ties
        self.lock = threading.Lock()
        self.width = min(32, max((len(n) for n in stages), default=1))

    def ready(self, done: set, started: set) -> list[str]:
        names = [n for n in self.order if n not in started and self.stages[n][0] <= done]
        return sorted(names, key=lambda n: (-self.priority[n], self.order.index(n)))

    def command(self, name: str) -> list[str]:
        return [*self.dvc, "--wait-for-lock", "repro", "--single-item", *(["--force"] if self.force else []), name]

    def run(self, up_to_date: set[str] = frozenset()) -> int:
        done: set[str] = set(up_to_date)
        started: set[str] = set(up_to_date)
        running: dict[str, tuple[subprocess.Popen, threading.Thread, float]] = {}
        failed: list[tuple[str, int]] = []
        start = time.monotonic()
        try:
            while len(done) < len(self.stages):
                if not failed:
                    for name in self.ready(done, started):
                        exclusive = self.stages[name][1]
                        busy = [self.stages[r][1] for r in running]
                        if any(busy) or len(running) >= self.jobs or (exclusive and running):
                            break  # an exclusive stage waits for an empty machine, and holds the queue
                        running[name] = self.launch(name)
                        started.add(name)
                        if exclusive:
                            break
                if not running:
                    break  # a failure stopped new stages and the running ones are finished
                finished = self.wait(running)
                for name, code in finished:
                    proc, thread, t0 = running.pop(name)
                    thread.join()
                    if code == 0:
                        done.add(name)
                        self.seconds[name] = round(time.monotonic() - t0, 1)
                    else:
                        failed.append((name, code))
                        self.say(f"stage {name} failed (exit status {code}); no new stage starts")
        except KeyboardInterrupt:
            for proc, _, _ in running.values():
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            for proc, thread, _ in running.values():
                proc.wait()
                thread.join()
            self.say("interrupted; the stages that were running were stopped (a training run resumes)")
            return 130
        minutes = (time.monotonic() - start) / 60
        if failed:
            left = [n for n in self.order if n not in done and n not in dict(failed)]
            self.say(
                "failed: {}; not run: {} ({:.1f} min)".format(
                    ", ".join(f"{n} (exit status {c})" for n, c in failed), ", ".join(left) or "none", minutes
                )
            )
            return failed[0][1] or 1
        ran = len(done) - len(up_to_date)
        self.say(f"{len(done)} stages up to date, {ran} of them run by DVC, {self.jobs} at a time ({minutes:.1f} min)")
        return 0

    def launch(self, name: str):
        cmd = self.command(name)
        proc = subprocess.Popen(
            cmd,
            cwd=self.repo_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches it through killpg, once
        )
        thread = threading.Thread(target=_stream, args=(proc, name, self.lock, self.width), daemon=True)
        thread.start()
        return proc, thread, time.monotonic()

    @staticmethod
    def wait(running: dict) -> list[tuple[str, int]]:
        while True:
            finished = [(n, p.poll()) for n, (p, _, _) in running.items()]
            finished = [(n, c) for n, c in finished if c is not None]
            if finished:
                return finished
            time.sleep(0.2)

    def say(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(f"repro.py: {text}\n")
            sys.stdout.flush()


def check_up_to_date(repo_dir: Path, dvc: list[str], targets: list[str]) -> int:
    """0 when ``dvc status`` reports nothing to do for ``targets``; otherwise its report and 1."""
    changed = dvc_status(repo_dir, dvc, targets)
    if changed:
        sys.stdout.write(
            "repro.py: dvc status still reports changes after the run (`dvc repro` reruns them):\n"
            + json.dumps(changed, indent=2)
            + "\n"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="stages or foreach groups (default: the whole pipeline)")
    parser.add_argument(
        "-j", "--jobs", default=os.environ.get("REPRO_JOBS", "auto"), help="stages at once (auto, or a number)"
    )
    parser.add_argument("-f", "--force", action="store_true", help="rerun the selected stages even if unchanged")
    parser.add_argument("--dry", action="store_true", help="print the stages in the order they would start")
    parser.add_argument(
        "--repo", type=Path, default=None, help="the DVC repository (default: the one here, else this script's)"
    )
    args = parser.parse_args(argv)

    repo_dir = (args.repo or find_repo(Path.cwd())).resolve()
    check_yaml(repo_dir)
    os.chdir(repo_dir)  # DVC names stages relative to the working directory
    if args.jobs == "auto":
        jobs = default_jobs(repo_dir)
    else:
        try:
            jobs = int(args.jobs)
        except ValueError:
            parser.error(f"--jobs: expected auto or a whole number, got {args.jobs!r}")
        if jobs < 1:
            parser.error(f"--jobs: expected at least 1, got {jobs}")
    stages = select(load_pipeline(repo_dir), args.targets)
    seconds_path = repo_dir / SECONDS_FILE
    seconds = {}
    if seconds_path.is_file():
        try:
            seconds = json.loads(seconds_path.read_text(encoding="utf-8"))
        except ValueError:
            seconds = {}  # a hint only: a damaged file means default weights
    dvc = [sys.executable, "-m", "dvc"]
    scheduler = Scheduler(repo_dir, stages, jobs, dvc, args.force, seconds)
    if args.dry:
        done: set[str] = set()
        while len(done) < len(stages):
            name = scheduler.ready(done, done)[0]
            print(f"{name}{'  (alone)' if stages[name][1] else ''}")
            done.add(name)
        return 0
    # One `dvc status` first: the stages it finds unchanged, with nothing changed upstream, are not
    # handed to DVC one by one (a second `make repro` takes seconds).
    todo = set(stages) if args.force else changed_stages(repo_dir, dvc, stages)
    if not todo:
        print("repro.py: Data and pipelines are up to date.")
        return 0
    code = scheduler.run(up_to_date=set(stages) - todo)
    seconds_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = seconds_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scheduler.seconds, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, seconds_path)
    if code == 0:
        code = check_up_to_date(repo_dir, dvc, sorted(stages) if args.targets else [])
    return code


def _main() -> int:
    """:func:`main`, with Ctrl-C one line (a stage's training run resumes at the next start)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("repro.py: interrupted; rerun the same command to go on (training stages resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_main())
