"""A careless user's commands (issue 28): nothing touched that a command did not create, every
error one line, a normal import leaves the pipeline clean.

Each test drives the real command line: ``anchorformer.cli.main`` in-process (the console
script's function), ``python -m anchorformer`` or ``scripts/repro.py`` in real processes. The rows
are those of the reliability table in the README ("What a careless user meets").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cls_helpers import make_tiny_imagefolder
from test_run_folder_cli import _argv, datasets  # noqa: F401 - the module's fixture, reused
from torch.optim.optimizer import register_optimizer_step_post_hook

from anchorformer.cli import main
from anchorformer.engine.checkpoint import load_training_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr: exactly one line, without a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cls_run(datasets, tmp_path_factory):  # noqa: F811
    """A finished one-epoch ``train cls`` run folder (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(_argv("cls", datasets / "cls", out, steps=1)) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Loses data (before): make-mini over a real dataset, eval --out over a run, --resume model.pth
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["imagenet", "coco", "ade20k/ADEChallengeData2016"])
def test_make_mini_refuses_a_folder_it_did_not_write(tmp_path, capsys, where):
    """``data make-mini --out DIR`` where DIR/imagenet (coco, ade20k/...) is not a mini set: refused
    by name before anything is written; the user's file survives."""
    keep = tmp_path / where / "train" / "mine.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("a real dataset")
    assert main(["data", "make-mini", "--out", str(tmp_path)]) == 2
    err = _error(capsys)
    assert str(tmp_path / where) in err and "mini.json" in err, err
    assert keep.read_text() == "a real dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == [where.split("/")[0]]  # nothing else written


def test_make_mini_replaces_its_own_sets(mini_data, tmp_path):
    """A folder holding the mini sets make-mini wrote is rewritten (same bytes)."""
    out = tmp_path / "mini"
    shutil.copytree(mini_data, out)
    before = _tree(out / "ade20k")
    assert main(["data", "make-mini", "--out", str(out)]) == 0
    assert _tree(out / "ade20k") == before


def test_eval_refuses_a_training_runs_folder(cls_run, datasets, tmp_path, capsys):  # noqa: F811
    """``eval cls --out RUN`` would replace the run's metrics.json and timings.json: refused, naming
    the folder and a folder to use; ``--out RUN/eval`` works and leaves the run as it was."""
    run = shutil.copytree(cls_run, tmp_path / "base")
    before = _tree(run)
    argv = ["eval", "cls", "--data", str(datasets / "cls"), "--checkpoint", str(run / "model.pth")]
    assert main([*argv, "--out", str(run)]) == 2
    err = _error(capsys)
    assert f"--out {run} holds a training run" in err and str(run / "eval") in err, err
    assert _tree(run) == before
    assert main([*argv, "--out", str(run / "eval")]) == 0
    assert json.loads((run / "eval" / "metrics.json").read_text())["top1"] >= 0
    assert {k: v for k, v in _tree(run).items() if not k.startswith("eval/")} == before


def test_resume_from_weights_only_touches_nothing(cls_run, datasets, tmp_path, capsys):  # noqa: F811
    """``train cls --out RUN --resume RUN/model.pth``: one line saying model.pth holds weights only,
    before anything in RUN is touched."""
    run = shutil.copytree(cls_run, tmp_path / "b")
    before = _tree(run)
    argv = [*_argv("cls", datasets / "cls", run, steps=1), "--resume", str(run / "model.pth")]
    assert main(argv) == 2
    err = _error(capsys)
    assert "model.pth holds weights only, not a training checkpoint" in err, err
    assert _tree(run) == before


# ---------------------------------------------------------------------------------------------
# Bad (before): a normal import invalidated the pipeline (__pycache__/ in 35 stages' deps)
# ---------------------------------------------------------------------------------------------

_NO_BYTECODE = "PYTHONDONTWRITEBYTECODE"


