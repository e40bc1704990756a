"""Segmentation training and evaluation on the mini ADE20K set: steps, recipe, CLI, resume, bad input."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchorformer.cli import main
from anchorformer.engine.checkpoint import load_training_checkpoint
from anchorformer.engine.recipe import RecipeError
from anchorformer.engine.run import RunFolderError
from anchorformer.tasks.segmentation.metrics import SegMetrics
from anchorformer.tasks.segmentation.recipe import SegRecipe
from anchorformer.tasks.segmentation.train import (
    _ade20k,
    _TrainBatches,
    build_model,
    evaluate_checkpoint,
    evaluate_segmentation,
    iters_for_epochs,
    lr_at,
    pad_collate,
    resolve_recipe,
    train,
)

# A model small enough for seconds-long tests: 2 blocks of 48 channels, 8x8 patches, 64² crops.
FAST = [
    "model_sizes.tiny.embed_dim=48",
    "model_sizes.tiny.depth=2",
    "model_sizes.small.embed_dim=48",
    "model_sizes.small.depth=2",
    "model_sizes.small.num_heads=3",
    "num_anchors=8",
    "pyramid_channels=16",
    "head_channels=16",
    "crop_size=64",
    "batch_size=2",
    "test_crop_size=64",
    "test_stride=48",
    "test_scale=[256,64]",
    "log_every=1",
]


@pytest.fixture(scope="module")
def ade(mini_data: Path) -> Path:
    return mini_data / "ade20k" / "ADEChallengeData2016"


def _subset(ade: Path, dst: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """A copy of the first images of each split (a small ``ADEChallengeData2016`` folder)."""
    root = dst / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for img in sorted((ade / "images" / split).glob("*.jpg"))[:n]:
            shutil.copy(img, root / "images" / split)
            shutil.copy(ade / "annotations" / split / f"{img.stem}.png", root / "annotations" / split)
    return root


@pytest.mark.parametrize(
    "backbone,head",
    [
        ("anchorformer_tiny_patch16_224", "fpn"),
        ("deit_tiny_patch16_224", "fpn"),
        ("anchorformer_small_patch16_224", "upernet"),
        ("deit_small_patch16_224", "upernet"),
    ],
)
def test_training_steps_decrease_the_loss(ade: Path, backbone: str, head: str) -> None:
    """A few AdamW steps on one mini-set batch: the loss is finite and goes down."""
    cfg = resolve_recipe("mini", FAST, model=backbone, head=head)
    assert cfg.aux_head == (head == "upernet")  # the head's recipe is applied
    data = _ade20k(ade, "training", cfg, train=True)
    images, labels = pad_collate([data[i] for i in range(2)])
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        out = model(images, labels)
        assert set(out) == ({"loss", "loss_decode", "loss_aux"} if head == "upernet" else {"loss", "loss_decode"})
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses


def test_poly_schedule_with_warmup() -> None:
    cfg = {"lr": 1.0, "warmup_iters": 10, "warmup_ratio": 1e-6, "poly_power": 1.0, "min_lr": 0.0}
    assert lr_at(0, 110, cfg) == pytest.approx(1e-6)
    assert lr_at(5, 110, cfg) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.5)
    assert lr_at(110, 110, cfg) == pytest.approx(0.0)
    cfg.update(warmup_iters=0, poly_power=0.9, min_lr=1e-4)
    assert lr_at(50, 100, cfg) == pytest.approx((1 - 1e-4) * 0.5**0.9 + 1e-4)


def test_train_stream_is_independent_of_world_size_and_start() -> None:
    one = list(_TrainBatches(10, 4, 3, 0, 6, 0, 1))
    assert all(len(b) == 4 for b in one)
    # every pass over the data is a permutation
    flat = [i for b in one for i, _ in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    two = [list(_TrainBatches(10, 4, 3, 0, 6, r, 2)) for r in (0, 1)]
    for it in range(6):
        assert sorted(two[0][it] + two[1][it]) == sorted(one[it])
    assert list(_TrainBatches(10, 4, 3, 4, 6, 0, 1)) == one[4:]
    assert list(_TrainBatches(10, 4, 4, 0, 6, 0, 1)) != one


def test_recipe_layers_and_errors() -> None:
    with pytest.raises(RecipeError, match="unknown recipe key 'not_a_key'"):
        resolve_recipe("mini", ["not_a_key=1"])
    with pytest.raises(RecipeError, match=r"head='deeplab' \(--set head=deeplab\): expected one of"):
        resolve_recipe("mini", ["head=deeplab"])
    with pytest.raises(RecipeError, match=r"head='deeplab' \(--head\)"):
        resolve_recipe("mini", head="deeplab", source="cli")
    with pytest.raises(RecipeError, match="num_anchors must be an integer >= 1; got 0"):
        resolve_recipe("mini", ["num_anchors=0"])
    with pytest.raises(RecipeError, match="num_anchors must be an integer >= 1; got -3"):
        resolve_recipe("mini", ["num_anchors=-3"])
    with pytest.raises(RecipeError, match=r"iters='3' \(params.yaml: iters\): expected an integer"):
        resolve_recipe("mini", iters="3", source="params.yaml")
    with pytest.raises(RecipeError, match=r"recipes.upernet: unknown recipe key\(s\) \['bogus'\]"):
        resolve_recipe("mini", ["recipes.upernet.bogus=1"], head="upernet")
    cfg = resolve_recipe("full", [], head="upernet")
    assert isinstance(cfg, SegRecipe) and "profile" not in cfg.keys()
    assert (cfg.iters, cfg.lr, cfg.aux_head, cfg.warmup_iters) == (160000, 6e-5, True, 1500)
    assert resolve_recipe("full", ["lr=1e-3"], head="upernet").lr == 1e-3  # --set beats the head's recipe
    assert resolve_recipe("full", ["head=upernet"]).iters == 160000  # a head chosen by --set brings its recipe
    assert resolve_recipe("full", ["recipes.upernet.lr=1e-4"], head="upernet").lr == 1e-4
    assert resolve_recipe("full", [], head="upernet", iters=7).iters == 7  # the flag beats the head's recipe
    assert resolve_recipe("full", []).iters == 80000
    # execution and test settings may change when a run is resumed; what it computes may not
    assert {"log_every", "checkpoint_every", "threads", "eval_at_end", "device"} <= (SegRecipe.resumable_keys())
    assert {"test_mode", "test_scales", "test_flip", "test_stride"} <= SegRecipe.resumable_keys()
    assert not {"lr", "iters", "seed", "model", "head", "crop_size"} & SegRecipe.resumable_keys()


def test_the_backbone_is_the_one_of_every_task() -> None:
    """The backbone's arguments come from backbone_kwargs: the mini sizes, M, and nothing else."""
    model = build_model(resolve_recipe("mini", model="anchorformer_small_patch16_224", head="upernet"))
    bk = model.config["backbone_kwargs"]
    assert {k: bk[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_anchors")} == {
        "img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "num_anchors": 16,
    }  # fmt: skip
    assert (bk["anchor_mode"], bk["normalize"], bk["per_head_anchors"]) == ("learned", True, False)
    deit = build_model(resolve_recipe("mini", model="deit_tiny_patch16_224")).config["backbone_kwargs"]
    assert deit["embed_dim"] == 96 and "num_anchors" not in deit and "anchor_mode" not in deit


def test_epochs_are_converted_to_iterations() -> None:
    assert iters_for_epochs(1.0, 200, 16) == 13  # ceil(200 / 16)
    assert iters_for_epochs(0.5, 200, 16) == 7
    assert iters_for_epochs(2, 200, 16) == 25
    for bad in ("1", 0, -1.0, True, float("nan")):
        with pytest.raises(RecipeError, match=r"epochs=.* \(--epochs\): expected a number > 0"):
            iters_for_epochs(bad, 200, 16, "--epochs")


def test_iteration_counts_are_checked_before_anything_starts(ade: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"give iters or epochs \(argument\), not both"):
        train(ade, out, iters=2, epochs=1)
    with pytest.raises(RecipeError, match=r"iters='2' \(argument: iters\): expected an integer"):
        train(ade, out, iters="2")
    with pytest.raises(RecipeError, match=r"iters=0 \(argument: iters\): expected a number >= 1"):
        train(ade, out, iters=0)
    with pytest.raises(RecipeError, match=r"epochs='1' \(argument: epochs\): expected a number > 0"):
        train(ade, out, epochs="1")
    with pytest.raises(RecipeError, match=r"epochs=-1 \(argument: epochs\)"):
        train(ade, out, epochs=-1)
    with pytest.raises(ValueError, match="unknown model 'nope_tiny'"):
        train(ade, out, "nope_tiny")
    assert not out.exists()


def test_cli_train_then_eval_writes_metrics_and_ade_pngs(
    ade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    sets = [a for s in FAST for a in ("--set", s)]
    rc = main(
        ["train", "seg", "--data", str(ade), "--out", str(run), "--profile", "mini", "--iters", "3", "--no-eval", *sets]
    )
    assert rc == 0
    assert (run / "model.pth").is_file() and (run / "checkpoints" / "checkpoint-000003.pth").is_file()
    assert not (run / "metrics.json").exists()
    stored = load_training_checkpoint(run / "model.pth")
    assert stored["config"]["iters"] == 3 and stored["profile"] == "mini" and "profile" not in stored["config"]
    ev = tmp_path / "eval"
    argv = ["eval", "seg", "--data", str(ade), "--checkpoint", str(run / "model.pth"), "--out", str(ev)]
    assert main([*argv, "--max-images", "3"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {"mIoU", "mAcc", "aAcc"} <= set(metrics) and metrics["num_images"] == 3
    assert 0.0 <= metrics["mIoU"] <= 100.0 and metrics["iters"] == 3 and metrics["gmacs"] > 0
    assert (metrics["backbone"], metrics["family"], metrics["head"], metrics["num_anchors"]) == (
        "anchorformer_tiny_patch16_224", "AnchorFormer", "fpn", 8,
    )  # fmt: skip
    assert metrics["profile"] == "mini"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mIoU"] == metrics["mIoU"]
    gts = sorted((ade / "annotations" / "validation").glob("*.png"))[:3]
    preds = sorted((ev / "predictions").glob("*.png"))
    assert [p.name for p in preds] == [g.name for g in gts]
    for p, g in zip(preds, gts):
        arr, gt = np.asarray(Image.open(p)), np.asarray(Image.open(g))
        assert arr.shape == gt.shape and arr.dtype == np.uint8
        assert arr.min() >= 1 and arr.max() <= 150  # ADE20K format: 1..150, 0 unused
    # the PNGs are the predictions the metrics were computed from
    m = SegMetrics(150)
    for p, g in zip(preds, gts):
        gt = torch.from_numpy(np.asarray(Image.open(g)).astype(np.int64)) - 1
        gt[gt < 0] = 255
        m.update(torch.from_numpy(np.asarray(Image.open(p)).astype(np.int64)) - 1, gt)
    assert m.compute()["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-3)
    # the test settings can be changed at evaluation; what the model is cannot
    assert main([*argv, "--max-images", "1", "--no-predictions", "--set", "test_flip=true"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["num_images"] == 1
    assert main([*argv, "--model", "deit_tiny_patch16_224"]) == 2
    assert "holds a anchorformer_tiny_patch16_224 backbone" in capsys.readouterr().err


def test_cli_refuses_bad_values_naming_the_flag(ade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    base = ["train", "seg", "--data", str(ade), "--out", str(out)]
    for args, message in [
        (["--iters", "2", "--epochs", "1"], "give --iters or --epochs, not both"),
        (["--set", "nope=1"], "unknown recipe key 'nope'"),
        (["--set", "num_anchors=0"], "num_anchors must be an integer >= 1; got 0"),
        (["--set", "iters=1.5"], "iters=1.5 (--set iters=1.5): expected an integer"),
        (["--iters", "0"], "iters=0 (--iters): expected a number >= 1"),
        (["--epochs", "-2"], "epochs=-2 (--epochs): expected a number > 0"),
        (["--head", "deeplab"], "head='deeplab' (--head): expected one of ['fpn', 'upernet']"),
    ]:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    with pytest.raises(SystemExit):  # argparse: --iters takes an integer
        main([*base, "--iters", "1.5"])
    assert "--iters: invalid int value" in capsys.readouterr().err
    assert not out.exists()
    # M <= 0 is refused with the message of train cls
    assert main(["train", "cls", "--data", str(tmp_path), "--out", str(out), "--set", "num_anchors=0"]) == 2
    cls_err = capsys.readouterr().err
    assert main([*base, "--set", "num_anchors=0"]) == 2
    seg_err = capsys.readouterr().err
    assert (
        cls_err.split("recipe: ")[1] == seg_err.split("recipe: ")[1] == "num_anchors must be an integer >= 1; got 0\n"
    )


def test_resume_after_a_kill_ends_with_the_same_weights(
    ade: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sets = [*FAST, "checkpoint_every=2", "keep_checkpoints=5"]
    result = train(ade, tmp_path / "a", overrides=sets, iters=4, evaluate=False)
    assert result["iters"] == 4 and not (tmp_path / "a" / "metrics.json").exists()
    # a run killed after its checkpoint at iteration 2 (and a temporary file cut mid-write)
    ckpts = tmp_path / "b" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "checkpoint-000002.pth", ckpts)
    (ckpts / ".checkpoint-000004.pth.tmp-x").write_bytes(b"PK\x03\x04 cut")
    with caplog.at_level("INFO"):
        result = train(ade, tmp_path / "b", overrides=sets, iters=4, evaluate=False)  # resumes at 2
    assert "resumed from" in caplog.text and "at iteration 2 of 4" in caplog.text
    assert result["iters"] == 4 and not (ckpts / ".checkpoint-000004.pth.tmp-x").exists()
    a = torch.load(tmp_path / "a" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def curves(run: Path) -> dict[str, bytes]:
        return {str(f.relative_to(run)): f.read_bytes() for f in sorted((run / "dvclive").rglob("*")) if f.is_file()}

    assert curves(tmp_path / "b") == curves(tmp_path / "a")  # the curves too, the final loss in the summary
    shutil.rmtree(tmp_path / "a" / "dvclive")  # as DVC removes a stage's outputs before rerunning it
    trained = (tmp_path / "a" / "timings.json").read_bytes()
    train(ade, tmp_path / "a", overrides=sets, iters=4, evaluate=False)  # a finished run, resumed
    assert curves(tmp_path / "a") == curves(tmp_path / "b")
    assert (tmp_path / "a" / "timings.json").read_bytes() == trained  # it trained nothing: the training's timings stay
    # settings of how it runs or is tested may change on resumption (nothing left to train here)
    resumable = [*sets, "log_every=3", "test_flip=true", "checkpoint_every=1"]
    train(ade, tmp_path / "b", overrides=resumable, iters=4, max_eval_images=2)
    assert (tmp_path / "b" / "metrics.json").is_file()
    # another run's checkpoint: refused, named or found by resume="auto"
    ckpt = str(ckpts / "checkpoint-000004.pth")
    with pytest.raises(RunFolderError, match="another model"):
        train(ade, tmp_path / "b", overrides=[*sets, "pyramid_channels=8"], iters=4, resume=ckpt)
    with pytest.raises(RunFolderError, match="another length: 4 iterations vs 6"):
        train(ade, tmp_path / "b", overrides=sets, iters=6, resume=ckpt)
    with pytest.raises(RunFolderError, match="lr: checkpoint 0.001 vs now 0.002"):
        train(ade, tmp_path / "b", overrides=[*sets, "lr=0.002"], iters=4, resume=ckpt)
    with pytest.raises(RunFolderError, match="another recipe"):
        train(ade, tmp_path / "b", overrides=[*sets, "lr=0.002"], iters=4)  # resume="auto"
    # ... unless the caller (the pipeline) asks for a restart: the earlier files move aside
    train(ade, tmp_path / "b", overrides=[*sets, "lr=0.002"], iters=2, evaluate=False, if_different="restart")
    (previous,) = (tmp_path / "b").glob("previous-*")
    assert (previous / "metrics.json").is_file() and (previous / "checkpoints" / "checkpoint-000004.pth").is_file()
    assert load_training_checkpoint(tmp_path / "b" / "model.pth")["config"]["lr"] == 0.002


def test_resume_never_refuses_an_earlier_run_unless_overwrite(ade: Path, tmp_path: Path) -> None:
    root = _subset(ade, tmp_path, n_train=4)
    out = tmp_path / "run"
    train(root, out, overrides=FAST, epochs=1, evaluate=False)  # 4 images, batch 2: 2 iterations
    assert (out / "checkpoints" / "checkpoint-000002.pth").is_file()
    assert load_training_checkpoint(out / "model.pth")["config"]["iters"] == 2
    with pytest.raises(RunFolderError, match="holds an earlier run"):
        train(root, out, overrides=FAST, iters=1, resume="never", evaluate=False)
    assert not list(out.glob("previous-*"))
    train(root, out, overrides=FAST, iters=1, resume="never", overwrite=True, evaluate=False)
    (previous,) = out.glob("previous-*")
    assert (previous / "checkpoints" / "checkpoint-000002.pth").is_file() and (previous / "model.pth").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001.pth"]


def test_checkpoints_written_before_the_typed_recipe_still_evaluate(ade: Path, tmp_path: Path) -> None:
    cfg = resolve_recipe("mini", FAST)
    model = build_model(cfg)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("anchor_mode", "normalize", "model_kwargs")}
    old["backbone"], old["pretrain_img_size"], old["profile"] = old.pop("model"), old.pop("img_size"), "mini"
    path = tmp_path / "old.pth"
    torch.save({"model": model.state_dict(), "model_config": model.config, "config": old, "iteration": 9}, path)
    m = evaluate_checkpoint(ade, path, tmp_path / "eval", max_images=1, save_predictions=False)
    assert (m["backbone"], m["profile"], m["iters"], m["num_images"]) == ("anchorformer_tiny_patch16_224", "mini", 9, 1)
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(ValueError, match="not a segmentation checkpoint"):
        evaluate_checkpoint(ade, path, tmp_path / "eval")


@pytest.mark.parametrize("defect", ["size", "value"])
def test_bad_label_map_names_the_file(ade: Path, tmp_path: Path, defect: str) -> None:
    root = _subset(ade, tmp_path, n_train=0)
    bad = sorted((root / "annotations" / "validation").glob("*.png"))[1]
    arr = np.asarray(Image.open(bad))
    if defect == "size":
        arr = arr[:-3]
    else:
        arr = arr.copy()
        arr[0, 0] = 151
    Image.fromarray(arr).save(bad)
    cfg = resolve_recipe("mini", FAST)
    model = build_model(cfg)
    with pytest.raises(ValueError, match=bad.name):
        evaluate_segmentation(model, root, tmp_path / "out", cfg)
    assert not (tmp_path / "out" / "metrics.json").exists()  # no output that looks complete


def test_evaluation_checks_sizes_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a loader that lets a mismatch through gets a clear error naming the ground-truth file."""

    class Mismatched:
        samples = [(tmp_path / "ADE_val_00000007.jpg", tmp_path / "ADE_val_00000007.png")]

        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(3, 64, 80), torch.zeros(64, 64, dtype=torch.long)

    # the module, not the package's `train` function that shadows its name
    module = importlib.import_module("anchorformer.tasks.segmentation.train")
    monkeypatch.setattr(module, "_ade20k", lambda *a, **k: Mismatched())
    cfg = resolve_recipe("mini", FAST)
    with pytest.raises(ValueError, match=r"ADE_val_00000007\.png.*\(64, 64\).*\(64, 80\)"):
        evaluate_segmentation(build_model(cfg), tmp_path, tmp_path / "out", cfg)


@pytest.mark.slow
def test_two_process_ddp_takes_the_same_step_as_one_process(
    ade: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 gloo processes x 1 crop == 1 process x 2 crops: the same weights after one step, same metrics."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exact = [
        *FAST,
        "norm=gn",
        "dropout=0.0",
        "warmup_iters=0",
        "checkpoint_every=1",
        "threads=1",
    ]  # no batch statistics
    root = _subset(ade, tmp_path, n_train=4, n_val=3)  # 3 validation images: shards of 2 and 1
    runs = {n: train(root, tmp_path / f"ddp{n}", nproc_per_node=n, overrides=exact, iters=1) for n in (2, 1)}
    assert runs[1]["num_images"] == runs[2]["num_images"] == 3
    for key in ("mIoU", "mAcc", "aAcc"):
        assert runs[1][key] == pytest.approx(runs[2][key], abs=1e-3)
    a = torch.load(tmp_path / "ddp2" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp1" / "model.pth", weights_only=True)["model"]
    torch.manual_seed(0)
    start = build_model(resolve_recipe("mini", exact)).state_dict()
    assert max(float((b[k] - start[k]).abs().max()) for k in b) > 1e-4  # the step did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
