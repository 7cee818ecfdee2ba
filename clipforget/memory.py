"""Process memory under glibc: give freed memory back to the OS. No torch here.

A long-lived process such as the app allocates transient tensors (activations, view sets) in
several threads. glibc serves them from heaps that it rarely gives back on its own, so the app
trims them (``malloc_trim``) after loading and at every job stage: the next stage's peak starts
from what is alive, not from what the last one left. Tensors stay heap-sized because inference
runs in small batches (``clipforget.embed.ENCODE_BATCH``): memory malloc already holds is reused
without page faults. (Forcing big tensors into their own mappings instead — a low
``M_MMAP_THRESHOLD`` — kept the resident size down too, but made the default job 55 s → 76 s on
two cores: every batch faulted its pages in afresh; docs/results/README.md has the figures.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); True if it could.
    Called after loading and at each job stage (a few ms)."""
    gc.collect()
    libc = _libc()
    try:
        return bool(libc is not None and libc.malloc_trim(0) >= 0)
    except AttributeError:          # not glibc (macOS, musl): nothing to trim
        return False
