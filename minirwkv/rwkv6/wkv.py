r"""The matrix-valued WKV of RWKV-6 (and RWKV-5.2), written twice and independently: a recurrent reference and a
chunked parallel form, each with its own hand-written backward.

Paper: "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (arXiv 2404.05892); official code:
the ``WKV_6`` autograd function of BlinkDL/RWKV-LM ``RWKV-v5/src/model.py`` and its kernel ``cuda/wkv6_cuda.cu``
(RWKV-5.2: ``WKV_5``, ``cuda/wkv5_cuda.cu``). Derivations: docs/rwkv6.md.

Per batch element b and head h, with column vectors r_t, k_t, v_t, y_t in R^N, the state S in R^{N x N} indexed
``S[i, j]`` (row i = key channel, column j = value channel), S_{-1} the initial state and, for t = 0..T-1
(docs/rwkv6.md §2):

    y_t = S_{t-1}^T r_t + <r_t, u * k_t> v_t          read the state BEFORE token t, plus the bonus u for token t
    S_t = diag(w_t) S_{t-1} + k_t v_t^T                then decay the rows (key channels) and write token t

The decay argument. Every function here takes ``w``, the raw per-token decay ``w_hat`` exactly as the official
RWKV-6 kernel takes it: the log-decay is ``lambda = -exp(w)`` (< 0) and the decay factor is ``exp(lambda) =
exp(-exp(w))``, in (0, 1). Returned gradients ``dw`` are gradients with respect to this raw ``w``. RWKV-5.2 is the
case where ``w[b, t, h, :] = time_decay[h, :]`` for every t (sum ``dw`` over b and t for d time_decay); RWKV-6
feeds ``time_decay + LoRA(x)``. ``u`` is ``time_faaaa``, used raw (it may be negative).

Shapes: r, k, v, w, y (B, T, H, N); u (H, N); state (B, H, N, N) in ``[b, h, key, value]`` order.

Recurrent form: ``wkv6_step`` is one token (RNN mode reuses it); ``wkv6_recurrent_forward`` steps through time; its
backward is the adjoint recurrence (docs/rwkv6.md §5), the forward read upwards.

Chunked form (docs/rwkv6.md §4): the sequence is cut into chunks of ``chunk`` tokens (the last may be shorter); a
chunk reads the incoming state with one matrix product, mixes its own tokens with a decayed (L, L) attention
matrix and one more matrix product, and writes the outgoing state with a third. Every decay it applies is
``exp`` of a sum of log-decays over an interval of tokens, computed as that sum, never as a difference or a
quotient of cumulative decays: all exponents are <= 0, nothing overflows for any decay, and no precision is lost
to cancellation. Its backward (docs/rwkv6.md §6) differentiates those chunk formulas directly.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backends import WKVBackend
from ..devices import array_module as _xp

DEFAULT_CHUNK = 32  # tokens per chunk: the (B, H, L, L, N) pair-decay tensor grows as L^2, the number of chunks as 1/L


class WKV6Grads(NamedTuple):
    """Gradients of a loss L(y, S_out) with respect to every input of the WKV."""

    dr: np.ndarray  # (B, T, H, N)
    dk: np.ndarray  # (B, T, H, N)
    dv: np.ndarray  # (B, T, H, N)
    dw: np.ndarray  # (B, T, H, N) with respect to the raw decay w (lambda = -exp(w))
    du: np.ndarray  # (H, N) summed over batch and time
    dstate: np.ndarray  # (B, H, N, N) with respect to the initial state S_{-1}


def log_decay(w):
    """lambda = -exp(w), the log of the decay factor, computed directly (never as log(exp(-exp(w))), which rounds
    to log(1) = 0 near 1 and to log(0) = -inf near 0). Raises if exp(w) overflows (w above ~88.7 in float32, ~709
    in float64): lambda = -inf would make the chain-rule factor of dw inf * 0 = NaN (docs/rwkv6.md §4.3)."""
    xp = _xp(w)
    lam = -xp.exp(w)  # same shape as w
    if not bool(xp.isfinite(lam).all()):
        raise ValueError("the raw decay w is so large that exp(w) overflows; the log-decay -exp(w) must be finite")
    return lam


def zero_state(batch_size: int, heads: int, head_size: int, dtype, xp=np):
    """S_{-1} = 0: the state before the first token in training."""
    return xp.zeros((batch_size, heads, head_size, head_size), dtype=dtype)  # (B, H, N, N)


# ---------------------------------------------------------------------------------------------------------------
# Recurrent form (docs/rwkv6.md §2, §5)
# ---------------------------------------------------------------------------------------------------------------

def wkv6_step(r, k, v, w, u, S):
    """One token: returns (y, S_new). r, k, v, w, y (B, H, N); u (H, N); S, S_new (B, H, N, N).

        y[j]      = sum_i r[i] (S[i, j] + u[i] k[i] v[j])      the output reads the state before this token
        S_new[i,j] = exp(-exp(w[i])) S[i, j] + k[i] v[j]        then the state decays per key row and takes k v^T
    """
    xp = _xp(r)
    decay = xp.exp(log_decay(w))  # (B, H, N) factors in (0, 1); exactly 0 once they underflow, the right limit
    bonus = (r * u * k).sum(axis=-1, keepdims=True)  # (B, H, 1) <r, u * k>
    y = xp.einsum("bhi,bhij->bhj", r, S) + bonus * v  # (B, H, N)
    S_new = decay[..., :, None] * S + k[..., :, None] * v[..., None, :]  # (B, H, N, N)
    return y, S_new


def wkv6_recurrent_forward(r, k, v, w, u, state=None):
    """y (B, T, H, N) and the state after the last token (B, H, N, N), stepping with ``wkv6_step``.

    ``state`` (B, H, N, N) is S_{-1}, default 0. docs/rwkv6.md §2.
    """
    xp = _xp(r)
    B, T, H, N = r.shape
    S = zero_state(B, H, N, r.dtype, xp) if state is None else state  # (B, H, N, N)
    y = xp.empty_like(r)  # (B, T, H, N)
    for t in range(T):
        y[:, t], S = wkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u, S)
    return y, S


def wkv6_recurrent_backward(r, k, v, w, u, dy, state=None, dstate=None) -> WKV6Grads:
    """Gradients of the recurrent form by the adjoint recurrence (docs/rwkv6.md §5).

    dy (B, T, H, N) = dL/dy; dstate (B, H, N, N) = dL/dS_{T-1} (default 0). With G_t = dL/dS_t, G_{T-1} = dstate,
    for t = T-1 .. 0 (the forward lines read upwards):

        dr_t    = (S_{t-1} + diag(u) k_t v_t^T) dy_t              from y_t = S_{t-1}^T r_t + <r_t, u k_t> v_t
        Ghat_t  = G_t + diag(u) r_t dy_t^T                        dL/d(k_t v_t^T): through S_t and through the bonus
        dk_t    = Ghat_t v_t,   dv_t = Ghat_t^T k_t
        du     += r_t * k_t <v_t, dy_t>
        dw_t    = lambda_t * w_t * rowsum(G_t * S_{t-1})          from S_t = diag(w_t) S_{t-1}; dw/dw_hat = lambda w
        G_{t-1} = r_t dy_t^T + diag(w_t) G_t                      S_{t-1} feeds y_t and S_t
        dstate  = G_{-1}

    The forward states S_{t-1} are recomputed and stored (B, T, H, N, N): a reference, not a kernel.
    """
    xp = _xp(r)
    B, T, H, N = r.shape
    lam = log_decay(w)  # (B, T, H, N)
    decay = xp.exp(lam)  # (B, T, H, N)
    S = zero_state(B, H, N, r.dtype, xp) if state is None else state  # (B, H, N, N)
    S_prev = xp.empty((B, T, H, N, N), dtype=xp.result_type(r, S))  # (B, T, H, N, N) S_{t-1} for every t
    for t in range(T):
        S_prev[:, t] = S
        S = decay[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, N, N)

    G = xp.zeros_like(S) if dstate is None else dstate  # (B, H, N, N) dL/dS_t, starting at t = T-1
    dr = xp.empty_like(r)  # (B, T, H, N)
    dk = xp.empty_like(k)  # (B, T, H, N)
    dv = xp.empty_like(v)  # (B, T, H, N)
    dw = xp.empty_like(r)  # (B, T, H, N)
    du = xp.zeros(u.shape, dtype=r.dtype)  # (H, N)
    for t in range(T - 1, -1, -1):
        rt, kt, vt, dyt, St = r[:, t], k[:, t], v[:, t], dy[:, t], S_prev[:, t]
        vdy = (vt * dyt).sum(axis=-1, keepdims=True)  # (B, H, 1) <v_t, dy_t>
        # y_t = S_{t-1}^T r_t + <r_t, u * k_t> v_t
        dr[:, t] = xp.einsum("bhij,bhj->bhi", St, dyt) + u * kt * vdy  # (B, H, N)
        Ghat = G + (u * rt)[..., :, None] * dyt[..., None, :]  # (B, H, N, N)
        # S_t = diag(w_t) S_{t-1} + k_t v_t^T  (and the bonus's k_t v_t^T)
        dk[:, t] = xp.einsum("bhij,bhj->bhi", Ghat, vt)  # (B, H, N)
        dv[:, t] = xp.einsum("bhij,bhi->bhj", Ghat, kt)  # (B, H, N)
        du += (rt * kt * vdy).sum(axis=0)  # (H, N)
        dw[:, t] = lam[:, t] * decay[:, t] * (G * St).sum(axis=-1)  # (B, H, N); d exp(-exp(w))/dw = lambda * decay
        G = rt[..., :, None] * dyt[..., None, :] + decay[:, t, :, :, None] * G  # (B, H, N, N) G_{t-1}
    return WKV6Grads(dr, dk, dv, dw, du, G)


# ---------------------------------------------------------------------------------------------------------------
# Chunked parallel form (docs/rwkv6.md §4, §6)
# ---------------------------------------------------------------------------------------------------------------

def _cumsum_exclusive(x, axis):
    """out[..., n, ...] = sum_{m < n} x[..., m, ...] along ``axis`` (a plain sum: every term has the same sign)."""
    xp = _xp(x)
    c = xp.cumsum(x, axis=axis)  # same shape as x
    out = xp.zeros_like(x)  # same shape as x
    dst = [slice(None)] * x.ndim
    src = [slice(None)] * x.ndim
    dst[axis], src[axis] = slice(1, None), slice(None, -1)
    out[tuple(dst)] = c[tuple(src)]
    return out


def _revcumsum_exclusive(x, axis):
    """out[..., n, ...] = sum_{m > n} x[..., m, ...] along ``axis``."""
    xp = _xp(x)
    return xp.flip(_cumsum_exclusive(xp.flip(x, axis=axis), axis), axis=axis)


class _ChunkDecays(NamedTuple):
    """Every decay one chunk needs, as exponents that are sums of log-decays over intervals (all <= 0)."""

    pre: np.ndarray  # (B, H, L, N)    sum_{tau < t} lambda_tau: the chunk's start to the read of token t
    suf: np.ndarray  # (B, H, L, N)    sum_{tau > s} lambda_tau: the write of token s to the chunk's end
    tot: np.ndarray  # (B, H, N)       sum of all L log-decays: S_in to S_out
    E: np.ndarray  # (B, H, L, L, N)   exp(sum_{s < tau < t} lambda_tau) for s < t, 0 on and above the diagonal


def _chunk_decays(lam):
    """lam (B, H, L, N) -> _ChunkDecays. The pair exponent D[t, s] is built as a masked suffix sum over tau for each
    t, not as pre_t - pre_{s+1}: a difference of two cumulative sums loses eps * |cumulative sum| of absolute accuracy
    (a chunk of large decays followed by small ones), and dividing exp's of them overflows (docs/rwkv6.md §4.3)."""
    xp = _xp(lam)
    L = lam.shape[2]
    i = xp.arange(L)
    before = i[None, :] < i[:, None]  # (L, L) [t, tau]: tau < t
    masked = xp.where(before[None, None, :, :, None], lam[:, :, None, :, :], 0)  # (B, H, L, L, N) [t, tau]
    D = _revcumsum_exclusive(masked, axis=3)  # (B, H, L, L, N) [t, s]: sum_{s < tau < t} lambda_tau
    E = xp.where(before[None, None, :, :, None], xp.exp(D), 0)  # (B, H, L, L, N)
    return _ChunkDecays(pre=_cumsum_exclusive(lam, 2), suf=_revcumsum_exclusive(lam, 2), tot=lam.sum(axis=2), E=E)


