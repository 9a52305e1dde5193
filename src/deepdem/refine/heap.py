"""glibc's heap policy for the ``deepdem refine`` command (process-wide, so never the library's)."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def _glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _keep_heap(libc=None) -> bool:
    """Serve allocations up to 32 MB from a heap that is not handed back to the system."""
    libc = libc or _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return True


@contextlib.contextmanager
def steady_heap():
    """Keep glibc's heap while the model runs, and give the memory back afterwards.

    Process-wide, so the library never does it by itself: ``deepdem refine`` (the command, a
    process of its own) runs under it, and a caller who owns its process may too.

    Between two forward passes, refine's own small arrays disturb glibc's adaptive thresholds:
    the heap is then trimmed after each pass and the next pass's activations fault their pages
    in again, which made the model 17 % slower inside refine than in a bare loop (4096² bench,
    CPU). With the mmap threshold at its adaptive maximum (32 MB) and no trimming, the model
    runs at its bare speed. Process-wide, as the PyTorch CPU guide's jemalloc/tcmalloc advice
    is; on exit the trim threshold becomes 64 MB (twice the mmap threshold, glibc's own rule)
    and the heap is trimmed. Does nothing where the C library is not glibc.
    """
    libc = _glibc()
    kept = _keep_heap(libc)
    try:
        yield
    finally:
        if kept:
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)
