"""Process memory settings: cap glibc's malloc arenas so a long-running multi-threaded process stays flat.

glibc gives each thread that allocates concurrently its own arena (up to 8 per core); with the inference streams,
analysis workers and I/O threads of the daemon, freed memory stays spread over many arenas and RSS creeps up
from study to study. Two arenas keep it flat (benchmarks/daemon_memory.py, 40 studies: 344 → 386 MB creeping
without, 311 → 315 MB with) at no measurable speed cost. An explicit MALLOC_ARENA_MAX in the environment wins.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_ARENA_MAX = -8  # mallopt parameter number (glibc malloc.h)
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc arenas for threads created from now on; True when applied (glibc only, not overridden)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.gnu_get_libc_version) and libc.mallopt(M_ARENA_MAX, int(arenas)) == 1
    except (OSError, AttributeError):  # not glibc (musl has neither call)
        return False
