"""Give a long-running process's freed memory back to the system, so its RSS stays flat over many rounds.

Measured by ``tests/benchmarks/bench_memory_soak.py``: over 100 rounds the hospitals' job processes and
the server's parent process grew 25-50 MB, nearly all of it objects awaiting Python's cyclic collector
and pages glibc's allocator kept after they were freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None


def release_memory() -> None:
    """Collect unreachable objects, then ask glibc to return free heap pages (a no-op elsewhere)."""
    global _libc
    gc.collect()
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
