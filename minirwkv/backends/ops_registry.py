"""Which element-wise kernels go with which WKV backend: ``get_ops(name)``.

    WKV backend                              element-wise kernels
    numba (and auto on the CPU)              minirwkv.ops, with the functions in numba_ops.OVERRIDES replaced
    numpy, parallel, cupy, cuda-shim         minirwkv.ops (the reference; NumPy or CuPy alike)

The result is an ``OpsNamespace``: every public forward/backward pair of minirwkv.ops under its own name, so the
model calls ``ops.layernorm_forward(...)`` whichever it got. The override list is explicit (``numba_ops.OVERRIDES``,
each with the same name and signature as the reference function it replaces), and ``OpsNamespace.overridden``
says which functions are not the reference. Nothing compiles here: the Numba kernels compile on their first call.
"""
from __future__ import annotations

import types

from .. import ops as reference_ops
from . import resolve

_cache: dict[str, "OpsNamespace"] = {}


class OpsNamespace(types.SimpleNamespace):
    """The functions of minirwkv.ops by name, some replaced; ``name`` and ``overridden`` say which."""

    def __repr__(self):
        return f"OpsNamespace({self.name!r}, overridden={list(self.overridden)})"


def _reference_functions() -> dict:
    return {k: v for k, v in vars(reference_ops).items() if not k.startswith("__")}


def get_ops(name: str = "auto", on_gpu: bool = False) -> OpsNamespace:
    """The element-wise kernels for WKV backend ``name`` (after resolving ``auto``); see the module docstring."""
    name = resolve(name, on_gpu)
    if name in _cache:
        return _cache[name]
    functions = _reference_functions()
    overridden: tuple = ()
    if name == "numba":
        from . import numba_ops

        overridden = numba_ops.OVERRIDES
        missing = [f for f in overridden if f not in functions]
        if missing:  # an override must replace a reference function of the same name
            raise RuntimeError(f"numba_ops overrides functions that minirwkv.ops does not have: {missing}")
        functions.update({f: getattr(numba_ops, f) for f in overridden})
    namespace = OpsNamespace(**functions, name=name, overridden=overridden)
    _cache[name] = namespace
    return namespace
