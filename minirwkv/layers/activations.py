"""Gates and activations: sigmoid, the receptance gate sigmoid(r) * y, relu^2, SiLU (docs/backward.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp


def sigmoid(x):
    """Logistic function without overflow warnings: exp of a non-positive argument only."""
    xp = _xp(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


class GateCache(NamedTuple):
    sr: np.ndarray  # sigmoid(r), stored
    y: np.ndarray


def gate_forward(r, y):
    """out = sigmoid(r) * y: the receptance gate of time mixing and channel mixing."""
    sr = sigmoid(r)
    return sr * y, GateCache(sr, y)


def gate_backward(dout, cache: GateCache):
    """-> dr, dy. sigmoid' = sigmoid * (1 - sigmoid)."""
    sr, y = cache
    return dout * y * sr * (1 - sr), dout * sr


def relu_square_forward(x):
    """h = relu(x)^2 (Primer), the channel-mixing activation. Cache: x."""
    h = _xp(x).maximum(x, 0)
    return h * h, x


def relu_square_backward(dh, x):
    """-> dx = 2 relu(x) dh."""
    return 2 * _xp(x).maximum(x, 0) * dh


def silu_forward(a):
    """g = a * sigmoid(a) (SiLU, "swish"): RWKV-5/6's output gate. Cache: (a, sigmoid(a))."""
    sa = sigmoid(a)
    return a * sa, (a, sa)


def silu_backward(dg, cache):
    """-> da = dg * sigmoid(a) * (1 + a * (1 - sigmoid(a)))."""
    a, sa = cache
    return dg * sa * (1 + a * (1 - sa))
