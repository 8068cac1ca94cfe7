"""Numba versions of the element-wise forward/backward pairs of minirwkv.ops, fused where that saves passes over
memory, and the fused AdamW update. Same names, signatures and caches as the reference functions they replace
(``OVERRIDES``); ``backends/ops_registry.py`` hands them to the model with the ``numba`` WKV backend.

Why: in a training step of a small model (V=256, C=256, L=6, T=256, B=8) NumPy's element-wise work, one pass over
memory per operator and a temporary per intermediate, took about as long as the matrix products. Here each pair is
one pass (forward) and one pass (backward) over its (B, T, C) arrays, parallel over the B T rows, SIMD over
channels. docs/numba.md has the profile and the figures.

    token_shift_mix_forward/backward   the shift and the 2 or 3 mixes that read it: one pass for all of them
    layernorm_forward/backward         per row; sums accumulated in float64
    gate_forward/backward              sigmoid fused in (fastexp.sigmoid, through the fast exp)
    relu_square_forward/backward
    embedding_backward                 a sequential scatter-add (np.add.at is slow)
    adamw_update                       not in minirwkv.ops: the optimizer's in-place update, one pass

Reductions over rows (dmix, dweight, dbias) are summed per chunk of ``ROWS_PER_CHUNK`` rows in parallel, then the
chunks are summed: the result does not depend on the number of threads. Floating-point constants reach the kernels
as arguments of the arrays' dtype (a float literal in Numba code is float64 and would promote float32 arithmetic);
the float64 accumulators of layernorm are deliberate.

Compiler flags: ``error_model="numpy"`` (a division by zero gives inf instead of raising, so the loop has no
branch to an exception and vectorises) and ``fastmath={"contract"}`` (a * b + c may become one fused multiply-add:
one rounding instead of two, never less accurate; no other fast-math licence). The AdamW kernel does not contract,
so it agrees bit for bit with ``minirwkv.optim.adamw_step``.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ... import layers as ops  # the reference functions these replace, and their caches
from .fastexp import sigmoid

OVERRIDES = ("token_shift_mix_forward", "token_shift_mix_backward", "layernorm_forward", "layernorm_backward",
             "gate_forward", "gate_backward", "relu_square_forward", "relu_square_backward", "embedding_backward")
ROWS_PER_CHUNK = 64  # rows per partial sum of a reduction over rows
_JIT = dict(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy")  # see the module docstring


def _rows(a):
    """(..., C) -> (N, C) C-contiguous, N the product of the leading axes (a view when possible)."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1, a.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Token shift and mixes
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(**_JIT)
def _shift_mix_forward_kernel(x, x_prev, mix, one_minus_mix, xx, out):
    """x (B, T, C), x_prev (B, C), mix and 1 - mix (n, C) -> xx (B, T, C), out (n, B, T, C)."""
    B, T, C = x.shape
    for row in prange(B * T):
        b, t = row // T, row % T
        x_t, xx_t = x[b, t], xx[b, t]
        prev = x[b, t - 1] if t > 0 else x_prev[b]  # xx[:, t] = x[:, t-1], xx[:, 0] = x_prev
        for c in range(C):
            xx_t[c] = prev[c]
        for j in range(mix.shape[0]):
            m_t, mix_j, one_minus_j = out[j, b, t], mix[j], one_minus_mix[j]
            for c in range(C):
                m_t[c] = x_t[c] * mix_j[c] + xx_t[c] * one_minus_j[c]


def token_shift_mix_forward(x, x_prev, mixes):
    """ops.token_shift_mix_forward in one pass: xx = shift(x) and every m_j = x mu_j + xx (1 - mu_j)."""
    x = np.ascontiguousarray(x)
    B, T, C = x.shape
    x_prev = np.zeros((B, C), x.dtype) if x_prev is None else np.ascontiguousarray(x_prev, dtype=x.dtype)
    mix = np.ascontiguousarray(np.stack([m.reshape(C) for m in mixes]), dtype=x.dtype)  # (n, C)
    xx = np.empty_like(x)  # (B, T, C)
    out = np.empty((len(mixes), B, T, C), x.dtype)  # (n, B, T, C)
    _shift_mix_forward_kernel(x, x_prev, mix, 1 - mix, xx, out)
    return tuple(out), tuple(ops.MixCache(x, xx, m) for m in mixes)