def test_dvc_ignores_bytecode_and_the_tests_write_it():
    """.dvcignore keeps ``__pycache__/`` and ``*.pyc`` out of every dependency's hash (asked of DVC
    itself), and the Makefile's targets (``make test``, CI) run with bytecode writing on."""
    paths = ["anchorformer/__pycache__/cli.cpython-311.pyc", "anchorformer/engine/run.pyc", "anchorformer/cli.py"]
    dvc = [str(Path(sys.executable).with_name("dvc")), "check-ignore", *paths]
    res = subprocess.run(dvc, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == paths[:2], res.stdout + res.stderr
    probe = 'include Makefile\nprobe:\n\t@echo "[$$PYTHONDONTWRITEBYTECODE]"\n'
    env = {**os.environ, _NO_BYTECODE: "1"}
    res = subprocess.run(["make", "-s", "-f", "-", "probe"], input=probe, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def _bytecode_env(root: Path) -> dict[str, str]:
    """This environment with bytecode writing on and the package imported from ``root``."""
    env = {k: v for k, v in os.environ.items() if k != _NO_BYTECODE}
    env.update(PYTHONPATH=str(root), TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    return env


def _import_every_module(root: Path, env: dict[str, str]) -> None:
    """Import every module of the package under ``root`` in a new process (bytecode writing on)."""
    walk = (
        "import importlib, pkgutil, anchorformer\n"
        f"assert anchorformer.__file__.startswith({str(root)!r}), anchorformer.__file__\n"
        "for m in pkgutil.walk_packages(anchorformer.__path__, 'anchorformer.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
    )
    subprocess.run([sys.executable, "-c", walk], cwd=root, env=env, check=True, timeout=600)
    assert len(list((root / "anchorformer").rglob("__pycache__/*.pyc"))) > 20, "bytecode writing was off"


@pytest.mark.slow  # a clone, every module imported, two `dvc status`: ~40 s on two shared cores
def test_importing_the_package_leaves_dvc_status_as_it_was(tmp_path):
    """In a fresh clone, importing every module of the package with bytecode writing on writes
    ``__pycache__/`` beside the sources, and ``dvc status`` says exactly what it said before."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = _bytecode_env(clone)
    dvc = [str(Path(sys.executable).with_name("dvc")), "status", "--json"]

    def status() -> dict:
        res = subprocess.run(dvc, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout or "{}")

    before = status()
    _import_every_module(clone, env)
    assert status() == before


@pytest.mark.parametrize("dvcignore", ["the project's", "none"])
def test_importing_the_package_leaves_a_reproduced_pipeline_up_to_date(dvcignore, tmp_path):
    """A pipeline reproduced from scratch whose stages depend on the package as the project's do
    (its folders, e.g. ``anchorformer/engine``, and single modules): importing every module with
    bytecode writing on leaves ``dvc status`` "up to date" with the project's ``.dvcignore``;
    without it (the control) the folder dependencies turn modified."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "anchorformer", repo / "anchorformer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _bytecode_env(repo)
    dvc = str(Path(sys.executable).with_name("dvc"))

    def run(*cmd: str) -> str:
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    if dvcignore != "none":
        shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    stage = "python -c \"import pathlib; pathlib.Path('out.txt').write_text('ran')\""
    run(dvc, "stage", "add", "-q", "-n", "uses-the-package", "-d", "anchorformer/engine", "-d", "anchorformer",
        "-d", "anchorformer/cli.py", "-o", "out.txt", stage)  # fmt: skip
    run(dvc, "repro", "-q")
    assert "up to date" in run(dvc, "status")
    _import_every_module(repo, env)
    status = run(dvc, "status")
    if dvcignore == "none":
        assert "modified:" in status and "anchorformer/engine" in status, status
    else:
        assert "up to date" in status, status


# ---------------------------------------------------------------------------------------------
# Bad (before): --overwrite with --out . or above --data moved the repository or the dataset
# ---------------------------------------------------------------------------------------------


def test_train_refuses_an_out_holding_the_data_or_a_repository(datasets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """``--out`` equal to or above ``--data``, or ``--out .`` in a repository: refused in one line,
    nothing moved; ``--overwrite`` without ``--resume never`` is refused too instead of ignored."""
    data = shutil.copytree(datasets / "cls", tmp_path / "ds" / "cls")
    before = _tree(tmp_path)
    for out in (tmp_path / "ds", data):
        assert main([*_argv("cls", data, out, steps=1), "--resume", "never", "--overwrite"]) == 2
        assert f"contains --data {data}" in _error(capsys)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src.py").write_text("x = 1\n")
    monkeypatch.chdir(repo)
    assert main([*_argv("cls", data, Path("."), steps=1), "--resume", "never", "--overwrite"]) == 2
    assert "--out . is a repository (.git)" in _error(capsys)
    assert sorted(p.name for p in repo.iterdir()) == [".git", "src.py"]
    assert main([*_argv("cls", data, tmp_path / "run", steps=1), "--overwrite"]) == 2
    assert "--overwrite applies only with --resume never" in _error(capsys)
    assert not (tmp_path / "run").exists()
    assert {k: v for k, v in _tree(tmp_path).items() if k.startswith("ds/")} == before


# ---------------------------------------------------------------------------------------------
# Bad (before): lr=inf, lr=nan and a diverging lr gave FloatingPointError / JSON tracebacks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "value", "expected"),
    [
        ("cls", "lr=inf", "lr=inf (--set lr=inf): expected a finite number"),
        ("cls", "lr=nan", "lr=nan (--set lr=nan): expected a finite number"),
        ("det", "lr=.inf", "lr=inf (--set lr=.inf): expected a finite number"),
        ("seg", "scale_range=[.nan, 1]", "expected finite numbers"),
        ("cls", "warmup_lr=-.inf", "warmup_lr=-inf (--set warmup_lr=-.inf): expected a finite number"),
    ],
)
def test_non_finite_recipe_values_are_refused_by_key(task, value, expected, datasets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(["train", task, "--data", str(datasets / task), "--out", str(out), "--set", value]) == 2
    err = _error(capsys)
    assert expected in err, err
    assert not out.exists()


def test_divergence_is_one_line_naming_the_step_and_the_kept_checkpoint(datasets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A diverging lr (1e30): one line naming the step and the loss, exit 2. A loss that turns
    infinite in epoch 2 (injected into the step's loss): the first epoch's checkpoint is kept,
    named, and loads."""
    out = tmp_path / "run"
    assert main(_argv("cls", datasets / "cls", out, "lr=1e30", "opt=sgd", "clip_grad=null", steps=1)) == 2
    err = _error(capsys)
    assert re.search(r"training diverged: the loss is (nan|inf) at epoch 1, step \d", err), err
    assert "no checkpoint had been written" in err and not (out / "metrics.json").exists()

    import anchorformer.tasks.classification.train as cls_train

    real = cls_train.check_loss
    monkeypatch.setattr(
        cls_train, "check_loss", lambda loss, step: real(loss * (1 if "epoch 1" in step else torch.inf), step)
    )
    out = tmp_path / "run2"
    assert main(_argv("cls", datasets / "cls", out, steps=3)) == 2
    err = _error(capsys)
    kept = out / "checkpoints" / "checkpoint-000001.pth"
    assert "training diverged: the loss is inf at epoch 2, step 1;" in err, err
    assert f"the last good checkpoint {kept} is kept" in err, err
    state = load_training_checkpoint(kept)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [kept.name]
    assert not (out / "metrics.json").exists()


def test_disk_full_at_the_final_safetensors_is_one_line_and_the_rerun_finishes(
    datasets,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    """``model.safetensors`` written on a full disk (the safetensors writer's own error): the ENOSPC
    line, naming the file; no temporary file left; the same command, once there is room, finishes."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    out = tmp_path / "run"
    argv = _argv("cls", datasets / "cls", out, steps=1)
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        assert main(argv) == 2
    err = _error(capsys)
    assert f"{out / 'model.safetensors'}: cannot write the weights: No space left on device (ENOSPC)" in err, err
    assert "free some space, then rerun the same command" in err
    assert not list(out.glob(".*tmp-*")) and not (out / "metrics.json").exists()
    assert main(argv) == 0 and (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------
# Bad (before): export's tracebacks; minor: --format onnx --out x.pt2
# ---------------------------------------------------------------------------------------------

EXPORT_NAME = "anchorformer_tiny_patch16_224"


class _Evil:
    """A class a weights-only load refuses to unpickle."""


def test_export_errors_are_one_line_naming_the_file(tmp_path, capsys):
    """Detection and segmentation weights, an unsafe pickle, a truncated file, a pt2 to a place that
    cannot be written, an ONNX export under a .pt2 name: one line naming the file, exit 2."""
    import anchorformer

    model = anchorformer.create_model(EXPORT_NAME, depth=1, num_classes=3, img_size=32)
    good = tmp_path / "model.pth"
    torch.save(
        {"model": model.state_dict(), "model_name": EXPORT_NAME, "model_kwargs": {"depth": 1, "num_classes": 3}}, good
    )
    files = {
        "det.pth": ({"model": {}, "detector_config": {"num_classes": 3}, "cat_ids": [1]}, "holds a detection model"),
        "seg.pth": ({"model": {}, "model_config": {"head": "fpn"}}, "holds a segmentation model"),
        "evil.pth": ({"model": {}, "x": _Evil()}, "refused as unsafe"),
    }
    for name, (state, _) in files.items():
        torch.save(state, tmp_path / name)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    files["cut.pth"] = (None, "cannot be read as weights to export")
    argv = ["export", "--model", EXPORT_NAME, "--img-size", "32"]
    for name, (_, expected) in files.items():
        assert main([*argv, "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "m.onnx")]) == 2
        err = _error(capsys)
        assert str(tmp_path / name) in err and expected in err, err
    assert main([*argv, "--checkpoint", str(good), "--format", "onnx", "--out", str(tmp_path / "x.pt2")]) == 2
    assert f"--out {tmp_path / 'x.pt2'}: a .pt2 name for a onnx export; name it {tmp_path / 'x.onnx'}" in _error(capsys)
    if os.geteuid() == 0:  # root writes through permissions: a place no one can write
        locked = Path("/proc/anchorformer-export")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        locked = tmp_path / "ro" / "sub"
    out = locked / "m.pt2"
    assert main([*argv, "--checkpoint", str(good), "--format", "pt2", "--out", str(out)]) == 2
    err = _error(capsys)
    assert f"{out}: cannot write the pt2 file" in err, err
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "x.pt2").exists()


# ---------------------------------------------------------------------------------------------
# Bad (before): COCO records without a field, or with a field of the wrong type
# ---------------------------------------------------------------------------------------------


def _spoil(doc: dict, how: str) -> str:
    """Spoil ``doc`` (a COCO instances file) as ``how`` says; return what the error must say."""
    img, ann = doc["images"][0], doc["annotations"][0]
    if how == "no file_name":
        del img["file_name"]
        return f"image {img['id']} has no 'file_name'"
    if how == "height big":
        img["height"] = "big"
        return f"image {img['id']}: height is 'big', expected a positive integer"
    if how == "no bbox":
        del ann["bbox"]
        return f"annotation {ann['id']} (image {ann['image_id']}) has no 'bbox'"
    ann["bbox"] = ann["bbox"][:3]
    return f"annotation {ann['id']} (image {ann['image_id']}) bbox {ann['bbox']!r} is not [x, y, width, height]"


@pytest.mark.parametrize("how", ["no file_name", "height big", "no bbox", "bbox of 3"])
def test_coco_records_are_named_in_verify_and_in_training(how, datasets, mini_data, tmp_path, capsys):  # noqa: F811
    """The file, the image or annotation id and the field named: in ``data verify`` (the complete
    mini set, its message listing every problem) and in ``train det`` (one line), for the training
    split's file and for the validation split's."""
    for split in ("train", "val"):
        full = tmp_path / split / "mini"
        shutil.copytree(mini_data / "coco" / "annotations", full / "annotations")
        shutil.copy(mini_data / "coco" / "mini.json", full)
        for s in ("train", "val"):
            (full / f"{s}2017").symlink_to(mini_data / "coco" / f"{s}2017")
        part = shutil.copytree(datasets / "det", tmp_path / split / "coco")
        for root in (full, part):
            ann_file = root / "annotations" / f"instances_{split}2017.json"
            doc = json.loads(ann_file.read_text())
            expected = f"{ann_file}: " + _spoil(doc, how)
            ann_file.write_text(json.dumps(doc))
            if root == full:
                assert main(["data", "verify", "coco", str(root), "--no-decode"]) == 2
                err = capsys.readouterr().err
                assert expected in err and "Traceback" not in err, err
            else:
                assert main(_argv("det", root, tmp_path / split / "run", steps=1)) == 2
                err = _error(capsys)
                assert expected in err, err


# ---------------------------------------------------------------------------------------------
# Bad (before): scripts/repro.py outside the repository, a malformed params.yaml, notebook names;
# minor: Ctrl-C on repro.py
# ---------------------------------------------------------------------------------------------

REPRO = ROOT / "scripts" / "repro.py"


def _repro(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, str(REPRO), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_repro_from_outside_the_repository_and_by_notebook_name(tmp_path):
    """From a folder outside any repository, repro.py finds its own; a notebook's name (with or
    without notebooks/ and .ipynb) selects the stages that run it."""
    res = _repro("--dry", "notebooks/01_complexity.ipynb", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["complexity"], res.stdout
    res = _repro("--dry", "01_complexity", "no_such_stage", cwd=tmp_path)
    assert res.returncode == 1 and "no stage named 'no_such_stage'" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_repro_names_the_line_of_a_malformed_params_yaml(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("profile: mini\nseeds: [0, 1\nlr: 3\n")
    res = _repro("--dry", cwd=repo)
    err = res.stderr.strip()
    assert res.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"repro.py: {repo / 'params.yaml'}:3: not valid YAML"), err


@pytest.mark.slow  # git init, dvc init, a stage started then interrupted: ~25 s on two shared cores
def test_ctrl_c_on_repro_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while a stage runs: one line saying what was
    interrupted and how to go on, exit 130, no traceback."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    started = tmp_path / "started"
    (tmp_path / "stage.py").write_text(  # a stage that stops in one line on SIGINT, as the CLI does
        f"import pathlib, sys, time\npathlib.Path({str(started)!r}).touch()\ntry:\n    time.sleep(120)\n"
        "except KeyboardInterrupt:\n    sys.exit('stage: interrupted')\n"
    )
    cmd = f"{sys.executable} {tmp_path / 'stage.py'}"
    (repo / "dvc.yaml").write_text(json.dumps({"stages": {"slow": {"cmd": cmd, "outs": ["o.txt"]}}}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPRO)], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert started.exists(), proc.communicate(timeout=5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err, out + err
    own = [line for line in (out + err).splitlines() if not line.startswith("[slow")]  # not the stage's lines
    assert own == ["repro.py: interrupted; the stages that were running were stopped (a training run resumes)"], own


# ---------------------------------------------------------------------------------------------
# Minor (before): Ctrl-C in training printed a traceback
# ---------------------------------------------------------------------------------------------

_INTERRUPTED = "interrupted; the run in {out} resumes from its newest checkpoint when the same command is run again"


def test_ctrl_c_in_training_is_one_line(datasets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """KeyboardInterrupt in the second epoch: one line naming the run and how it resumes, exit 130."""
    import anchorformer.tasks.classification.train as cls_train

    real = cls_train.check_loss

    def interrupt(loss, step):
        if step.startswith("epoch 2"):
            raise KeyboardInterrupt
        return real(loss, step)

    monkeypatch.setattr(cls_train, "check_loss", interrupt)
    out = tmp_path / "run"
    assert main(_argv("cls", datasets / "cls", out, steps=2)) == 130
    assert _error(capsys) == "anchorformer train cls: " + _INTERRUPTED.format(out=out) + " (--resume auto)"
    assert (out / "checkpoints" / "checkpoint-000001.pth").is_file()


@pytest.mark.slow  # a real process interrupted, then the same command: ~40 s on two shared cores
def test_sigint_in_training_then_the_same_command_resumes(datasets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    # long enough (tens of milliseconds an epoch, unloaded) that the signal lands inside training
    argv = [sys.executable, "-m", "anchorformer", *_argv("cls", datasets / "cls", out, steps=300)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "checkpoint-000001.pth").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    own = [line for line in err.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]  # not the log's lines
    assert "Traceback" not in err and len(own) == 1 and _INTERRUPTED.format(out=out) in own[0], err
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "resuming from" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# Minor (before): a resumed run's checkpoint differed in bytes (the pickle memo)
# ---------------------------------------------------------------------------------------------


def test_a_resumed_run_writes_the_same_bytes_as_an_uninterrupted_one(datasets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Interrupted in epoch 2 and resumed from checkpoint 1: checkpoint 2, model.pth and
    model.safetensors are the same bytes as those of the run that was never interrupted."""
    import anchorformer.tasks.classification.train as cls_train

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(_argv("cls", datasets / "cls", whole, steps=2)) == 0
    real = cls_train.check_loss

    def interrupt(loss, step):
        if step.startswith("epoch 2"):
            raise KeyboardInterrupt
        return real(loss, step)

    with monkeypatch.context() as m:
        m.setattr(cls_train, "check_loss", interrupt)
        assert main(_argv("cls", datasets / "cls", resumed, steps=2)) == 130
    capsys.readouterr()
    assert main(_argv("cls", datasets / "cls", resumed, steps=2)) == 0
    for name in ("checkpoints/checkpoint-000002.pth", "model.pth", "model.safetensors"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Minor (before): on_bad=skip and a bad validation file: an epoch trained, then the error
# ---------------------------------------------------------------------------------------------


def _validation_file(task: str, data: Path) -> Path:
    """A file that the run's evaluation reads and nothing before training does (an image; for
    seg a label map): for cls, one that the entropy probe's fixed batch leaves out."""
    if task == "cls":
        from anchorformer.tasks.classification.anchors import ENTROPY_IMAGES

        files = sorted((data / "val").rglob("*.png"))  # ImageFolder's order
        probed = {i * len(files) // ENTROPY_IMAGES for i in range(ENTROPY_IMAGES)}
        return files[min(set(range(len(files))) - probed)]
    if task == "det":
        doc = json.loads((data / "annotations" / "instances_val2017.json").read_text())
        return data / "val2017" / min(doc["images"], key=lambda i: i["id"])["file_name"]
    return sorted((data / "annotations" / "validation").glob("*.png"))[0]


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_a_bad_validation_file_stops_the_run_before_training_whatever_on_bad(task, datasets, tmp_path, capsys):  # noqa: F811
    """A truncated validation file with ``on_bad=skip``: before, the run trained its epoch, then
    evaluation stopped it (``check_files=none`` still does, the control); now one line names the
    file and says that skip covers training files only, before the first step (no checkpoint)."""
    if task == "cls":  # more validation images than the entropy probe reads before training
        data = make_tiny_imagefolder(tmp_path / "data", val_per_class=12)
    else:
        data = shutil.copytree(datasets / task, tmp_path / "data")
    bad = _validation_file(task, data)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    steps = []  # optimizer steps taken, by any optimizer
    hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        out = tmp_path / "run"
        assert main(_argv(task, data, out, "on_bad=skip", steps=1)) == 2
        err = _error(capsys)
        assert err.startswith(f"anchorformer train: error: {bad}: cannot decode"), err
        assert "1 bad file(s) among the" in err and "validation samples, found before training" in err, err
        assert "on_bad=skip (training files only) does not cover it" in err, err
        assert not steps and not (out / "metrics.json").exists()

        control = tmp_path / "control"
        assert main(_argv(task, data, control, "on_bad=skip", "check_files=none", steps=1)) == 2
        err = _error(capsys)
        assert f"{bad}: cannot decode" in err and "found before training" not in err, err
        assert steps  # the training that the check now saves
    finally:
        hook.remove()


@pytest.mark.slow  # two torchrun jobs of two processes each: ~60 s on two shared cores
def test_under_torchrun_every_rank_stops_at_a_bad_file_that_one_rank_checked(tmp_path):
    """Each rank checks its share of the files and the findings are gathered: a bad validation
    file that only one rank decodes stops both, before training, each with the line naming it and
    the count over the whole split; with on_bad=skip a bad training file is counted once."""
    data = make_tiny_imagefolder(tmp_path / "data", val_per_class=12)  # 24 training, 36 validation images
    bad = _validation_file("cls", data)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = _argv("cls", data, tmp_path / "run", "on_bad=skip", "batch_size=4", steps=1)
    res = subprocess.run([*torchrun, "anchorformer.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    # each rank's line (the two processes share stderr: their lines may run into each other)
    errors = re.findall(r"anchorformer train: error: (.*?)(?=anchorformer train: error:|\n|$)", res.stderr)
    assert res.returncode != 0 and len(errors) == 2, res.stdout[-3000:] + res.stderr[-3000:]
    for error in errors:
        assert error.startswith(f"{bad}: cannot decode"), error
        assert "1 bad file(s) among the 36 validation samples, found before training" in error, error
    assert not (tmp_path / "run" / "metrics.json").exists()

    bad.write_bytes(raw)  # repaired; a training file spoiled instead, and skipped
    spoiled = sorted((data / "train").rglob("*.png"))[5]
    spoiled.write_bytes(spoiled.read_bytes()[:40])
    args = _argv("cls", data, tmp_path / "run2", "on_bad=skip", "batch_size=4", steps=1)
    res = subprocess.run([*torchrun, "anchorformer.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["bad_files"] == 1, metrics


@pytest.mark.parametrize("task", ["cls", "det"])  # seg seeds after the check
def test_checking_the_files_first_leaves_the_trained_weights_unchanged(task, datasets, tmp_path):  # noqa: F811
    """``check_files`` is an execution setting: ``all`` and ``none`` train the same weights, bit for
    bit (the check draws nothing from the global random generators)."""
    from safetensors.torch import load_file

    weights = {}
    for check in ("all", "none"):
        out = tmp_path / check
        assert main(_argv(task, datasets / task, out, f"check_files={check}", steps=1)) == 0
        weights[check] = load_file(out / "model.safetensors")
    assert weights["all"].keys() == weights["none"].keys()
    assert all(torch.equal(weights["all"][k], weights["none"][k]) for k in weights["all"])


# ---------------------------------------------------------------------------------------------
# Minor (before): num_workers changed the results
# ---------------------------------------------------------------------------------------------


def test_num_workers_is_part_of_the_recipe_that_resume_compares(datasets, tmp_path, capsys):  # noqa: F811
    """0 and 2 loader workers train different weights (the same seed otherwise), so a run is not
    resumed with another num_workers: refused in one line naming the key and both values."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert main(_argv("cls", datasets / "cls", out, f"num_workers={workers}", steps=1)) == 0
        runs[workers] = load_training_checkpoint(out / "model.pth")["model"]
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # why it is in the recipe
    assert main(_argv("cls", datasets / "cls", tmp_path / "w0", "num_workers=2", steps=2)) == 2
    err = _error(capsys)
    assert "another recipe" in err and "num_workers: checkpoint 0 vs now 2" in err, err


@pytest.mark.parametrize(
    ("task", "value", "expected"),
    [
        ("cls", "model_sizes.tiny.depth=0", "model_sizes.tiny.depth=0: expected an integer >= 1"),
        ("det", "model_sizes.tiny.num_heads=0", "model_sizes.tiny.num_heads=0: expected an integer >= 1"),
        ("seg", "model_kwargs={depth: 0}", "model_kwargs.depth=0: expected an integer >= 1"),
    ],
)
def test_a_backbone_without_blocks_is_refused(task, value, expected, datasets, tmp_path, capsys):  # noqa: F811
    """``depth=0`` trained a model without blocks, at chance: refused before anything runs."""
    out = tmp_path / "run"
    assert main(["train", task, "--data", str(datasets / task), "--out", str(out), "--set", value]) == 2
    assert expected in _error(capsys)
    assert not out.exists()


def test_a_failed_stage_names_the_git_checkout_of_its_removed_outputs(tmp_path):
    """DVC removes a stage's outputs before running it; those kept by git (``cache: false``) are
    not restored by ``dvc checkout``: the failure's hint names ``git checkout -- PATHS`` too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_stage", ROOT / "scripts" / "run_stage.py")
    run_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_stage)
    repo = tmp_path / "repo"
    (repo / "outputs" / "cls").mkdir(parents=True)
    (repo / "outputs" / "cls" / "table.md").write_text("| a |\n")
    (repo / "outputs" / "cls" / "kept.json").write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "outputs"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True, capture_output=True)
    (repo / "outputs" / "cls" / "table.md").unlink()
    hint = run_stage.restore_hint("cls-e1", cwd=repo)
    assert hint == (
        " (`dvc checkout cls-e1` restores the stage's previous cached outputs, "
        "`git checkout -- outputs/cls/table.md` its git-tracked ones (1 removed))"
    ), hint
