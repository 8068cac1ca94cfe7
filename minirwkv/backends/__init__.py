"""Where the arithmetic runs: the engines, and the WKV of each generation on each engine. No silent fallback: an
engine asked for by name that cannot run raises.

    engine      device   WKV (for generation N)                                 element-wise ops, optimizer
    numpy       any      the recurrent reference, rwkvN/wkv.py                   minirwkv.layers, optim.py
    parallel    any      the parallel (T x T) or chunked reference, rwkvN/wkv.py minirwkv.layers, optim.py
    numba       cpu      backends/numba/wkvN.py, compiled, parallel              layers with backends/numba/ops.py
                                                                                 overrides; the fused AdamW update
    cupy        cuda     kernels/wkvN.cu through cupy.RawModule (cuda/)          minirwkv.layers on CuPy arrays
    cuda-shim   cpu      kernels/wkvN.cu compiled by the host C++ compiler       minirwkv.layers (for tests)

``auto`` is ``cupy`` on "cuda" and ``numba`` on "cpu" (Numba is a core dependency). ``minirwkv.backends.engine``
builds the one ``Engine`` object that is chosen at the edge and passed down; each generation names the module of
its WKV for each engine (``Generation.wkv_backends``), and every WKV follows the contract in its reference module's
docstring.
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

NAMES = ("numpy", "parallel", "numba", "cupy", "cuda-shim")
DEVICE_OF = {"numba": "cpu", "cuda-shim": "cpu", "cupy": "cuda"}  # engines that run on one device only


class WKVBackend(NamedTuple):
    name: str
    forward: Callable  # the generation's forward contract, e.g. RWKV-4: (w, u, k, v, state) -> (y, state)
    backward: Callable  # RWKV-4: (w, u, k, v, y, gy) -> (gw, gu, gk, gv)


_wkv_cache: dict[tuple[str, str], WKVBackend] = {}


def resolve(name: str = "auto", device: str = "cpu") -> str:
    """The concrete engine name ``auto`` stands for on ``device``; an engine that cannot run there raises."""
    if name == "auto":
        return "cupy" if device == "cuda" else "numba"
    if name not in NAMES:
        raise ValueError(f"unknown engine (impl) {name!r}; choose one of: auto, {', '.join(NAMES)}")
    if DEVICE_OF.get(name, device) != device:
        raise ValueError(f"engine {name!r} runs on {DEVICE_OF[name]!r} arrays, these are on {device!r}; use "
                         f"impl='auto' or move the arrays")
    return name


def get_wkv(version: str, name: str) -> WKVBackend:
    """The WKV of generation ``version`` on engine ``name`` (already resolved). RuntimeError if it cannot run here."""
    key = (version, name)
    if key in _wkv_cache:
        return _wkv_cache[key]
    from ..generation import get_generation

    target = get_generation(version).wkv_backends.get(name)
    if target is None:
        raise RuntimeError(f"RWKV-{version} has no WKV for engine {name!r} yet; use impl='numpy'")
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RuntimeError(f"engine {name!r} is unavailable: {e}. Install what it needs, or pass impl='numpy' for "
                           f"the reference") from e
    backend = getattr(module, function)()  # raises RuntimeError with the reason if it cannot run here
    _wkv_cache[key] = backend
    return backend
