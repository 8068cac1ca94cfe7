"""Linear layers without bias, weights stored (out, in) as nn.Linear (docs/backward.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np



class LinearCache(NamedTuple):
    x: np.ndarray  # (..., in)
    weight: np.ndarray  # (out, in)


def linear_forward(x, weight):
    """y = x @ weight.T. x (..., in), weight (out, in) -> y (..., out).

    Computed as one 2-D product over the flattened leading axes: NumPy's stacked (3-D) matmul with a transposed
    operand does not reach BLAS and runs ~10x slower.
    """
    n_out, n_in = weight.shape
    y = x.reshape(-1, n_in) @ weight.T  # (B T, out)
    return y.reshape(*x.shape[:-1], n_out), LinearCache(x, weight)


def linear_backward(dy, cache: LinearCache):
    """-> dx (..., in), dweight (out, in). Both as 2-D products, as in the forward."""
    x, weight = cache
    n_out, n_in = weight.shape
    dy2 = dy.reshape(-1, n_out)  # (B T, out)
    dx = (dy2 @ weight).reshape(*dy.shape[:-1], n_in)  # (..., in)
    dweight = dy2.T @ x.reshape(-1, n_in)  # (out, in)
    return dx, dweight
