"""CPU inference settings: glibc malloc's thresholds, so that transient tensors are reused, not re-faulted.

A forward pass of a ViT allocates and frees hundreds of mid-size tensors (AnchorFormer-T at
1024²: ~390 tensors, ~650 MiB per image, most of them 1-12 MiB). With glibc's defaults, blocks
above the mmap threshold are mapped and unmapped on every call, and the heap's free top is given
back to the system once it exceeds the trim threshold. Both thresholds move with the sizes
freed before ("dynamic mmap threshold"), so the number of pages faulted in anew per call, and
with it up to ~15 % of the time, depends on what ran earlier in the process. Fixing the
thresholds (a tensor up to 32 MiB comes from the heap; up to 256 MiB of free heap is kept)
makes the pages stay mapped and the time independent of the process's history.

The same can be had without code: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456``
in the environment of the process, or another allocator (jemalloc, tcmalloc) through ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_glibc_malloc"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 * 2**20  # the largest block glibc's dynamic threshold would ever take from the heap
TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def tune_glibc_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process (``mallopt``).

    Args:
        mmap_threshold: blocks of at least this many bytes are mapped with mmap.
        trim_threshold: free heap above this many bytes is returned to the system.

    Returns:
        True if set; False where the C library is not glibc (nothing changed).

    Raises:
        ValueError: a value that is not a C int >= 0, or one glibc refused.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("tune_glibc_malloc: not glibc (%s), nothing set", platform.libc_ver())
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for name, param, value in (
        ("mmap_threshold", _M_MMAP_THRESHOLD, mmap_threshold),
        ("trim_threshold", _M_TRIM_THRESHOLD, trim_threshold),
    ):
        if not 0 <= int(value) < 2**31:
            raise ValueError(f"tune_glibc_malloc: {name}={value} is not a C int >= 0")
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(int(value))) != 1:
            raise ValueError(f"tune_glibc_malloc: glibc refused {name}={value}")
    return True
