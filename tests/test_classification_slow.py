"""Classification engine across processes: DDP on the CPU, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cls_helpers import TINY, make_tiny_imagefolder

from anchorformer.engine.checkpoint import checkpoint_path, find_latest_checkpoint
from anchorformer.tasks.classification.train import build_classifier, classifier_kwargs, resolve_recipe, train

MODEL = "anchorformer_tiny_patch16_224"
# No randomness left in the step: no augmentation, no drop-path, plain SGD without weight decay.
EXACT = TINY + ["no_aug=true", "opt=sgd", "weight_decay=0.0", "lr=0.5", "smoothing=0.0", "threads=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_process_ddp_takes_the_same_step_as_one_process(tmp_path, monkeypatch):
    """2 gloo processes x 8 images == 1 process x 16 images: the same parameters after one step."""
    root = make_tiny_imagefolder(tmp_path / "imagenet", train_per_class=8, val_per_class=2)  # 24 images: one step
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    two = train(
        root, tmp_path / "ddp2", MODEL, nproc_per_node=2, profile="mini", overrides=EXACT + ["batch_size=8"], epochs=1
    )
    one = train(
        root, tmp_path / "ddp1", MODEL, nproc_per_node=1, profile="mini", overrides=EXACT + ["batch_size=16"], epochs=1
    )
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["val_images"] == one["val_images"] == 6  # the shards cover the set once
    assert len(torch.load(checkpoint_path(tmp_path / "ddp1", 1), weights_only=True)["history"]) == 1
    a = torch.load(tmp_path / "ddp2" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp1" / "model.pth", weights_only=True)["model"]
    torch.manual_seed(0)  # the initial weights, as the engine builds them (seed 0)
    cfg = resolve_recipe(profile="mini", overrides=EXACT, model=MODEL)
    start = build_classifier(MODEL, classifier_kwargs(MODEL, cfg, 3)).state_dict()
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    assert moved > 1e-3  # the step did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert abs(two["train_loss"] - one["train_loss"]) < 1e-5
    # the per-image flags come back in dataset order from the two shards (rank 0: 0, 2, 4; rank 1: 1, 3, 5)
    from anchorformer.tasks.classification.intervals import read_predictions

    pa, pb = read_predictions(tmp_path / "ddp2"), read_predictions(tmp_path / "ddp1")
    assert pa["files_sha256"] == pb["files_sha256"] and pa["correct"].tolist() == pb["correct"].tolist()
    assert 100.0 * pa["correct"].mean() == pytest.approx(two["top1"])


def _train_cmd(root, out, epochs, *extra):
    cmd = [sys.executable, "-m", "anchorformer.cli", "train", "cls", "--data", str(root), "--out", str(out)]
    cmd += ["--model", MODEL, "--profile", "mini", "--epochs", str(epochs), *extra]
    return cmd + [a for item in [*TINY, "keep_checkpoints=10"] for a in ("--set", item)]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    root = make_tiny_imagefolder(tmp_path / "imagenet", train_per_class=16, val_per_class=4)
    epochs = 6
    subprocess.run(_train_cmd(root, tmp_path / "ref", epochs), check=True, env=_env(), capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(root, run, epochs), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while find_latest_checkpoint(run) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists() and not (run / "model.pth").exists()
    latest = find_latest_checkpoint(run)
    assert latest is not None
    done = torch.load(latest, weights_only=True)["epoch"]
    assert 1 <= done < epochs

    subprocess.run(_train_cmd(root, run, epochs, "--resume", "auto"), check=True, env=_env(), capture_output=True)
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    for key in ("top1", "top5", "loss", "train_loss"):
        assert got[key] == ref[key], key
    strip = lambda h: [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in h]  # noqa: E731
    assert strip(json.loads((run / "history.json").read_text())) == strip(
        json.loads((tmp_path / "ref" / "history.json").read_text())
    )
    a = torch.load(tmp_path / "ref" / "model.pth", weights_only=True)["model"]
    b = torch.load(run / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    tsv = (run / "dvclive" / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in tsv[1:]] == list(range(epochs))  # no epoch logged twice
