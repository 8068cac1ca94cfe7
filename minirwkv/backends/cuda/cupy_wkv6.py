"""kernels/wkv6.cu (the RWKV-5/6 matrix WKV) on an NVIDIA GPU, compiled at first use by NVRTC via cupy.RawModule.

The API of shim_wkv6 (and the contract of minirwkv.rwkv6.wkv) on CuPy arrays: forward(r, k, v, w, u, state=None)
-> (y, state_out) and backward(r, k, v, w, u, dy, state=None, dstate=None) -> WKV6Grads. Importing this module
does not import CuPy; the first call does, and raises RuntimeError if it is missing.

Launch layout: one block of N threads per (b, h) for each WKV kernel (wkv6.cu's header), then a tiny kernel that
sums the per-(b, h, i) du partials over b (one writer per output: no atomics). All launches go to the current
stream, so each runs after the previous. A fault inside a kernel is reported by the next synchronizing call.
``make_backend`` is the engine's ``cupy`` WKV of RWKV-5.2 and RWKV-6; kernels/gpu_check.py checks it on a GPU.
"""
from __future__ import annotations

import functools
from importlib.resources import files

import numpy as np

from ...devices import is_cupy
from .. import WKVBackend
from ...rwkv6.wkv import WKV6Grads
from .cupy_wkv4 import check_device
from .shim_wkv6 import SUM_THREADS, check_wkv6_args

NVRTC_OPTIONS = ("--std=c++14",)  # no --use_fast_math: exp stays the accurate expf / exp
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
KERNELS = ("wkv6_forward", "wkv6_backward_rows", "wkv6_backward_cols", "wkv6_sum_batch")
MAX_THREADS_PER_BLOCK = 1024
INSTALL_HINT = "install CuPy for your CUDA version (pip install minirwkv[gpu], i.e. cupy-cuda12x)"


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(f"the cupy WKV6 kernels need CuPy, which is not installed ({e}); {INSTALL_HINT}, "
                           f"or use the NumPy reference minirwkv.rwkv6.wkv on the CPU") from e
    return cupy


@functools.lru_cache(maxsize=None)
def _module():
    """wkv6.cu compiled once per process; the templates are instantiated through NVRTC name expressions."""
    cupy = _cupy()
    source = files("minirwkv.kernels").joinpath("wkv6.cu").read_text()
    names = [f"{kernel}<{c_type}>" for kernel in KERNELS for c_type in C_TYPES.values()]
    return cupy.RawModule(code=source, options=NVRTC_OPTIONS, name_expressions=names)


def _kernel(name, dtype):
    return _module().get_function(f"{name}<{C_TYPES[np.dtype(dtype)]}>")


def forward(r, k, v, w, u, state=None):
    """(y (B, T, H, N), state after the last token (B, H, N, N)) as CuPy arrays; ``state`` is copied."""
    cupy = _cupy()
    B, T, H, N = _check(r, k, v, w, u, state=state)
    dtype = r.dtype
    S = cupy.zeros((B, H, N, N), dtype) if state is None else cupy.array(state, dtype=dtype, order="C", copy=True)
    y = cupy.empty_like(r)  # (B, T, H, N)
    if B * H * N:
        dims = tuple(np.int32(n) for n in (B, T, H, N))
        _kernel("wkv6_forward", dtype)((B * H,), (N,), (*dims, r, k, v, w, u, y, S))
    return y, S


def backward(r, k, v, w, u, dy, state=None, dstate=None) -> WKV6Grads:
    """WKV6Grads(dr, dk, dv, dw, du, dstate) as CuPy arrays; du (H, N) summed over b on the device."""
    cupy = _cupy()
    B, T, H, N = _check(r, k, v, w, u, dy=dy, state=state, dstate=dstate)
    dtype = r.dtype
    S0 = cupy.zeros((B, H, N, N), dtype) if state is None else cupy.ascontiguousarray(state)
    G = cupy.zeros((B, H, N, N), dtype) if dstate is None else cupy.array(dstate, dtype=dtype, order="C", copy=True)
    Gc = G.copy()  # (B, H, N, N) the column kernel's own adjoint
    S_prev = cupy.empty((B, H, T, N, N), dtype)  # (B, H, T, N, N) all forward row-states (v1: no checkpoints)
    dr, dk, dv, dw = (cupy.empty_like(r) for _ in range(4))  # (B, T, H, N) each
    du_bh = cupy.empty((B, H, N), dtype)  # (B, H, N)
    du = cupy.zeros((H, N), dtype)  # (H, N)
    if B * H * N:
        dims = tuple(np.int32(n) for n in (B, T, H, N))
        _kernel("wkv6_backward_rows", dtype)((B * H,), (N,), (*dims, r, k, v, w, u, dy, S0, S_prev, G,
                                                              dr, dk, dw, du_bh))
        _kernel("wkv6_backward_cols", dtype)((B * H,), (N,), (*dims, r, k, w, u, dy, Gc, dv))
        _kernel("wkv6_sum_batch", dtype)(((H * N + SUM_THREADS - 1) // SUM_THREADS,), (SUM_THREADS,),
                                         (np.int32(B), np.int32(H * N), du_bh, du))
    return WKV6Grads(dr, dk, dv, dw, du, G)


def _check(r, k, v, w, u, dy=None, state=None, dstate=None):
    """Shapes, dtype and layout (shim_wkv6.check_wkv6_args), then: CuPy arrays, and a launchable grid."""
    named = {"r": r, "k": k, "v": v, "w": w, "u": u, "dy": dy, "state": state, "dstate": dstate}
    for name, a in named.items():
        if a is not None and not is_cupy(a):
            raise ValueError(f"the cupy WKV6 kernels take CuPy arrays, but {name} is {type(a).__name__}; "
                             f"move the inputs with cupy.asarray, or use shim_wkv6 for NumPy arrays")
    B, T, H, N = check_wkv6_args(r, k, v, w, u, dy=dy, state=state, dstate=dstate)
    if N > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"WKV6: head size N = {N} exceeds {MAX_THREADS_PER_BLOCK} threads per block")
    if B * H >= 2**31:
        raise ValueError(f"WKV6: B*H = {B * H} blocks exceeds the kernels' int32 block index; split the batch")
    return B, T, H, N


def make_backend() -> WKVBackend:
    """The ``cupy`` WKV of RWKV-5.2 / RWKV-6. RuntimeError if CuPy is missing or there is no usable GPU."""
    check_device()
    return WKVBackend("cupy", forward, backward)
