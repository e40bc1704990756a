"""timm's own model tests (``tests/test_models.py`` of the pinned timm) on every AnchorFormer variant
and every peer of E10 (``agent_deit_*``, ``nystrom_deit_*``, ``flatten_deit_*``, ``isab_deit_*``).

The test module comes from timm's source distribution, which ``make env`` downloads beside the
environment (``.venv/src/timm-<version>.tar.gz``; ``TIMM_SDIST`` names another file). It is
imported unchanged, with ``list_models`` answering for our variants as it answers for timm's
DeiT, the architecture AnchorFormer replaces the attention of: a variant takes part in a test
exactly when its DeiT twin (``anchorformer_tiny_patch16_224`` -> ``deit_tiny_patch16_224``)
does, so our variants run as non-standard models with ``forward_intermediates``, FX and
TorchScript, and skip what DeiT skips (pretrained weights, the standard-model config checks).
The two tiny architectures run by default, the other variants are marked ``slow``; the pruning
contract (which timm's own CI leaves out as slow) runs, marked ``slow``, on the tiny ones.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm

from anchorformer.models import MODEL_NAMES, PEER_MODEL_NAMES

OURS = MODEL_NAMES + PEER_MODEL_NAMES  # every model this package registers in timm

# timm's tests that take their models from list_models (the others name timm models).
SUITE = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs_non_std",
    "test_model_forward_torchscript",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
)
FIXTURES = ("cfg_device",)  # the module's fixtures these tests use
# timm's tests of models it lists that stay empty for ours, as for DeiT, or need downloads.
NOT_OURS = (
    "test_model_inference",
    "test_model_default_cfgs",
    "test_model_forward_features",
    "test_model_load_pretrained",
)


def timm_sdist() -> Path:
    """The source distribution of the installed timm (``make env`` puts it in ``<venv>/src``)."""
    name = f"timm-{timm.__version__}.tar.gz"
    path = Path(os.environ.get("TIMM_SDIST") or Path(sys.prefix) / "src" / name)
    if not path.is_file():
        raise FileNotFoundError(
            f"timm's source distribution {path} is missing: `make env` downloads it "
            f"(pip download --no-deps --no-binary :all: timm=={timm.__version__} -d {path.parent}), "
            "or set TIMM_SDIST to the file"
        )
    return path


def deit_twin(name: str) -> str:
    """The timm DeiT a variant replaces the attention of: anchorformer_/anchor_deit_ -> deit_, and
    for the peers agent_deit_/nystrom_deit_/flatten_deit_/isab_deit_ -> deit_."""
    if name in PEER_MODEL_NAMES:
        return "deit_" + name.split("_deit_", 1)[1]
    for prefix in ("anchorformer_", "anchor_deit_"):
        if name.startswith(prefix):
            return "deit_" + name[len(prefix) :]
    raise ValueError(f"{name} is not an AnchorFormer variant nor a peer")


# By default: the two tiny architectures; the rest (S, B, B@384, the official names, and the
# peers: about two CPU minutes each, checked at mini shapes by tests/test_peers.py) are slow.
DEFAULT_RUN = ("anchorformer_tiny_patch16_224", "anchorformer_tiny_distilled_patch16_224")


def _param(name: str):
    return pytest.param(name, marks=() if name in DEFAULT_RUN else pytest.mark.slow)


def _our_list_models(real):
    """``list_models`` that gives our variants whose DeiT twins ``real`` would give."""

    def list_models(
        filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False, include_tags=None
    ):
        if pretrained:
            return []  # no AnchorFormer weights are published
        chosen = set(real(filter, module, False, exclude_filters, name_matches_cfg, include_tags=False))
        return [_param(n) for n in OURS if deit_twin(n) in chosen]

    return list_models


def _load_timm_test_module():
    folder = Path(tempfile.mkdtemp(prefix="timm-tests-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(timm_sdist()) as tar:
        member = tar.getmember(f"timm-{timm.__version__}/tests/test_models.py")
        member.name = "test_models.py"
        tar.extract(member, folder, filter="data")
    spec = importlib.util.spec_from_file_location("timm_tests_test_models", folder / "test_models.py")
    module = importlib.util.module_from_spec(spec)
    real_list_models, real_list_pretrained = timm.list_models, timm.list_pretrained
    timm.list_models, timm.list_pretrained = _our_list_models(real_list_models), lambda *a, **k: []
    try:
        spec.loader.exec_module(module)  # parametrizes its tests with our variants
    finally:
        timm.list_models, timm.list_pretrained = real_list_models, real_list_pretrained
    return module


_timm_tests = _load_timm_test_module()
globals().update({name: getattr(_timm_tests, name) for name in (*SUITE, *FIXTURES)})


@pytest.mark.slow
@pytest.mark.parametrize("model_name", DEFAULT_RUN)
def test_prune_intermediate_layers_contract(model_name):
    """timm's pruning contract (each block in turn; timm's own CI leaves it out as slow), on the
    two tiny architectures: S and B run the same code, at many times the cost."""
    _timm_tests.test_prune_intermediate_layers_contract(model_name)


def test_every_variant_takes_part():
    """Each variant is in the forward, backward, config, intermediates and FX tests (as DeiT is)."""
    for test in (
        "test_model_forward",
        "test_model_default_cfgs_non_std",
        "test_model_forward_intermediates",
        "test_model_forward_fx",
    ):
        (mark,) = [
            m for m in getattr(_timm_tests, test).pytestmark if m.name == "parametrize" and m.args[0] == "model_name"
        ]
        assert sorted(p.values[0] for p in mark.args[1]) == sorted(OURS), test
    for test in (t for t in NOT_OURS if hasattr(_timm_tests, t)):
        (mark,) = [
            m for m in getattr(_timm_tests, test).pytestmark if m.name == "parametrize" and m.args[0] == "model_name"
        ]
        assert not [p for p in mark.args[1] if str(getattr(p, "values", [p])[0]) in OURS], test
