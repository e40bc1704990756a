"""torchrun / DDP helpers."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from anchorformer.engine.distributed import (
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    unwrap_model,
)


def test_single_process_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")
    t = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(t) is t
    barrier()
    cleanup_distributed()


def test_bad_environment_is_reported(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        init_distributed("cpu")


def test_unwrap_model():
    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.nn.DataParallel(inner)) is inner
    assert unwrap_model(inner) is inner


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    mean = all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    out[rank] = (info.is_distributed, info.is_main, mean.tolist(), unwrap_model(model) is model.module)
    barrier()
    cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_all_reduce():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        res = dict(out)
    assert res[0] == (True, True, [0.5, 5.0], True)
    assert res[1] == (True, False, [0.5, 5.0], True)
