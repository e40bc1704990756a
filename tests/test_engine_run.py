"""The run folder: a lock, the resume protocol, nothing of an earlier run deleted or mixed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from anchorformer.engine.checkpoint import checkpoint_path, save_checkpoint, save_training_state
from anchorformer.engine.run import LOCK_NAME, RunFolderError, open_run, release_run


def _ckpt(out, step, **extra):
    save_training_state(out, step, {"step": step, "config": {"lr": 0.1}, **extra}, keep=10)


def test_a_fresh_folder_starts_afresh_and_is_locked(tmp_path):
    start = open_run(tmp_path / "run")
    assert not start.resumed and (tmp_path / "run" / LOCK_NAME).is_file()
    info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"]
    release_run(start)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from anchorformer.engine.run import open_run; "
         "open_run(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(host .*, PID {holder.pid}"):
            open_run(out)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over
    start = open_run(out)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_run(start)


def test_auto_resumes_the_newest_loadable_checkpoint_and_says_which_it_skipped(tmp_path, caplog):
    out = tmp_path / "run"
    _ckpt(out, 1)
    _ckpt(out, 2)
    checkpoint_path(out, 3).write_bytes(b"not a checkpoint")
    (out / "checkpoints" / ".checkpoint-000005.pth.tmp-abc").write_bytes(b"half")
    (out / "metrics.json").write_text("{}")
    start = open_run(out)
    assert start.resumed and start.state["step"] == 2 and start.checkpoint == checkpoint_path(out, 2)
    assert "checkpoint-000003.pth" in " ".join(start.skipped)
    assert not (out / "checkpoints" / ".checkpoint-000005.pth.tmp-abc").exists()  # orphan removed
    assert not (out / "metrics.json").exists()  # a restarted run never looks finished
    release_run(start)


def test_auto_refuses_another_recipe_and_results_without_checkpoints(tmp_path):
    out = tmp_path / "run"
    _ckpt(out, 1)
    with pytest.raises(RunFolderError, match=r"another recipe \(lr differs\).*--resume never --overwrite"):
        open_run(out, differences=lambda state: ["lr differs"])
    assert checkpoint_path(out, 1).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match="results .*metrics.json.* but no checkpoint"):
        open_run(other)
    assert (other / "metrics.json").is_file()


def test_never_refuses_an_earlier_run_unless_overwrite_which_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    _ckpt(out, 1)
    (out / "metrics.json").write_text('{"top1": 1}')
    with pytest.raises(RunFolderError, match="--resume never --overwrite"):
        open_run(out, resume="never")
    start = open_run(out, resume="never", overwrite=True)
    assert not start.resumed
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1
    assert json.loads((aside[0] / "metrics.json").read_text()) == {"top1": 1}
    assert (aside[0] / "checkpoints" / "checkpoint-000001.pth").is_file()
    assert not (out / "checkpoints").exists()
    release_run(start)


def test_restart_mode_moves_a_changed_run_aside(tmp_path):
    out = tmp_path / "run"
    _ckpt(out, 1)
    save_checkpoint(checkpoint_path(out, 2), {"step": 2, "code_version": "other"})
    start = open_run(out, if_different="restart")  # the newest was written by other code: resumed
    assert start.resumed and start.state["step"] == 2
    release_run(start)
    start = open_run(out, if_different="restart", restart_on_code_change=True)  # the strict behaviour
    assert not start.resumed and any(p.name.startswith("previous-") for p in out.iterdir())
    release_run(start)


def test_resume_from_a_named_checkpoint(tmp_path):
    out = tmp_path / "run"
    _ckpt(out, 1)
    start = open_run(tmp_path / "new", resume=str(checkpoint_path(out, 1)))
    assert start.state["step"] == 1
    release_run(start)
    with pytest.raises(RunFolderError, match="expected auto, never or an existing checkpoint"):
        open_run(tmp_path / "new", resume=str(tmp_path / "nope.pth"))
