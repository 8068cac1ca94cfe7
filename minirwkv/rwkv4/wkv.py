r"""The WKV operator of RWKV-4, written twice and independently: a parallel (T x T) form and a recurrent form.

Paper: "RWKV: Reinventing RNNs for the Transformer Era", eq. (14)-(16); official code: the ``WKV`` autograd function
of BlinkDL/RWKV-LM ``RWKV-v4neo/src/model.py`` and its kernel ``cuda/wkv_cuda.cu``. Derivations: docs/wkv.md.

For one batch element b and one channel c (every quantity below is a scalar), with the per-channel log-decay
``w = -exp(time_decay)`` (< 0) and the bonus ``u = time_first``:

    y_t = ( sum_{i<t} e^{(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t )  /  ( sum_{i<t} e^{(t-1-i) w + k_i}  +  e^{u + k_t} )

The most recent past token (i = t-1) arrives undecayed, token i is decayed (t-1-i) times, and the current token
gets the bonus e^u instead of a decay. All weights are positive, so y_t is a convex combination of v_0..v_t.

Parallel form: the weights form a T x T lower-triangular matrix per channel. Normalising each row is a softmax over
the log-weights, so the WKV is softmax attention with a fixed, position-only "query" (the link to AFT). Computed in
log space with the row maximum subtracted: nothing overflows for any k. O(T^2) memory: a teaching and testing form.

Recurrent form: the numerator and denominator are running sums a_t, b_t with a_{t+1} = e^w a_t + e^{k_t} v_t. Stored
naively they overflow (float32 exp overflows above ~88.7), so the state is kept as (aa, bb, pp) with a = aa e^pp,
b = bb e^pp, and every exp argument is <= 0 (docs/rwkv4.md §3.2). Its backward is the two-sweep algorithm of the
official kernel (section 3.4). ``wkv_step`` is one token of it, and RNN-mode inference calls the same function.

Backend contract (shared by this module, backends/numba/wkv4.py and kernels/wkv4.cu):
    forward(w, u, k, v, state=None) -> (y, state)   w, u (C,); k, v, y (B, T, C); state = WKVState of (B, C) arrays
    backward(w, u, k, v, y, gy)     -> (gw, gu, gk, gv)   from the zero state; gw, gu (C,) summed over the batch
gw is the gradient with respect to w; the layer (``wkv_backward``) turns it into the gradient of time_decay.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backends import WKVBackend
from ..devices import array_module as _xp

MIN_VALUE = -1e38  # stand-in for log(0) = -inf, as in the official kernels; finite, so (MIN_VALUE + w) stays finite


class WKVState(NamedTuple):
    """The recurrent state of one layer's WKV: a = aa * e^pp (numerator), b = bb * e^pp (denominator)."""

    aa: np.ndarray  # (B, C) scaled numerator alpha
    bb: np.ndarray  # (B, C) scaled denominator beta
    pp: np.ndarray  # (B, C) log-scale p


def zero_state(batch_size: int, channels: int, dtype, xp=np) -> WKVState:
    """The state before the first token: a = b = 0, i.e. aa = bb = 0 and pp = -inf (MIN_VALUE)."""
    aa = xp.zeros((batch_size, channels), dtype=dtype)  # (B, C)
    bb = xp.zeros((batch_size, channels), dtype=dtype)  # (B, C)
    pp = xp.full((batch_size, channels), MIN_VALUE, dtype=dtype)  # (B, C)
    return WKVState(aa, bb, pp)


# ---------------------------------------------------------------------------------------------------------------
# Recurrent form
# ---------------------------------------------------------------------------------------------------------------

