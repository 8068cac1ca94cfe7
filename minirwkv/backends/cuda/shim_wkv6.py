"""kernels/wkv6.cu (the RWKV-5/6 matrix WKV) compiled for the CPU by the host C++ compiler, called with ctypes.

The same scheme as shim_wkv4.py (whose compiler lookup, flags and cache folder it reuses): kernels/cuda_shim.h
defines ``__global__``, ``threadIdx`` and friends, a small C++ entry file (ENTRY_SOURCE below) includes it and
wkv6.cu and exports one C function per kernel sequence and float type, and shim_launch runs each grid one thread
after another. wkv6.cu is barrier-free by design (no __syncthreads, no shared memory), so the shim runs exactly
what a GPU runs, minus the concurrency.

The contract is that of the reference minirwkv.rwkv6.wkv (wkv6_recurrent_forward / wkv6_recurrent_backward):
r, k, v, w (B, T, H, N); u (H, N); state, dstate (B, H, N, N) in [b, h, key, value] order, default 0; all one
dtype, float32 or float64. The caller's arrays are never modified. ``make_backend`` is the engine's ``cuda-shim`` WKV of RWKV-5.2 and RWKV-6.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.resources

import numpy as np

from .. import WKVBackend
from ...rwkv6.wkv import WKV6Grads, log_decay
from .shim_wkv4 import DTYPES, compile_shared

SOURCES = ("wkv6.cu", "cuda_shim.h")  # in the package minirwkv.kernels (the kernels/ folder)
ENTRY = "wkv6_shim.cpp"
SUM_THREADS = 32  # block size of the du batch sum, as in cupy_wkv6

# The launches mirror cupy_wkv6: one block of N threads per (b, h) for the WKV kernels, then the du batch sum.
ENTRY_SOURCE = r"""
#include "cuda_shim.h"
#include "wkv6.cu"

#define MINIRWKV_WKV6_EXPORT(F, SUFFIX)                                                                       \
    extern "C" void wkv6_forward_##SUFFIX(int B, int T, int H, int N, const F *r, const F *k, const F *v,     \
                                          const F *w, const F *u, F *y, F *S) {                               \
        shim_launch((unsigned)(B * H), (unsigned)N, wkv6_forward<F>, B, T, H, N, r, k, v, w, u, y, S);        \
    }                                                                                                          \
    extern "C" void wkv6_backward_##SUFFIX(int B, int T, int H, int N, const F *r, const F *k, const F *v,    \
                                           const F *w, const F *u, const F *dy, const F *state, F *S_prev,     \
                                           F *G, F *Gc, F *dr, F *dk, F *dv, F *dw, F *du_bh, F *du,           \
                                           int sum_block) {                                                    \
        shim_launch((unsigned)(B * H), (unsigned)N, wkv6_backward_rows<F>, B, T, H, N, r, k, v, w, u, dy,     \
                    state, S_prev, G, dr, dk, dw, du_bh);                                                      \
        shim_launch((unsigned)(B * H), (unsigned)N, wkv6_backward_cols<F>, B, T, H, N, r, k, w, u, dy, Gc,    \
                    dv);                                                                                       \
        shim_launch((unsigned)((H * N + sum_block - 1) / sum_block), (unsigned)sum_block, wkv6_sum_batch<F>,  \
                    B, H * N, (const F *)du_bh, du);                                                           \
    }

