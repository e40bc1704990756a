"""E9 in the classification engine: entropies logged per epoch, k-means anchors, the anchors' learning rate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cls_helpers import TINY, make_tiny_imagefolder
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import anchorformer
from anchorformer.engine.recipe import RecipeError
from anchorformer.tasks.classification import train as cls_train
from anchorformer.tasks.classification.anchors import optimizer_params
from anchorformer.tasks.classification.train import classifier_kwargs, resolve_recipe, train

MODEL = "anchorformer_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_imagefolder(tmp_path_factory.mktemp("tiny") / "imagenet", train_per_class=8, val_per_class=2)


def _without_times(history):
    return [{k: v for k, v in row.items() if "time" not in k} for row in history]


def test_entropies_are_logged_and_change_nothing_else(tiny_root, tmp_path, monkeypatch):
    metrics = train(tiny_root, tmp_path / "a", MODEL, profile="mini", overrides=TINY, epochs=2)
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    N, M = (16 // 4) ** 2 + 1, 4
    for row in history:
        for kind, uniform in (("token_given_anchor", math.log(N)), ("anchor_given_token", math.log(M))):
            values = [row[f"entropy/{kind}/layer0"], row[f"entropy/{kind}/mean"]]
            assert values[0] == values[1] and 0 < values[0] <= uniform + 1e-5
            assert round(values[0], 5) == values[0]
    tsv = tmp_path / "a" / "dvclive" / "plots" / "metrics" / "entropy" / "token_given_anchor" / "layer0.tsv"
    assert len(tsv.read_text().splitlines()) == 1 + 2  # header and one line per epoch
    assert metrics["entropy"]["uniform"] == {
        "token_given_anchor": round(math.log(N), 5),
        "anchor_given_token": round(math.log(M), 5),
    }
    assert metrics["entropy"]["final"]["token_given_anchor/mean"] == history[-1]["entropy/token_given_anchor/mean"]
    assert metrics["entropy"]["init"]["anchor_given_token/layer0"] == pytest.approx(math.log(M), abs=1e-3)
    # the same run without the probe: the same losses and accuracies to the last bit
    monkeypatch.setattr(cls_train, "entropy_probe", lambda *a: None)
    bare = train(tiny_root, tmp_path / "b", MODEL, profile="mini", overrides=TINY, epochs=2)
    assert "entropy" not in bare
    assert (bare["top1"], bare["loss"], bare["train_loss"]) == (metrics["top1"], metrics["loss"], metrics["train_loss"])
    probed = [{k: v for k, v in r.items() if not k.startswith("entropy/")} for r in history]
    assert _without_times(probed) == _without_times(json.loads((tmp_path / "b" / "history.json").read_text()))


def test_deit_logs_softmax_attention_entropy(tiny_root, tmp_path):
    metrics = train(tiny_root, tmp_path / "d", "deit_tiny_patch16_224", profile="mini", overrides=TINY, epochs=1)
    assert set(metrics["entropy"]["uniform"]) == {"token_given_token"}
    assert "token_given_token/layer0" in metrics["entropy"]["final"]


def test_kmeans_anchors_on_a_fresh_run_only(tiny_root, tmp_path, monkeypatch):
    calls = []
    real = cls_train.kmeans_anchors_from_first_batch
    monkeypatch.setattr(cls_train, "kmeans_anchors_from_first_batch", lambda *a: calls.append(1) or real(*a))
    overrides = [*TINY, "anchor_init=kmeans", "keep_checkpoints=3"]
    first = train(tiny_root, tmp_path / "k", MODEL, profile="mini", overrides=overrides, epochs=1)
    assert calls == [1] and first["config"]["anchor_init"] == "kmeans"
    again = train(tiny_root, tmp_path / "k2", MODEL, profile="mini", overrides=overrides, epochs=1)
    assert again["top1"] == first["top1"] and again["train_loss"] == first["train_loss"]  # seeded
    calls.clear()
    (tmp_path / "k" / "metrics.json").unlink()  # an interrupted run: resumes from epoch 1's checkpoint
    resumed = train(tiny_root, tmp_path / "k", MODEL, profile="mini", overrides=overrides, epochs=1)
    assert calls == [] and resumed["train_loss"] == first["train_loss"]
    assert resumed["entropy"]["init"] == first["entropy"]["init"]


def test_anchor_lr_mult_puts_the_anchors_in_their_own_group():
    torch.manual_seed(0)
    recipe = resolve_recipe(overrides=[*TINY, "learn_temperature=true"])
    model = anchorformer.create_model(MODEL, **classifier_kwargs(MODEL, recipe, 3))
    assert optimizer_params(model, 0.05, 1.0) is model  # the official grouping, untouched
    groups = optimizer_params(model, 0.05, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    *rest, own = groups
    assert own["lr_scale"] == 10.0 and own["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in own["params"]) == ["blocks.0.attn.anchors", "blocks.0.attn.logit_scale"]
    timm_groups = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05).param_groups
    assert [len(g["params"]) for g in rest] == [len(timm_groups[0]["params"]) - 2, len(timm_groups[1]["params"])]
    assert [g["weight_decay"] for g in rest] == [0.0, 0.05]
    opt = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=4, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-6,
                                   step_on_epochs=False, updates_per_epoch=3)  # fmt: skip
    for step in (1, 3, 7):
        sched.step_update(num_updates=step)
        assert opt.param_groups[-1]["lr"] == pytest.approx(10.0 * opt.param_groups[0]["lr"], rel=1e-12)
    with pytest.raises(ValueError, match="no learned anchors"):
        optimizer_params(anchorformer.create_model(MODEL, anchor_mode="pooled", **_shape()), 0.05, 2.0)
    with pytest.raises(ValueError, match="anchor_lr_mult must be a number > 0"):
        optimizer_params(model, 0.05, 0.0)


def _shape():
    return dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_anchors=4, num_classes=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["anchor_lr_mult=0"], r"anchor_lr_mult=0.* expected a number > 0"),
        (["anchor_lr_mult=-2.5"], r"anchor_lr_mult=-2.5.* expected a number > 0"),
        (["anchor_init=orthogonal"], r"anchor_init='?orthogonal'?.* expected one of"),
        (["learn_temperature=maybe"], r"learn_temperature"),
        (["model=deit_tiny_patch16_224", "anchor_init=unit"], r"has no anchors; expected official, false, 1.0"),
        (["model=deit_tiny_patch16_224", "anchor_lr_mult=3"], r"has no anchors"),
        (["anchor_mode=pooled", "anchor_init=kmeans"], r"anchor_init='kmeans': expected official with anchor_mode"),
    ],
)
def test_recipe_validates_the_anchor_keys(overrides, message):
    with pytest.raises(RecipeError, match=message):
        resolve_recipe(overrides=overrides)


def test_recipe_passes_the_switches_to_the_model():
    recipe = resolve_recipe(overrides=["anchor_init=qk_norm", "learn_temperature=true", "anchor_lr_mult=4"])
    kw = classifier_kwargs(MODEL, recipe, 10)
    assert kw["anchor_init"] == "qk_norm" and kw["learn_temperature"] is True and "anchor_lr_mult" not in kw
    assert "anchor_init" not in classifier_kwargs("deit_tiny_patch16_224", resolve_recipe(), 10)
