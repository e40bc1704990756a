"""`train det` / `eval det`: outputs, resume, evaluation of a saved model, presets, command line."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from anchorformer.cli import main
from anchorformer.engine.run import RunFolderError
from anchorformer.tasks.detection.coco_eval import metric_keys
from anchorformer.tasks.detection.train import (
    detector_config,
    evaluate_checkpoint,
    load_detector,
    resolve_recipe,
    train,
)

TINY_RUN = [
    "model_sizes.tiny.embed_dim=48",
    "model_sizes.tiny.depth=2",
    "num_anchors=8",
    "out_channels=32",
    "representation_size=64",
    "mask_head_layers=1",
    "mask_head_channels=16",
    "min_size=96",
    "max_size=120",
    "batch_size=4",
    "max_train_images=8",
    "max_eval_images=4",
    "log_every=1",
    "warmup_iters=2",
]


def _cfg(*extra: str) -> list[str]:
    return [*TINY_RUN, *extra]


def _preset(profile: str, *overrides: str):
    return resolve_recipe(profile=profile, overrides=overrides)


def test_train_then_eval_saved_model(mini_data, tmp_path) -> None:
    out = tmp_path / "run"
    metrics = train(mini_data / "coco", out, overrides=_cfg("epochs=1", "lr_steps=[1]"))
    for name in ("metrics.json", "detections.json", "model.pth", "run.json"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("checkpoint-*.pth"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved.pop("code_versions") == metrics.pop("code_versions")  # one segment: [{version, 0, 2}]
    assert saved.pop("numerics")["path"] in ("avx2", "native")  # the numeric path the run followed
    metrics.pop("numerics", None)
    assert set(metric_keys()) <= set(saved) and saved == pytest.approx(metrics)
    assert saved["iterations"] == 2 and saved["backbone_gmacs"] > 0
    assert (out / "dvclive" / "metrics.json").is_file()

    # the saved model evaluates to the same detections and numbers
    ev = evaluate_checkpoint(mini_data / "coco", out / "model.pth", tmp_path / "eval", max_images=4)
    assert (tmp_path / "eval" / "detections.json").read_bytes() == (out / "detections.json").read_bytes()
    assert ev == pytest.approx({k: saved[k] for k in metric_keys()})
    model, state = load_detector(out / "model.pth")
    assert state["cat_ids"] == [1, 3, 7] and state["detector_config"]["num_classes"] == 3


def test_resume_gives_the_same_model(mini_data, tmp_path, caplog) -> None:
    """A run killed after its first epoch and resumed ends with the same weights and numbers."""
    cfg = _cfg("epochs=2", "lr_steps=[2]", "keep_checkpoints=2")
    straight = tmp_path / "straight"
    train(mini_data / "coco", straight, overrides=cfg)
    first = straight / "checkpoints" / "checkpoint-000002.pth"
    assert first.is_file()
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(first, killed / "checkpoints" / first.name)
    resumed = train(mini_data / "coco", killed, overrides=cfg)
    a = torch.load(straight / "model.pth", weights_only=True)["model"]
    b = torch.load(killed / "model.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed["iterations"] == 4
    before = json.loads((straight / "metrics.json").read_text())
    assert {k: before[k] for k in metric_keys()} == {k: resumed[k] for k in metric_keys()}

    # another recipe in the same folder is refused: nothing of the earlier run is touched
    before_files = sorted(p.name for p in (killed / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match=r"lr: checkpoint 0.0004 vs now 1e-05"):
        train(mini_data / "coco", killed, overrides=_cfg("epochs=2", "lr_steps=[2]", "lr=1e-5"))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == before_files
    # ... unless told to start afresh, which moves the earlier run aside
    with caplog.at_level(logging.WARNING, logger="anchorformer.engine.run"):
        train(mini_data / "coco", killed, overrides=_cfg("epochs=1", "lr_steps=[1]", "lr=1e-5"), resume="never",
              overwrite=True)  # fmt: skip
    assert "starting afresh" in caplog.text
    aside = [p for p in killed.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "metrics.json").is_file()
    assert (aside[0] / "checkpoints" / "checkpoint-000004.pth").is_file()


def test_presets_and_comparable_flops() -> None:
    full, _ = detector_config(_preset("full"), 80)
    assert (full.min_size, full.max_size, full.num_classes) == (800, 1333, 80)
    cfg, info = detector_config(_preset("mini"), 3)
    assert info["input_scale"] == 1.0 and cfg.min_size == 128
    assert cfg.backbone_kwargs == dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_anchors=16, attn_impl="auto",
        anchor_mode="learned", normalize=True, per_head_anchors=False,
    )  # fmt: skip
    deit = _preset("mini", "model=deit_tiny_patch16_224", "match_macs_of=anchorformer_tiny_patch16_224")
    dcfg, dinfo = detector_config(deit, 3)
    assert "num_anchors" not in dcfg.backbone_kwargs
    assert dinfo["matched_to"] == "anchorformer_tiny_patch16_224"
    assert dinfo["input_scale"] < 1.0 and dcfg.min_size < 128
    # matched at the size the mini runs train on (128x160), not at 1333x800
    assert dinfo["match_size"] == info["match_size"] == [128, 160]
    assert abs(dinfo["backbone_gmacs_match"] - info["backbone_gmacs_match"]) / info["backbone_gmacs_match"] < 0.05
    assert 0.5 < dinfo["input_scale"] < 1.0
    assert dinfo["backbone_gmacs_full"] > 5 * info["backbone_gmacs"]
    # the full recipe matches at 1333x800
    fdeit = _preset("full", "model=deit_tiny_patch16_224", "match_macs_of=anchorformer_tiny_patch16_224")
    fanchor = _preset("full", "model=anchorformer_tiny_patch16_224")
    _, fd = detector_config(fdeit, 80)
    _, fa = detector_config(fanchor, 80)
    assert fd["match_size"] == [800, 1333]
    assert abs(fd["backbone_gmacs"] - fa["backbone_gmacs"]) / fa["backbone_gmacs"] < 0.05


def test_command_line_errors(mini_data, tmp_path, capsys) -> None:
    assert main(["train", "det", "--data", str(mini_data / "coco"), "--out", str(tmp_path), "--set", "bogus=1"]) == 2
    assert "unknown recipe key 'bogus'" in capsys.readouterr().err
    # M <= 0 is refused as by train cls, and so is a fractional epoch count, naming the flag
    assert (
        main(["train", "det", "--data", str(mini_data / "coco"), "--out", str(tmp_path), "--set", "num_anchors=0"]) == 2
    )
    assert "num_anchors must be an integer >= 1; got 0" in capsys.readouterr().err
    assert main(["train", "det", "--data", str(mini_data / "coco"), "--out", str(tmp_path), "--epochs", "1.5"]) == 2
    assert "epochs=1.5 (--epochs): expected an integer" in capsys.readouterr().err
    assert main(["eval", "det", "--data", str(tmp_path / "nope"), "--checkpoint", "x.pth", "--out", str(tmp_path)]) == 2
    assert "x.pth" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "det",
                "--data",
                str(tmp_path / "nope"),
                "--checkpoint",
                str(mini_data / "coco" / "mini.json"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
