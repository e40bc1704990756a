"""A run folder is one run's, through the command line of every task (issue 15).

Each test drives ``anchorformer.cli.main`` (in-process) or ``python -m anchorformer.cli`` (real
processes), on seconds-long recipes: ``train cls`` on a 24-image colour set, ``train det`` on 8
mini COCO images, ``train seg`` on 4 mini ADE20K scenes.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cls_helpers import TINY, make_tiny_imagefolder

from anchorformer.cli import main
from anchorformer.data.files import BadFileError, MissingFileError
from anchorformer.engine.checkpoint import load_training_checkpoint
from anchorformer.engine.run import LOCK_NAME
from anchorformer.models.checkpoint import model_from_checkpoint

TASKS = ("cls", "det", "seg")
DET = [  # 8 images, batch 4: 2 iterations an epoch
    "max_train_images=8", "max_eval_images=2", "warmup_iters=2", "model_sizes.tiny.embed_dim=48",
    "model_sizes.tiny.depth=2", "num_anchors=8", "out_channels=32", "representation_size=64",
    "mask_head_layers=1", "mask_head_channels=16", "min_size=96", "max_size=120", "lr_steps=[1]",
]  # fmt: skip
SEG = [  # 4 scenes, batch 2
    "model_sizes.tiny={embed_dim: 32, depth: 2, num_heads: 2}", "num_anchors=4", "pyramid_channels=16",
    "head_channels=16", "crop_size=64", "batch_size=2", "test_crop_size=64", "test_stride=48",
    "test_scale=[256, 64]", "warmup_iters=0", "checkpoint_every=1",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, request):
    """Pristine copies of the three training sets (copy again what a test modifies)."""
    mini = request.getfixturevalue("mini_data")
    root = tmp_path_factory.mktemp("data")
    make_tiny_imagefolder(root / "cls")
    coco = root / "det"
    shutil.copytree(mini / "coco" / "annotations", coco / "annotations")
    for split in ("train", "val"):  # only the images the recipes read
        doc = json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())
        (coco / f"{split}2017").mkdir()
        for img in sorted(doc["images"], key=lambda i: i["id"])[:8]:
            shutil.copy(mini / "coco" / f"{split}2017" / img["file_name"], coco / f"{split}2017")
    ade, seg = mini / "ade20k" / "ADEChallengeData2016", root / "seg"
    for split, n in (("training", 4), ("validation", 1)):
        for kind in ("images", "annotations"):
            (seg / kind / split).mkdir(parents=True)
        for img in sorted((ade / "images" / split).glob("*.jpg"))[:n]:
            shutil.copy(img, seg / "images" / split)
            shutil.copy(ade / "annotations" / split / f"{img.stem}.png", seg / "annotations" / split)
    return root


def _copy(datasets: Path, task: str, dest: Path) -> Path:
    shutil.copytree(datasets / task, dest)
    return dest


def _argv(task: str, data: Path, out: Path, *sets: str, steps: int = 2) -> list[str]:
    """``train TASK`` for ``steps`` checkpoints (epochs of cls and det, iterations of seg)."""
    base = {"cls": [*TINY, "num_workers=0"], "det": DET, "seg": SEG}[task]
    length = ["--iters", str(steps), "--max-eval-images", "1"] if task == "seg" else ["--epochs", str(steps)]
    return ["train", task, "--data", str(data), "--out", str(out), *length,
            *[a for s in [*base, *sets] for a in ("--set", s)]]  # fmt: skip


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr: exactly one line, without a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []


# ---------------------------------------------------------------------------------------------
# Rows: two runs at once; kill -9 during a checkpoint write (real processes)
# ---------------------------------------------------------------------------------------------

# A `train cls` whose first checkpoint write never ends (its fsync hangs), so that it holds the
# folder while the test starts a second run, then dies by SIGKILL in the middle of the write.
_HANGS_IN_CHECKPOINT = """
import os, sys, time
fsync = os.fsync
def hang_on_checkpoints(fd):
    if "checkpoint-" in os.readlink(f"/proc/self/fd/{fd}"):
        print("writing", flush=True)
        time.sleep(600)
    fsync(fd)
