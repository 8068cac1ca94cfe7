"""The engine: one object, resolved once at the edge, that carries everything "how to compute" means.

    engine = make_engine("auto", "cpu")     # Engine(name="numba", device="cpu")
    engine.xp                               # numpy (cupy on "cuda")
    engine.ops.layernorm_forward(...)       # the element-wise kernels: minirwkv.layers, some replaced by Numba
    engine.wkv("4").forward(...)            # the WKV of a generation on this engine
    engine.adamw_update                     # the fused in-place AdamW update, or None (minirwkv.optim's NumPy form)
    engine.threads, engine.pool             # CPU: the thread count and the pool that splits the products
                                            # (backends/threads.py); make_engine(..., threads=1) for one core

Public functions (``minirwkv.forward`` and friends) take ``impl=`` as a name or an Engine and resolve it once; the
trainer and the runners make one at setup and pass it down. Nothing below the edge re-resolves a name.
Making an engine compiles nothing: the Numba kernels compile on their first call. Making a CPU engine applies its
thread count to the process (threads.configure: BLAS on one thread per call, Numba's threads), since the pools it
uses are the process's; the engine made last sets them.
"""
from __future__ import annotations

import functools
import operator
import types
from dataclasses import dataclass, field
from typing import Callable

from .. import layers
from ..devices import module_for_device
from . import WKVBackend, get_wkv, resolve, threads as cpu_threads

_cache: dict[tuple[str, str, int], "Engine"] = {}
MATMUL_FUNCTIONS = ("linear_forward", "linear_backward", "lora_forward", "lora_backward")  # take ``matmul=``


class OpsNamespace(types.SimpleNamespace):
    """The functions of minirwkv.layers by name, some replaced; ``overridden`` says which."""

    def __repr__(self):
        return f"OpsNamespace(overridden={list(self.overridden)})"


@dataclass(frozen=True)
class Engine:
    name: str  # numpy, parallel, numba, cupy, cuda-shim (minirwkv.backends)
    device: str  # cpu or cuda
    xp: types.ModuleType = field(repr=False)  # the array module: numpy or cupy
    ops: OpsNamespace = field(repr=False)  # the element-wise forward/backward pairs
    adamw_update: Callable | None = field(repr=False)  # fused in-place AdamW (backends/numba/ops.py), or None
    threads: int = 1  # CPU threads of the products and the Numba kernels (backends/threads.py); 1 on a GPU
    pool: cpu_threads.ThreadPool | None = field(default=None, repr=False)  # splits the products; None on a GPU

    @property
    def matmul(self) -> Callable:
        """A 2-D product ``matmul(a, b, out=None)``: the pool's on the CPU (split over the threads), else ``@``."""
        return self.pool.matmul if self.pool is not None else operator.matmul

    def wkv(self, version: str) -> WKVBackend:
        """The WKV of generation ``version`` on this engine."""
        return get_wkv(version, self.name)


def make_engine(impl="auto", device: str = "cpu", threads: int | None = None) -> Engine:
    """The Engine called ``impl`` (a name, "auto", or an Engine, returned as it is) for arrays on ``device``.
    ``threads``: CPU threads (default: threads.resolve_threads, i.e. the environment, else every usable core)."""
    if isinstance(impl, Engine):
        if impl.device != device:
            raise ValueError(f"engine {impl.name!r} computes on {impl.device!r}, the arrays are on {device!r}; "
                             f"make the engine for {device!r} (make_engine(impl, {device!r}))")
        if threads is not None and cpu_threads.resolve_threads(threads) != impl.threads and device == "cpu":
            raise ValueError(f"the engine given runs on {impl.threads} threads, threads={threads} was asked for; "
                             f"pass one or the other")
        engine = impl
    else:
        name = resolve(impl, device)
        n = cpu_threads.resolve_threads(threads) if device == "cpu" else 1
        key = (name, device, n)
        if key not in _cache:
            _cache[key] = _build(name, device, n)
        engine = _cache[key]
    if engine.device == "cpu":
        cpu_threads.configure(engine.threads)
    return engine


def _build(name: str, device: str, n: int) -> Engine:
    functions = {f: getattr(layers, f) for f in layers.FUNCTIONS}
    overridden: tuple = ()
    adamw = None
    if name == "numba":
        from .numba import ops as numba_ops

        overridden = numba_ops.OVERRIDES
        missing = [f for f in overridden if f not in functions]
        if missing:  # an override must replace a reference function of the same name
            raise RuntimeError(f"backends/numba/ops.py overrides functions minirwkv.layers does not have: {missing}")
        functions.update({f: getattr(numba_ops, f) for f in overridden})
        adamw = numba_ops.adamw_update
    pool = None
    if device == "cpu":
        pool = cpu_threads.get_pool(n)
        for f in MATMUL_FUNCTIONS:  # their products go through the pool
            functions[f] = functools.partial(getattr(layers, f), matmul=pool.matmul)
    return Engine(name, device, module_for_device(device), OpsNamespace(**functions, overridden=overridden), adamw,
                  n, pool)
