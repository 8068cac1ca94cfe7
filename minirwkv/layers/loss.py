"""The training loss: cross-entropy over the vocabulary, and RWKV-LM's L2Wrap logits gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (B, T, V)
    targets: np.ndarray  # (B, T)


def cross_entropy_forward(logits, targets):
    """Mean over tokens of -log softmax(logits)[target], computed with the max subtracted (log-sum-exp).

    logits (B, T, V), targets (B, T) int -> scalar loss (Python float), cache.
    """
    xp = _xp(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (B, T, V)
    e = xp.exp(shifted)
    sumexp = e.sum(axis=-1, keepdims=True)  # (B, T, 1)
    logp_target = xp.take_along_axis(shifted, targets[..., None], axis=-1) - xp.log(sumexp)  # (B, T, 1)
    loss = -float(logp_target.mean())
    return loss, CrossEntropyCache(e / sumexp, targets)


def cross_entropy_backward(cache: CrossEntropyCache, dloss=1.0):
    """-> dlogits (B, T, V) = (softmax - onehot(target)) / (B T)."""
    xp = _xp(cache.probs)
    probs, targets = cache
    B, T, V = probs.shape
    dlogits = probs.reshape(B * T, V).copy()  # (B T, V)
    dlogits[xp.arange(B * T), targets.reshape(-1)] -= 1
    dlogits *= dloss / (B * T)
    return dlogits.reshape(B, T, V)


def l2wrap_backward(logits, factor=1e-4):
    """L2Wrap (docs/rwkv4.md §2.7): the extra logits gradient of RWKV-LM's ``L2Wrap``.

    At each (b, t) the argmax logit gets factor / (B T) times its value; everything else gets 0. It equals the
    gradient of (factor / (2 B T)) * sum_{b,t} max_j logits^2, which is not added to the reported loss. Keeps
    logits near 0 (softmax is shift-invariant, so they would otherwise drift). -> dlogits (B, T, V).
    """
    xp = _xp(logits)
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    rows = xp.arange(B * T)
    j = flat.argmax(axis=-1)  # (B T,)
    d = xp.zeros_like(flat)
    d[rows, j] = flat[rows, j] * (factor / (B * T))
    return d.reshape(B, T, V)