os.fsync = hang_on_checkpoints
from anchorformer.cli import main
sys.exit(main(sys.argv[1:]))
"""
# `python -m anchorformer.cli ARGS` once the first run holds the lock (imports overlap with it).
_WHEN_LOCKED = """
import runpy, sys, time
from pathlib import Path
import anchorformer.tasks.classification.train  # the slow imports, while the first run starts
lock = Path(sys.argv[1])
while not lock.exists():
    time.sleep(0.05)
sys.argv = ["anchorformer", *sys.argv[2:]]
runpy.run_module("anchorformer.cli", run_name="__main__")
"""


@pytest.mark.slow  # two processes importing torch: ~25 s on two shared cores
def test_two_runs_on_one_folder_then_a_run_killed_mid_write(datasets, tmp_path, capsys, caplog):
    """Row 1 (two runs at once) and row 8 (kill -9 during a checkpoint write): the second run is
    refused naming the first (host, PID, command); the dead run's lock is taken over with a
    warning and its temporary file removed with a log line; the lock goes when the run ends."""
    out = tmp_path / "run"
    argv = _argv("cls", datasets / "cls", out, steps=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    first = subprocess.Popen([sys.executable, "-c", _HANGS_IN_CHECKPOINT, *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    second = subprocess.Popen([sys.executable, "-c", _WHEN_LOCKED, str(out / LOCK_NAME), *argv], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"is in use by another run (host {os.uname().nodename}, PID {first.pid}, started " in err
        assert "train cls --data" in err and "use another --out" in err
        assert first.stdout.readline().strip() == "writing"  # the first run is inside its checkpoint write
        (orphan,) = (out / "checkpoints").glob(".checkpoint-000001.pth.tmp-*")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert (out / LOCK_NAME).is_file() and orphan.exists()  # what a kill -9 leaves
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert f"taking over the lock of process {first.pid}, which is no longer running" in caplog.text
    assert f"removing {orphan}, left by an interrupted write" in caplog.text
    assert not orphan.exists() and not (out / LOCK_NAME).exists()
    assert _checkpoints(out) == ["checkpoint-000001.pth"] and (out / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------
# Rows: disk full, rerun after a crash, unsafe newest checkpoint, an earlier run's folder
# ---------------------------------------------------------------------------------------------


def _disk_full_at(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``n``-th training checkpoint write fails as torch's serializer fails on a full disk:
    a RuntimeError ("unexpected pos") whose context is the OSError ENOSPC."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "rng" in obj:
            calls.append(1)
            if len(calls) == n:
                f.write(b"PK\x03\x04 the first bytes")
                try:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_at_the_first_checkpoint(datasets, tmp_path, capsys, monkeypatch):
    """Row 7 as the issue met it: ENOSPC and the file named in one line, no temporary file left;
    the same command, once there is room, starts the run."""
    out = tmp_path / "run"
    argv = _argv("cls", datasets / "cls", out, steps=1)
    with monkeypatch.context() as m:
        _disk_full_at(1, m)
        assert main(argv) == 2
    err = _error(capsys)
    assert f"{out / 'checkpoints' / 'checkpoint-000001.pth'}: cannot write the checkpoint: " in err
    assert "(ENOSPC); no earlier checkpoint existed; nothing was replaced; free some space" in err
    assert list((out / "checkpoints").iterdir()) == [] and not (out / LOCK_NAME).exists()
    assert main(argv) == 0 and _checkpoints(out) == ["checkpoint-000001.pth"]


class _Evil:
    """A class a weights-only load refuses to unpickle."""


@pytest.mark.parametrize("task", TASKS)
def test_disk_full_crash_resume_unsafe_checkpoint_and_an_earlier_run(
    task, datasets, tmp_path, capsys, caplog, monkeypatch
):
    """Row 7 (disk full), row 2 (rerun after a crash), row 9 (newest checkpoint unsafe) and
    row 3 (an earlier run's folder: resumed, or refused naming --resume never --overwrite, which
    moves it aside), on one folder."""
    out = tmp_path / "run"
    argv = _argv(task, datasets / task, out, "keep_checkpoints=2")
    step1, step2 = {"det": (2, 4)}.get(task, (1, 2))  # det counts iterations: 2 an epoch
    first, second = f"checkpoint-{step1:06d}.pth", f"checkpoint-{step2:06d}.pth"

    # disk full at the second checkpoint: one line naming ENOSPC and the file; the first is intact
    with monkeypatch.context() as m:
        _disk_full_at(2, m)
        assert main(argv) == 2
    err = _error(capsys)
    assert f"{out / 'checkpoints' / second}: cannot write the checkpoint: No space left on device (ENOSPC)" in err
    assert f"the previous checkpoint {out / 'checkpoints' / first} is intact" in err
    assert _checkpoints(out) == [first] and not (out / LOCK_NAME).exists()
    load_training_checkpoint(out / "checkpoints" / first)

    # the same command again (no --resume): resumed from what the crash left, nothing deleted
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert f"resuming from {out / 'checkpoints' / first}" in caplog.text
    assert "removing" not in caplog.text and not list(out.glob("previous-*"))
    assert _checkpoints(out) == [first, second]
    assert json.loads((out / "metrics.json").read_text())["bad_files"] == 0

    # the newest checkpoint refused as unsafe: skipped, naming it and why; the previous one resumed
    torch.save({"model": _Evil()}, out / "checkpoints" / second)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert f"skipping {out / 'checkpoints' / second}: " in caplog.text
    assert "refused as unsafe to load with weights_only=True (Unsupported global" in caplog.text
    assert f"resuming from {out / 'checkpoints' / first}; skipped newer checkpoint(s): {second}" in caplog.text
    load_training_checkpoint(out / "checkpoints" / second)  # rewritten by the resumed run
    # ... and named as the checkpoint to resume, it is refused with the reason
    torch.save({"model": _Evil()}, tmp_path / "evil.pth")
    assert main([*argv, "--resume", str(tmp_path / "evil.pth")]) == 2
    assert f"--resume {tmp_path / 'evil.pth'}: " in _error(capsys)

    # another run (another lr) in this folder: refused, naming the flag that starts afresh
    other = _argv(task, datasets / task, out, "keep_checkpoints=2", "lr=0.0025") + (
        ["--no-eval"] if task == "seg" else []
    )
    before = sorted(p.name for p in out.iterdir())
    assert main(other) == 2
    assert "--resume never --overwrite" in _error(capsys)
    assert sorted(p.name for p in out.iterdir()) == before
    assert main([*other, "--resume", "never"]) == 2
    assert "holds an earlier run" in _error(capsys) and sorted(p.name for p in out.iterdir()) == before
    assert main([*other, "--resume", "never", "--overwrite"]) == 0
    (previous,) = out.glob("previous-*")
    assert set(before) - {LOCK_NAME} <= {p.name for p in previous.iterdir()}
    assert (previous / "metrics.json").is_file() and (previous / "checkpoints" / second).is_file()
    assert (
        load_training_checkpoint(out / "checkpoints" / _checkpoints(out)[-1])["config"]
        != load_training_checkpoint(previous / "checkpoints" / second)["config"]
    )
    if task == "seg":  # --no-eval: the new model.pth alone, the earlier results moved aside with their run
        assert (out / "model.pth").is_file() and (previous / "per_class.json").is_file()
        assert not (out / "metrics.json").exists() and not (out / "per_class.json").exists()
        assert _checkpoints(out) == ["checkpoint-000001.pth", "checkpoint-000002.pth"]


# ---------------------------------------------------------------------------------------------
# Rows: a bad file met in training; skipping bad files
# ---------------------------------------------------------------------------------------------


def _truncate_a_training_jpeg(task: str, data: Path) -> Path:
    """Cut a JPEG that the first training batches read in half; return its path."""
    if task == "cls":  # the first image of a class, rewritten as a truncated JPEG (24 images: all read)
        png = sorted((data / "train" / "n001").glob("*.png"))[0]
        bad = png.with_suffix(".jpg")
        from PIL import Image

        Image.open(png).convert("RGB").save(bad, quality=95)
        png.unlink()
    elif task == "det":
        doc = json.loads((data / "annotations" / "instances_train2017.json").read_text())
        bad = data / "train2017" / sorted(doc["images"], key=lambda i: i["id"])[0]["file_name"]
    else:
        bad = sorted((data / "images" / "training").glob("*.jpg"))[0]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def _collect_failed_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Collect the DataLoader iterators a failed run left to the garbage collector without
    waiting: torch joins a worker whose batch raised only after a timeout (5 s each, torch's
    MP_STATUS_CHECK_INTERVAL), then terminates it. (A command-line process exits without joining.)"""
    import torch.utils.data._utils as loader_utils

    with monkeypatch.context() as m:
        m.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.05)
        gc.collect()


