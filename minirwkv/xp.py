"""NumPy or CuPy: the array module an array belongs to, and the explicit move to the host.

The model takes its array module from its inputs, so the same code runs on the CPU and on a GPU; nothing here
imports CuPy unless a CuPy array is already in hand.
"""
from __future__ import annotations

import numpy as np


def is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    """numpy, or cupy for a CuPy array (without importing cupy otherwise)."""
    if is_cupy(a):
        import cupy

        return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """The array on the host: a copy from the GPU for CuPy arrays, np.asarray otherwise."""
    return a.get() if is_cupy(a) else np.asarray(a)
