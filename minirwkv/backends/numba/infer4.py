r"""The element-wise work of RWKV-4 inference, fused into a few Numba loops (used by ``minirwkv.infer``).

Between two matrix products a layer does only element-wise work on B·T·C numbers: a layernorm, the token-shift
mixes, the WKV recurrence, the sigmoid gates, relu². In NumPy each of these is several array operations, each a
Python call and a pass over memory; here each group between two matrix products is one compiled loop that reads
its inputs once and writes its outputs once. The matrix products stay in NumPy's BLAS (``infer.py``).

Every kernel works on (B, T, C) blocks of T consecutive tokens: T = 1 is one RNN step, T > 1 a chunk of a prompt.
The token shift inside a block reads the previous token of the block, and for t = 0 the ``prev`` (B, C) carried in
the state (docs/rwkv4.md §4); the kernels update the state in place (prev, aa, bb, pp) to the block's last token.

    time_mix_inputs      LN_ln1, the shift and the three mixes of TimeMix       (x -> xk, xv, xr; att_x updated)
    wkv_gate             the WKV recurrence of ``wkv.wkv_step`` and sigmoid(r) * wkv  (aa, bb, pp updated)
    channel_mix_inputs   the TimeMix residual add, LN_ln2, shift, two mixes    (x += att; -> xk, xr; ffn_x updated)
    relu_square          relu(k)^2 in place
    gate_residual        the ChannelMix residual add: x += sigmoid(r) * kv
    layernorm_rows       LN_ln_out (and the ln0 fold of infer.py does not need it: it uses ops.layernorm_forward)

SIMD: every inner loop runs over the channels of one token through 1-D views, contains no call and no branch, and
so vectorises (the rules of numba_wkv.py): exp comes from ``fastexp`` (``exp_shifted_pair`` in the WKV, one exp per
pair; ``fastexp.sigmoid``), not libm; ``error_model="numpy"`` removes the division's exception
branch; ``fastmath={"contract"}`` allows fused multiply-adds and nothing else, except in the layernorm's two sums
(``_mean_rstd``). Measured on (1, 256, 768), one core: wkv_gate 3.9 ms with libm exps and 3-D indexing, 0.5 ms
now; a layernorm of 256 rows 0.54 ms with sums in program order, 0.11 ms with ``reassoc``. That made the prefill
of the 169M-shaped model about 1.3x faster (docs/inference.md).

Precision: means and variances of the layernorm are accumulated in float64; constants reach the kernels as
scalars of the arrays' dtype (``zero``, ``one``: a float literal would be float64 and promote float32 work), and
results are stored in the arrays' dtype.

Threads: none. The loops are serial; a prompt chunk's element-wise work is now ~6% of its time (one BLAS thread),
and on the shared 2-core development machine ``prange`` versions (workqueue) were slower at every size tried:
relu² of (256, 3072) 0.66 -> 0.95 ms, time_mix_inputs of (1, 256, 768) 0.35 -> 0.65 ms, and a T = 1 call
took 0.05-0.2 ms instead of 3-14 us (waking the pool).
Compilation is lazy (first call) and cached on disk; importing this module compiles nothing.
"""
from __future__ import annotations

import numba
import numpy as np

from .fastexp import exp_shifted_pair, sigmoid

LN_EPS = 1e-5  # as ops.LN_EPS (PyTorch's nn.LayerNorm default); a float64 constant: the statistics are float64
_JIT = dict(cache=True, error_model="numpy", fastmath={"contract"})  # see the module docstring
_JIT_INLINE = dict(_JIT, inline="always")


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _mean_rstd(x):
    """(mean, 1 / sqrt(var + eps)) of one (C,) row, summed in float64.

    The one place with ``reassoc``: it lets LLVM split each sum into SIMD lanes (a sum in program order is one
    chain of dependent adds, 5x slower for C = 768). Float64 sums of float32 or float64 values in another order
    differ by ~C ulp of float64, far below what the result is rounded to. Not inlined into the callers' IR (no
    ``inline="always"``), so the licence stays on these two loops; LLVM still inlines the call.
    """
    C = x.shape[0]
    mean = 0.0
    for c in range(C):
        mean += x[c]
    mean /= C
    var = 0.0
    for c in range(C):
        d = x[c] - mean
        var += d * d
    return mean, 1.0 / np.sqrt(var / C + LN_EPS)


@numba.njit(**_JIT_INLINE)
def _layernorm(x, weight, bias, out):
    """out = (x - mean) / sqrt(var + eps) * weight + bias for one (C,) row (ops.layernorm_forward)."""
    mean, rstd = _mean_rstd(x)
    for c in range(x.shape[0]):
        out[c] = (x[c] - mean) * rstd * weight[c] + bias[c]