MINIRWKV_WKV6_EXPORT(float, f32)
MINIRWKV_WKV6_EXPORT(double, f64)
"""


# ---------------------------------------------------------------------------------------------------------------
# The contract of minirwkv.rwkv6.wkv
# ---------------------------------------------------------------------------------------------------------------

def forward(r, k, v, w, u, state=None, lib=None):
    """(y (B, T, H, N), state after the last token (B, H, N, N)); ``state`` (default 0) is copied."""
    lib = lib or load_library()
    B, T, H, N = check_wkv6_args(r, k, v, w, u, state=state)
    dtype = r.dtype
    S = np.zeros((B, H, N, N), dtype) if state is None else np.array(state, dtype=dtype, order="C", copy=True)
    y = np.empty_like(r)  # (B, T, H, N)
    if B * H * N:
        getattr(lib, f"wkv6_forward_{DTYPES[dtype]}")(B, T, H, N, r, k, v, w, u, y, S)
    return y, S


def backward(r, k, v, w, u, dy, state=None, dstate=None, lib=None) -> WKV6Grads:
    """WKV6Grads(dr, dk, dv, dw, du, dstate) of a loss with dL/dy = dy and dL/dS_{T-1} = dstate (default 0)."""
    lib = lib or load_library()
    B, T, H, N = check_wkv6_args(r, k, v, w, u, dy=dy, state=state, dstate=dstate)
    dtype = r.dtype
    S0 = np.zeros((B, H, N, N), dtype) if state is None else np.ascontiguousarray(state)
    G = np.zeros((B, H, N, N), dtype) if dstate is None else np.array(dstate, dtype=dtype, order="C", copy=True)
    Gc = G.copy()  # (B, H, N, N) kernel B's own adjoint (columns); G is kernel A's (rows)
    S_prev = np.empty((B, H, T, N, N), dtype)  # (B, H, T, N, N) all forward row-states (v1: no checkpoints)
    dr, dk, dv, dw = (np.empty_like(r) for _ in range(4))  # (B, T, H, N) each
    du_bh = np.empty((B, H, N), dtype)  # (B, H, N) per-(b, h, i) partials
    du = np.zeros((H, N), dtype)  # (H, N)
    if B * H * N:
        getattr(lib, f"wkv6_backward_{DTYPES[dtype]}")(B, T, H, N, r, k, v, w, u, dy, S0, S_prev, G, Gc,
                                                      dr, dk, dv, dw, du_bh, du, SUM_THREADS)
    return WKV6Grads(dr, dk, dv, dw, du, G)


def check_wkv6_args(r, k, v, w, u, dy=None, state=None, dstate=None):
    """-> (B, T, H, N). ValueError naming the problem unless r, k, v, w (and dy) are (B, T, H, N), u (H, N),
    state, dstate (B, H, N, N), all C-contiguous (state, dstate may be any layout: they are copied), one dtype,
    float32 or float64, and the raw decay w is finite under exp. Works for NumPy and CuPy arrays alike."""
    if r.ndim != 4:
        raise ValueError(f"WKV6: r must be (B, T, H, N), got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    if np.dtype(r.dtype) not in DTYPES:
        raise ValueError(f"WKV6 kernels support float32 and float64, got {r.dtype}; cast the inputs first")
    shapes = {"r": (B, T, H, N), "k": (B, T, H, N), "v": (B, T, H, N), "w": (B, T, H, N), "u": (H, N),
              "dy": (B, T, H, N), "state": (B, H, N, N), "dstate": (B, H, N, N)}
    named = {"r": r, "k": k, "v": v, "w": w, "u": u, "dy": dy, "state": state, "dstate": dstate}
    for name, a in named.items():
        if a is None:
            continue
        if tuple(a.shape) != shapes[name]:
            raise ValueError(f"WKV6: {name} has shape {tuple(a.shape)}, expected {shapes[name]} "
                             f"(from r: B={B}, T={T}, H={H}, N={N})")
        if a.dtype != r.dtype:
            raise ValueError(f"WKV6: {name} is {a.dtype} but r is {r.dtype}; pass all WKV6 inputs in one dtype")
        if name not in ("state", "dstate") and not a.flags.c_contiguous:
            raise ValueError(f"WKV6: {name} must be C-contiguous; pass xp.ascontiguousarray({name})")
    if w.size:
        log_decay(w)  # raises if exp(w) overflows, as the reference does
    return B, T, H, N


# ---------------------------------------------------------------------------------------------------------------
# Building and loading the library
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def load_library(cache_dir: str | None = None) -> ctypes.CDLL:
    """Compile (once per source version, cached on disk like shim_wkv4) and load the wkv6 shim library."""
    sources = {name: importlib.resources.files("minirwkv.kernels").joinpath(name).read_text() for name in SOURCES}
    sources[ENTRY] = ENTRY_SOURCE
    lib = compile_shared("wkv6", sources, ENTRY, cache_dir)
    i = ctypes.c_int
    for dtype, suffix in DTYPES.items():
        p = np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")  # checks dtype and layout at every call
        getattr(lib, f"wkv6_forward_{suffix}").argtypes = [i] * 4 + [p] * 7
        getattr(lib, f"wkv6_backward_{suffix}").argtypes = [i] * 4 + [p] * 16 + [i]
        getattr(lib, f"wkv6_forward_{suffix}").restype = None
        getattr(lib, f"wkv6_backward_{suffix}").restype = None
    return lib


def make_backend(cache_dir=None) -> WKVBackend:
    """The ``cuda-shim`` WKV of RWKV-5.2 / RWKV-6. Builds the library now (RuntimeError if there is no C++
    compiler)."""
    lib = load_library(str(cache_dir) if cache_dir is not None else None)
    return WKVBackend("cuda-shim", functools.partial(forward, lib=lib), functools.partial(backward, lib=lib))