def wkv_step(w, u, k, v, aa, bb, pp):
    """One token of the stable recurrence: returns (y, aa, bb, pp). k, v, aa, bb, pp (B, C); w, u (C,).

    Output first (the current token with its bonus u), then the state update (the current token joins the past,
    everything already there decays once). ``q`` is the running maximum of the log-weights: shifting by it keeps
    every exp argument <= 0.
    """
    xp = _xp(k)
    ww = u + k  # (B, C) log-weight of the current token in the output
    q = xp.maximum(pp, ww)
    e1 = xp.exp(pp - q)  # weight of the past, scaled by e^-q
    e2 = xp.exp(ww - q)  # weight of the current token, scaled by e^-q
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)  # (B, C); the denominator is >= 1 once a token was seen
    ww = pp + w  # the past decays once
    q = xp.maximum(ww, k)
    e1 = xp.exp(ww - q)
    e2 = xp.exp(k - q)
    aa = e1 * aa + e2 * v  # (B, C)
    bb = e1 * bb + e2  # (B, C)
    return y, aa, bb, q


def wkv_recurrent_forward(w, u, k, v, state: WKVState | None = None):
    """y (B, T, C) and the state after the last token, stepping through time with ``wkv_step``."""
    xp = _xp(k)
    B, T, C = k.shape
    aa, bb, pp = state if state is not None else zero_state(B, C, k.dtype, xp)
    y = xp.empty_like(k)  # (B, T, C)
    for t in range(T):
        y[:, t], aa, bb, pp = wkv_step(w, u, k[:, t], v[:, t], aa, bb, pp)
    return y, WKVState(aa, bb, pp)


def wkv_recurrent_backward(w, u, k, v, y, gy):
    """Gradients (gw, gu, gk, gv) of the recurrent form, from the zero initial state (docs/rwkv4.md §3.4).

    Exact gradients (docs/wkv.md), with D_t the denominator of y_t:
        dL/du   = sum_t g_t e^{u+k_t} (v_t - y_t) / D_t
        dL/dw   = sum_t g_t (A'_t - y_t B'_t) / D_t,  A'_t = da_t/dw, B'_t = db_t/dw
        dL/dk_i = g_i e^{u+k_i} (v_i - y_i) / D_i + e^{k_i} (v_i P_i + Q_i)
        dL/dv_i = g_i e^{u+k_i} / D_i + e^{k_i} P_i
    with P_i = sum_{t>i} e^{(t-1-i) w} g_t / D_t and Q_i = -sum_{t>i} e^{(t-1-i) w} g_t y_t / D_t.
    Sweep 1 (forward in time) recomputes the state and accumulates gw, gu; it stores s_t = g_t e^{q_t} / D_t and
    r_t = u + k_t - q_t. Sweep 2 (backward in time) accumulates P, Q as (pa, qa) with log-scale rho.
    """
    xp = _xp(k)
    B, T, C = k.shape
    aa, bb, pp = zero_state(B, C, k.dtype, xp)
    dA = xp.zeros_like(aa)  # (B, C) A'_t scaled by e^-pp
    dB = xp.zeros_like(aa)  # (B, C) B'_t scaled by e^-pp
    gw = xp.zeros_like(aa)  # (B, C)
    gu = xp.zeros_like(aa)  # (B, C)
    s = xp.empty_like(k)  # (B, T, C)
    r = xp.empty_like(k)  # (B, T, C)
    for t in range(T):
        kk, vv, yy = k[:, t], v[:, t], y[:, t]
        ww = u + kk
        q = xp.maximum(pp, ww)
        e1 = xp.exp(pp - q)
        e2 = xp.exp(ww - q)
        s[:, t] = gy[:, t] / (e1 * bb + e2)  # g_t / (D_t e^-q)
        r[:, t] = ww - q
        gw += (dA - yy * dB) * e1 * s[:, t]
        gu += (vv - yy) * e2 * s[:, t]
        ww = pp + w
        q = xp.maximum(ww, kk)
        e1 = xp.exp(ww - q)
        e2 = xp.exp(kk - q)
        dA = e1 * (aa + dA)  # A'_{t+1} = e^w (A'_t + a_t)
        dB = e1 * (bb + dB)  # B'_{t+1} = e^w (B'_t + b_t)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = q

    gk = xp.empty_like(k)  # (B, T, C)
    gv = xp.empty_like(k)  # (B, T, C)
    pa = xp.zeros_like(aa)  # (B, C) P scaled by e^-rho
    qa = xp.zeros_like(aa)  # (B, C) Q scaled by e^-rho
    rho = xp.full_like(aa, MIN_VALUE)  # (B, C)
    for i in range(T - 1, -1, -1):
        kk, vv, yy, ss = k[:, i], v[:, i], y[:, i], s[:, i]
        e1 = ss * xp.exp(r[:, i])  # g_i e^{u+k_i} / D_i
        e2 = xp.exp(kk + rho)  # e^{k_i} times the scale of P, Q (<= 1: rho <= -k_i)
        gk[:, i] = e1 * (vv - yy) + e2 * (pa * vv + qa)
        gv[:, i] = e1 + e2 * pa
        z = r[:, i] - u - kk  # -q_i, so g_i / D_i = s_i e^z
        ww = rho + w
        q = xp.maximum(ww, z)
        e1 = xp.exp(ww - q)
        e2 = xp.exp(z - q)
        pa = e1 * pa + ss * e2
        qa = e1 * qa - ss * e2 * yy
        rho = q
    return gw.sum(axis=0), gu.sum(axis=0), gk, gv


