r"""The WKV forward and backward compiled for the CPU with Numba: ``wkv_recurrent_forward/backward`` of wkv.py,
transcribed loop by loop with the same variable names (aa, bb, pp, ww, q, e1, e2; dA, dB, s, r, pa, qa, rho).

Mirrors the official kernel ``RWKV-v4neo/cuda/wkv_cuda.cu`` (``kernel_forward``, ``kernel_backward``): each (b, c)
pair is an independent recurrence over t, so the pairs run in parallel and time runs sequentially.
rwkv4-math sections 3.2 (forward) and 3.4 (backward); design and figures: docs/numba.md.

Loop order. The arrays are (B, T, C) C-contiguous, so for one (b, c) pair consecutive time steps lie C elements
apart. The kernels split the (b, c) pairs into blocks of ``BLOCK`` consecutive channels of one batch row; ``prange``
runs over the blocks, and inside a block the loop over t is outside the loop over c. Each time step then reads
one contiguous run of BLOCK channels (whole cache lines) instead of one element per line, and the per-(b, c)
state lives in (B, C) arrays exactly as in the NumPy reference. (The alternative, prange over single (b, c) pairs
with the state in scalars, was measured too: docs/numba.md.)

Dtypes. float32 and float64 go through the same functions; Numba compiles one specialisation per dtype on first
call. The kernels contain no floating-point literal: a Python float inside an njit function is a float64 and
would silently promote float32 arithmetic. Every constant (0 and MIN_VALUE = -1e38) arrives in an array of the
inputs' dtype, allocated by the Python wrapper (``zero_state``), so float32 stays float32 throughout.

Memory. The forward allocates y (B, T, C) and the (B, C) state. The backward stores s and r of every step as in
the official kernel (rwkv4-math 3.4), as (B, T, C) arrays: 2·B·T·C floats beyond its outputs gk, gv (B, T, C)
and a few (B, C) accumulators. No compile-time length (the official kernel's T_MAX): T is any size.

Compilation is lazy (on the first call; importing compiles nothing) and cached on disk (``cache=True``).
Threads: Numba's pool; ``set_threads(n)`` / ``get_threads()`` below (or NUMBA_NUM_THREADS before start-up).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ..wkv import MIN_VALUE, WKVState, zero_state
from . import WKVBackend

BLOCK = 16  # channels per parallel task: 16 float32 = one 64-byte cache line per array and time step


# ---------------------------------------------------------------------------------------------------------------
# Kernels (compiled on first call)
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(w, u, k, v, y, aa, bb, pp):
    """y[b, t, c] for all t, updating the state (aa, bb, pp) (B, C) in place: on entry the state before the first
    token, on return the state after the last. Transcribes ``wkv_step`` (rwkv4-math 3.2, official kernel_forward).
    """
    B, T, C = k.shape
    n_blocks = (C + BLOCK - 1) // BLOCK
    for task in prange(B * n_blocks):
        b = task // n_blocks
        c0 = (task % n_blocks) * BLOCK
        c1 = min(c0 + BLOCK, C)
        for t in range(T):
            for c in range(c0, c1):
                ww = u[c] + k[b, t, c]  # log-weight of the current token in the output
                q = max(pp[b, c], ww)
                e1 = np.exp(pp[b, c] - q)  # weight of the past, scaled by e^-q
                e2 = np.exp(ww - q)  # weight of the current token, scaled by e^-q
                y[b, t, c] = (e1 * aa[b, c] + e2 * v[b, t, c]) / (e1 * bb[b, c] + e2)
                ww = pp[b, c] + w[c]  # the past decays once
                q = max(ww, k[b, t, c])
                e1 = np.exp(ww - q)
                e2 = np.exp(k[b, t, c] - q)
                aa[b, c] = e1 * aa[b, c] + e2 * v[b, t, c]
                bb[b, c] = e1 * bb[b, c] + e2
                pp[b, c] = q


@numba.njit(parallel=True, cache=True, fastmath=False)
def _backward_kernel(w, u, k, v, y, gy, aa, bb, pp, dA, dB, gw, gu, pa, qa, rho, s, r, gk, gv):
    """Two sweeps of ``wkv_recurrent_backward`` (rwkv4-math 3.4, official kernel_backward), per (b, c) pair.

    In: w, u (C,); k, v, y, gy (B, T, C); the zero state aa, bb = 0, pp = MIN_VALUE, and dA = dB = gw = gu =
    pa = qa = 0, rho = MIN_VALUE, all (B, C) and overwritten. Out: gw, gu (B, C) per batch row (the caller sums
    them), gk, gv (B, T, C). Scratch: s, r (B, T, C), written by sweep 1 and read by sweep 2.
    """
    B, T, C = k.shape
    n_blocks = (C + BLOCK - 1) // BLOCK
    for task in prange(B * n_blocks):
        b = task // n_blocks
        c0 = (task % n_blocks) * BLOCK
        c1 = min(c0 + BLOCK, C)
        # Sweep 1, forward in time: recompute the state, accumulate gw and gu, store s_t and r_t.
        for t in range(T):
            for c in range(c0, c1):
                ww = u[c] + k[b, t, c]
                q = max(pp[b, c], ww)
                e1 = np.exp(pp[b, c] - q)
                e2 = np.exp(ww - q)
                s[b, t, c] = gy[b, t, c] / (e1 * bb[b, c] + e2)  # g_t / (D_t e^-q); |s_t| <= |g_t|
                r[b, t, c] = ww - q
                gw[b, c] += (dA[b, c] - y[b, t, c] * dB[b, c]) * e1 * s[b, t, c]
                gu[b, c] += (v[b, t, c] - y[b, t, c]) * e2 * s[b, t, c]
                ww = pp[b, c] + w[c]
                q = max(ww, k[b, t, c])
                e1 = np.exp(ww - q)
                e2 = np.exp(k[b, t, c] - q)
                dA[b, c] = e1 * (aa[b, c] + dA[b, c])  # A'_{t+1} = e^w (A'_t + a_t)
                dB[b, c] = e1 * (bb[b, c] + dB[b, c])  # B'_{t+1} = e^w (B'_t + b_t)
                aa[b, c] = e1 * aa[b, c] + e2 * v[b, t, c]
                bb[b, c] = e1 * bb[b, c] + e2
                pp[b, c] = q
        # Sweep 2, backward in time: the future's P, Q as (pa, qa) with log-scale rho give gk_i and gv_i.
        for i in range(T - 1, -1, -1):
            for c in range(c0, c1):
                e1 = s[b, i, c] * np.exp(r[b, i, c])  # g_i e^{u+k_i} / D_i
                e2 = np.exp(k[b, i, c] + rho[b, c])  # e^{k_i} times the scale of P, Q (<= 1: rho <= -k_i)
                gk[b, i, c] = e1 * (v[b, i, c] - y[b, i, c]) + e2 * (pa[b, c] * v[b, i, c] + qa[b, c])
                gv[b, i, c] = e1 + e2 * pa[b, c]
                z = r[b, i, c] - u[c] - k[b, i, c]  # -q_i, so g_i / D_i = s_i e^z
                ww = rho[b, c] + w[c]
                q = max(ww, z)
                e1 = np.exp(ww - q)
                e2 = np.exp(z - q)
                pa[b, c] = e1 * pa[b, c] + s[b, i, c] * e2
                qa[b, c] = e1 * qa[b, c] - s[b, i, c] * e2 * y[b, i, c]
                rho[b, c] = q


# ---------------------------------------------------------------------------------------------------------------
# The backend contract (see the docstring of minirwkv.wkv)
# ---------------------------------------------------------------------------------------------------------------

def forward(w, u, k, v, state: WKVState | None = None):
    """y (B, T, C) and the state after the last token, from ``state`` (None: the zero state). Not modified."""
    w, u, k, v = _checked(w, u, k, v)
    B, T, C = k.shape
    if state is None:
        state = zero_state(B, C, k.dtype)
    aa, bb, pp = (_checked_state(a, name, B, C, k.dtype) for a, name in zip(state, WKVState._fields))
    y = np.empty_like(k)  # (B, T, C)
    _forward_kernel(w, u, k, v, y, aa, bb, pp)
    return y, WKVState(aa, bb, pp)


def backward(w, u, k, v, y, gy):
    """(gw, gu, gk, gv) from the zero initial state: gw, gu (C,) summed over the batch; gk, gv (B, T, C)."""
    w, u, k, v = _checked(w, u, k, v)
    y, gy = (_checked_like(a, name, k) for a, name in ((y, "y"), (gy, "gy")))
    B, T, C = k.shape
    aa, bb, pp = zero_state(B, C, k.dtype)  # (B, C) each
    dA, dB, gw, gu, pa, qa = (np.zeros((B, C), k.dtype) for _ in range(6))
    rho = np.full((B, C), MIN_VALUE, k.dtype)  # (B, C)
    s = np.empty_like(k)  # (B, T, C)
    r = np.empty_like(k)  # (B, T, C)
    gk = np.empty_like(k)  # (B, T, C)
    gv = np.empty_like(k)  # (B, T, C)
    _backward_kernel(w, u, k, v, y, gy, aa, bb, pp, dA, dB, gw, gu, pa, qa, rho, s, r, gk, gv)
    return gw.sum(axis=0), gu.sum(axis=0), gk, gv  # no atomics: per-row partials, summed here as in the official code


def make_backend() -> WKVBackend:
    """The ``numba`` WKV backend. Compiles nothing: each kernel compiles (or loads its cache) on first call."""
    return WKVBackend("numba", forward, backward)


# ---------------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------------

def set_threads(n: int) -> None:
    """Run the kernels on ``n`` threads (1 .. the pool size, NUMBA_NUM_THREADS at start-up). Per calling thread."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise ValueError(f"threads must be an integer in 1..{limit} (Numba's pool size); got {n!r}. "
                         f"Start Python with NUMBA_NUM_THREADS=N to enlarge the pool")
    numba.set_num_threads(int(n))


