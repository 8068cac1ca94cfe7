"""GroupNorm over the heads, as PyTorch nn.GroupNorm(H, A) on one token at a time: RWKV-5/6's ``ln_x``
(docs/rwkv5.md §5).

The A channels of a token are cut into H contiguous groups (the heads) of N = A / H channels; each group is
normalised over its own N channels (biased variance), then one affine (weight, bias) of A entries applies. The
statistics are per (b, t, h): never across time (an early RWKV-5 normalised across time, a leak of the future).
The eps is an argument (the model's ``ln_x_eps``), applied to the input as given: the official "divide by
head_size_divisor d, then eps 1e-5" is the same function as eps = 1e-5 d^2 on the undivided input.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layernorm import normalize_backward, normalize_forward


class GroupNormCache(NamedTuple):
    xhat: np.ndarray  # (..., H, N) normalised input, stored
    rstd: np.ndarray  # (..., H, 1) 1 / sqrt(var + eps) per group
    weight: np.ndarray  # (A,)


def groupnorm_forward(x, weight, bias, heads: int, eps: float):
    """y = GroupNorm_heads(x) * weight + bias. x (..., A) -> y (..., A); weight, bias (A,)."""
    A = x.shape[-1]
    xhat, rstd = normalize_forward(x.reshape(*x.shape[:-1], heads, A // heads), eps)  # (..., H, N), (..., H, 1)
    y = xhat.reshape(x.shape) * weight + bias  # (..., A)
    return y, GroupNormCache(xhat, rstd, weight)


def groupnorm_backward(dy, cache: GroupNormCache):
    """-> dx (..., A), dweight (A,), dbias (A,). Per group, LayerNorm's backward (layernorm.normalize_backward)."""
    xhat, rstd, weight = cache
    axes = tuple(range(dy.ndim - 1))
    xhat_flat = xhat.reshape(dy.shape)  # (..., A)
    dweight = (dy * xhat_flat).sum(axis=axes)  # (A,)
    dbias = dy.sum(axis=axes)  # (A,)
    g = (dy * weight).reshape(xhat.shape)  # (..., H, N)
    return normalize_backward(g, xhat, rstd).reshape(dy.shape), dweight, dbias
