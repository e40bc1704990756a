"""anchorformer.ops.cpu: fixed glibc malloc thresholds keep a forward pass's pages mapped."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from anchorformer.ops.cpu import tune_glibc_malloc
if sys.argv[1] == "tuned":
    assert tune_glibc_malloc()
else:  # thresholds far below the tensors: each is mapped and unmapped on every round
    assert tune_glibc_malloc(mmap_threshold=2**20, trim_threshold=2**20)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(6):  # what a forward pass does: several mid-size tensors, touched, then freed
    f0 = faults()
    tensors = [torch.empty(3 * 2**20).fill_(1.0) for _ in range(3)]  # 3 x 12 MiB
    del tensors
    counts.append(faults() - f0)
print(sum(counts[3:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_thresholds_stop_refaulting():
    """Fixed thresholds above the tensors' sizes keep their pages mapped from one round to the
    next; thresholds below them (what glibc's dynamic ones do at times, depending on the sizes
    freed before) fault every page in anew on every round."""
    got = {}
    for mode in ("small", "tuned"):
        proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got[mode] = int(proc.stdout.split()[-1])
    pages = 3 * 12 * 2**20 // 4096
    assert got["small"] > pages, got  # the 9216 pages of a round, faulted anew in each of the last 3
    assert got["tuned"] < pages // 20, got


def test_refused_value_is_a_clear_error():
    from anchorformer.ops.cpu import tune_glibc_malloc

    if platform.libc_ver()[0] != "glibc":
        assert tune_glibc_malloc() is False
        return
    with pytest.raises(ValueError, match="trim_threshold=1099511627776 is not a C int"):
        tune_glibc_malloc(trim_threshold=2**40)
