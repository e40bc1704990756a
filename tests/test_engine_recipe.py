"""Typed recipes: presets, --set overrides and validation that names the key and its source."""

from __future__ import annotations

import pytest

from anchorformer.cli import main
from anchorformer.engine.recipe import RecipeError, load_preset, parse_override
from anchorformer.tasks.classification.recipe import ClsRecipe
from anchorformer.tasks.classification.train import resolve_recipe
from anchorformer.tasks.detection.recipe import DetRecipe
from anchorformer.tasks.segmentation.recipe import SegRecipe


@pytest.mark.parametrize("cls", [ClsRecipe, DetRecipe, SegRecipe])
@pytest.mark.parametrize("profile", ["mini", "full"])
def test_every_preset_is_a_valid_recipe_with_exactly_its_keys(cls, profile):
    values, label = load_preset(cls.task, profile)
    assert label == f"anchorformer/configs/{cls.task}.yaml [{profile}]"
    assert set(values) == set(cls.keys()), set(values) ^ set(cls.keys())


def test_deit_recipe_in_full():
    full = resolve_recipe(profile="full")
    assert (full.epochs, full.lr, full.lr_batch, full.weight_decay) == (300, 5e-4, 512, 0.05)
    assert full.mixup == 0.8 and full.cutmix == 1.0 and full.repeated_aug and full.reprob == 0.25


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epochs=1.5"], "epochs=1.5 (--set epochs=1.5): expected an integer"),
        (["epochs=four"], "epochs='four' (--set epochs=four): expected an integer"),
        (["lr=-0.1"], "lr=-0.1 (--set lr=-0.1): expected a number > 0.0"),
        (["epoch=3"], "unknown recipe key 'epoch'"),
        (["num_anchors=0"], "num_anchors must be an integer >= 1; got 0"),
        (["amp=yes please"], "amp='yes please' (--set amp=yes please): expected true or false"),
        (["scale=[0.9, 0.1]"], "scale=[0.9, 0.1]: expected [min, max]"),
        (["distillation=maybe"], "expected one of ['auto', 'none', 'soft', 'hard']"),
    ],
)
def test_bad_values_name_the_key_and_where_it_came_from(overrides, message):
    with pytest.raises(RecipeError) as e:
        resolve_recipe(profile="mini", overrides=overrides)
    assert message in str(e.value)


def test_explicit_values_name_their_source():
    with pytest.raises(RecipeError, match=r"epochs=1.5 \(params.yaml: epochs\): expected an integer"):
        resolve_recipe(profile="mini", epochs=1.5, source="params.yaml")
    with pytest.raises(RecipeError, match=r"epochs=1.5 \(--epochs\): expected an integer"):
        resolve_recipe(profile="mini", epochs=1.5, source="cli")
    r = resolve_recipe(profile="mini", epochs=3, model="deit_tiny_patch16_224")
    assert r.epochs == 3 and r.model == "deit_tiny_patch16_224"


def test_overrides_parse_yaml_dotted_keys_and_numbers():
    r = resolve_recipe(profile="mini", overrides=["lr=1e-3", "model_sizes.tiny.depth=6", "clip_grad=null", "min_lr=0"])
    assert r.lr == 1e-3 and isinstance(r.min_lr, float) and r.clip_grad is None
    assert r.model_sizes["tiny"]["depth"] == 6 and r.model_sizes["tiny"]["embed_dim"] == 96
    assert parse_override("teacher=resnet10t") == ("teacher", "resnet10t")
    with pytest.raises(RecipeError, match="space after the colon"):
        parse_override("model_sizes.tiny={depth:6}")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_override("lr")


def test_resumable_settings_and_differences():
    r = resolve_recipe(profile="mini")
    assert {"threads", "device", "attn_impl", "eval_batch_size"} <= ClsRecipe.resumable_keys()
    assert "num_workers" not in ClsRecipe.resumable_keys()  # the weights differ with it
    stored = r.to_dict() | {"threads": 7}
    assert r.differences(stored) == []
    assert r.differences(r.to_dict() | {"num_workers": 7}) == [f"num_workers: checkpoint 7 vs now {r.num_workers!r}"]
    assert r.differences(r.to_dict() | {"lr": 0.5}) == [f"lr: checkpoint 0.5 vs now {r.lr!r}"]


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_every_task_refuses_the_same_bad_values_from_the_command_line(task, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for args, message in [
        (["--set", "num_anchors=0"], "num_anchors must be an integer >= 1; got 0"),
        (["--set", "lr=-1"], "lr=-1.0 (--set lr=-1): expected a number > 0.0"),
        (["--set", "bogus=1"], "unknown recipe key 'bogus'"),
    ]:
        rc = main(["train", task, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (task, args, err)
        assert not (tmp_path / "out").exists()