@numba.njit(**_JIT_INLINE)
def _mix(z, xx, mix, one, out):
    """out = z * mix + xx * (1 - mix), all (C,): one token's mix of itself and the previous token (the shift)."""
    for c in range(z.shape[0]):
        out[c] = z[c] * mix[c] + xx[c] * (one - mix[c])


@numba.njit(**_JIT)
def layernorm_rows(x, weight, bias, out):
    """LayerNorm of every row of x (N, C) into out (N, C)."""
    for n in range(x.shape[0]):
        _layernorm(x[n], weight, bias, out[n])


@numba.njit(**_JIT)
def time_mix_inputs(x, ln_w, ln_b, prev, mix_k, mix_v, mix_r, one, z, xk, xv, xr):
    """z = LN_ln1(x); xx = shift(z) starting from prev; xk/xv/xr = z * mix + xx * (1 - mix); prev <- z[:, -1].

    x, z, xk, xv, xr (B, T, C); prev (B, C) updated; ln_w, ln_b, mix_* (C,); one a scalar of x's dtype. z is
    scratch (kept for the shift).
    """
    B, T, C = x.shape
    for b in range(B):
        for t in range(T):
            z_t = z[b, t]
            _layernorm(x[b, t], ln_w, ln_b, z_t)
            xx = z[b, t - 1] if t > 0 else prev[b]
            _mix(z_t, xx, mix_k, one, xk[b, t])
            _mix(z_t, xx, mix_v, one, xv[b, t])
            _mix(z_t, xx, mix_r, one, xr[b, t])
        prev[b] = z[b, T - 1]


@numba.njit(**_JIT)
def wkv_gate(w, u, k, v, r, aa, bb, pp, g):
    """g = sigmoid(r) * WKV(w, u, k, v): ``wkv.wkv_step`` for each token in turn, the state (aa, bb, pp) (B, C)
    updated in place. w = -exp(time_decay), u = time_first (C,); k, v, r, g (B, T, C). The loop of numba_wkv's forward kernel (the official kernel_forward), same variable names: per token a
    SIMD loop over the channels (1-D views, no call: fastexp), one exp per shifted pair (``exp_shifted_pair``: the
    larger of the two log-weights gives e^0 = 1 exactly).
    """
    B, T, C = k.shape
    for b in range(B):
        aa_b, bb_b, pp_b = aa[b], bb[b], pp[b]  # (C,) views
        for t in range(T):
            k_t, v_t, r_t, g_t = k[b, t], v[b, t], r[b, t], g[b, t]  # (C,) views of this token
            for c in range(C):
                ww = u[c] + k_t[c]  # log-weight of the current token in the output
                e1, e2, q = exp_shifted_pair(pp_b[c], ww)  # e1 = e^(pp - q) the past, e2 = e^(ww - q) the current
                y = (e1 * aa_b[c] + e2 * v_t[c]) / (e1 * bb_b[c] + e2)
                g_t[c] = sigmoid(r_t[c]) * y
                ww = pp_b[c] + w[c]  # the past decays once
                e1, e2, q = exp_shifted_pair(ww, k_t[c])
                aa_b[c] = e1 * aa_b[c] + e2 * v_t[c]
                bb_b[c] = e1 * bb_b[c] + e2
                pp_b[c] = q


@numba.njit(**_JIT)
def channel_mix_inputs(x, att, ln_w, ln_b, prev, mix_k, mix_r, one, z, xk, xr):
    """x += att (the TimeMix residual); z = LN_ln2(x); xk/xr mixes of z and its shift from prev; prev <- z[:, -1]."""
    B, T, C = x.shape
    for b in range(B):
        for t in range(T):
            x_t, att_t, z_t = x[b, t], att[b, t], z[b, t]
            for c in range(C):
                x_t[c] += att_t[c]
            _layernorm(x_t, ln_w, ln_b, z_t)
            xx = z[b, t - 1] if t > 0 else prev[b]
            _mix(z_t, xx, mix_k, one, xk[b, t])
            _mix(z_t, xx, mix_r, one, xr[b, t])
        prev[b] = z[b, T - 1]


@numba.njit(**_JIT)
def relu_square(k, zero):
    """k <- relu(k)^2 in place, k (N, F) (Primer's activation in ChannelMix); zero a scalar of k's dtype."""
    for n in range(k.shape[0]):
        k_n = k[n]
        for f in range(k.shape[1]):
            h = max(k_n[f], zero)
            k_n[f] = h * h


@numba.njit(**_JIT)
def gate_residual(x, r, kv):
    """x += sigmoid(r) * kv: the ChannelMix output added to the residual stream. All (N, C)."""
    for n in range(x.shape[0]):
        x_n, r_n, kv_n = x[n], r[n], kv[n]
        for c in range(x.shape[1]):
            x_n[c] += sigmoid(r_n[c]) * kv_n[c]
