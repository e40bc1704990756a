"""Dry runs of every full recipe on the CPU (`--set dry_run=true`), the global batch of a recipe on
any number of processes, and the teacher read from a local file (issue: the full profile, proven
before the GPUs)."""

from __future__ import annotations

import json
import logging

import pytest
import timm
from safetensors.torch import save_file

from anchorformer.engine.batching import plan_batch
from anchorformer.engine.recipe import RecipeError

TEACHER_KW = "{channels: [16, 32, 64, 128]}"


# ---------------------------------------------------------------------------------------------
# the batch plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("global_batch", "per_device", "world", "expected"),
    [
        (1024, 128, 8, (128, 1)),  # DeiT on 8 GPUs
        (1024, 128, 1, (128, 8)),  # one GPU accumulates 8 micro-batches
        (1024, 128, 16, (64, 1)),  # more GPUs: smaller per-device batches
        (16, 2, 1, (2, 8)),  # Mask R-CNN / ADE20K on one device
        (16, 2, 4, (2, 2)),
        (32, 32, 1, (32, 1)),  # the mini recipes: nothing derived
    ],
)
def test_the_global_batch_is_the_recipes(global_batch, per_device, world, expected):
    plan = plan_batch(global_batch, per_device, world)
    assert (plan.per_device, plan.accum_steps) == expected
    assert plan.global_batch == global_batch and plan.matches
    assert plan.record()["global_batch"] == global_batch and plan.record()["world_size"] == world


def test_an_inexact_split_says_so(caplog):
    plan = plan_batch(1024, 128, 3)  # 1024 is not divisible by 3 processes
    assert not plan.matches and plan.global_batch == 128 * 3 * 3
    assert "DIFFERS from the recipe's global batch 1024" in plan.describe()
    with caplog.at_level(logging.WARNING):
        plan.log()
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_without_a_global_batch_the_batch_follows_the_processes():
    plan = plan_batch(None, 8, 2, accum_steps=2)
    assert plan.global_batch == 32 and plan.matches


def test_accum_steps_and_global_batch_are_not_both_set():
    from anchorformer.tasks.classification.train import resolve_recipe

    with pytest.raises(RecipeError, match="accum_steps=2: derived from global_batch"):
        resolve_recipe(profile="full", overrides=["accum_steps=2"])
    assert resolve_recipe(profile="full").global_batch == 1024
    mini = resolve_recipe(profile="mini")  # the mini numerics unchanged: 32 per step on the pipeline's 1 process
    assert (mini.global_batch, mini.batch_size, mini.accum_steps) == (None, 32, 1)
    assert plan_batch(mini.global_batch, mini.batch_size, 1).record()["global_batch"] == 32


# ---------------------------------------------------------------------------------------------
# the teacher of the full profile
# ---------------------------------------------------------------------------------------------


def test_full_profile_teacher_is_deits_from_a_local_file():
    from anchorformer.tasks.classification.train import resolve_recipe

    r = resolve_recipe(profile="full")
    assert (r.teacher, r.teacher_pretrained) == ("regnety_160", False)  # no download at run time


def test_a_missing_teacher_file_is_one_clear_error(mini_data, tmp_path):
    from anchorformer.tasks.classification.train import train

    missing = tmp_path / "regnety_160.deit_in1k.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        train(
            mini_data / "imagenet", tmp_path / "run", "deit_tiny_distilled_patch16_224", profile="full",
            overrides=["dry_run=true", f"teacher_checkpoint={missing}"],
        )  # fmt: skip
    text = str(e.value)
    for needed in ("teacher_checkpoint", str(missing), "regnety_160.deit_in1k", "hf download"):
        assert needed in text
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


# ---------------------------------------------------------------------------------------------
# one dry run per task in the default run; two processes (gloo) are slow
# ---------------------------------------------------------------------------------------------


def _teacher_file(tmp_path):
    path = tmp_path / "teacher.safetensors"  # a stand-in for regnety_160: the same code path, a small CNN
    save_file(timm.create_model("resnet10t", num_classes=10, channels=[16, 32, 64, 128]).state_dict(), str(path))
    return path


