r"""The matrix-valued WKV of RWKV-6 / RWKV-5.2 compiled for the CPU with Numba: ``wkv6_recurrent_forward/backward``
of minirwkv/rwkv6/wkv.py, transcribed loop by loop with the same variable names (S, bonus, decay, lam; G, Ghat, St,
vdy, dr, dk, dv, dw, du).

Mirrors the official kernels ``RWKV-v5/cuda/wkv6_cuda.cu`` (and ``wkv5_cuda.cu``): each (b, h) pair is an
independent recurrence over t of an N x N state, so the pairs run in parallel (``prange`` over B·H tasks) and time
runs sequentially inside a task. docs/rwkv6.md §2 (forward) and §5 (backward).

Contract: exactly the reference's. ``forward(r, k, v, w, u, state=None) -> (y, state_out)`` and
``backward(r, k, v, w, u, dy, state=None, dstate=None) -> WKV6Grads(dr, dk, dv, dw, du, dstate)``; r, k, v, w, y, dy
(B, T, H, N), u (H, N), state and dstate (B, H, N, N) in ``[b, h, key, value]`` order; w is the raw decay (decay
factor exp(-exp(w))) and dw is with respect to it; du is summed over b and t. Inputs are not modified; a
non-contiguous input is copied to a contiguous one here, at the edge. An overflowing exp(w) raises ValueError, as
the reference's ``log_decay`` does.

Loop order. Per task, per token t, the kernels read the (N,) rows ``r[b, t, h]`` etc. (contiguous views indexed from
0) and sweep the task's N x N state once: the forward in two passes (the read y_t = S^T r_t + bonus v_t, then the
write S = diag(decay) S + k_t v_t^T); the backward's adjoint step in a single pass over (i, j) that reads G and
S_{t-1} and updates G in place (Ghat is formed element by element, never stored).

Dtypes. float32 and float64 go through the same functions; Numba compiles one specialisation per dtype on first
call. The kernels contain no floating-point literal (a Python float inside an njit function is a float64 and would
promote float32 arithmetic): sums start from their first term or from arrays zeroed by the wrapper in the inputs'
dtype. ``fastmath={"contract"}`` (fused multiply-adds only) and ``error_model="numpy"`` as in wkv4.py.

Memory. The forward: y (B, T, H, N) and the state (B, H, N, N), updated in place. The backward does not store all
T states like the reference: a first sweep stores a checkpoint S_{t-1} every ``segment`` tokens (default
isqrt(T), ``segment_length``), (B, H, ceil(T / segment), N, N); the adjoint sweep runs the segments from the last,
recomputing each one's states from its checkpoint into a (B, H, segment, N, N) scratch. That is O(B·H·sqrt(T)·N²)
memory for one extra forward's work. du: per-(b, h) partial sums (B, H, N), summed over b after the prange (no
races, no atomics), as wkv4.py does for gw and gu.

Compilation is lazy (on the first call; importing compiles nothing) and cached on disk (``cache=True``). Threads:
Numba's pool (see wkv4.set_threads / get_threads). ``make_backend`` is the engine's ``numba`` WKV of RWKV-5.2 and RWKV-6.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .. import WKVBackend
from ...rwkv6.wkv import WKV6Grads


def segment_length(T: int) -> int:
    """Tokens between two checkpoints of the backward: isqrt(T) balances the checkpoints (T / segment states) against
    the scratch of one segment (segment states)."""
    return max(1, math.isqrt(T))


# ---------------------------------------------------------------------------------------------------------------
# Kernels (compiled on first call)
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy")
def _forward_kernel(r, k, v, w, u, y, state):
    """y[b, t, h] for all t, updating ``state`` (B, H, N, N) in place: on entry S_{-1}, on return S_{T-1}.
    Transcribes ``wkv6_step`` (docs/rwkv6.md §2)."""
    B, T, H, N = r.shape
    for task in prange(B * H):
        b = task // H
        h = task % H
        S = state[b, h]  # (N, N) view: S[i, j], i the key channel, j the value channel
        u_h = u[h]  # (N,)
        for t in range(T):
            r_t, k_t, v_t, w_t, y_t = r[b, t, h], k[b, t, h], v[b, t, h], w[b, t, h], y[b, t, h]  # (N,) views
            bonus = r_t[0] * u_h[0] * k_t[0]  # <r, u * k>, from its first term (no float literal)
            for i in range(1, N):
                bonus += r_t[i] * u_h[i] * k_t[i]
            for j in range(N):
                y_t[j] = bonus * v_t[j]
            for i in range(N):  # y = S^T r + bonus v: the output reads the state before this token
                for j in range(N):
                    y_t[j] += r_t[i] * S[i, j]
            for i in range(N):  # S = diag(decay) S + k v^T
                lam = -np.exp(w_t[i])  # log-decay
                decay = np.exp(lam)  # in (0, 1); exactly 0 once it underflows
                for j in range(N):
                    S[i, j] = decay * S[i, j] + k_t[i] * v_t[j]


@numba.njit(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy")
def _backward_kernel(r, k, v, w, u, dy, state, G_all, dr, dk, dv, dw, du_part, S_ckpt, S_seg, segment):
    """The adjoint recurrence of ``wkv6_recurrent_backward`` (docs/rwkv6.md §5), per (b, h) pair.

    In: r, k, v, w, dy (B, T, H, N); u (H, N); state = S_{-1} (B, H, N, N), read only; G_all = dstate (B, H, N, N),
    overwritten with dL/dS_{-1}; dr, dk, dv, dw (B, T, H, N) and du_part (B, H, N) zeroed, accumulated into.
    Scratch: S_ckpt (B, H, n_segments, N, N) the state before each segment's first token, S_seg (B, H, segment, N, N)
    the states S_{t-1} of the segment being differentiated.
    """
    B, T, H, N = r.shape
    n_segments = S_ckpt.shape[2]
    for task in prange(B * H):
        b = task // H
        h = task % H
        u_h = u[h]  # (N,)
        du_b = du_part[b, h]  # (N,) this pair's share of du
        G = G_all[b, h]  # (N, N) dL/dS_t, starting at t = T-1
        # Sweep 1, forward in time: the checkpoint S_{t-1} at the start of every segment.
        S = S_seg[b, h, 0]  # (N, N) working state
        S[:, :] = state[b, h]
        for t in range(T):
            if t % segment == 0:
                S_ckpt[b, h, t // segment, :, :] = S
            k_t, v_t, w_t = k[b, t, h], v[b, t, h], w[b, t, h]
            for i in range(N):
                decay = np.exp(-np.exp(w_t[i]))
                for j in range(N):
                    S[i, j] = decay * S[i, j] + k_t[i] * v_t[j]
        # Sweep 2, backward in time, segment by segment from the last.
        for c in range(n_segments - 1, -1, -1):
            t0 = c * segment
            t1 = min(t0 + segment, T)
            S_seg[b, h, 0, :, :] = S_ckpt[b, h, c]  # recompute S_{t-1} for t = t0 .. t1-1
            for t in range(t0, t1 - 1):
                S_from, S_to = S_seg[b, h, t - t0], S_seg[b, h, t - t0 + 1]
                k_t, v_t, w_t = k[b, t, h], v[b, t, h], w[b, t, h]
                for i in range(N):
                    decay = np.exp(-np.exp(w_t[i]))
                    for j in range(N):
                        S_to[i, j] = decay * S_from[i, j] + k_t[i] * v_t[j]
            for t in range(t1 - 1, t0 - 1, -1):
                r_t, k_t, v_t, w_t, dy_t = r[b, t, h], k[b, t, h], v[b, t, h], w[b, t, h], dy[b, t, h]
                dr_t, dk_t, dv_t, dw_t = dr[b, t, h], dk[b, t, h], dv[b, t, h], dw[b, t, h]
                St = S_seg[b, h, t - t0]  # (N, N) S_{t-1}
                vdy = v_t[0] * dy_t[0]  # <v_t, dy_t>
                for j in range(1, N):
                    vdy += v_t[j] * dy_t[j]
                for i in range(N):
                    lam = -np.exp(w_t[i])
                    decay = np.exp(lam)
                    ur = u_h[i] * r_t[i]
                    dr_i, dk_i, dw_i = dr_t[i], dk_t[i], dw_t[i]  # zeros of the inputs' dtype
                    for j in range(N):
                        Ghat = G[i, j] + ur * dy_t[j]  # dL/d(k_t v_t^T): through S_t and the bonus
                        dk_i += Ghat * v_t[j]
                        dv_t[j] += Ghat * k_t[i]
                        dr_i += St[i, j] * dy_t[j]
                        dw_i += G[i, j] * St[i, j]
                        G[i, j] = r_t[i] * dy_t[j] + decay * G[i, j]  # G_{t-1}: S_{t-1} feeds y_t and S_t
                    dr_t[i] = dr_i + u_h[i] * k_t[i] * vdy
                    dk_t[i] = dk_i
                    dw_t[i] = lam * decay * dw_i  # d exp(-exp(w))/dw = lambda * decay
                    du_b[i] += r_t[i] * k_t[i] * vdy


# ---------------------------------------------------------------------------------------------------------------
# The contract of wkv6_recurrent_forward / wkv6_recurrent_backward
# ---------------------------------------------------------------------------------------------------------------

def forward(r, k, v, w, u, state=None):
    """y (B, T, H, N) and the state after the last token (B, H, N, N), from ``state`` S_{-1} (None: 0)."""
    r, k, v, w, u = _checked(r, k, v, w, u)
    B, T, H, N = r.shape
    S = _checked_state(state, "state", B, H, N, r.dtype)  # (B, H, N, N) a copy, updated in place by the kernel
    y = np.empty_like(r)  # (B, T, H, N)
    _forward_kernel(r, k, v, w, u, y, S)
    return y, S


def backward(r, k, v, w, u, dy, state=None, dstate=None) -> WKV6Grads:
    """WKV6Grads(dr, dk, dv, dw, du, dstate) of a loss L(y, S_out) given dy = dL/dy (B, T, H, N) and
    dstate = dL/dS_{T-1} (B, H, N, N, None: 0), from the initial state ``state`` (None: 0)."""
    r, k, v, w, u = _checked(r, k, v, w, u)
    dy = _checked_like(dy, "dy", r)
    B, T, H, N = r.shape
    S0 = _checked_state(state, "state", B, H, N, r.dtype)  # (B, H, N, N)
    G = _checked_state(dstate, "dstate", B, H, N, r.dtype)  # (B, H, N, N) becomes dL/dS_{-1}
    segment = segment_length(T)
    n_segments = -(-T // segment)
    dr, dk, dv, dw = (np.zeros_like(r) for _ in range(4))  # (B, T, H, N) each
    du_part = np.zeros((B, H, N), r.dtype)  # (B, H, N)
    S_ckpt = np.empty((B, H, n_segments, N, N), r.dtype)  # (B, H, n_segments, N, N)
    S_seg = np.empty((B, H, segment, N, N), r.dtype)  # (B, H, segment, N, N)
    _backward_kernel(r, k, v, w, u, dy, S0, G, dr, dk, dv, dw, du_part, S_ckpt, S_seg, segment)
    return WKV6Grads(dr, dk, dv, dw, du_part.sum(axis=0), G)  # du: per-(b, h) partials, summed here


def make_backend() -> WKVBackend:
    """The ``numba`` WKV of RWKV-5.2 / RWKV-6. Compiles nothing: each kernel compiles (or loads its cache) on first
    call."""
    return WKVBackend("numba", forward, backward)


# ---------------------------------------------------------------------------------------------------------------
# Input checks: the kernels index without bounds checks, so shapes and dtypes are checked here
# ---------------------------------------------------------------------------------------------------------------

def _checked(r, k, v, w, u):
    r, k, v, w, u = (np.asarray(a) for a in (r, k, v, w, u))
    if r.ndim != 4 or not k.shape == v.shape == w.shape == r.shape:
        raise ValueError(f"r, k, v, w must all be (B, T, H, N); got r {r.shape}, k {k.shape}, v {v.shape}, "
                         f"w {w.shape}")
    H, N = r.shape[2:]
    if u.shape != (H, N):
        raise ValueError(f"u must be (H, N) = ({H}, {N}); got {u.shape}")
    if r.dtype not in (np.float32, np.float64):
        raise ValueError(f"the numba WKV-6 runs float32 or float64; got r of dtype {r.dtype}. Cast the inputs first")
    if not all(a.dtype == r.dtype for a in (k, v, w, u)):
        raise ValueError(f"r, k, v, w, u must share one dtype; got r {r.dtype}, k {k.dtype}, v {v.dtype}, "
                         f"w {w.dtype}, u {u.dtype}. Cast them to one dtype first")
    if w.size and not np.isfinite(np.exp(w.max())):  # exp is monotone: overflows somewhere iff at the max (or NaN)
        raise ValueError("the raw decay w is so large that exp(w) overflows; the log-decay -exp(w) must be finite")
    return tuple(np.ascontiguousarray(a) for a in (r, k, v, w, u))


def _checked_like(a, name, r):
    a = np.asarray(a)
    if a.shape != r.shape or a.dtype != r.dtype:
        raise ValueError(f"{name} must match r: {r.shape} {r.dtype}; got {a.shape} {a.dtype}")
    return np.ascontiguousarray(a)


def _checked_state(a, name, B, H, N, dtype):
    """A C-contiguous copy of ``a`` (the kernels update it in place; the caller's array stays), zeros for None."""
    if a is None:
        return np.zeros((B, H, N, N), dtype)
    a = np.asarray(a)
    if a.shape != (B, H, N, N) or a.dtype != dtype:
        raise ValueError(f"{name} must be (B, H, N, N) = ({B}, {H}, {N}, {N}) of dtype {np.dtype(dtype)} like r; "
                         f"got {a.shape} {a.dtype}")
    return np.array(a, order="C", copy=True)
