"""The host allocator's policy, set alike wherever pdv times or runs a model on CPU.

glibc's malloc serves a large block with its own ``mmap`` and gives it back on ``free``, and it
trims the heap's free top; the next allocation of that size then faults its pages in again, so
one backward can cost twice another of the same shape depending on what was freed just before
(identical mlp blocks of 4 MB gradients profiled 3.2-7.1 ms backward in one profile, the
whole model 18.6 and 24.8 ms in two profiles minutes apart). Telling malloc to keep what it
frees (``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB) put blocks 0-2 at
3.3-3.6 ms and block 3 at 2.8-3.0 ms at micro-batch 4, in each of three profiles. PyTorch's
caching allocator does the same on CUDA; CPU tuning guides for PyTorch recommend a caching
malloc (jemalloc, tcmalloc) for the same reason.

The profile is only a prediction of the run if both allocate alike, so the model profiler, the
cluster probes and every run rank call :func:`keep_freed_memory` before they time anything.
Freed memory is reused before the heap grows, so a run's peak resident memory stays what it
was (mlp on 2 ranks: 479/487 MiB before, 476/491 MiB after); it is no longer handed back to
the system between steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

__all__ = ["KEEP_BYTES", "keep_freed_memory", "trim_heap"]

KEEP_BYTES = 1 << 30
"""blocks below this are served from malloc's heap, and a free top below it is kept"""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: str | None = None


def keep_freed_memory() -> str | None:
    """Make glibc's malloc keep freed memory; a note of what was set, or None where not glibc."""
    global _done
    if _done is not None:
        return _done
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): leave malloc alone
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)):
        return None
    _done = (f"host malloc keeps freed memory (glibc mmap and trim thresholds {KEEP_BYTES >> 20} "
             "MiB), as in every pdv profile and run")
    return _done


def trim_heap() -> None:
    """Hand the heap's free top back to the system now (glibc's malloc_trim; else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