def _cls_dry_run(mini_data, tmp_path, nproc=1):
    from anchorformer.tasks.classification.train import train

    sets = [
        "dry_run=true",
        "device=cpu",
        "teacher=resnet10t",
        f"teacher_kwargs={TEACHER_KW}",
        f"teacher_checkpoint={_teacher_file(tmp_path)}",
    ]
    return train(
        mini_data / "imagenet", tmp_path / "cls", "anchorformer_tiny_distilled_patch16_224", profile="full",
        overrides=sets, nproc_per_node=nproc,
    )  # fmt: skip


def _check_cls(m, tmp_path, world):
    cfg = m["config"]
    # every code path of DeiT's recipe is on
    assert cfg["auto_augment"].startswith("rand-m9") and cfg["mixup"] > 0 and cfg["cutmix"] > 0
    assert cfg["repeated_aug"] and cfg["reprob"] > 0 and cfg["ema"] and cfg["amp"]
    assert m["distillation"] == "hard" and "teacher_top1" in m and "top1_ema" in m
    assert (m["global_batch"], m["world_size"], m["accum_steps"]) == (16, world, 4 // world)
    assert m["lr"] == pytest.approx(5e-4 * 16 / 512)  # scaled from the effective global batch
    hist = json.loads((tmp_path / "cls" / "history.json").read_text())
    assert len(hist) == 2


def test_dry_run_classification_full(mini_data, tmp_path):
    _check_cls(_cls_dry_run(mini_data, tmp_path), tmp_path, 1)


def _det_dry_run(mini_data, tmp_path, nproc=1):
    from anchorformer.tasks.detection.train import train

    return train(
        mini_data / "coco", tmp_path / "det", "anchorformer_tiny_patch16_224", profile="full",
        overrides=["dry_run=true", "device=cpu"], nproc_per_node=nproc,
    )  # fmt: skip


def _check_det(m, tmp_path, world):
    run = json.loads((tmp_path / "det" / "run.json").read_text())
    cfg = run["config"]
    assert cfg["layer_decay"] < 1 and cfg["box_head"] == "4conv1fc" and cfg["mask_head_layers"] == 4
    assert (m["global_batch"], m["world_size"], m["accum_steps"]) == (4, world, 2 // world)
    assert run["global_batch"] == 4 and m["iterations"] == 3 and "segm_AP" in m
    assert m["lr"] == pytest.approx(1e-4 * 4 / 16)


def test_dry_run_detection_full(mini_data, tmp_path):
    _check_det(_det_dry_run(mini_data, tmp_path), tmp_path, 1)


def _seg_dry_run(mini_data, tmp_path, head, nproc=1):
    from anchorformer.tasks.segmentation.train import train

    return train(
        mini_data / "ade20k" / "ADEChallengeData2016", tmp_path / f"seg_{head}", "anchorformer_small_patch16_224",
        head=head, profile="full", overrides=["dry_run=true", "device=cpu"], nproc_per_node=nproc,
    )  # fmt: skip


@pytest.mark.parametrize("head", ["upernet", pytest.param("fpn", marks=pytest.mark.slow)])
def test_dry_run_segmentation_full(mini_data, tmp_path, head):
    m = _seg_dry_run(mini_data, tmp_path, head)
    assert (m["global_batch"], m["world_size"], m["accum_steps"]) == (4, 1, 2)
    assert m["iters"] == 4 and m["num_images"] == 4 and m["head"] == head


@pytest.mark.slow
def test_dry_runs_under_torchrun_two_processes(mini_data, tmp_path):
    _check_cls(_cls_dry_run(mini_data, tmp_path, nproc=2), tmp_path, 2)
    _check_det(_det_dry_run(mini_data, tmp_path, nproc=2), tmp_path, 2)
    m = _seg_dry_run(mini_data, tmp_path, "upernet", nproc=2)
    assert (m["global_batch"], m["world_size"], m["accum_steps"]) == (4, 2, 1)
