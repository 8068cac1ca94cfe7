"""Forward/backward pairs of every operation in RWKV-4 except the WKV (see wkv.py).

Each ``*_forward`` returns its output and a cache (a NamedTuple of what the backward needs); each ``*_backward``
takes the gradient of the output and the cache and returns the gradients of the inputs, in argument order.
Derivations: docs/backward.md. Shapes: B batch, T time, C channels (see the glossary in model.py).

Every function works on NumPy or CuPy arrays alike (the array module is taken from the inputs) and keeps the
inputs' dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .xp import array_module as _xp

LN_EPS = 1e-5  # PyTorch nn.LayerNorm default, used by every official RWKV-4 model


# --- embedding ---------------------------------------------------------------------------------------------------

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


# --- layernorm ---------------------------------------------------------------------------------------------------

class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) normalised input, stored
    rstd: np.ndarray  # (..., 1) 1 / sqrt(var + eps), stored
    weight: np.ndarray  # (C,)


def layernorm_forward(x, weight, bias, eps=LN_EPS):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance, as PyTorch)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / _xp(x).sqrt(var + eps)
    rstd = rstd.astype(x.dtype, copy=False)
    xhat = xc * rstd  # (..., C)
    return xhat * weight + bias, LayerNormCache(xhat, rstd, weight)


def layernorm_backward(dy, cache: LayerNormCache):
    """-> dx, dweight (C,), dbias (C,).

    With g = dy * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), the mean over the normalised axis.
    """
    xhat, rstd, weight = cache
    axes = tuple(range(dy.ndim - 1))
    dweight = (dy * xhat).sum(axis=axes)  # (C,)
    dbias = dy.sum(axis=axes)  # (C,)
    g = dy * weight
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dweight, dbias


# --- linear (no bias; weight stored (out, in) as nn.Linear) --------------------------------------------------------

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


# --- token shift -------------------------------------------------------------------------------------------------

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


# --- time mix: per-channel interpolation between the current and the previous token ---------------------------------

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


# --- gates and activations -----------------------------------------------------------------------------------------

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


# --- loss --------------------------------------------------------------------------------------------------------

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
    """L2Wrap (rwkv4-math section 2.7): the extra logits gradient of RWKV-LM's ``L2Wrap``.

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
