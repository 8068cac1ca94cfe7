r"""The element-wise work of RWKV-4 inference, fused into a few Numba loops (used by ``minirwkv.infer``).

Between two matrix products a layer does only element-wise work on B·T·C numbers: a layernorm, the token-shift
mixes, the WKV recurrence, the sigmoid gates, relu². In NumPy each of these is several array operations, each a
Python call and a pass over memory; here each group between two matrix products is one compiled loop that reads
its inputs once and writes its outputs once. The matrix products stay in NumPy's BLAS (``infer.py``).

Every kernel works on (B, T, C) blocks of T consecutive tokens: T = 1 is one RNN step, T > 1 a chunk of a prompt.
The token shift inside a block reads the previous token of the block, and for t = 0 the ``prev`` (B, C) carried in
the state (rwkv4-math section 4); the kernels update the state in place (prev, aa, bb, pp) to the block's last token.

    time_mix_inputs      LN_ln1, the shift and the three mixes of TimeMix       (x -> xk, xv, xr; att_x updated)
    wkv_gate             the WKV recurrence of ``wkv.wkv_step`` and sigmoid(r) * wkv  (aa, bb, pp updated)
    channel_mix_inputs   the TimeMix residual add, LN_ln2, shift, two mixes    (x += att; -> xk, xr; ffn_x updated)
    relu_square          relu(k)^2 in place
    gate_residual        the ChannelMix residual add: x += sigmoid(r) * kv
    layernorm_rows       LN_ln_out (and the ln0 fold of infer.py does not need it: it uses ops.layernorm_forward)

Precision: means and variances of the layernorm are accumulated in float64 and element-wise results are stored in
the arrays' dtype. The loops are serial: at batch 1 a layer has C (768 for the 169M model) values per kernel, far
too few to pay for waking a thread pool; the time goes to the matrix products.
Compilation is lazy (first call) and cached on disk; importing this module compiles nothing.
"""
from __future__ import annotations

import numba
import numpy as np

LN_EPS = 1e-5  # as ops.LN_EPS (PyTorch's nn.LayerNorm default); a float64 constant: the statistics are float64


@numba.njit(cache=True, error_model="numpy", inline="always")
def _layernorm(x, weight, bias, out):
    """out = (x - mean) / sqrt(var + eps) * weight + bias for one (C,) row (ops.layernorm_forward)."""
    C = x.shape[0]
    mean = 0.0
    for c in range(C):
        mean += x[c]
    mean /= C
    var = 0.0
    for c in range(C):
        d = x[c] - mean
        var += d * d
    rstd = 1.0 / np.sqrt(var / C + LN_EPS)
    for c in range(C):
        out[c] = (x[c] - mean) * rstd * weight[c] + bias[c]


@numba.njit(cache=True, error_model="numpy")
def layernorm_rows(x, weight, bias, out):
    """LayerNorm of every row of x (N, C) into out (N, C)."""
    for n in range(x.shape[0]):
        _layernorm(x[n], weight, bias, out[n])


@numba.njit(cache=True, error_model="numpy")
def time_mix_inputs(x, ln_w, ln_b, prev, mix_k, mix_v, mix_r, z, xk, xv, xr):
    """z = LN_ln1(x); xx = shift(z) starting from prev; xk/xv/xr = z * mix + xx * (1 - mix); prev <- z[:, -1].

    x, z, xk, xv, xr (B, T, C); prev (B, C) updated; ln_w, ln_b, mix_* (C,). z is scratch (kept for the shift).
    """
    B, T, C = x.shape
    for b in range(B):
        for t in range(T):
            _layernorm(x[b, t], ln_w, ln_b, z[b, t])
            xx = z[b, t - 1] if t > 0 else prev[b]
            for c in range(C):
                xk[b, t, c] = z[b, t, c] * mix_k[c] + xx[c] * (1 - mix_k[c])
                xv[b, t, c] = z[b, t, c] * mix_v[c] + xx[c] * (1 - mix_v[c])
                xr[b, t, c] = z[b, t, c] * mix_r[c] + xx[c] * (1 - mix_r[c])
        prev[b] = z[b, T - 1]


@numba.njit(cache=True, error_model="numpy", inline="always")
def _scaled_exps(a, b):
    """(e^(a-q), e^(b-q)) with q = max(a, b), as wkv_step computes them. One of the two is e^0 = 1 exactly, so
    only the other needs an exp: half the exps of the literal transcription, bit for bit the same values."""
    if a >= b:
        return a - a + 1, np.exp(b - a)  # a - a + 1: a 1 of a's type (a float literal would be float64)
    return np.exp(a - b), b - b + 1


@numba.njit(cache=True, error_model="numpy")
def wkv_gate(w, u, k, v, r, aa, bb, pp, g):
    """g = sigmoid(r) * WKV(w, u, k, v): ``wkv.wkv_step`` for each token in turn, the state (aa, bb, pp) (B, C)
    updated in place. w = -exp(time_decay), u = time_first (C,); k, v, r, g (B, T, C).
    Same variable names as wkv_step and the official kernel_forward; the running max q that keeps every exp
    argument <= 0 is inside ``_scaled_exps``.
    """
    B, T, C = k.shape
    for b in range(B):
        for t in range(T):
            for c in range(C):
                ww = u[c] + k[b, t, c]  # log-weight of the current token in the output
                e1, e2 = _scaled_exps(pp[b, c], ww)
                y = (e1 * aa[b, c] + e2 * v[b, t, c]) / (e1 * bb[b, c] + e2)
                g[b, t, c] = y / (1 + np.exp(-r[b, t, c]))  # sigmoid(r) * y; exp(-r) = inf gives 0, no NaN
                ww = pp[b, c] + w[c]  # the past decays once
                e1, e2 = _scaled_exps(ww, k[b, t, c])
                aa[b, c] = e1 * aa[b, c] + e2 * v[b, t, c]
                bb[b, c] = e1 * bb[b, c] + e2
                pp[b, c] = max(ww, k[b, t, c])


@numba.njit(cache=True, error_model="numpy")
def channel_mix_inputs(x, att, ln_w, ln_b, prev, mix_k, mix_r, z, xk, xr):
    """x += att (the TimeMix residual); z = LN_ln2(x); xk/xr mixes of z and its shift from prev; prev <- z[:, -1]."""
    B, T, C = x.shape
    for b in range(B):
        for t in range(T):
            for c in range(C):
                x[b, t, c] += att[b, t, c]
            _layernorm(x[b, t], ln_w, ln_b, z[b, t])
            xx = z[b, t - 1] if t > 0 else prev[b]
            for c in range(C):
                xk[b, t, c] = z[b, t, c] * mix_k[c] + xx[c] * (1 - mix_k[c])
                xr[b, t, c] = z[b, t, c] * mix_r[c] + xx[c] * (1 - mix_r[c])
        prev[b] = z[b, T - 1]


@numba.njit(cache=True, error_model="numpy")
def relu_square(k):
    """k <- relu(k)^2 in place, k (N, F) (Primer's activation in ChannelMix)."""
    for n in range(k.shape[0]):
        for f in range(k.shape[1]):
            h = max(k[n, f], 0)
            k[n, f] = h * h


@numba.njit(cache=True, error_model="numpy")
def gate_residual(x, r, kv):
    """x += sigmoid(r) * kv: the ChannelMix output added to the residual stream. All (N, C)."""
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[n, c] += kv[n, c] / (1 + np.exp(-r[n, c]))
