"""Token embedding: a row lookup, and its scatter-add backward (docs/backward.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp


class EmbeddingCache(NamedTuple):
    idx: np.ndarray  # (B, T) int
    vocab_size: int


def embedding_forward(weight, idx):
    """x[b, t] = weight[idx[b, t]]. weight (V, C), idx (B, T) -> x (B, T, C)."""
    return weight[idx], EmbeddingCache(idx, weight.shape[0])


def embedding_backward(dx, cache: EmbeddingCache):
    """Scatter-add: every occurrence of token v adds its dx row to dweight[v]. -> dweight (V, C)."""
    xp = _xp(dx)
    C = dx.shape[-1]
    dweight = xp.zeros((cache.vocab_size, C), dtype=dx.dtype)  # (V, C)
    rows, grads = cache.idx.reshape(-1), dx.reshape(-1, C)
    if xp is np:
        np.add.at(dweight, rows, grads)  # repeated tokens accumulate (a plain += would not)
    else:
        import cupyx

        cupyx.scatter_add(dweight, rows, grads)
    return dweight
