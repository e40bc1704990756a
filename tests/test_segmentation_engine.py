"""Segmentation training and evaluation on the mini ADE20K set: steps, CLI, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchorformer.cli import main
from anchorformer.engine.seg_metrics import SegMetrics
from anchorformer.engine.segmentation import (
    _ade20k,
    _resolve_iters,
    _TrainBatches,
    build_model,
    evaluate_segmentation,
    lr_at,
    pad_collate,
    resolve_config,
    train_segmentation,
    train_segmentation_torchrun,
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
    cfg = resolve_config("mini", FAST, backbone=backbone, head=head)
    assert cfg["aux_head"] == (head == "upernet")  # the head's recipe is applied
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


def test_config_errors() -> None:
    with pytest.raises(KeyError, match="unknown config key 'not_a_key'"):
        resolve_config("mini", ["not_a_key=1"])
    with pytest.raises(ValueError, match="head must be one of"):
        resolve_config("mini", ["head=deeplab"])
    cfg = resolve_config("full", [], head="upernet")
    assert (cfg["iters"], cfg["lr"], cfg["aux_head"], cfg["warmup_iters"]) == (160000, 6e-5, True, 1500)
    cfg = resolve_config("full", ["lr=1e-3"], head="upernet")  # --set beats the recipe
    assert cfg["lr"] == 1e-3
    assert resolve_config("full", [])["iters"] == 80000


def test_cli_train_then_eval_writes_metrics_and_ade_pngs(ade: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [a for s in FAST for a in ("--set", s)]
    rc = main(
        ["train", "seg", "--data", str(ade), "--out", str(run), "--profile", "mini", "--iters", "3", "--no-eval", *sets]
    )
    assert rc == 0
    assert (run / "model.pth").is_file() and (run / "checkpoints" / "checkpoint-000003.pth").is_file()
    assert not (run / "metrics.json").exists()
    ev = tmp_path / "eval"
    argv = ["eval", "seg", "--data", str(ade), "--checkpoint", str(run / "model.pth"), "--out", str(ev)]
    assert main([*argv, "--max-images", "3"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {"mIoU", "mAcc", "aAcc"} <= set(metrics) and metrics["num_images"] == 3
    assert 0.0 <= metrics["mIoU"] <= 100.0 and metrics["iters"] == 3 and metrics["gmacs"] > 0
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
    with pytest.raises(SystemExit):  # --iters and --epochs exclude each other
        main(["train", "seg", "--data", str(ade), "--out", str(run), "--iters", "2", "--epochs", "1"])
    assert main(["train", "seg", "--data", str(ade), "--out", str(run), "--set", "nope=1"]) == 2


def test_epochs_are_converted_to_iterations() -> None:
    cfg = resolve_config("mini", ["batch_size=16"])
    assert _resolve_iters(cfg, 200, None, 1.0) == 13  # ceil(200 / 16)
    assert _resolve_iters(cfg, 200, None, 0.5) == 7
    assert _resolve_iters(cfg, 200, 5, None) == 5
    assert _resolve_iters(cfg, 200, None, None) == cfg["iters"]
    with pytest.raises(ValueError, match="not both"):
        _resolve_iters(cfg, 200, 2, 1.0)


def test_resume_after_a_kill_ends_with_the_same_weights(
    ade: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = resolve_config("mini", [*FAST, "checkpoint_every=2", "keep_checkpoints=5"])
    train_segmentation(ade, tmp_path / "a", cfg, iters=4, evaluate=False)
    # a run killed after its checkpoint at iteration 2 (and a temporary file cut mid-write)
    ckpts = tmp_path / "b" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "checkpoint-000002.pth", ckpts)
    (ckpts / ".checkpoint-000004.pth.tmp-x").write_bytes(b"PK\x03\x04 cut")
    result = train_segmentation(ade, tmp_path / "b", cfg, iters=4, evaluate=False)  # resumes at 2
    assert result["iters"] == 4
    a = torch.load(tmp_path / "a" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # another run's checkpoint: refused when named, skipped (fresh start) by resume="auto"
    other = resolve_config("mini", [*FAST, "pyramid_channels=8"])
    ckpt = str(tmp_path / "b" / "checkpoints" / "checkpoint-000004.pth")
    with pytest.raises(ValueError, match="another model"):
        train_segmentation(ade, tmp_path / "b", other, iters=4, evaluate=False, resume=ckpt)
    with pytest.raises(ValueError, match="another length"):
        train_segmentation(ade, tmp_path / "b", cfg, iters=6, evaluate=False, resume=ckpt)
    with pytest.raises(ValueError, match="lr 0.001 vs 0.002"):
        train_segmentation(ade, tmp_path / "b", {**cfg, "lr": 0.002}, iters=4, evaluate=False, resume=ckpt)
    with caplog.at_level("WARNING", logger="anchorformer.engine.segmentation"):
        train_segmentation(ade, tmp_path / "b", {**cfg, "lr": 0.002}, iters=2, evaluate=False)  # resume="auto"
    assert "not resuming" in caplog.text


def _copy_validation(ade: Path, dst: Path, n: int = 2) -> Path:
    root = dst / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (root / sub / "validation").mkdir(parents=True)
        (root / sub / "training").mkdir(parents=True)
    for img in sorted((ade / "images" / "validation").glob("*.jpg"))[:n]:
        shutil.copy(img, root / "images" / "validation")
        shutil.copy(ade / "annotations" / "validation" / f"{img.stem}.png", root / "annotations" / "validation")
    return root


@pytest.mark.parametrize("defect", ["size", "value"])
def test_bad_label_map_names_the_file(ade: Path, tmp_path: Path, defect: str) -> None:
    root = _copy_validation(ade, tmp_path)
    bad = sorted((root / "annotations" / "validation").glob("*.png"))[1]
    arr = np.asarray(Image.open(bad))
    if defect == "size":
        arr = arr[:-3]
    else:
        arr = arr.copy()
        arr[0, 0] = 151
    Image.fromarray(arr).save(bad)
    cfg = resolve_config("mini", FAST)
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

    monkeypatch.setattr("anchorformer.engine.segmentation._ade20k", lambda *a, **k: Mismatched())
    cfg = resolve_config("mini", FAST)
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
    root = _copy_validation(ade, tmp_path, n=3)  # 3 validation images: shards of 2 and 1
    for img in sorted((ade / "images" / "training").glob("*.jpg"))[:4]:
        shutil.copy(img, root / "images" / "training")
        shutil.copy(ade / "annotations" / "training" / f"{img.stem}.png", root / "annotations" / "training")
    runs = {}
    for n in (2, 1):
        runs[n] = train_segmentation_torchrun(
            root, tmp_path / f"ddp{n}", nproc_per_node=n, profile="mini", overrides=exact, iters=1
        )
    assert runs[1]["num_images"] == runs[2]["num_images"] == 3
    for key in ("mIoU", "mAcc", "aAcc"):
        assert runs[1][key] == pytest.approx(runs[2][key], abs=1e-3)
    a = torch.load(tmp_path / "ddp2" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp1" / "model.pth", weights_only=True)["model"]
    torch.manual_seed(0)
    start = build_model(resolve_config("mini", exact)).state_dict()
    assert max(float((b[k] - start[k]).abs().max()) for k in b) > 1e-4  # the step did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
