"""The fused operator's host path: device operations per call, launch plans, the config table.

``test_device_operations`` counts, on the CPU under the Triton interpreter (a child process,
``tests/launch_count.py``), what one fp32 call at B 2, H 3, N 197 asks of the device: every
Triton launch plus every torch operation that writes memory (fills, casts, copies); allocations
and views are not counted. Before the lean path: 4 forward (2 zero-fills and 2 launches), 11
forward+backward (3 more fills and 2 copies by autograd of gradients in another layout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anchorformer.ops.anchor_attention.configs import DEFAULTS, bucket, config_key, lookup_config

LAUNCH_COUNT = Path(__file__).with_name("launch_count.py")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="starts its own interpreter process")
def test_device_operations():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    args = json.dumps(dict(B=2, H=3, N=197, D=64, M=30, dtype="float32"))
    proc = subprocess.run(
        [sys.executable, str(LAUNCH_COUNT), args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("COUNTS "))
    counts = json.loads(line[len("COUNTS ") :])
    fwd, bwd, infer = counts["forward"], counts["backward"], counts["inference"]
    assert len(fwd) <= 2, f"forward: {fwd}"
    assert len(fwd) + len(bwd) <= 5, f"forward {fwd} + backward {bwd}"
    assert len(infer) <= 2, f"inference: {infer}"
    # One split at N = 197: no fills, casts or copies at all, only launches.
    assert all(op.startswith("launch:") for op in fwd + bwd + infer), fwd + bwd + infer
    assert counts["syncs"] == [], f"host synchronisations on the op's path: {counts['syncs']}"
    assert counts["grad_layouts_match"], "gradients must come back in their inputs' layout"


def test_config_table_keys_and_defaults():
    assert [bucket(x) for x in (1, 16, 17, 197, 256, 257, 10**6)] == [16, 16, 32, 256, 256, 512, 65536]
    assert config_key("fwd", 197, 48, "bfloat16", "NVIDIA H100", 64) == "fwd/256/64/bfloat16/64/NVIDIA H100"
    # No measured entry for an unknown GPU: the defaults, as a copy the caller may change.
    cfg = lookup_config("bwd", 4096, 768, "float16", "no such GPU", 128)
    assert cfg == DEFAULTS[("bwd", False)] and cfg is not DEFAULTS[("bwd", False)]


def test_config_table_file_is_valid():
    from anchorformer.ops.anchor_attention.configs import TABLE_PATH

    data = json.loads(TABLE_PATH.read_text())
    for key, cfg in data["configs"].items():
        kind, n, bh, dtype, block_d, _gpu = key.split("/", 5)
        assert kind in ("fwd", "bwd") and dtype in ("float32", "bfloat16", "float16"), key
        assert int(n) == bucket(int(n)) and int(bh) == bucket(int(bh)) and int(block_d) >= 16, key
        assert set(cfg) == {"BLOCK_N", "num_warps", "num_stages"} and cfg["BLOCK_N"] >= 16, (key, cfg)