def _heads_first(x):
    """(B, T, H, N) -> (B, H, T, N), so that matrix products run over the last two axes."""
    return x.transpose(0, 2, 1, 3)


def _chunk_attention(rc, kc, u, E):
    """The chunk's (L, L) score matrix: A[t, s] = sum_i r_t[i] k_s[i] E[t, s, i] below the diagonal,
    A[t, t] = <r_t, u * k_t>, 0 above. rc, kc (B, H, L, N); u (H, N); E (B, H, L, L, N)."""
    xp = _xp(rc)
    L = rc.shape[2]
    att = (rc[:, :, :, None, :] * kc[:, :, None, :, :] * E).sum(axis=-1)  # (B, H, L, L)
    i = xp.arange(L)
    att[:, :, i, i] = (rc * u[:, None, :] * kc).sum(axis=-1)  # (B, H, L) the current token gets u, not a decay
    return att


def _chunks(T, chunk):
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(c0, min(c0 + chunk, T)) for c0 in range(0, T, chunk)]


def wkv6_chunked_forward(r, k, v, w, u, state=None, chunk: int = DEFAULT_CHUNK):
    """y (B, T, H, N) and the final state (B, H, N, N), chunk by chunk (docs/rwkv6.md §4).

    For a chunk of L tokens (local t, s = 0..L-1) entered with S_in:

        y_t   = S_in^T (r_t * exp(pre_t)) + sum_{s<t} A[t, s] v_s + <r_t, u * k_t> v_t
        S_out = diag(exp(tot)) S_in + sum_s (k_s * exp(suf_s)) v_s^T
        A[t, s] = sum_i r_t[i] k_s[i] exp(sum_{s<tau<t} lambda_tau[i])

    In matrix form per (b, h): Y = R_d S_in + A V, S_out = diag(exp(tot)) S_in + K_d^T V, with R_d, K_d the decayed
    (L, N) r and k. Any T works; the last chunk is just shorter.
    """
    xp = _xp(r)
    B, T, H, N = r.shape
    lam = _heads_first(log_decay(w))  # (B, H, T, N)
    rh, kh, vh = _heads_first(r), _heads_first(k), _heads_first(v)  # (B, H, T, N) each
    S = zero_state(B, H, N, r.dtype, xp) if state is None else state  # (B, H, N, N)
    y = xp.empty((B, H, T, N), dtype=r.dtype)  # (B, H, T, N)
    for c0, c1 in _chunks(T, chunk):
        rc, kc, vc = rh[:, :, c0:c1], kh[:, :, c0:c1], vh[:, :, c0:c1]  # (B, H, L, N) each
        dec = _chunk_decays(lam[:, :, c0:c1])
        rd = rc * xp.exp(dec.pre)  # (B, H, L, N) r_t decayed back to the chunk's start
        kd = kc * xp.exp(dec.suf)  # (B, H, L, N) k_s decayed forward to the chunk's end
        att = _chunk_attention(rc, kc, u, dec.E)  # (B, H, L, L)
        y[:, :, c0:c1] = rd @ S + att @ vc  # (B, H, L, N)
        S = xp.exp(dec.tot)[..., :, None] * S + kd.swapaxes(-1, -2) @ vc  # (B, H, N, N)
    return y.transpose(0, 2, 1, 3), S  # (B, T, H, N), (B, H, N, N)


