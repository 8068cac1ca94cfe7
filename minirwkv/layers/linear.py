"""Linear layers without bias, weights stored (out, in) as nn.Linear (docs/backward.md).
"""
from __future__ import annotations

import operator
from typing import NamedTuple


class LinearCache(NamedTuple):
    x: np.ndarray  # (..., in)
    weight: np.ndarray  # (out, in)


def linear_forward(x, weight, matmul=operator.matmul):
    """y = x @ weight.T. x (..., in), weight (out, in) -> y (..., out).

    Computed as one 2-D product over the flattened leading axes: NumPy's stacked (3-D) matmul with a transposed
    operand does not reach BLAS and runs ~10x slower. ``matmul``: how a 2-D product is computed; a CPU engine
    passes its thread pool's (backends/threads.py), which splits it over the cores.
    """
    n_out, n_in = weight.shape
    y = matmul(x.reshape(-1, n_in), weight.T)  # (B T, out)
    return y.reshape(*x.shape[:-1], n_out), LinearCache(x, weight)


def linear_backward(dy, cache: LinearCache, matmul=operator.matmul):
    """-> dx (..., in), dweight (out, in). Both as 2-D products, as in the forward."""
    x, weight = cache
    n_out, n_in = weight.shape
    dy2 = dy.reshape(-1, n_out)  # (B T, out)
    dx = matmul(dy2, weight).reshape(*dy.shape[:-1], n_in)  # (..., in)
    dweight = matmul(dy2.T, x.reshape(-1, n_in))  # (out, in)
    return dx, dweight