# ---------------------------------------------------------------------------------------------------------------
# Parallel (T x T) form
# ---------------------------------------------------------------------------------------------------------------

def wkv_log_weights(w, u, k):
    """The (B, T, T, C) log-weights E[b, t, i, c] of token i in the output at time t (-inf where i > t).

        E[t, i] = (t-1-i) w + k_i   for i < t
        E[t, t] = u + k_t
    """
    xp = _xp(k)
    B, T, C = k.shape
    t = xp.arange(T)
    dist = (t[:, None] - 1 - t[None, :]).astype(k.dtype)  # (T, T) number of decays t-1-i
    E = dist[None, :, :, None] * w + k[:, None, :, :]  # (B, T, T, C)
    eye = xp.eye(T, dtype=bool)[None, :, :, None]
    E = xp.where(eye, (u + k)[:, :, None, :], E)  # the diagonal: bonus u instead of decay
    future = (t[None, :] > t[:, None])[None, :, :, None]
    return xp.where(future, -xp.inf, E).astype(k.dtype)


class WKVParallelCache(NamedTuple):
    A: np.ndarray  # (B, T, T, C) normalised weights (each row sums to 1)
    v: np.ndarray  # (B, T, C)
    y: np.ndarray  # (B, T, C)


def wkv_parallel_forward(w, u, k, v):
    """y (B, T, C) as a row-normalised weighted sum: a softmax over i of the log-weights E[t, i].

    Also returns the state after the last token, summed directly rather than recurrently:
    a_T = sum_i e^{(T-1-i) w + k_i} v_i, b_T likewise without v, kept as (aa, bb, pp) with pp the largest exponent.
    """
    xp = _xp(k)
    T = k.shape[1]
    E = wkv_log_weights(w, u, k)  # (B, T, T, C)
    E = E - E.max(axis=2, keepdims=True)  # shift by the row maximum: every exp argument <= 0
    A = xp.exp(E)
    A /= A.sum(axis=2, keepdims=True)  # (B, T, T, C)
    y = xp.einsum("btic,bic->btc", A, v)  # (B, T, C)
    decays = (T - 1 - xp.arange(T)).astype(k.dtype)  # (T,) decays of token i at the end
    logw = decays[None, :, None] * w + k  # (B, T, C) exponent of token i in a_T
    pp = logw.max(axis=1)  # (B, C)
    e = xp.exp(logw - pp[:, None, :])  # (B, T, C)
    state = WKVState(aa=(e * v).sum(axis=1), bb=e.sum(axis=1), pp=pp)
    return y, WKVParallelCache(A=A, v=v, y=y), state