@numba.njit(**_JIT)
def _shift_mix_backward_kernel(dm, x, xx, mix, one_minus_mix, zero, dx, dmix_partial):
    """dm a tuple of n (B, T, C) -> dx (B, T, C); dmix_partial (chunks, n, C) per chunk of rows.

    dx[t] = sum_j dm_j[t] mu_j + sum_j dm_j[t+1] (1 - mu_j)  (x[t] feeds m[t] directly and m[t+1] through the shift)
    dmu_j = sum_{b,t} dm_j (x - xx)
    """
    B, T, C = x.shape
    n = len(dm)
    N = B * T
    for chunk in prange(dmix_partial.shape[0]):
        acc = dmix_partial[chunk]  # (n, C), zeros on entry
        for row in range(chunk * ROWS_PER_CHUNK, min(N, (chunk + 1) * ROWS_PER_CHUNK)):
            b, t = row // T, row % T
            x_t, xx_t, dx_t = x[b, t], xx[b, t], dx[b, t]
            for c in range(C):
                dx_t[c] = zero
            for j in range(n):
                dm_t, mix_j, acc_j = dm[j][b, t], mix[j], acc[j]
                for c in range(C):
                    dx_t[c] += dm_t[c] * mix_j[c]
                    acc_j[c] += dm_t[c] * (x_t[c] - xx_t[c])
                if t + 1 < T:  # the last token feeds no shift
                    dm_next, one_minus_j = dm[j][b, t + 1], one_minus_mix[j]
                    for c in range(C):
                        dx_t[c] += dm_next[c] * one_minus_j[c]