def wkv6_chunked_backward(r, k, v, w, u, dy, state=None, dstate=None, chunk: int = DEFAULT_CHUNK) -> WKV6Grads:
    """Gradients of the chunked form, chunk by chunk from the last (docs/rwkv6.md §6).

    A first sweep recomputes each chunk's S_in. Then, with G = dL/dS_out of the current chunk (dstate for the last;
    default 0), each chunk differentiates its three products and its decays:

        Y = R_d S_in + A V               dA = dY V^T (on and below the diagonal), dV = A^T dY, dR_d = dY S_in^T,
                                         dS_in = R_d^T dY
        S_out = e^{tot} S_in + K_d^T V   dK_d = V G^T, dV += K_d G, dS_in += diag(e^{tot}) G,
                                         dtot = e^{tot} rowsum(G * S_in)
        R_d = r e^{pre}, K_d = k e^{suf}, A[t,s] = sum_i r_t k_s E[t,s]  ->  dr, dk, du and the exponents' gradients
        dlambda_tau = sum_{t>tau} dpre_t + sum_{s<tau} dsuf_s + dtot + sum_{s<tau<t} dD[t, s]
        dw = dlambda * lambda                                           (lambda = -exp(w))

    G for the previous chunk is this chunk's dS_in.
    """
    xp = _xp(r)
    B, T, H, N = r.shape
    lam = _heads_first(log_decay(w))  # (B, H, T, N)
    rh, kh, vh, dyh = _heads_first(r), _heads_first(k), _heads_first(v), _heads_first(dy)  # (B, H, T, N) each
    spans = _chunks(T, chunk)
    S = zero_state(B, H, N, r.dtype, xp) if state is None else state  # (B, H, N, N)
    S_in = []  # S_in of every chunk, (B, H, N, N) each
    for c0, c1 in spans:
        S_in.append(S)
        dec = _chunk_decays(lam[:, :, c0:c1])
        kd = kh[:, :, c0:c1] * xp.exp(dec.suf)  # (B, H, L, N)
        S = xp.exp(dec.tot)[..., :, None] * S + kd.swapaxes(-1, -2) @ vh[:, :, c0:c1]  # (B, H, N, N)

    G = xp.zeros_like(S) if dstate is None else dstate  # (B, H, N, N) dL/dS_out of the current chunk
    dr = xp.empty((B, H, T, N), dtype=r.dtype)  # (B, H, T, N)
    dk = xp.empty_like(dr)  # (B, H, T, N)
    dv = xp.empty_like(dr)  # (B, H, T, N)
    dw = xp.empty_like(dr)  # (B, H, T, N)
    du = xp.zeros(u.shape, dtype=r.dtype)  # (H, N)
    for (c0, c1), Sc in zip(reversed(spans), reversed(S_in)):
        rc, kc, vc, dyc, lc = rh[:, :, c0:c1], kh[:, :, c0:c1], vh[:, :, c0:c1], dyh[:, :, c0:c1], lam[:, :, c0:c1]
        L = c1 - c0
        dec = _chunk_decays(lc)
        e_pre, e_suf, e_tot = xp.exp(dec.pre), xp.exp(dec.suf), xp.exp(dec.tot)  # (B, H, L, N), (B, H, L, N), (B, H, N)
        rd = rc * e_pre  # (B, H, L, N)
        kd = kc * e_suf  # (B, H, L, N)
        att = _chunk_attention(rc, kc, u, dec.E)  # (B, H, L, L)
        i = xp.arange(L)
        causal = i[None, :] <= i[:, None]  # (L, L) [t, s]: s <= t

        # Y = R_d S_in + A V
        datt = xp.where(causal, dyc @ vc.swapaxes(-1, -2), 0)  # (B, H, L, L)
        dvc = att.swapaxes(-1, -2) @ dyc  # (B, H, L, N)
        drd = dyc @ Sc.swapaxes(-1, -2)  # (B, H, L, N)
        dS_in = rd.swapaxes(-1, -2) @ dyc  # (B, H, N, N)
        # S_out = diag(e^{tot}) S_in + K_d^T V
        dkd = vc @ G.swapaxes(-1, -2)  # (B, H, L, N)
        dvc = dvc + kd @ G  # (B, H, L, N) v feeds Y and S_out
        dS_in = dS_in + e_tot[..., :, None] * G  # (B, H, N, N) S_in feeds Y and S_out
        dtot = e_tot * (G * Sc).sum(axis=-1)  # (B, H, N)
        # R_d = r e^{pre}, K_d = k e^{suf}, A[t, s] = sum_i r_t[i] k_s[i] E[t, s, i], A[t, t] = <r_t, u k_t>
        diag = datt[:, :, i, i][..., None]  # (B, H, L, 1) dA[t, t]
        P = datt[..., None] * dec.E  # (B, H, L, L, N) dA[t, s] E[t, s, i], 0 on and above the diagonal
        drc = drd * e_pre + (P * kc[:, :, None, :, :]).sum(axis=3) + diag * u[:, None, :] * kc  # (B, H, L, N)
        dkc = dkd * e_suf + (P * rc[:, :, :, None, :]).sum(axis=2) + diag * u[:, None, :] * rc  # (B, H, L, N)
        du += (diag * rc * kc).sum(axis=(0, 2))  # (H, N)
        # the exponents: pre_t = sum_{tau<t} lambda_tau, suf_s = sum_{tau>s}, tot = sum_tau, D[t,s] = sum_{s<tau<t}
        dpre = drd * rd  # (B, H, L, N)
        dsuf = dkd * kd  # (B, H, L, N)
        dD = P * rc[:, :, :, None, :] * kc[:, :, None, :, :]  # (B, H, L, L, N) [t, s]
        below_tau = _cumsum_exclusive(dD, axis=3)  # (B, H, L, L, N) [t, tau]: sum_{s < tau} dD[t, s]
        straddle = xp.where((i[None, :] < i[:, None])[..., None], below_tau, 0).sum(axis=2)  # (B, H, L, N) tau < t
        dlam = (_revcumsum_exclusive(dpre, 2) + _cumsum_exclusive(dsuf, 2) + dtot[:, :, None, :]
                + straddle)  # (B, H, L, N)

        dr[:, :, c0:c1], dk[:, :, c0:c1], dv[:, :, c0:c1] = drc, dkc, dvc
        dw[:, :, c0:c1] = dlam * lc  # (B, H, L, N) dlambda/dw = -exp(w) = lambda
        G = dS_in  # (B, H, N, N) dL/dS_out of the previous chunk
    back = (a.transpose(0, 2, 1, 3) for a in (dr, dk, dv, dw))  # (B, T, H, N) each
    return WKV6Grads(*back, du, G)


# ---------------------------------------------------------------------------------------------------------------
# The reference forms as engines' WKVs (minirwkv.backends: "numpy" and "parallel")
# ---------------------------------------------------------------------------------------------------------------

def recurrent_backend() -> WKVBackend:
    return WKVBackend("numpy", wkv6_recurrent_forward, wkv6_recurrent_backward)


def chunked_backend() -> WKVBackend:
    return WKVBackend("parallel", wkv6_chunked_forward, wkv6_chunked_backward)