def get_threads() -> int:
    """The number of threads the kernels run on now (from the calling thread)."""
    return numba.get_num_threads()


# ---------------------------------------------------------------------------------------------------------------
# Input checks: the kernels index without bounds checks, so shapes and dtypes are checked here
# ---------------------------------------------------------------------------------------------------------------

def _checked(w, u, k, v):
    k, v, w, u = (np.asarray(a) for a in (k, v, w, u))
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (B, T, C); got k {k.shape}, v {v.shape}")
    C = k.shape[2]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"w and u must be (C,) = ({C},); got w {w.shape}, u {u.shape}")
    if k.dtype not in (np.float32, np.float64):
        raise ValueError(f"the numba WKV runs float32 or float64; got k of dtype {k.dtype}. Cast the inputs first")
    if not all(a.dtype == k.dtype for a in (v, w, u)):
        raise ValueError(f"w, u, k, v must share one dtype; got w {w.dtype}, u {u.dtype}, k {k.dtype}, v {v.dtype}. "
                         f"Cast them to one dtype first")
    return tuple(np.ascontiguousarray(a) for a in (w, u, k, v))


def _checked_like(a, name, k):
    a = np.asarray(a)
    if a.shape != k.shape or a.dtype != k.dtype:
        raise ValueError(f"{name} must match k: {k.shape} {k.dtype}; got {a.shape} {a.dtype}")
    return np.ascontiguousarray(a)


def _checked_state(a, name, B, C, dtype):
    a = np.asarray(a)
    if a.shape != (B, C) or a.dtype != dtype:
        raise ValueError(f"state.{name} must be (B, C) = ({B}, {C}) of dtype {np.dtype(dtype)} like k; "
                         f"got {a.shape} {a.dtype}")
    return np.array(a, order="C", copy=True)  # a copy: the kernel updates it in place, the caller's state stays
