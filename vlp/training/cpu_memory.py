"""Keep freed CPU memory for reuse (glibc): large per-step temporaries then cost no fresh page faults.

glibc's malloc serves every block above ``M_MMAP_THRESHOLD`` (dynamic, from 128 KiB up to 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free, and it trims the heap top above ``M_TRIM_THRESHOLD``. A training
step on the CPU allocates many such blocks (activations, (B, K) logits against a feature queue, optimizer
temporaries), so each step page-faults its whole working set in again (a large share of the MoD-ITC loss and AdamW
step times on these machines; `bench.albef` measures it). Raising both thresholds makes freed blocks stay in the
heap for the next step, as a caching allocator does (the same effect as preloading jemalloc or tcmalloc). The
resident set then stays near its peak. Nothing happens off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("vlp.train")

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # asked for in turn: glibc refuses values above its build's maximum
TRIM_THRESHOLD = 1 << 31


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the workers it forks later); True when set."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(M_MMAP_THRESHOLD, value) == 1 for value in MMAP_THRESHOLDS):
        return False
    if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    logger.debug("glibc malloc keeps freed memory (mmap threshold raised, trim threshold %d)", TRIM_THRESHOLD)
    return True
