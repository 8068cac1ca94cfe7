"""NumPy or CuPy: the one set of device helpers.

The model takes its array module from its inputs, so the same code runs on the CPU and on a GPU. A device is named
once, at the edge ("cpu" or "cuda": ``module_for_device``), or read off an array (``device_of``); nothing here
imports CuPy unless a CuPy array is already in hand or "cuda" was asked for.
"""
from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "cuda")


def is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    """numpy, or cupy for a CuPy array (without importing cupy otherwise)."""
    if is_cupy(a):
        import cupy

        return cupy
    return np


def device_of(a) -> str:
    """"cuda" for a CuPy array, "cpu" otherwise."""
    return "cuda" if is_cupy(a) else "cpu"


def module_for_device(device: str):
    """NumPy for "cpu"; CuPy for "cuda", with a one-line error when CuPy or the GPU is missing."""
    if device == "cpu":
        return np
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # ImportError, or CUDARuntimeError without a driver or GPU
        raise RuntimeError(f"device 'cuda' needs CuPy and an NVIDIA GPU ({type(e).__name__}: {e}); install the gpu "
                           f"extra (pip install 'minirwkv[gpu]') or use device 'cpu'") from None
    return cupy


def to_numpy(a) -> np.ndarray:
    """The array on the host: a copy from the GPU for CuPy arrays, np.asarray otherwise."""
    return a.get() if is_cupy(a) else np.asarray(a)