def wkv_parallel_backward(gy, cache: WKVParallelCache):
    """(gw, gu, gk, gv) of the parallel form: the softmax backward, then E's dependence on w, u, k.

    y_t = sum_i A[t, i] v_i  ->  gv_i = sum_t A[t, i] g_t;  gE[t, i] = A[t, i] g_t (v_i - y_t)  (softmax backward)
    E[t, i] = (t-1-i) w + k_i (i < t), u + k_t (i = t)  ->  gk_i = sum_t gE[t, i];  gu = sum_t gE[t, t];
    gw = sum_{i<t} (t-1-i) gE[t, i].
    """
    xp = _xp(gy)
    A, v, y = cache
    T = A.shape[1]
    gv = xp.einsum("btic,btc->bic", A, gy)  # (B, T, C)
    gE = A * gy[:, :, None, :] * (v[:, None, :, :] - y[:, :, None, :])  # (B, T, T, C)
    gk = gE.sum(axis=1)  # (B, T, C)
    t = xp.arange(T)
    gu = gE[:, t, t, :].sum(axis=(0, 1))  # (C,)
    dist = xp.maximum(t[:, None] - 1 - t[None, :], 0).astype(gy.dtype)  # (T, T); 0 on and above the diagonal
    gw = xp.einsum("btic,ti->c", gE, dist)  # (C,)
    return gw, gu, gk, gv


def _parallel_backend_forward(w, u, k, v, state=None):
    if state is not None:
        raise ValueError("the parallel WKV form starts from the zero state; use impl='numpy' or a kernel to carry state")
    y, _, state = wkv_parallel_forward(w, u, k, v)
    return y, state


def _parallel_backend_backward(w, u, k, v, y, gy):
    _, cache, _ = wkv_parallel_forward(w, u, k, v)
    return wkv_parallel_backward(gy, cache)


# ---------------------------------------------------------------------------------------------------------------
# The layer: time_decay -> w, a backend, and the chain rule back to time_decay
# ---------------------------------------------------------------------------------------------------------------

class WKVCache(NamedTuple):
    w: np.ndarray  # (C,) w = -exp(time_decay)
    u: np.ndarray  # (C,)
    k: np.ndarray  # (B, T, C)
    v: np.ndarray  # (B, T, C)
    y: np.ndarray  # (B, T, C)
    backend: object


def wkv_forward(time_decay, time_first, k, v, backend, state: WKVState | None = None):
    """The WKV layer: y (B, T, C), its cache, and the state after the last token.

    time_decay (C,) is the raw parameter theta of the checkpoints; w = -exp(theta) is computed here, in the
    parameters' dtype. ``backend`` is a ``minirwkv.backends.WKVBackend``.
    """
    xp = _xp(k)
    w = -xp.exp(time_decay)  # (C,)
    u = time_first
    y, state_out = backend.forward(w, u, k, v, state)
    return y, WKVCache(w, u, k, v, y, backend), state_out


def wkv_backward(gy, cache: WKVCache):
    """-> (g_time_decay, g_time_first, gk, gv). dw/dtheta = -exp(theta) = w, hence g_theta = gw * w."""
    w, u, k, v, y, backend = cache
    gw, gu, gk, gv = backend.backward(w, u, k, v, y, gy)
    return gw * w, gu, gk, gv


# ---------------------------------------------------------------------------------------------------------------
# The reference forms as engines' WKVs (minirwkv.backends: "numpy" and "parallel")
# ---------------------------------------------------------------------------------------------------------------

def recurrent_backend() -> WKVBackend:
    return WKVBackend("numpy", wkv_recurrent_forward, wkv_recurrent_backward)


def parallel_backend() -> WKVBackend:
    return WKVBackend("parallel", _parallel_backend_forward, _parallel_backend_backward)
