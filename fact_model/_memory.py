"""Process-level memory settings for long data passes (the ``fact`` CLI sets them once at start).

A pass over a dataset allocates and frees the same batch-sized buffers (images, activations,
gradients: tens of MB each) thousands of times. glibc's malloc raises its mmap threshold
dynamically after such a buffer is freed, after which buffers of that size come from the heap
and its fragments are not returned to the system: the resident set then creeps upward with the
number of batches, and its peak depends on how long the pass ran. Pinning the threshold keeps
every large buffer in its own mapping, returned to the system when freed, so peak memory is set
by the batch size alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["pin_large_allocations_to_mmap"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_THRESHOLD_BYTES = 1 << 20  # allocations of 1 MiB and more: one mapping each


def pin_large_allocations_to_mmap(threshold_bytes: int = _THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes`` (no dynamic raise); True when it was set.

    A no-op returning False on other C libraries (macOS, musl) or platforms.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    log.debug("glibc mmap threshold pinned at %d bytes: %s", threshold_bytes, done)
    return done
