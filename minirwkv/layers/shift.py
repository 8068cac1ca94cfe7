"""Token shift and the mixes that read it: every RWKV generation interpolates, per channel, between the current
token's input and the previous token's (docs/backward.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp


def token_shift_forward(x, x_prev=None):
    """xx[:, t] = x[:, t-1], xx[:, 0] = x_prev (zeros by default: nn.ZeroPad2d((0, 0, 1, -1)) in the official code).

    x (B, T, C), x_prev (B, C) the previous token's input when continuing from an RNN state. No cache needed.
    """
    xp = _xp(x)
    xx = xp.empty_like(x)  # (B, T, C)
    xx[:, 1:] = x[:, :-1]
    xx[:, 0] = 0 if x_prev is None else x_prev
    return xx


def token_shift_backward(dxx):
    """-> dx (B, T, C): x[:, t] feeds xx[:, t+1]; the last token feeds nothing (the prefix x_prev is a constant)."""
    xp = _xp(dxx)
    dx = xp.zeros_like(dxx)  # (B, T, C)
    dx[:, :-1] = dxx[:, 1:]
    return dx


class MixCache(NamedTuple):
    x: np.ndarray  # (B, T, C)
    xx: np.ndarray  # (B, T, C)
    mix: np.ndarray  # (1, 1, C)


def mix_forward(x, xx, mix):
    """m = x * mix + xx * (1 - mix): mix (1, 1, C) is the weight of the current token (time_mix_k/v/r)."""
    return x * mix + xx * (1 - mix), MixCache(x, xx, mix)


def mix_backward(dm, cache: MixCache):
    """-> dx, dxx (B, T, C), dmix (1, 1, C). dm/dmix = x - xx."""
    x, xx, mix = cache
    dmix = (dm * (x - xx)).sum(axis=(0, 1), keepdims=True)  # (1, 1, C)
    return dm * mix, dm * (1 - mix), dmix


def token_shift_mix_forward(x, x_prev, mixes):
    """The token shift and the mixes that read it: xx = shift(x), m_j = mix(x, xx, mixes[j]) for every j.

    Time mixing has three mixes (mu_k, mu_v, mu_r), channel mixing two (mu_k, mu_r). One function so that a
    kernel can do it in one pass over x (backends/numba_ops.py); this is its meaning.
    x (B, T, C), x_prev (B, C) or None, mixes a tuple of (1, 1, C) -> a tuple of m_j (B, T, C), a tuple of MixCache.
    """
    xx = token_shift_forward(x, x_prev)  # (B, T, C)
    outs, caches = zip(*(mix_forward(x, xx, mix) for mix in mixes))
    return outs, caches


def token_shift_mix_backward(dms, caches):
    """-> dx (B, T, C), a tuple of dmix_j (1, 1, C). The forward read upwards."""
    grads = [mix_backward(dm, cache) for dm, cache in zip(dms, caches)]
    dx = sum(g[0] for g in grads)  # x feeds every mix ...
    dxx = sum(g[1] for g in grads)  # ... and so does its shifted copy
    return dx + token_shift_backward(dxx), tuple(g[2] for g in grads)  # x also feeds the shift
