"""Classification engine: training, determinism, resume, evaluation, distillation, bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from cls_helpers import TINY, make_tiny_imagefolder

from anchorformer.cli import main
from anchorformer.engine.checkpoint import checkpoint_path, load_training_checkpoint
from anchorformer.tasks.classification.distillation import DistillationLoss, distillation_term
from anchorformer.tasks.classification.train import classifier_kwargs, resolve_recipe, train

MODEL = "anchorformer_tiny_patch16_224"
REQUIRED_KEYS = {"top1", "top5", "loss", "train_loss", "params", "gmacs", "config"}
TIMING_KEYS = {"throughput", "train_time_s", "epoch_time_s"}  # timings.json, apart from the results


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_imagefolder(tmp_path_factory.mktemp("tiny") / "imagenet")


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """Three epochs of the tiny model (3 steps each), kept for the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "t"
    metrics = train(tiny_root, out, MODEL, profile="mini", overrides=TINY + ["keep_checkpoints=5"], epochs=3)
    return out, metrics


def _comparable(history):
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in history]


def test_training_lowers_the_loss_and_writes_outputs(trained):
    out, metrics = trained
    history = json.loads((out / "history.json").read_text())
    losses = [row["train_loss"] for row in history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(on_disk)
    assert on_disk["top1"] == metrics["top1"] and 0 <= on_disk["top1"] <= 100 and on_disk["top5"] == 100.0
    assert on_disk["val_images"] == 12 and on_disk["num_classes"] == 3 and on_disk["num_anchors"] == 4
    assert on_disk["params"] > 0 and on_disk["gmacs"] > 0
    timings = json.loads((out / "timings.json").read_text())
    assert timings["throughput"] > 0 and len(timings["epoch_time_s"]) == 3 and timings["machine"]["torch"]
    assert not TIMING_KEYS & set(on_disk) and not any(TIMING_KEYS & set(row) for row in history)
    assert on_disk["config"]["img_size"] == 16 and on_disk["distillation"] == "none"
    assert (out / "model.pth").is_file()
    assert (out / "dvclive" / "plots" / "metrics" / "train_loss.tsv").is_file()
    assert json.loads((out / "dvclive" / "metrics.json").read_text())["top1"] == metrics["top1"]
    state = load_training_checkpoint(checkpoint_path(out, 3))
    assert state["epoch"] == 3 and {"model", "optimizer", "scheduler", "rng", "history", "logged"} <= set(state)


def test_same_seed_same_metrics_and_resume_matches(trained, tiny_root, tmp_path):
    out, metrics = trained
    again = train(tiny_root, tmp_path / "a", MODEL, profile="mini", overrides=TINY, epochs=3)
    for key in ("top1", "top5", "loss", "train_loss"):
        assert again[key] == metrics[key], key
    ref = _comparable(json.loads((out / "history.json").read_text()))
    assert _comparable(json.loads((tmp_path / "a" / "history.json").read_text())) == ref

    # a run stopped after epoch 1 (later checkpoints and outputs gone, the curves too, as DVC
    # removes a stage's outputs before rerunning it), resumed: the same bytes as the uninterrupted run
    run = tmp_path / "b"
    train(tiny_root, run, MODEL, profile="mini", overrides=TINY + ["keep_checkpoints=5"], epochs=3)
    for p in (checkpoint_path(run, 2), checkpoint_path(run, 3), run / "metrics.json", run / "model.pth"):
        p.unlink()
    shutil.rmtree(run / "dvclive")
    resumed = train(tiny_root, run, MODEL, profile="mini", overrides=TINY + ["keep_checkpoints=5"], epochs=3)
    for key in ("top1", "top5", "loss", "train_loss"):
        assert resumed[key] == metrics[key], key
    results = ["metrics.json", "history.json", "model.pth", "model.safetensors", "dvclive/metrics.json"]
    curves = sorted(p for p in (out / "dvclive" / "plots" / "metrics").rglob("*.tsv"))  # entropy/<kind>/ too
    assert any("entropy" in p.parts for p in curves)
    results += [p.relative_to(out).as_posix() for p in curves]
    for name in results:
        assert (run / name).read_bytes() == (out / name).read_bytes(), name
    assert (run / "timings.json").read_bytes() != (out / "timings.json").read_bytes()  # they are real timings

    other = train(tiny_root, tmp_path / "c", MODEL, profile="mini", overrides=TINY + ["seed=1"], epochs=3)
    assert other["train_loss"] != metrics["train_loss"]


def test_resume_refuses_another_recipe(trained, tiny_root):
    out, _ = trained
    with pytest.raises(ValueError, match="lr: checkpoint 0.003 vs now 0.001"):
        train(tiny_root, out, MODEL, profile="mini", overrides=TINY + ["lr=1e-3"], epochs=3, resume="auto")


def test_eval_cli_reproduces_the_training_metrics(trained, tiny_root, tmp_path, capsys):
    out, metrics = trained
    rc = main(
        ["eval", "cls", "--data", str(tiny_root), "--checkpoint", str(out / "model.pth"), "--out", str(tmp_path / "e")]
    )
    assert rc == 0
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert evaluated["top1"] == metrics["top1"] and evaluated["top5"] == metrics["top5"]
    assert math.isclose(evaluated["loss"], metrics["loss"], rel_tol=1e-5)
    assert evaluated["params"] == metrics["params"] and evaluated["gmacs"] == metrics["gmacs"]
    assert json.loads(capsys.readouterr().out)["top1"] == metrics["top1"]


def test_distilled_student_with_a_checkpoint_teacher(trained, tiny_root, tmp_path):
    out, _ = trained
    metrics = train(
        tiny_root,
        tmp_path / "d",
        "anchorformer_tiny_distilled_patch16_224",
        profile="mini",
        overrides=TINY + [f"teacher={out / 'model.pth'}", "distillation=soft", "distillation_tau=2.0"],
        epochs=1,
    )
    assert metrics["distillation"] == "soft" and metrics["top5"] == 100.0
    with pytest.raises(ValueError, match="needs a distilled model"):
        train(tiny_root, tmp_path / "x", MODEL, profile="mini", overrides=TINY + ["distillation=hard"], epochs=1)


def test_distillation_loss_equals_its_formula():
    torch.manual_seed(0)
    b, k, alpha, tau = 4, 5, 0.3, 2.0
    z_cls, z_dist, z_t = torch.randn(b, k), torch.randn(b, k), torch.randn(b, k)
    y = torch.tensor([0, 3, 1, 4])

    # soft: tau^2 * (1/B) * sum_i sum_c p_t log(p_t / p_s), temperatures applied to both
    expected_soft = 0.0
    for i in range(b):
        p_t = [math.exp(z_t[i, c] / tau) for c in range(k)]
        p_s = [math.exp(z_dist[i, c] / tau) for c in range(k)]
        p_t = [v / sum(p_t) for v in p_t]
        p_s = [v / sum(p_s) for v in p_s]
        expected_soft += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected_soft *= tau * tau / b
    assert math.isclose(float(distillation_term(z_dist, z_t, "soft", tau)), expected_soft, rel_tol=1e-5)

    # hard: cross-entropy against the teacher's argmax
    expected_hard = 0.0
    for i in range(b):
        t = int(z_t[i].argmax())
        expected_hard += -(float(z_dist[i, t]) - math.log(sum(math.exp(float(v)) for v in z_dist[i])))
    expected_hard /= b
    assert math.isclose(float(distillation_term(z_dist, z_t, "hard")), expected_hard, rel_tol=1e-5)

    teacher = torch.nn.Linear(3, k)
    x = torch.randn(b, 3)
    with torch.no_grad():
        z_t = teacher(x)
    for kind, term in (
        ("soft", distillation_term(z_dist, z_t, "soft", tau)),
        ("hard", distillation_term(z_dist, z_t, "hard")),
    ):
        loss = DistillationLoss(F.cross_entropy, teacher, kind, alpha, tau)(x, (z_cls, z_dist), y)
        expected = (1 - alpha) * F.cross_entropy(z_cls, y) + alpha * term
        assert torch.allclose(loss, expected)
    assert torch.equal(DistillationLoss(F.cross_entropy, None, "none")(x, z_cls, y), F.cross_entropy(z_cls, y))
    with pytest.raises(ValueError, match="same shape"):
        distillation_term(z_dist, z_t[:, :3], "hard")


def test_model_kwargs_by_family():
    cfg = resolve_recipe(profile="mini")
    af = classifier_kwargs(MODEL, cfg, 10)
    assert af["embed_dim"] == cfg["model_sizes"]["tiny"]["embed_dim"] and af["num_anchors"] == cfg["num_anchors"]
    deit = classifier_kwargs("deit_small_patch16_224", cfg, 10)
    assert deit["embed_dim"] == cfg["model_sizes"]["small"]["embed_dim"] and "num_anchors" not in deit
    cnn = classifier_kwargs("resnet10t", cfg, 10)
    assert "img_size" not in cnn and cnn["num_classes"] == 10


def test_bad_input_fails_before_training(tiny_root, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--data", str(tiny_root), "--model", "anchorformer_huge_thing"], "unknown model 'anchorformer_huge_thing'"),
        (["--data", str(tmp_path / "empty"), "--model", MODEL], "expected layout"),
        (["--data", str(tiny_root), "--model", MODEL, "--set", "epoch=3"], "unknown recipe key 'epoch'"),
        (
            ["--data", str(tiny_root), "--model", MODEL, "--set", "distillation=maybe"],
            "distillation='maybe' (--set distillation=maybe)",
        ),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        rc = main(["train", "cls", "--out", str(out), "--profile", "mini", *args])
        err = capsys.readouterr().err
        assert rc == 2, args
        assert message in err and err.startswith("anchorformer train: error: "), err
        assert "Traceback" not in err
        assert not out.exists()
    rc = main(["eval", "cls", "--data", str(tiny_root), "--checkpoint", str(tmp_path / "no.pth"), "--out", str(out)])
    assert rc == 2 and "no.pth" in capsys.readouterr().err


def test_gradient_accumulation_equals_the_large_batch(tiny_root, tmp_path):
    """Two accumulated batches of 4 take the step of one batch of 8 (SGD, no augmentation)."""
    exact = TINY + ["no_aug=true", "opt=sgd", "weight_decay=0.0", "lr=0.5", "smoothing=0.0", "clip_grad=10.0"]
    big = train(tiny_root, tmp_path / "big", MODEL, profile="mini", overrides=exact + ["batch_size=8"], epochs=1)
    acc = train(
        tiny_root,
        tmp_path / "acc",
        MODEL,
        profile="mini",
        overrides=exact + ["batch_size=4", "accum_steps=2"],
        epochs=1,
    )
    a = torch.load(tmp_path / "big" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "acc" / "model.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert abs(big["train_loss"] - acc["train_loss"]) < 1e-5


def test_bf16_autocast_and_ema_on_the_cpu(tiny_root, tmp_path):
    metrics = train(
        tiny_root,
        tmp_path / "amp",
        MODEL,
        profile="mini",
        overrides=TINY + ["amp=true", "ema=true", "ema_decay=0.5"],
        epochs=2,
    )
    assert math.isfinite(metrics["train_loss"]) and "top1_ema" in metrics
    state = torch.load(tmp_path / "amp" / "model.pth", weights_only=True)
    assert set(state["model_ema"]) == set(state["model"])
    assert any(not torch.equal(state["model_ema"][k], state["model"][k]) for k in state["model"])
