"""torch on one CPU thread in the calling thread only: for work done while a job trains elsewhere.

torch's OpenMP backend keeps its thread count per calling thread (``omp_set_num_threads``), and a
thread that runs one parallel op — a query's text encode is enough — keeps an OpenMP team (one more
worker thread) for as long as it lives. libgomp lets its workers spin-wait between parallel
regions only while the process has no more OpenMP threads than CPUs; past that, every region of
the job waits for a worker to wake from sleep. The default job in a plain process with one such
thread alive reached its results in 28–29 s instead of 24.5 s on two cores (remind 16 s against
13 s), as under ``OMP_WAIT_POLICY=PASSIVE`` (docs/results/README.md). In the app a search or a
retain suggestion runs in one of the web server's worker threads, which lives on while it is
reused: :func:`single_threaded` runs that torch work on the calling thread alone, so the jobs
thread's team stays the only one; the other threads keep their own settings.

``torch.set_num_threads`` cannot do this: it also sets the process-wide count that every thread
reads when it first runs torch, so the jobs thread could start single-threaded.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _library(names: list[Path], symbol: str):
    """The first of ``names`` (then the symbols the process already loaded globally) that has
    ``symbol``; loading a library torch loaded returns torch's own copy."""
    for candidate in [*map(str, names), *([None] if os.name == "posix" else [])]:
        try:
            fn = getattr(ctypes.CDLL(candidate), symbol)
        except (OSError, AttributeError, TypeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


@functools.cache
def _setters():
    """``omp_set_num_threads`` of the OpenMP runtime torch was built with and MKL's
    ``MKL_Set_Num_Threads_Local`` (torch sets MKL's per-thread count too once anyone called
    ``torch.set_num_threads``), each None where absent."""
    import torch
    if not torch.backends.openmp.is_available():
        return None, None
    lib = Path(torch.__file__).parent / "lib"
    omp = _library([p for pattern in ("libgomp*", "libiomp5*", "libomp*") for p in sorted(lib.glob(pattern))],
                   "omp_set_num_threads")
    # MKL_Set_Num_Threads_Local takes its int by value; the lower-case names are MKL's Fortran
    # entry (a pointer): calling that one with an int crashes
    mkl = _library(sorted(lib.glob("libtorch_cpu*")), "MKL_Set_Num_Threads_Local") \
        if torch.backends.mkl.is_available() else None
    return omp, mkl


@contextlib.contextmanager
def single_threaded():
    """torch runs on one thread in the calling thread for the block (also a decorator); the
    thread's own counts come back after it. Where the runtime cannot be told (no OpenMP, or its
    setting does not reach torch), the block runs unchanged: only speed is at stake. Nor is torch
    imported for it (a web handler would wait for that import): a block entered before torch is
    imported, or while it is, is not limited — enter it once the model is loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "__spec__", None), "_initializing", False):
        torch = None                          # another thread is importing it right now
    before = torch.get_num_threads() if torch is not None else 1   # also initialises this thread's count
    omp, mkl = _setters() if before > 1 else (None, None)
    if omp is not None:
        omp(1)
        if torch.get_num_threads() != 1:      # not the runtime torch reads: leave it alone
            omp(before)
            log.debug("could not limit torch to one thread in this thread")
            omp = mkl = None
    mkl_before = mkl(1) if mkl is not None else None      # MKL's per-thread count (0: its default)
    try:
        yield
    finally:
        if omp is not None:
            omp(before)
        if mkl is not None:
            mkl(mkl_before)
