"""The low-rank adapters of RWKV-6 and later: out = act(x @ w1) @ w2, weights stored (in, rank) and (rank, out)
as the official checkpoints store them (``time_decay_w1`` (C, D), ``time_decay_w2`` (D, A); docs/rwkv6.md §10).

Unlike a Linear layer's (out, in) weight, these are applied as ``x @ w1``. ``act`` is the middle non-linearity:
"tanh" (RWKV-6's decay and ddlerp adapters), "sigmoid" or None (RWKV-7 uses all three). Both products are 2-D over
the flattened leading axes; ``matmul`` is how one is computed (a CPU engine passes its thread pool's).
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp
from .activations import sigmoid


class LoraCache(NamedTuple):
    x: np.ndarray  # (..., in)
    h: np.ndarray  # (..., rank) act(x @ w1)
    w1: np.ndarray  # (in, rank)
    w2: np.ndarray  # (rank, out)
    act: str | None


def _act_forward(p, act):
    if act == "tanh":
        return _xp(p).tanh(p)
    if act == "sigmoid":
        return sigmoid(p)
    if act is None:
        return p
    raise ValueError(f"unknown LoRA activation {act!r}; use 'tanh', 'sigmoid' or None")


def _act_backward(dh, h, act):
    """dL/dp from dL/dh, written with the output h = act(p) only."""
    if act == "tanh":
        return dh * (1 - h * h)
    if act == "sigmoid":
        return dh * h * (1 - h)
    return dh


def lora_forward(x, w1, w2, act="tanh", matmul=operator.matmul):
    """out = act(x @ w1) @ w2. x (..., in), w1 (in, rank), w2 (rank, out) -> out (..., out), LoraCache."""
    n_in, rank = w1.shape
    h = _act_forward(matmul(x.reshape(-1, n_in), w1), act)  # (B T, rank)
    out = matmul(h, w2)  # (B T, out)
    return out.reshape(*x.shape[:-1], w2.shape[1]), LoraCache(x, h, w1, w2, act)


def lora_backward(dout, cache: LoraCache, matmul=operator.matmul):
    """-> dx (..., in), dw1 (in, rank), dw2 (rank, out). The forward read upwards."""
    x, h, w1, w2, act = cache
    n_in, rank = w1.shape
    dout2 = dout.reshape(-1, w2.shape[1])  # (B T, out)
    dw2 = matmul(h.T, dout2)  # (rank, out)
    dh = matmul(dout2, w2.T)  # (B T, rank)
    dp = _act_backward(dh, h, act)  # (B T, rank)
    x2 = x.reshape(-1, n_in)  # (B T, in)
    dw1 = matmul(x2.T, dp)  # (in, rank)
    dx = matmul(dp, w1.T).reshape(x.shape)  # (..., in)
    return dx, dw1, dw2