@pytest.mark.parametrize("task", TASKS)
def test_a_bad_training_file_fails_in_one_line_or_is_skipped_and_counted(task, datasets, tmp_path, capsys, monkeypatch):
    """Row 4 (a truncated JPEG met by a DataLoader worker) and row 5 (``--set on_bad=skip``),
    as training meets the file (``check_files=none``) and as the check before training finds it."""
    data = _copy(datasets, task, tmp_path / "data")
    bad = _truncate_a_training_jpeg(task, data)
    out = tmp_path / "run"
    workers = 1 if task == "cls" else 0  # the case, and the error from the main process
    for check in ("none", "all"):
        assert main(_argv(task, data, out, f"num_workers={workers}", f"check_files={check}", steps=1)) == 2
        err = _error(capsys)
        assert err.startswith(f"anchorformer train: error: {bad}: cannot decode image (") and "truncated" in err.lower()
        assert ("found before training" in err) == (check == "all"), err
        assert not (out / LOCK_NAME).exists() and not (out / "metrics.json").exists()
        _collect_failed_workers(monkeypatch)

    # skipped by a DataLoader worker, counted in the main process; or recorded before training
    for check in ("none", "all"):
        argv = _argv(task, data, out, "num_workers=1", "on_bad=skip", f"check_files={check}", steps=1)
        assert main([*argv, "--resume", "never", "--overwrite"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["bad_files"] == 1
        records = [json.loads(line) for line in (out / "bad_files.jsonl").read_text().splitlines()]
        assert {r["path"] for r in records} == {str(bad)} and "cannot decode image" in records[0]["reason"]


def test_every_recipe_takes_on_bad_as_data_verify_does():
    from anchorformer.data.files import ON_BAD
    from anchorformer.engine.recipe import TaskRecipe, load_preset

    field = next(f for f in dataclasses.fields(TaskRecipe) if f.name == "on_bad")
    assert field.metadata["choices"] == ON_BAD and field.metadata["resumable"]
    for task in TASKS:
        for profile in ("mini", "full"):
            assert load_preset(task, profile)[0]["on_bad"] == "fail"


def test_every_recipe_checks_every_file_before_training_by_default():
    """``check_files`` (all | val | none) is in every preset, ``all``, and may change on resume."""
    from anchorformer.engine.recipe import TaskRecipe, load_preset

    field = next(f for f in dataclasses.fields(TaskRecipe) if f.name == "check_files")
    assert field.metadata["choices"] == ("all", "val", "none") and field.metadata["resumable"]
    for task in TASKS:
        for profile in ("mini", "full"):
            assert load_preset(task, profile)[0]["check_files"] == "all"


def test_bad_file_errors_survive_pickling_and_worker_reports():
    """What a DataLoader worker sends back (``type(e)(report)``) rebuilds the same error."""
    e = BadFileError("/data/x.jpg", "cannot decode image (OSError: image file is truncated)")
    report = (
        "Caught BadFileError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "worker.py", line 1, in <module>\n'
        f"anchorformer.data.files.BadFileError: {e}\n"
    )
    for rebuilt in (BadFileError(report), BadFileError(str(e))):
        assert (rebuilt.path, rebuilt.reason, str(rebuilt)) == (e.path, e.reason, str(e))
    m = MissingFileError("/data/y.png", "label map")
    again = MissingFileError(report.replace("BadFileError", "MissingFileError").replace(str(e), str(m)))
    assert isinstance(again, FileNotFoundError) and (again.path, again.reason) == ("/data/y.png", m.reason)


# ---------------------------------------------------------------------------------------------
# Rows: every split checked first; a batch larger than the dataset
# ---------------------------------------------------------------------------------------------

_SECOND_SPLIT = {"cls": "val", "det": "annotations/instances_val2017.json", "seg": "annotations/validation"}


@pytest.mark.parametrize("task", TASKS)
def test_every_split_is_checked_before_training(task, datasets, tmp_path, capsys):
    """Row 6: a missing validation split (ADE20K without annotations/validation) is named before
    the run folder is made."""
    data = _copy(datasets, task, tmp_path / "data")
    missing = data / _SECOND_SPLIT[task]
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    out = tmp_path / "run"
    assert main(_argv(task, data, out)) == 2
    assert f"{missing}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("task,batch", [("cls", 32), ("det", 16), ("seg", 8)])
def test_a_batch_larger_than_the_dataset_is_refused(task, batch, datasets, tmp_path, capsys):
    """Row 11: in every task (detection included: no single short iteration at a scaled lr)."""
    out = tmp_path / "run"
    assert main(_argv(task, datasets / task, out, f"batch_size={batch}")) == 2
    err = _error(capsys)
    assert f"fewer than one global batch of {batch}" in err and "batch_size" in err
    assert not (out / LOCK_NAME).exists() and _checkpoints(out) == []


# ---------------------------------------------------------------------------------------------
# Rows: unreadable checkpoints; degenerate annotations
# ---------------------------------------------------------------------------------------------


def test_unreadable_checkpoints_are_named_in_one_line(datasets, tmp_path, capsys):
    """Row 10: a bad .safetensors or a truncated .pth, to eval cls/det/seg and to model_from_checkpoint."""
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cut = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.zeros(64)}, "model_name": "x"}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    for task, ckpt in [("cls", bad_st), ("cls", cut), ("det", cut), ("seg", cut)]:
        argv = ["eval", task, "--data", str(datasets / task), "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]
        assert main([*argv, "--model", "deit_tiny_patch16_224"] if task == "cls" else argv) == 2
        err = _error(capsys)
        assert f"error: {ckpt}: " in err and ("SafetensorError" in err or "central directory" in err), err
    with pytest.raises(ValueError, match=rf"{cut}: cannot be read as a weights-only PyTorch checkpoint"):
        model_from_checkpoint(cut)
    with pytest.raises(ValueError):  # --debug: the error itself, with its traceback
        main(["--debug", "eval", "det", "--data", str(datasets / "det"), "--checkpoint", str(cut), "--out", "x"])


def test_data_verify_reports_degenerate_boxes_and_short_polygons(mini_data, tmp_path, capsys):
    """Row 12: a box of negative width and a two-point polygon fail verification; --on-bad skip lists them."""
    data = tmp_path / "coco"
    shutil.copytree(mini_data / "coco", data)
    ann = data / "annotations" / "instances_train2017.json"
    doc = json.loads(ann.read_text())
    a, b = doc["annotations"][0], next(x for x in doc["annotations"][1:] if isinstance(x["segmentation"], list))
    a["bbox"][2] = -4.0
    b["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]
    ann.write_text(json.dumps(doc))
    argv = ["data", "verify", "coco", str(data), "--no-decode"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"annotation {a['id']} (image {a['image_id']}): degenerate box" in err and "non-positive width" in err
    assert f"annotation {b['id']} (image {b['image_id']}): polygon 0 has 4 coordinates" in err
    manifest = tmp_path / "manifest.json"
    assert main([*argv, "--on-bad", "skip", "--manifest", str(manifest)]) == 0
    assert "2 bad annotations skipped: instances_train2017.json: annotation" in capsys.readouterr().out
    listed = json.loads(manifest.read_text())["bad_annotations"]
    assert [x.split(" (")[0] for x in listed] == [
        f"instances_train2017.json: annotation {a['id']}",
        f"instances_train2017.json: annotation {b['id']}",
    ]
    # a clean set's manifest has no such key (the pipeline's manifests stay as they were)
    assert main(["data", "verify", "coco", str(mini_data / "coco"), "--no-decode", "--manifest", str(manifest)]) == 0
    assert "bad_annotations" not in json.loads(manifest.read_text())
