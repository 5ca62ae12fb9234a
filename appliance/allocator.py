"""Process-wide allocator setting: keep freed slice-sized buffers for reuse instead of unmapping them.

glibc serves allocations above its mmap threshold (128 KiB at start, adapting upwards to at most 32 MiB) with fresh
`mmap` pages and unmaps them on free, so every 512² slice buffer (1 MiB as float32) costs a page fault per 4 KiB
page on each use. On the virtual machines this appliance runs on that was most of the pre-processing time
(`ctriage bench`: windowing and resizing one slice 3.4 ms → 1.3 ms, decoding 6.5 ms → 2.8 ms with this setting).
Raising the thresholds makes such buffers come from the heap and be reused; the heap keeps at most the working
set of a batch or two (peak RSS is checked by `benchmarks/daemon_memory.py`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def reuse_freed_buffers(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 128) -> bool:
    """Set glibc's mmap and trim thresholds once per process. False where the C library is not glibc."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt; nothing to tune
        log.debug("allocator: no mallopt in this C library; left as is")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb << 20)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold_mb << 20))
    _applied = ok
    return ok
