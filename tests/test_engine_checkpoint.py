"""Checkpoints: atomic writes, weights-only reads, the latest complete one, RNG states."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from anchorformer.engine.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


def _training_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=5, warmup_epochs=1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step(1)
    return {
        "epoch": 1,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "config": {"lr": 1e-3, "scale": [0.08, 1.0], "teacher": None},
    }


def test_roundtrip_weights_only(tmp_path):
    state = _training_state()
    path = tmp_path / "run" / "checkpoint-000001.pth"
    save_checkpoint(path, state)
    back = load_training_checkpoint(path)
    assert back["epoch"] == 1 and back["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["scheduler"] == state["scheduler"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-000001.pth"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_training_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_latest_skips_partial_and_temporary_files(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for step in (1, 2):
        save_checkpoint(checkpoint_path(tmp_path, step), {"epoch": step})
    ckdir = tmp_path / "checkpoints"
    # what a non-atomic writer killed mid-write would leave: a cut archive under the final name
    whole = checkpoint_path(tmp_path, 2).read_bytes()
    checkpoint_path(tmp_path, 3).write_bytes(whole[: len(whole) // 2])
    # and what our writer killed mid-write leaves: a hidden temporary file
    (ckdir / ".checkpoint-000004.pth.tmp-abc").write_bytes(whole)
    (ckdir / "checkpoint-000005.pth.tmp").write_bytes(whole)
    latest = find_latest_checkpoint(tmp_path)
    assert latest == checkpoint_path(tmp_path, 2)
    assert load_training_checkpoint(latest)["epoch"] == 2


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_training_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_training_checkpoint(bad)


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 10):
        save_checkpoint(checkpoint_path(tmp_path, step), {"epoch": step})
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-000001.pth", "checkpoint-000002.pth"]
    assert find_latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)


def test_rng_state_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), np.random.randn(), torch.rand(1)  # advance; numpy holds a gauss
    save_checkpoint(tmp_path / "rng.pth", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_training_checkpoint(tmp_path / "rng.pth")["rng"])
    got = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    assert got == expected
    with pytest.raises(KeyError, match="numpy"):
        restore_rng_state({"python": {}, "torch": torch.get_rng_state()})


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_partial_checkpoint(tmp_path):
    """A writer killed at an arbitrary moment: every checkpoint-*.pth present loads completely."""
    script = textwrap.dedent(
        f"""
        import torch
        from anchorformer.engine.checkpoint import checkpoint_path, save_checkpoint
        big = torch.randn(4_000_000)
        for step in range(1, 1000):
            save_checkpoint(checkpoint_path({str(tmp_path)!r}, step), {{"epoch": step, "w": big}})
            print(step, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # one checkpoint is complete
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = find_latest_checkpoint(tmp_path)
    assert latest is not None
    state = load_training_checkpoint(latest)
    assert state["w"].numel() == 4_000_000
    for p in (tmp_path / "checkpoints").glob("checkpoint-*.pth"):
        assert load_training_checkpoint(p)["w"].numel() == 4_000_000