def token_shift_mix_backward(dms, caches):
    """ops.token_shift_mix_backward in one pass. -> dx (B, T, C), a tuple of dmix_j (1, 1, C)."""
    x, xx = caches[0].x, caches[0].xx
    B, T, C = x.shape
    mix = np.ascontiguousarray(np.stack([c.mix.reshape(C) for c in caches]), dtype=x.dtype)  # (n, C)
    dm = tuple(np.ascontiguousarray(d, dtype=x.dtype) for d in dms)  # n (B, T, C) arrays, not copied
    dx = np.empty_like(x)  # (B, T, C)
    partial = np.zeros(((B * T + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK, len(dms), C), x.dtype)  # (chunks, n, C)
    _shift_mix_backward_kernel(dm, np.ascontiguousarray(x), np.ascontiguousarray(xx), mix, 1 - mix, x.dtype.type(0),
                               dx, partial)
    dmix = partial.sum(axis=0)  # (n, C)
    return dx, tuple(d.reshape(1, 1, C) for d in dmix)


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(**_JIT)
def _layernorm_forward_kernel(x, weight, bias, eps, y, xhat, rstd):
    """Per row: mean, biased variance (two passes, float64 sums), xhat = (x - mean) rstd, y = xhat w + b."""
    N, C = x.shape
    for i in prange(N):
        x_i, y_i, xhat_i = x[i], y[i], xhat[i]
        s = 0.0  # float64 accumulator
        for c in range(C):
            s += x_i[c]
        mean = s / C
        s = 0.0
        for c in range(C):
            s += (x_i[c] - mean) ** 2
        rstd[i, 0] = 1.0 / np.sqrt(s / C + eps)  # stored in x's dtype
        r = rstd[i, 0]
        for c in range(C):
            xhat_i[c] = (x_i[c] - mean) * r
            y_i[c] = xhat_i[c] * weight[c] + bias[c]


def layernorm_forward(x, weight, bias, eps=ops.LN_EPS):
    """ops.layernorm_forward, one pass per row."""
    x2 = _rows(x)
    y, xhat = np.empty_like(x2), np.empty_like(x2)  # (N, C)
    rstd = np.empty((x2.shape[0], 1), x2.dtype)  # (N, 1)
    _layernorm_forward_kernel(x2, weight.astype(x2.dtype, copy=False), bias.astype(x2.dtype, copy=False), float(eps),
                              y, xhat, rstd)
    lead = x.shape[:-1]
    return y.reshape(x.shape), ops.LayerNormCache(xhat.reshape(x.shape), rstd.reshape(*lead, 1), weight)


@numba.njit(**_JIT)
def _layernorm_backward_kernel(dy, xhat, rstd, weight, dx, dw_partial, db_partial):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w; dweight, dbias partial sums per chunk (float64)."""
    N, C = dy.shape
    for chunk in prange(dw_partial.shape[0]):
        dw, db = dw_partial[chunk], db_partial[chunk]
        for i in range(chunk * ROWS_PER_CHUNK, min(N, (chunk + 1) * ROWS_PER_CHUNK)):
            dy_i, xhat_i, dx_i = dy[i], xhat[i], dx[i]
            s_g = 0.0
            s_gx = 0.0
            for c in range(C):
                g = dy_i[c] * weight[c]
                s_g += g
                s_gx += g * xhat_i[c]
                dw[c] += dy_i[c] * xhat_i[c]
                db[c] += dy_i[c]
            mean_g, mean_gx = s_g / C, s_gx / C
            r = rstd[i, 0]
            for c in range(C):
                dx_i[c] = r * (dy_i[c] * weight[c] - mean_g - xhat_i[c] * mean_gx)


def layernorm_backward(dy, cache):
    """ops.layernorm_backward, one pass per row. -> dx, dweight (C,), dbias (C,)."""
    xhat, rstd, weight = cache
    dy2, xhat2 = _rows(dy), _rows(xhat)
    N, C = dy2.shape
    dx = np.empty_like(dy2)  # (N, C)
    chunks = (N + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    dw, db = np.zeros((chunks, C)), np.zeros((chunks, C))  # float64 partial sums
    _layernorm_backward_kernel(dy2, xhat2, rstd.reshape(N, 1), weight.astype(dy2.dtype, copy=False), dx, dw, db)
    return dx.reshape(dy.shape), dw.sum(axis=0).astype(dy2.dtype), db.sum(axis=0).astype(dy2.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Gate and relu^2
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(**_JIT)
def _gate_forward_kernel(r, y, out, sr):
    """sr = sigmoid(r) (fastexp.sigmoid: nothing overflows), out = sr y."""
    N, C = r.shape
    for i in prange(N):
        r_i, y_i, out_i, sr_i = r[i], y[i], out[i], sr[i]
        for c in range(C):
            sr_i[c] = sigmoid(r_i[c])
            out_i[c] = sr_i[c] * y_i[c]


def gate_forward(r, y):
    """ops.gate_forward: out = sigmoid(r) * y, one pass."""
    r2, y2 = _rows(r), _rows(y)
    out, sr = np.empty_like(r2), np.empty_like(r2)
    _gate_forward_kernel(r2, y2, out, sr)
    return out.reshape(r.shape), ops.GateCache(sr.reshape(r.shape), y)


@numba.njit(**_JIT)
def _gate_backward_kernel(dout, sr, y, one, dr, dy):
    N, C = dout.shape
    for i in prange(N):
        dout_i, sr_i, y_i, dr_i, dy_i = dout[i], sr[i], y[i], dr[i], dy[i]
        for c in range(C):
            dr_i[c] = dout_i[c] * y_i[c] * sr_i[c] * (one - sr_i[c])  # sigmoid' = sigmoid (1 - sigmoid)
            dy_i[c] = dout_i[c] * sr_i[c]


def gate_backward(dout, cache):
    """ops.gate_backward, one pass. -> dr, dy."""
    sr, y = cache
    d2 = _rows(dout)
    dr, dy = np.empty_like(d2), np.empty_like(d2)
    _gate_backward_kernel(d2, _rows(sr), _rows(y), d2.dtype.type(1), dr, dy)
    return dr.reshape(dout.shape), dy.reshape(dout.shape)


@numba.njit(**_JIT)
def _relu_square_forward_kernel(x, zero, h):
    N, C = x.shape
    for i in prange(N):
        x_i, h_i = x[i], h[i]
        for c in range(C):
            a = max(x_i[c], zero)
            h_i[c] = a * a


def relu_square_forward(x):
    """ops.relu_square_forward: h = relu(x)^2. Cache: x."""
    x2 = _rows(x)
    h = np.empty_like(x2)
    _relu_square_forward_kernel(x2, x2.dtype.type(0), h)
    return h.reshape(x.shape), x


@numba.njit(**_JIT)
def _relu_square_backward_kernel(dh, x, zero, dx):
    N, C = x.shape
    for i in prange(N):
        dh_i, x_i, dx_i = dh[i], x[i], dx[i]
        for c in range(C):
            a = max(x_i[c], zero)
            dx_i[c] = (a + a) * dh_i[c]  # 2 relu(x) dh (a + a is 2a exactly)


def relu_square_backward(dh, x):
    """ops.relu_square_backward: dx = 2 relu(x) dh."""
    x2 = _rows(x)
    dx = np.empty_like(x2)
    _relu_square_backward_kernel(_rows(dh), x2, x2.dtype.type(0), dx)
    return dx.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------------
# Embedding backward
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _embedding_backward_kernel(rows, grads, dweight):
    """dweight[rows[i]] += grads[i] in order (sequential: two rows may hit the same token)."""
    N, C = grads.shape
    for i in range(N):
        d, g = dweight[rows[i]], grads[i]
        for c in range(C):
            d[c] += g[c]


def embedding_backward(dx, cache):
    """ops.embedding_backward: scatter-add of dx rows into dweight (V, C)."""
    g = _rows(dx)
    dweight = np.zeros((cache.vocab_size, g.shape[1]), dtype=g.dtype)  # (V, C)
    _embedding_backward_kernel(np.ascontiguousarray(cache.idx).reshape(-1).astype(np.int64), g, dweight)
    return dweight


# ---------------------------------------------------------------------------------------------------------------
# AdamW (for the optimizer; not an op of the model)
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True, fastmath=False, error_model="numpy")  # no FMA: bit-identical to optim.py
def _adamw_kernel(param, grad, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size):
    for i in prange(param.size):
        g = grad[i]
        p = param[i] * decay  # decoupled weight decay first, as torch does
        m[i] = m[i] * beta1 + g * one_minus_beta1
        v[i] = v[i] * beta2 + (g * g) * one_minus_beta2
        param[i] = p - step_size * (m[i] / (np.sqrt(v[i]) / sqrt_bc2 + eps))


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """One AdamW step (Loshchilov and Hutter; the form and order of torch.optim.AdamW), in place, in one pass:

        p <- p (1 - lr wd);   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)

    bias_correction1 = bc1 = 1 - beta1^t and bias_correction2 = bc2 = 1 - beta2^t come from the caller (which owns
    the step count t); pass weight_decay = 0 for parameters that do not decay. The scalar factors are formed in
    float64 and rounded once to the arrays' dtype, as ``minirwkv.optim.adamw_step`` does, so the two agree to the
    last bit. param, grad, m, v: C-contiguous NumPy arrays of one shape and dtype; param, m, v are overwritten.
    """
    arrays = (param, grad, m, v)
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
        raise ValueError("adamw_update needs C-contiguous NumPy arrays for param, grad, m and v "
                         "(np.ascontiguousarray them once, when the optimizer state is created)")
    if len({a.shape for a in arrays}) != 1 or len({a.dtype for a in arrays}) != 1:
        raise ValueError(f"param, grad, m, v must share one shape and dtype; got "
                         f"{[(a.shape, str(a.dtype)) for a in arrays]}")
    f = param.dtype.type
    _adamw_kernel(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), f(1 - lr * weight_decay),
                  f(beta1), f(1 - beta1), f(beta2), f(1 - beta2), f(np.sqrt(bias_correction2)), f(eps),
                  f(lr / bias_correction1))
