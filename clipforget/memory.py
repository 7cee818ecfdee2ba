"""Process memory under glibc: give freed memory back to the OS. No torch here (the app calls
this before it imports the model stack).

A long-lived process such as the app allocates big transient tensors (activations, view sets) in
several threads. glibc serves an allocation above its mmap threshold with its own mapping, and
unmaps it when freed; below the threshold it comes from a heap that is rarely given back. The
threshold starts at 128 KiB but glibc raises it (up to 32 MiB) each time such a mapping is freed, so
after the first job nearly every tensor lands in a heap, and the resident size only grows.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

M_MMAP_THRESHOLD = -3           # mallopt parameter (glibc malloc.h)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); True if it could.
    Called after loading and after each job (a few ms)."""
    gc.collect()
    libc = _libc()
    try:
        return bool(libc is not None and libc.malloc_trim(0) >= 0)
    except AttributeError:          # not glibc (macOS, musl): nothing to trim
        return False


def fix_mmap_threshold(nbytes: int = 1 << 16) -> bool:
    """Serve every allocation of at least ``nbytes`` by its own mapping, returned to the OS when
    freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; setting it also stops glibc raising it). True if
    it could. bench/bench_app.py measures the app's peak resident size with and without it."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)
    except AttributeError:
        return False
