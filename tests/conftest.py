"""Test-wide settings: offline hub, deterministic CPU, a small thread count."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny matrices gain nothing from threads, and a busy
    machine makes thread barriers slow (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory: pytest.TempPathFactory):
    """The three mini datasets (seed 0), generated once per session (a few seconds); read-only:
    copy what a test modifies. Holds ``imagenet/``, ``coco/``, ``ade20k/ADEChallengeData2016/``."""
    from anchorformer.data.synthetic import make_mini_datasets

    out = tmp_path_factory.mktemp("mini_data")
    make_mini_datasets(out, seed=0)
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
