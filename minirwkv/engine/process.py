"""Settings that belong to a whole process, applied by the ``minirwkv`` command and the benchmarks, never by the
library on import (a program that imports minirwkv keeps its own process settings).

* Numba's threading layer: the OpenMP layer keeps idle threads spinning, which starves BLAS between kernels on a
  small machine (docs/numba.md: a relu^2 forward took 8.0 ms under omp, 0.7 ms under workqueue). workqueue, unless
  the user chose a layer with NUMBA_THREADING_LAYER.
* glibc malloc: a training step allocates and frees many arrays of megabytes. By default glibc serves those with
  fresh mmap'ed pages and returns them on free, so every step pays the page faults again (measured: a step of the
  issue-3 benchmark model took ~6% longer). Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD makes freed blocks reusable,
  as PyTorch's caching allocator does; the process keeps its peak memory. Linux with glibc only; elsewhere nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def prefer_workqueue_threads() -> None:
    if "NUMBA_THREADING_LAYER" not in os.environ:
        import numba

        numba.config.THREADING_LAYER = "workqueue"  # read when the first parallel kernel launches


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large blocks instead of unmapping them. Returns whether the setting took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep the defaults
        return False


def tune_for_training() -> None:
    """What the ``minirwkv`` command and the benchmarks apply before any work."""
    prefer_workqueue_threads()
    keep_freed_memory()
