"""LayerNorm over the channels, as PyTorch nn.LayerNorm (biased variance; docs/backward.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp


LN_EPS = 1e-5  # PyTorch nn.LayerNorm default, used by every official RWKV model


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) normalised input, stored
    rstd: np.ndarray  # (..., 1) 1 / sqrt(var + eps), stored
    weight: np.ndarray  # (C,)


def normalize_forward(x, eps):
    """xhat = (x - mean) / sqrt(var + eps) over the last axis (biased variance), and rstd = 1 / sqrt(var + eps).

    The normalisation LayerNorm and GroupNorm share: GroupNorm is this over each group's axis."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / _xp(x).sqrt(var + eps)
    rstd = rstd.astype(x.dtype, copy=False)
    return xc * rstd, rstd  # (..., C), (..., 1)


def normalize_backward(g, xhat, rstd):
    """-> dx from g = dL/dxhat: rstd * (g - mean(g) - xhat * mean(g * xhat)), the mean over the normalised axis."""
    return rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


def layernorm_forward(x, weight, bias, eps=LN_EPS):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance, as PyTorch)."""
    xhat, rstd = normalize_forward(x, eps)  # (..., C), (..., 1)
    return xhat * weight + bias, LayerNormCache(xhat, rstd, weight)


def layernorm_backward(dy, cache: LayerNormCache):
    """-> dx, dweight (C,), dbias (C,).

    With g = dy * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), the mean over the normalised axis.
    """
    xhat, rstd, weight = cache
    axes = tuple(range(dy.ndim - 1))
    dweight = (dy * xhat).sum(axis=axes)  # (C,)
    dbias = dy.sum(axis=axes)  # (C,)
    return normalize_backward(dy * weight, xhat, rstd), dweight, dbias
