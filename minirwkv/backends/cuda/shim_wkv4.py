"""The ``cuda-shim`` WKV backend: kernels/wkv4.cu compiled for the CPU by the host C++ compiler, called with ctypes.

The CUDA kernels cannot run without a GPU, but their arithmetic and indexing can: kernels/cuda_shim.h defines
``__global__``, ``threadIdx`` and friends so that g++ (or clang++) compiles the very same wkv4.cu, and a launcher
runs the grid one thread after another (docs/kernels.md says what that can and cannot catch). Tests compare it
with the NumPy reference of ``minirwkv.wkv`` on every machine; gpu_check.py does the same for the real GPU.

The shared library is built at first use (not at import) and cached in ~/.cache/minirwkv/shim (or
$XDG_CACHE_HOME/minirwkv/shim), under a name keyed by a hash of the sources, the compiler and its flags, so an
edited kernel is rebuilt and an unchanged one is not. The file is written under a temporary name and renamed into
place, so processes building at the same time never load a half-written library.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .. import WKVBackend
from ...rwkv4.wkv import WKVState, zero_state

SOURCES = ("wkv4.cu", "cuda_shim.h", "cuda_shim.cpp")  # in the package minirwkv.kernels (the kernels/ folder)
# -ffp-contract=off: no fused multiply-adds, so the shim rounds like the NumPy reference it is compared with.
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror")
THREADS_PER_BLOCK = 32  # the launch layout of the cupy backend: a block is one warp of consecutive channels
DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def make_backend(cache_dir=None) -> WKVBackend:
    """The ``cuda-shim`` WKVBackend. Builds the library now (RuntimeError if there is no C++ compiler)."""
    lib = load_library(str(cache_dir) if cache_dir is not None else None)
    return WKVBackend("cuda-shim", functools.partial(forward, lib), functools.partial(backward, lib))


# ---------------------------------------------------------------------------------------------------------------
# The backend contract (minirwkv.wkv docstring)
# ---------------------------------------------------------------------------------------------------------------

def forward(lib, w, u, k, v, state: WKVState | None = None):
    """y (B, T, C) and the state after the last token; ``state`` (each (B, C)) is copied, never modified."""
    B, T, C = check_wkv_args(w, u, k, v)
    dtype = k.dtype
    if state is None:
        state = zero_state(B, C, dtype)
    aa, bb, pp = (_state_copy(a, B, C, dtype, name) for a, name in zip(state, ("aa", "bb", "pp")))
    y = np.empty_like(k)  # (B, T, C)
    kernel = getattr(lib, f"wkv_forward_{DTYPES[dtype]}")
    kernel(B, T, C, w, u, k, v, y, aa, bb, pp, THREADS_PER_BLOCK)
    return y, WKVState(aa, bb, pp)


def backward(lib, w, u, k, v, y, gy):
    """(gw, gu, gk, gv) from the zero initial state; gw, gu (C,) summed over the batch by the kernel wkv_sum_batch."""
    B, T, C = check_wkv_args(w, u, k, v, y=y, gy=gy)
    dtype = k.dtype
    s = np.empty_like(k)  # (B, T, C) sweep 1 -> sweep 2 scratch: no per-thread arrays, so no T_MAX
    r = np.empty_like(k)  # (B, T, C)
    gw_bc = np.empty((B, C), dtype)  # (B, C) per-thread partials, assigned by the kernel, summed after
    gu_bc = np.empty((B, C), dtype)  # (B, C)
    gw = np.empty(C, dtype)  # (C,)
    gu = np.empty(C, dtype)  # (C,)
    gk = np.empty_like(k)  # (B, T, C)
    gv = np.empty_like(k)  # (B, T, C)
    kernel = getattr(lib, f"wkv_backward_{DTYPES[dtype]}")
    kernel(B, T, C, w, u, k, v, y, gy, s, r, gw_bc, gu_bc, gw, gu, gk, gv, THREADS_PER_BLOCK)
    return gw, gu, gk, gv


def check_wkv_args(w, u, k, v, y=None, gy=None):
    """-> (B, T, C). ValueError naming the problem unless w, u are (C,) and k, v (and y, gy) are (B, T, C),
    C-contiguous, all of one dtype, float32 or float64. Works for NumPy and CuPy arrays alike."""
    if k.ndim != 3:
        raise ValueError(f"WKV: k must be (B, T, C), got shape {k.shape}")
    B, T, C = k.shape
    if np.dtype(k.dtype) not in DTYPES:
        raise ValueError(f"WKV kernels support float32 and float64, got {k.dtype}; cast k, v (and w, u) first")
    named = {"w": w, "u": u, "k": k, "v": v, "y": y, "gy": gy}
    for name, a in named.items():
        if a is None:
            continue
        shape = (C,) if name in ("w", "u") else (B, T, C)
        if tuple(a.shape) != shape:
            raise ValueError(f"WKV: {name} has shape {tuple(a.shape)}, expected {shape} (from k: B={B}, T={T}, C={C})")
        if a.dtype != k.dtype:
            raise ValueError(f"WKV: {name} is {a.dtype} but k is {k.dtype}; pass all WKV inputs in one dtype")
        if not a.flags.c_contiguous:
            raise ValueError(f"WKV: {name} must be C-contiguous; pass xp.ascontiguousarray({name})")
    return B, T, C


def _state_copy(a, B, C, dtype, name):
    if tuple(a.shape) != (B, C):
        raise ValueError(f"WKV: state.{name} has shape {tuple(a.shape)}, expected (B, C) = {(B, C)}")
    return np.array(a, dtype=dtype, order="C", copy=True)  # (B, C) the kernel overwrites it with the final state


# ---------------------------------------------------------------------------------------------------------------
# Building and loading the library
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def load_library(cache_dir: str | None = None) -> ctypes.CDLL:
    """Compile (once per source version) and load the shim library, with argument types set for both dtypes."""
    sources = {name: importlib.resources.files("minirwkv.kernels").joinpath(name).read_text() for name in SOURCES}
    lib = compile_shared("wkv4", sources, "cuda_shim.cpp", cache_dir)
    for dtype, suffix in DTYPES.items():
        p = np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")  # checks dtype and layout at every call
        i = ctypes.c_int
        getattr(lib, f"wkv_forward_{suffix}").argtypes = [i, i, i] + [p] * 8 + [i]
        getattr(lib, f"wkv_backward_{suffix}").argtypes = [i, i, i] + [p] * 14 + [i]
        getattr(lib, f"wkv_forward_{suffix}").restype = None
        getattr(lib, f"wkv_backward_{suffix}").restype = None
    return lib


def find_compiler() -> str:
    """The C++ compiler: $CXX if set, else the first of c++, g++, clang++ on PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"the cuda-shim WKV backend needs a C++ compiler and found none of {candidates} on PATH; "
                       f"install g++ (e.g. apt-get install g++) or set CXX, or use impl='numpy' or 'numba'")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minirwkv" / "shim"


def compile_shared(name: str, sources: dict, entry: str, cache_dir: str | None = None) -> ctypes.CDLL:
    """Compile ``sources`` ({file name: text}, ``entry`` the file given to the compiler) with the host C++ compiler
    into ``<cache>/<name>-shim-<hash>.so`` (keyed by the sources, the compiler and its flags: built once per
    version) and load it. Shared by every kernel's shim."""
    compiler = find_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(repr((sorted(sources.items()), compiler, version, CXXFLAGS)).encode()).hexdigest()[:16]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-shim-{key}.so"
    if not path.exists():
        _build(compiler, sources, entry, directory, path)
    return ctypes.CDLL(str(path))


def _build(compiler, sources, entry: str, directory: Path, path: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for name, text in sources.items():
            Path(tmp, name).write_text(text)
        out = Path(tmp, path.name)
        cmd = [compiler, *CXXFLAGS, "-o", str(out), str(Path(tmp, entry))]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the cuda-shim library failed:\n{' '.join(cmd)}\n{result.stderr}")
        os.replace(out, path)  # atomic on one file system: other processes see no file or the whole file
