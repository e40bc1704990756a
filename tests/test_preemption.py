"""Preemption is a pause: signals, wall-time checkpoints, the lock's heartbeat, code versions.

The chaos test drives the real command line (``python -m anchorformer.cli train cls|det|seg``) on
the full recipes' dry runs (every code path of the recipe, tiny models, the mini sets): each run
is stopped by SIGTERM, ``kill -9`` and SIGUSR1 at steps a fixed seed picks, the package's code
is edited before one of the resumptions, and every segment resumes with ``--resume auto``; the
run ends with the same weights and metrics, bit for bit, as the run never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anchorformer.engine import run as run_module
from anchorformer.engine.checkpoint import checkpoint_candidates, checkpoint_path, code_version, save_checkpoint
from anchorformer.engine.preempt import REQUEUE_EXIT, SIGNAL_EXIT, Preempted, Preemption, ResumableSampler
from anchorformer.engine.run import LOCK_NAME, RunFolderError, open_run, release_run
from anchorformer.engine.trainer import TrainingRun

# ---------------------------------------------------------------------------------------------
# the engine's parts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig,name,status", [(signal.SIGTERM, "SIGTERM", SIGNAL_EXIT), (signal.SIGUSR1, "SIGUSR1", REQUEUE_EXIT)]
)
def test_a_signal_only_sets_a_flag_the_loop_stops_with_its_status(sig, name, status, caplog) -> None:
    before = signal.getsignal(sig)
    with Preemption(None) as pre:
        assert pre.poll() is None and not pre.stopping
        os.kill(os.getpid(), sig)  # the handler runs here and only sets the flag
        assert pre.poll() == name and pre.stopping
        with caplog.at_level(logging.WARNING), pytest.raises(Preempted) as stopped:
            pre.stop(7, "ckpt.pth")
    assert stopped.value.code == status and isinstance(stopped.value, SystemExit)
    assert f"{name}: stopped after optimizer step 7; checkpoint ckpt.pth" in caplog.text
    assert signal.getsignal(sig) == before  # the handlers are the previous ones again


def test_wall_time_checkpoints_follow_the_clock(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("anchorformer.engine.preempt.time.monotonic", lambda: now[0])
    with Preemption(2.0) as pre:  # every 2 minutes
        assert pre.poll() is None
        now[0] += 119.0
        assert pre.poll() is None
        now[0] += 1.0
        assert pre.poll() == "time" and not pre.stopping
        pre.saved()
        assert pre.poll() is None
    with Preemption(None) as off:
        now[0] += 1e6
        assert off.poll() is None
    assert Preemption(2.0, is_main=False).poll() is None  # only rank 0's clock counts (max over ranks)


def test_resumable_sampler_skips_once_and_keeps_the_order() -> None:
    base = torch.utils.data.RandomSampler(range(10), generator=torch.Generator().manual_seed(3))
    whole = list(base)
    base.generator.manual_seed(3)
    s = ResumableSampler(base)
    s.skip = 4
    assert list(s) == whole[4:] and len(s) == 10
    assert len(list(s)) == 10  # the next pass is whole


def test_checkpoint_names_inside_an_epoch_sort_between_epochs(tmp_path) -> None:
    for step, within in [(2, 0), (1, 3), (1, 0), (1, 1), (0, 2)]:
        save_checkpoint(checkpoint_path(tmp_path, step, within), {"s": step, "w": within})
    names = [p.name for _, p in checkpoint_candidates(tmp_path)]
    assert names == [
        "checkpoint-000000-000002.pth",
        "checkpoint-000001.pth",
        "checkpoint-000001-000001.pth",
        "checkpoint-000001-000003.pth",
        "checkpoint-000002.pth",
    ]


def _lock(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {"host": "node-17", "pid": 4242, "command": "anchorformer train cls", "started": "2026-12-01T00:00:00"}
    (out / LOCK_NAME).write_text(json.dumps({**info, **fields}))


def test_a_lock_whose_heartbeat_stopped_is_taken_over_from_any_host(tmp_path, caplog) -> None:
    out = tmp_path / "run"
    _lock(out, heartbeat=time.time() - 60)  # another host, alive a minute ago: refused
    with pytest.raises(RunFolderError, match=r"in use by another run \(host node-17, PID 4242.*heartbeat 1\.0 min"):
        open_run(out)
    _lock(out, heartbeat=time.time() - 11 * 60)  # silent for 11 minutes: a dead job's
    with caplog.at_level(logging.WARNING):
        start = open_run(out)
    assert "taking over the lock of host node-17, PID 4242, whose heartbeat stopped 11.0 minutes ago" in caplog.text
    held = json.loads((out / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    release_run(start)
    assert not (out / LOCK_NAME).exists()
    _lock(out, heartbeat=time.time() - 11 * 60)
    with pytest.raises(RunFolderError, match="lock_stale_minutes=20"):
        open_run(out, lock_stale_minutes=20)
    (out / LOCK_NAME).unlink()
    _lock(out)  # a lock written before heartbeats: its file's age counts
    os.utime(out / LOCK_NAME, (time.time() - 700, time.time() - 700))
    release_run(open_run(out))


def test_the_heartbeat_is_refreshed_while_the_run_holds_the_lock(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(run_module, "HEARTBEAT_SECONDS", 0.05)
    start = open_run(tmp_path / "run")
    first = json.loads((tmp_path / "run" / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.4)
    later = json.loads((tmp_path / "run" / LOCK_NAME).read_text())["heartbeat"]
    assert later > first
    release_run(start)
    assert not (tmp_path / "run" / LOCK_NAME).exists() and not list((tmp_path / "run").glob(".*tmp-*"))


def _checkpoint(out: Path, version: str, segments=None) -> None:
    state = {"config": {"lr": 1.0}, "code_version": version}
    if segments is not None:
        state["code_versions"] = segments
    save_checkpoint(checkpoint_path(out, 5), state)


def test_another_code_version_resumes_unless_asked_to_restart(tmp_path, caplog) -> None:
    out = tmp_path / "run"
    _checkpoint(out, "0123456789abcdef")
    same = lambda state: []  # noqa: E731 - the recipe matches
    for if_different in ("refuse", "restart"):
        with caplog.at_level(logging.WARNING):
            start = open_run(out, differences=same, if_different=if_different)
        release_run(start)
        assert start.resumed, if_different
        assert "written by code version 0123456789abcdef" in caplog.text and "resuming all the same" in caplog.text
    start = open_run(out, differences=same, restart_on_code_change=True)  # the command line: resumed
    release_run(start)
    assert start.resumed
    start = open_run(out, differences=same, if_different="restart", restart_on_code_change=True)  # the pipeline
    release_run(start)
    assert not start.resumed and list(out.glob("previous-*/checkpoints/checkpoint-000005.pth"))


def test_code_versions_lists_each_segment(tmp_path) -> None:
    now = code_version()
    run = TrainingRun(recipe=None, out=tmp_path, dist=None, start=run_module.RunStart(tmp_path))  # type: ignore[arg-type]
    assert run.code_versions(4) == [{"version": now, "from_step": 0, "to_step": 4}]
    run.start.state = {"code_version": "old"}  # a checkpoint from before the list: one segment
    run.resumed_at(6)
    assert run.code_versions(9) == [
        {"version": "old", "from_step": 0, "to_step": 6},
        {"version": now, "from_step": 6, "to_step": 9},
    ]
    run.start.state = {"code_versions": [{"version": now, "from_step": 0, "to_step": 6}]}
    run.resumed_at(6)
    assert run.code_versions(9) == [{"version": now, "from_step": 0, "to_step": 9}]  # the same code: one segment
    segs = [{"version": "a", "from_step": 0, "to_step": 3}, {"version": "b", "from_step": 3, "to_step": 8}]
    run.start.state = {"code_versions": segs}
    run.resumed_at(5)  # an older checkpoint than the newest segment's end
    assert run.code_versions(7) == [
        *segs[:1],
        {**segs[1], "to_step": 5},
        {"version": now, "from_step": 5, "to_step": 7},
    ]


# ---------------------------------------------------------------------------------------------
# the chaos test: the real command line, stopped and resumed
# ---------------------------------------------------------------------------------------------

# the full recipe's dry run of each task, a few steps longer; a checkpoint after every step
# (checkpoint_minutes of a few milliseconds), so that a kill -9 loses at most one step
_EVERY_STEP = ["checkpoint_minutes=0.00001", "keep_checkpoints=100", "device=cpu"]
TASKS = {
    "cls": ("imagenet", ["dry_run=true", "epochs=4"], 8),  # 4 epochs of 2 steps
    "det": ("coco", ["dry_run=true", "epochs=4", "max_train_images=8", "lr_steps=[2, 3]"], 8),  # 4 x 2 steps
    "seg": ("ade20k/ADEChallengeData2016", ["dry_run=true", "iters=8"], 8),
}


def _package_copy(root: Path) -> Path:
    """A copy of the package under ``root`` (imported first through PYTHONPATH), to edit."""
    src = Path(__import__("anchorformer").__file__).parent
    shutil.copytree(src, root / "anchorformer", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _command(task: str, data: Path, out: Path) -> list[str]:
    folder, sets, _ = TASKS[task]
    argv = [sys.executable, "-m", "anchorformer.cli", "train", task, "--data", str(data / folder), "--out", str(out)]
    argv += ["--profile", "full", "--resume", "auto"]
    for s in [*sets, *_EVERY_STEP]:
        argv += ["--set", s]
    return argv


def _env(package_root: Path) -> dict[str, str]:
    """The copy first on the path (the commands run in ``package_root``: ``python -m`` puts the
    current folder before PYTHONPATH)."""
    return {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _written(out: Path) -> int:
    return len(checkpoint_candidates(out))


def _segment(cmd: list[str], env: dict[str, str], out: Path, stop: tuple[int, int] | None, log: Path) -> int:
    """Run one segment; with ``stop=(signal, n)``, send it once ``n`` more checkpoints exist."""
    before = _written(out)
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=f, stderr=subprocess.STDOUT)
        try:
            if stop is not None:
                sig, n = stop
                while _written(out) < before + n and proc.poll() is None:
                    time.sleep(0.02)
                assert proc.poll() is None, f"the run ended before its interruption; log: {log.read_text()[-3000:]}"
                proc.send_signal(sig)
            return proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{k}.{n}": t for k in ("model", "model_ema") if k in state for n, t in state[k].items()}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_chaos_sigterm_kill_sigusr1_and_a_code_edit_end_with_the_same_bytes(task, mini_data, tmp_path) -> None:
    pkg = _package_copy(tmp_path / "pkg")
    env = _env(pkg)
    total = TASKS[task][2]
    ref, out, log = tmp_path / "straight", tmp_path / "chaos", tmp_path / "chaos.log"
    straight = subprocess.run(_command(task, mini_data, ref), env=env, cwd=pkg, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    rng = random.Random(25)  # picks the steps at which each stop is sent
    plan = [(signal.SIGTERM, SIGNAL_EXIT), (signal.SIGKILL, -signal.SIGKILL), (signal.SIGUSR1, REQUEUE_EXIT)]
    cmd = _command(task, mini_data, out)
    for k, (sig, status) in enumerate(plan):
        if k == 2:  # a fix to the package between two segments: another code version
            edited = pkg / "anchorformer" / "engine" / "seeding.py"
            edited.write_text(edited.read_text() + "\n# a comment: another code version, the same computation\n")
        n = rng.randint(1, 2) if k < 2 else 1  # the last stop leaves a step to train after it
        rc = _segment(cmd, env, out, (sig, n), log)
        assert rc == status, f"{sig.name}: exit {rc}; log: {log.read_text()[-3000:]}"
        if sig != signal.SIGKILL:
            assert not (out / LOCK_NAME).exists(), "the lock is released"
            assert f"{sig.name}: stopped after optimizer step" in log.read_text()
        assert not (out / "metrics.json").exists()
    assert _segment(cmd, env, out, None, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "taking over the lock of process" in text  # the kill -9 left its lock behind
    assert "resuming all the same" in text  # the edited code resumed the run

    a, b = _weights(ref / "model.pth"), _weights(out / "model.pth")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    segments = mb.pop("code_versions")
    assert ma.pop("code_versions") == [{"version": segments[0]["version"], "from_step": 0, "to_step": total}]
    assert ma == mb
    assert len(segments) == 2 and segments[0]["version"] != segments[1]["version"]
    assert segments[0]["from_step"] == 0 and segments[0]["to_step"] == segments[1]["from_step"]
    assert segments[1]["to_step"] == total
    for rel in ("history.json", "dvclive/metrics.json", "detections.json", "per_class.json"):
        if (ref / rel).exists():
            assert (ref / rel).read_bytes() == (out / rel).read_bytes(), rel


def _worker_of_rank(parent: int, rank: int) -> int | None:
    """The PID of the torchrun worker of ``rank`` under the launcher ``parent`` (Linux /proc)."""
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (child / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(child.name)
    return None


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(mini_data, tmp_path) -> None:
    """SIGTERM reaches rank 1 only: both ranks stop after the same step, rank 0's checkpoint is
    that step's, the lock is released; SIGTERM to the launcher stops it again; the run then
    resumes to its end, with the weights of the run never stopped."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    folder, sets, total = TASKS["seg"]
    args = ["train", "seg", "--data", str(mini_data / folder), "--out", str(out), "--profile", "full"]
    for s in [*sets, *_EVERY_STEP, "threads=1"]:
        args += ["--set", s]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen([*torchrun, "anchorformer.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            while _written(out) < 1 and proc.poll() is None:
                time.sleep(0.02)
            worker = _worker_of_rank(proc.pid, 1)
            assert worker is not None and proc.poll() is None, log.read_text()[-3000:]
            os.kill(worker, signal.SIGTERM)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    stops = sorted(set(int(m) for m in re.findall(r"SIGTERM: stopped after optimizer step (\d+)", text)))
    assert len(stops) == 1 and text.count("SIGTERM: stopped after optimizer step") == 2, text[-3000:]
    (step,) = stops
    assert step < total and checkpoint_candidates(out)[-1][0] == step
    assert not (out / LOCK_NAME).exists() and not (out / "metrics.json").exists()
    # the launcher of a notebook (train(..., nproc_per_node=2)) passes SIGTERM on to torchrun and
    # exits 143 once the workers have checkpointed
    launcher = (
        "import sys; from anchorformer.tasks.segmentation.train import train; "
        f"train({str(mini_data / folder)!r}, {str(out)!r}, profile='full', nproc_per_node=2, "
        f"overrides={[*sets, *_EVERY_STEP, 'threads=1']!r})"
    )
    before = _written(out)
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-c", launcher], env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            while _written(out) < before + 1 and proc.poll() is None:
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=600) == SIGNAL_EXIT, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert log.read_text().count("SIGTERM: stopped after optimizer step") == 4  # both ranks, twice
    assert not (out / LOCK_NAME).exists() and not (out / "metrics.json").exists()
    with log.open("a") as f:
        assert (
            subprocess.run(
                [*torchrun, "anchorformer.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT
            ).returncode
            == 0
        )
    assert json.loads((out / "metrics.json").read_text())["iters"] == total
    # the same weights as two processes never stopped: each rank resumed its own generators
    straight = [a.replace(str(out), str(tmp_path / "straight")) for a in args]
    done = subprocess.run([*torchrun, "anchorformer.cli", *straight], env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    a, b = _weights(tmp_path / "straight" / "model.pth"), _weights(out / "model.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
