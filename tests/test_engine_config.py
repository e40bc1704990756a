"""Profile presets and --set overrides."""

from __future__ import annotations

import pytest

from anchorformer.engine.config import CONFIG_DIR, apply_overrides, default_profile, load_profile


def test_cls_profiles_have_the_same_keys():
    mini, full = load_profile("cls", "mini"), load_profile("cls", "full")
    assert set(mini) == set(full)
    assert full["epochs"] == 300 and full["lr"] == 5e-4 and full["lr_batch"] == 512  # the DeiT recipe
    assert mini["img_size"] % mini["patch_size"] == 0


def test_load_profile_errors():
    with pytest.raises(KeyError, match="no profile 'huge'"):
        load_profile("cls", "huge")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_profile("nope", "mini")
    assert (CONFIG_DIR / "cls.yaml").is_file()


def test_overrides_parse_yaml_and_keep_the_input():
    cfg = {
        "epochs": 3,
        "lr": 1e-3,
        "min_lr": 0.0,
        "teacher": None,
        "auto_augment": "rand-m9",
        "sizes": {"tiny": {"depth": 4}},
    }
    out = apply_overrides(
        cfg,
        [
            "epochs=5",
            "lr=2",
            "min_lr=1e-5",
            "teacher=resnet10t",
            "auto_augment=null",
            "sizes.tiny.depth=6",
            "sizes.tiny={depth: 2}",
        ],
    )
    assert out == {
        "epochs": 5,
        "lr": 2.0,
        "min_lr": 1e-5,
        "teacher": "resnet10t",
        "auto_augment": None,
        "sizes": {"tiny": {"depth": 2}},
    }
    assert isinstance(out["lr"], float)
    assert cfg["epochs"] == 3 and cfg["sizes"]["tiny"]["depth"] == 4


def test_override_errors():
    cfg = {"epochs": 3, "amp": False, "sizes": {"tiny": {"depth": 4}}}
    with pytest.raises(KeyError) as e:
        apply_overrides(cfg, ["epoch=5"])
    msg = str(e.value)
    assert "'epoch'" in msg and "epochs" in msg and "sizes.tiny.depth" in msg and not msg.startswith('"')
    with pytest.raises(KeyError, match="sizes.huge"):
        apply_overrides(cfg, ["sizes.huge=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["epochs"])
    with pytest.raises(ValueError, match="epochs"):
        apply_overrides(cfg, ["epochs=abc"])
    with pytest.raises(ValueError, match="epochs"):
        apply_overrides(cfg, ["epochs=2.5"])
    with pytest.raises(ValueError, match="space after the colon"):
        apply_overrides(cfg, ["sizes.tiny={depth:6}"])
    with pytest.raises(ValueError, match="amp"):
        apply_overrides(cfg, ["amp=1"])


def test_default_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_profile() == "mini"
    (tmp_path / "params.yaml").write_text("profile: full\nother: {a: 1}\n")
    assert default_profile() == "full"
    (tmp_path / "params.yaml").write_text("profile: medium\n")
    with pytest.raises(ValueError, match="medium"):
        default_profile()
