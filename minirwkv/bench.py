"""Benchmarks that print figures: the WKV kernels against the NumPy reference and a memory roofline.

    python -m minirwkv.bench                    # everything, full sizes
    python -m minirwkv.bench --only wkv         # the WKV section (and the environment)
    python -m minirwkv.bench --quick            # small sizes: a smoke test in seconds
    python -m minirwkv.bench --threads 2 --json out/bench.json

Times are medians of several repeats after a warm-up (which includes Numba's compilation). The roofline is the
time a kernel would take if it only moved its bytes at the copy bandwidth measured in the same run (see
``wkv_bytes`` for what is counted). Nothing here is a test: speed is reported, never asserted. docs/numba.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from .backends import get_backend

WKV_SHAPE = (8, 1024, 512)  # (B, T, C) of the figures in docs/numba.md
WKV_SHAPE_QUICK = (2, 128, 64)
COPY_BYTES = 256 * 2**20  # per array: large enough to leave the caches (except a huge shared L3, see docs)
COPY_BYTES_QUICK = 16 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# Timing and bandwidth
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
# WKV
# ---------------------------------------------------------------------------------------------------------------

def wkv_bytes(B: int, T: int, C: int, itemsize: int) -> dict:
    """The bytes each WKV pass must move through memory (w, u and the (B, C) state are negligible):

    forward:  reads k, v; writes y                                              3 (B, T, C) arrays
    backward: reads k, v, y, gy; writes gk, gv; writes s, r in sweep 1 and reads them in sweep 2   10 arrays
    """
    n = B * T * C * itemsize
    return {"forward": 3 * n, "backward": 10 * n, "forward+backward": 13 * n}


def _wkv_inputs(B, T, C, dtype, seed=0):
    """Init-like inputs: theta, u in the official init ranges, k, v ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    w = -np.exp(rng.uniform(-5.0, 3.0, C)).astype(dtype)  # (C,)
    u = rng.uniform(-1.0, 1.0, C).astype(dtype)  # (C,)
    k, v, gy = (rng.standard_normal((B, T, C)).astype(dtype) for _ in range(3))  # (B, T, C) each
    return w, u, k, v, gy


def _time_backend(backend, inputs, repeats, warmup):
    w, u, k, v, gy = inputs
    y, _ = backend.forward(w, u, k, v)
    t_fwd = median_time(lambda: backend.forward(w, u, k, v), repeats, warmup)
    t_bwd = median_time(lambda: backend.backward(w, u, k, v, y, gy), repeats, warmup)
    return {"forward": t_fwd, "backward": t_bwd, "forward+backward": t_fwd + t_bwd}, y, backend.backward(
        w, u, k, v, y, gy)


def bench_wkv(args) -> dict:
    B, T, C = WKV_SHAPE_QUICK if args.quick else WKV_SHAPE
    dtype = np.float32
    inputs = _wkv_inputs(B, T, C, dtype)
    print(f"\n== WKV forward/backward, (B, T, C) = ({B}, {T}, {C}) {np.dtype(dtype).name} ==")

    t0 = time.perf_counter()
    numba_times, y_nb, g_nb = _time_backend(get_backend("numba"), inputs, repeats=3 if args.quick else 9, warmup=1)
    print(f"numba: warm-up and timing took {time.perf_counter() - t0:.1f} s (the first call compiles or loads the "
          f"cache)")
    numpy_times, y_np, g_np = _time_backend(get_backend("numpy"), inputs, repeats=1 if args.quick else 3, warmup=0)

    bw = copy_bandwidth(COPY_BYTES_QUICK if args.quick else COPY_BYTES)
    nbytes = wkv_bytes(B, T, C, np.dtype(dtype).itemsize)
    rows = []
    for op in ("forward", "backward", "forward+backward"):
        roofline_s = nbytes[op] / bw["roofline"]
        rows.append({"op": op, "numba_ms": 1e3 * numba_times[op], "numpy_ms": 1e3 * numpy_times[op],
                     "speedup": numpy_times[op] / numba_times[op], "bytes_MB": nbytes[op] / 1e6,
                     "roofline_ms": 1e3 * roofline_s, "roofline_pct": 100 * roofline_s / numba_times[op]})

    print(f"copy bandwidth ({bw['array_bytes'] // 2**20} MiB arrays, read + write): "
          f"np.copyto {bw['numpy_copyto'] / 1e9:.1f} GB/s, numba prange {bw['numba_prange_copy'] / 1e9:.1f} GB/s; "
          f"roofline uses {bw['roofline'] / 1e9:.1f} GB/s")
    _print_table(rows, [("op", "op", "{}"), ("numba ms", "numba_ms", "{:.2f}"), ("numpy ms", "numpy_ms", "{:.1f}"),
                        ("numpy/numba", "speedup", "{:.1f}x"), ("MB moved", "bytes_MB", "{:.3g}"),
                        ("roofline ms", "roofline_ms", "{:.3g}"), ("% roofline", "roofline_pct", "{:.1f}%")])
    maxdiff = {name: float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
               for name, a, b in zip(("y", "gw", "gu", "gk", "gv"), (y_nb, *g_nb), (y_np, *g_np))}
    print("numba vs numpy, max |diff| / max |numpy|: " + ", ".join(f"{k} {v:.1e}" for k, v in maxdiff.items()))
    return {"shape": [B, T, C], "dtype": np.dtype(dtype).name, "copy_bandwidth_Bps": bw, "bytes": nbytes,
            "rows": rows, "maxdiff_relative": maxdiff}


# ---------------------------------------------------------------------------------------------------------------
# Training step (another section, to come)
# ---------------------------------------------------------------------------------------------------------------

def bench_step(args) -> dict:
    print("\n== training step ==")
    print("training-step benchmark: not implemented yet")
    return {}


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------

def environment() -> dict:
    """What the figures depend on: CPU count, Numba's threads, NumPy's BLAS and the OpenBLAS variables."""
    import numba

    from .backends import numba_wkv

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


def _print_environment(env: dict) -> None:
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
# Table and CLI
# ---------------------------------------------------------------------------------------------------------------

def _print_table(rows, columns):
    cells = [[fmt.format(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _, _) in enumerate(columns)]
    print("  ".join(title.rjust(w) if i else title.ljust(w) for i, ((title, _, _), w) in enumerate(zip(columns,
                                                                                                         widths))))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minirwkv.bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None,
                   help="Numba threads for the kernels (at most the pool size, NUMBA_NUM_THREADS)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test")
    p.add_argument("--only", choices=("wkv", "step", "all"), default="all", help="which section to run")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        from .backends import numba_wkv

        numba_wkv.set_threads(args.threads)
    results = {"args": vars(args)}
    if args.only in ("wkv", "all"):
        results["wkv"] = bench_wkv(args)
    if args.only in ("step", "all"):
        results["step"] = bench_step(args)
    results["environment"] = environment()  # after the kernels ran, so the threading layer is known
    _print_environment(results["environment"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
