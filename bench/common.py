"""What every benchmark shares: median timings, the copy bandwidth (the memory roofline), the environment the
figures depend on, and a plain-text table."""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np


# ---------------------------------------------------------------------------------------------------------------

def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """Copy bandwidth in bytes/s, counted as read + write (2 * nbytes per copy, the STREAM convention).

    Two measurements: np.copyto (one thread) and a Numba prange copy on the kernels' threads; the roofline uses the
    larger, so the kernels are compared with the best the machine showed in this run.
    """
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    numpy_bw = 2 * nbytes / median_time(lambda: np.copyto(dst, src), repeats)
    parallel_copy = _parallel_copy()
    numba_bw = 2 * nbytes / median_time(lambda: parallel_copy(dst, src), repeats)
    return {"array_bytes": nbytes, "numpy_copyto": numpy_bw, "numba_prange_copy": numba_bw,
            "roofline": max(numpy_bw, numba_bw)}


def _parallel_copy():
    import numba

    @numba.njit(parallel=True, cache=True)
    def parallel_copy(dst, src):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    return parallel_copy


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------

def environment() -> dict:
    """What the figures depend on: CPU count, Numba's threads, NumPy's BLAS and the OpenBLAS variables."""
    import numba

    from minirwkv.backends.numba import wkv4 as numba_wkv

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "numpy": np.__version__, "numba": numba.__version__, "numba_threads": numba_wkv.get_threads(),
           "numba_pool_size": numba.config.NUMBA_NUM_THREADS, "numba_threading_layer": _threading_layer(),
           "blas": _blas_info()}
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env[name] = os.environ.get(name)  # read only to report them, never to configure anything
    return env


def _threading_layer():
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return None


def _blas_info() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        keys = ("internal_api", "version", "num_threads", "architecture", "threading_layer", "filepath")
        return [{k: lib.get(k) for k in keys} for lib in threadpool_info() if lib.get("user_api") == "blas"]
    try:
        config = np.show_config(mode="dicts")
        return [{"internal_api": lib.get("name"), "version": lib.get("version")}
                for lib in config.get("Build Dependencies", {}).values() if isinstance(lib, dict)]
    except TypeError:  # numpy < 1.26 prints instead of returning
        return [{"internal_api": "unknown (install threadpoolctl for details)"}]


def print_environment(env: dict) -> None:
    print("\n== environment ==")
    print(f"python {env['python']} ({env['machine']}), {env['cpu_count']} CPUs; numpy {env['numpy']}, "
          f"numba {env['numba']}")
    print(f"numba threads: {env['numba_threads']} of a pool of {env['numba_pool_size']} "
          f"(threading layer: {env['numba_threading_layer'] or 'not started'})")
    for lib in env["blas"] or [{"internal_api": "none found"}]:
        details = ", ".join(f"{k} {v}" for k, v in lib.items() if k != "internal_api" and v is not None)
        print(f"numpy BLAS: {lib.get('internal_api')}" + (f" ({details})" if details else ""))
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        print(f"{name}: {env[name] if env[name] is not None else 'not set'}")


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def print_table(rows, columns):
    cells = [[fmt.format(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _, _) in enumerate(columns)]
    print("  ".join(title.rjust(w) if i else title.ljust(w) for i, ((title, _, _), w) in enumerate(zip(columns,
                                                                                                         widths))))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))
