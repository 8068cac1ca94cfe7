"""The ``cupy`` WKV backend: kernels/wkv4.cu on an NVIDIA GPU, compiled at first use by NVRTC through cupy.RawModule.

The source ships inside the package (pyproject maps the top-level kernels/ folder to ``minirwkv.kernels``) and is
read with importlib.resources, so an installed wheel finds it as well as a checkout. It is compiled once per
process, on the first call, never at import: importing this module does not even import CuPy.

Launch layout (docs/kernels.md): one thread per (b, c) in blocks of 32, i.e. one warp of consecutive channels per
block. There are only B*C threads, so small blocks spread them over more of the GPU's multiprocessors. The batch sum
of gw, gu is a second, tiny kernel over C threads: each output has one writer, so there is no race and no atomic.

Launch errors (a bad grid, a missing kernel) raise at the call. A fault inside a kernel, like any CUDA error, is
reported by the next call that synchronizes (e.g. ``.get()``); kernels/gpu_check.py synchronizes after each check.
"""
from __future__ import annotations

import functools
from importlib.resources import files

import numpy as np

from .. import WKVBackend
from ...rwkv4.wkv import MIN_VALUE, WKVState
from .shim_wkv4 import check_wkv_args
from ...devices import is_cupy

THREADS_PER_BLOCK = 32  # one warp: 32 consecutive channels of one time step, read in one coalesced access
# No --use_fast_math: exp stays the accurate expf / exp (wkv4.cu's header says why).
NVRTC_OPTIONS = ("--std=c++14",)
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
KERNELS = ("wkv_forward", "wkv_backward", "wkv_sum_batch")

INSTALL_HINT = "install CuPy for your CUDA version (pip install minirwkv[gpu], i.e. cupy-cuda12x)"


def make_backend() -> WKVBackend:
    """The ``cupy`` WKVBackend. RuntimeError if CuPy is missing or there is no usable GPU."""
    check_device()
    return WKVBackend("cupy", forward, backward)


def check_device() -> None:
    """RuntimeError, saying why and what to do, unless CuPy imports and sees a CUDA device (every cupy WKV)."""
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(f"the cupy WKV backend needs CuPy, which is not installed ({e}); {INSTALL_HINT}, "
                           f"or use impl='numba' on the CPU") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a CuPy built for another CUDA version: CUDARuntimeError and friends
        raise RuntimeError(f"the cupy WKV backend found no usable CUDA device ({type(e).__name__}: {e}); it needs "
                           f"an NVIDIA GPU with its driver, and CuPy matching the CUDA version ({INSTALL_HINT})") from e
    if count == 0:
        raise RuntimeError("the cupy WKV backend found no CUDA device; run on a machine with an NVIDIA GPU, "
                           "or use impl='numba' on the CPU")


@functools.lru_cache(maxsize=None)
def _module():
    """wkv4.cu compiled once per process; the templates are instantiated through NVRTC name expressions."""
    import cupy

    source = files("minirwkv.kernels").joinpath("wkv4.cu").read_text()
    names = [f"{kernel}<{c_type}>" for kernel in KERNELS for c_type in C_TYPES.values()]
    return cupy.RawModule(code=source, options=NVRTC_OPTIONS, name_expressions=names)


def _kernel(name, dtype):
    return _module().get_function(f"{name}<{C_TYPES[np.dtype(dtype)]}>")


def _blocks(n):
    return ((n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK,)  # round up: wkv4.cu bounds-checks the last block


def forward(w, u, k, v, state: WKVState | None = None):
    """y (B, T, C) and the state after the last token, as CuPy arrays; ``state`` is copied, never modified."""
    import cupy

    B, T, C = _check(w, u, k, v)
    dtype = k.dtype
    if state is None:
        aa = cupy.zeros((B, C), dtype)  # (B, C)
        bb = cupy.zeros((B, C), dtype)  # (B, C)
        pp = cupy.full((B, C), MIN_VALUE, dtype)  # (B, C) log(0), as wkv.zero_state
    else:
        for name, a in zip(WKVState._fields, state):
            if tuple(a.shape) != (B, C):
                raise ValueError(f"WKV: state.{name} has shape {tuple(a.shape)}, expected (B, C) = {(B, C)}")
        aa, bb, pp = (cupy.array(a, dtype=dtype, order="C", copy=True) for a in state)  # the kernel overwrites them
    y = cupy.empty_like(k)  # (B, T, C)
    _kernel("wkv_forward", dtype)(_blocks(B * C), (THREADS_PER_BLOCK,),
                                  (np.int32(B), np.int32(T), np.int32(C), w, u, k, v, y, aa, bb, pp))
    return y, WKVState(aa, bb, pp)


def backward(w, u, k, v, y, gy):
    """(gw, gu, gk, gv) from the zero initial state; gw, gu (C,) summed over the batch on the device."""
    import cupy

    B, T, C = _check(w, u, k, v, y=y, gy=gy)
    dtype = k.dtype
    s = cupy.empty_like(k)  # (B, T, C) sweep 1 -> sweep 2 scratch, in global memory: no T_MAX
    r = cupy.empty_like(k)  # (B, T, C)
    gw_bc = cupy.empty((B, C), dtype)  # (B, C) per-thread partials, assigned by the kernel
    gu_bc = cupy.empty((B, C), dtype)  # (B, C)
    gk = cupy.empty_like(k)  # (B, T, C)
    gv = cupy.empty_like(k)  # (B, T, C)
    _kernel("wkv_backward", dtype)(_blocks(B * C), (THREADS_PER_BLOCK,),
                                   (np.int32(B), np.int32(T), np.int32(C), w, u, k, v, y, gy, s, r,
                                    gw_bc, gu_bc, gk, gv))
    gw = cupy.empty(C, dtype)  # (C,)
    gu = cupy.empty(C, dtype)  # (C,)
    total = _kernel("wkv_sum_batch", dtype)
    total(_blocks(C), (THREADS_PER_BLOCK,), (np.int32(B), np.int32(C), gw_bc, gw))  # same stream: runs after
    total(_blocks(C), (THREADS_PER_BLOCK,), (np.int32(B), np.int32(C), gu_bc, gu))
    return gw, gu, gk, gv


def _check(w, u, k, v, y=None, gy=None):
    """Shapes, dtype and layout (shim_wkv.check_wkv_args), then: CuPy arrays, and an int32-sized grid."""
    for name, a in {"w": w, "u": u, "k": k, "v": v, "y": y, "gy": gy}.items():
        if a is not None and not is_cupy(a):
            raise ValueError(f"the cupy WKV backend takes CuPy arrays, but {name} is {type(a).__name__}; "
                             f"move the inputs with cupy.asarray, or use impl='numba' for NumPy arrays")
    B, T, C = check_wkv_args(w, u, k, v, y=y, gy=gy)
    if B * C >= 2**31:
        raise ValueError(f"WKV: B*C = {B * C} threads exceeds the kernels' int32 thread index; split the batch")
    return B, T, C
