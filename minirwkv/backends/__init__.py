"""One registry of WKV backends. No silent fallback: a backend asked for by name that cannot run raises.

    name        where            what
    numpy       CPU (or CuPy)    the recurrent reference of wkv.py, a Python loop over T of (B, C) vector ops
    parallel    CPU (or CuPy)    the T x T reference of wkv.py (O(T^2) memory; no carried state)
    numba       CPU              backends/numba_wkv.py, the recurrence compiled, parallel over (b, c)
    cupy        GPU              backends/cupy_wkv.py, kernels/wkv4.cu through cupy.RawModule
    cuda-shim   CPU              kernels/wkv4.cu compiled by the host C++ compiler with kernels/cuda_shim.h (tests)

``auto`` is ``cupy`` for CuPy arrays and ``numba`` otherwise (Numba is a core dependency).
Every backend follows the contract in the docstring of ``minirwkv.wkv``.
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

NAMES = ("numpy", "parallel", "numba", "cupy", "cuda-shim")


class WKVBackend(NamedTuple):
    name: str
    forward: Callable  # (w, u, k, v, state) -> (y, state)
    backward: Callable  # (w, u, k, v, y, gy) -> (gw, gu, gk, gv)


_MODULES = {
    "numba": "minirwkv.backends.numba_wkv",
    "cupy": "minirwkv.backends.cupy_wkv",
    "cuda-shim": "minirwkv.backends.shim_wkv",
}
_cache: dict[str, WKVBackend] = {}


def resolve(name: str = "auto", on_gpu: bool = False) -> str:
    """The concrete backend name ``auto`` stands for, given where the arrays live."""
    if name == "auto":
        return "cupy" if on_gpu else "numba"
    if name not in NAMES:
        raise ValueError(f"unknown WKV implementation {name!r}; choose one of: auto, {', '.join(NAMES)}")
    return name


def get_backend(name: str = "auto", on_gpu: bool = False) -> WKVBackend:
    """The WKVBackend called ``name`` (after resolving ``auto``). Raises RuntimeError if it cannot run here."""
    if isinstance(name, WKVBackend):
        return name
    name = resolve(name, on_gpu)
    if name in _cache:
        return _cache[name]
    if name == "numpy":
        from .. import wkv

        backend = WKVBackend("numpy", wkv.wkv_recurrent_forward, wkv.wkv_recurrent_backward)
    elif name == "parallel":
        from .. import wkv

        backend = WKVBackend("parallel", wkv._parallel_backend_forward, wkv._parallel_backend_backward)
    else:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as e:
            raise RuntimeError(f"WKV backend {name!r} is unavailable: {e}. Install what it needs, or pass "
                               f"impl='numpy' for the reference") from e
        backend = module.make_backend()  # raises RuntimeError with the reason if it cannot run here
    _cache[name] = backend
    return backend
