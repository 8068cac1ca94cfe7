r"""The WKV forward and backward compiled for the CPU with Numba: ``wkv_recurrent_forward/backward`` of wkv.py,
transcribed loop by loop with the same variable names (aa, bb, pp, ww, q, e1, e2; dA, dB, s, r, pa, qa, rho).

Mirrors the official kernel ``RWKV-v4neo/cuda/wkv_cuda.cu`` (``kernel_forward``, ``kernel_backward``): each (b, c)
pair is an independent recurrence over t, so the pairs run in parallel and time runs sequentially.
docs/rwkv4.md §3.2 (forward) and §3.4 (backward); design and figures: docs/numba.md.

Loop order. The arrays are (B, T, C) C-contiguous, so for one (b, c) pair consecutive time steps lie C elements
apart. The kernels split the (b, c) pairs into blocks of consecutive channels of one batch row (``block_size``);
``prange`` runs over the blocks, and inside a block the loop over t is outside the loop over c. Each time step
then reads contiguous runs of channels, and the inner loop over c is a SIMD loop: LLVM vectorises it (8 float32
lanes here) because it contains no call and no branch. That takes three things (docs/numba.md, "the ladder"):
  * exp without libm: ``fastexp.exp_nonpositive`` (Cody-Waite + polynomial, < 1 ulp), and one exp per pair of
    weights (``exp_shifted_pair``: the larger of the two is always exp(0) = 1), so 12 exps per (b, t, c) become 5;
  * ``error_model="numpy"``: with Python's error model every division carries a branch to ZeroDivisionError;
  * 1-D views per block and time step (``k_t = k[b, t, c0:c1]``) indexed from 0: with ``k[b, t, c]`` LLVM cannot
    prove the index non-negative (Numba's wraparound select) and gives up on the dependence analysis.
``fastmath={"contract"}`` lets a * b + c become one fused multiply-add (one rounding instead of two; no other
fast-math licence): 15-20% faster, and no less accurate. The state lives in (B, C) arrays exactly as in the
NumPy reference.

Dtypes. float32 and float64 go through the same functions; Numba compiles one specialisation per dtype on first
call. The kernels contain no floating-point literal: a Python float inside an njit function is a float64 and
would silently promote float32 arithmetic. Every constant (0 and MIN_VALUE = -1e38) arrives in an array of the
inputs' dtype, allocated by the Python wrapper (``zero_state``), so float32 stays float32 throughout; fastexp's
constants are typed by the argument's dtype.

Memory. The forward allocates y (B, T, C) and the (B, C) state. The backward stores s and r of every step as in
the official kernel (docs/rwkv4.md §3.4), as (B, T, C) arrays: 2·B·T·C floats beyond its outputs gk, gv (B, T, C)
and a few (B, C) accumulators. No compile-time length (the official kernel's T_MAX): T is any size.

Compilation is lazy (on the first call; importing compiles nothing) and cached on disk (``cache=True``). Numba's
cache is keyed on this file only: after editing fastexp.py, touch this file (or clear __pycache__) to recompile.
Threads: Numba's pool; ``set_threads(n)`` / ``get_threads()`` below (or NUMBA_NUM_THREADS before start-up).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ...rwkv4.wkv import MIN_VALUE, WKVState, zero_state
from .. import WKVBackend
from .fastexp import exp_nonpositive, exp_shifted_pair

SIMD_WIDTH = 16  # channels per cache line of float32; blocks are multiples of it
TASKS_PER_THREAD = 2  # enough tasks to balance the threads, as few as possible to keep the SIMD loops long


def block_size(B: int, C: int) -> int:
    """Channels per parallel task: as wide as possible (each time step restarts the SIMD loop over the block, with
    its alias checks, so short blocks pay that set-up often), but narrow enough to give every thread
    ``TASKS_PER_THREAD`` tasks when the batch alone does not. (8, *, 512) on 2 threads: one block of 512 per row.
    """
    blocks_per_row = max(1, -(-TASKS_PER_THREAD * numba.get_num_threads() // B))
    width = -(-C // blocks_per_row)
    return max(SIMD_WIDTH, -(-width // SIMD_WIDTH) * SIMD_WIDTH)


# ---------------------------------------------------------------------------------------------------------------
# Kernels (compiled on first call)
# ---------------------------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy")
def _forward_kernel(w, u, k, v, y, aa, bb, pp, block):
    """y[b, t, c] for all t, updating the state (aa, bb, pp) (B, C) in place: on entry the state before the first
    token, on return the state after the last. Transcribes ``wkv_step`` (docs/rwkv4.md §3.2, official kernel_forward).
    """
    B, T, C = k.shape
    n_blocks = (C + block - 1) // block
    for task in prange(B * n_blocks):
        b = task // n_blocks
        c0 = (task % n_blocks) * block
        c1 = min(c0 + block, C)
        w_b, u_b, aa_b, bb_b, pp_b = w[c0:c1], u[c0:c1], aa[b, c0:c1], bb[b, c0:c1], pp[b, c0:c1]  # views
        for t in range(T):
            k_t, v_t, y_t = k[b, t, c0:c1], v[b, t, c0:c1], y[b, t, c0:c1]  # (block,) views of this step
            for c in range(c1 - c0):  # vectorised (SIMD over channels): no calls, only selects
                ww = u_b[c] + k_t[c]  # log-weight of the current token in the output
                e1, e2, q = exp_shifted_pair(pp_b[c], ww)  # e1 = e^(pp - q) the past, e2 = e^(ww - q) the current
                y_t[c] = (e1 * aa_b[c] + e2 * v_t[c]) / (e1 * bb_b[c] + e2)
                ww = pp_b[c] + w_b[c]  # the past decays once
                e1, e2, q = exp_shifted_pair(ww, k_t[c])
                aa_b[c] = e1 * aa_b[c] + e2 * v_t[c]
                bb_b[c] = e1 * bb_b[c] + e2
                pp_b[c] = q


@numba.njit(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy")
def _backward_kernel(w, u, k, v, y, gy, aa, bb, pp, dA, dB, gw, gu, pa, qa, rho, s, r, gk, gv, block):
    """Two sweeps of ``wkv_recurrent_backward`` (docs/rwkv4.md §3.4, official kernel_backward), per (b, c) pair.

    In: w, u (C,); k, v, y, gy (B, T, C); the zero state aa, bb = 0, pp = MIN_VALUE, and dA = dB = gw = gu =
    pa = qa = 0, rho = MIN_VALUE, all (B, C) and overwritten. Out: gw, gu (B, C) per batch row (the caller sums
    them), gk, gv (B, T, C). Scratch: s, r (B, T, C), written by sweep 1 and read by sweep 2.
    """
    B, T, C = k.shape
    n_blocks = (C + block - 1) // block
    for task in prange(B * n_blocks):
        b = task // n_blocks
        c0 = (task % n_blocks) * block
        c1 = min(c0 + block, C)
        w_b, u_b, aa_b, bb_b, pp_b = w[c0:c1], u[c0:c1], aa[b, c0:c1], bb[b, c0:c1], pp[b, c0:c1]
        dA_b, dB_b, gw_b, gu_b = dA[b, c0:c1], dB[b, c0:c1], gw[b, c0:c1], gu[b, c0:c1]
        pa_b, qa_b, rho_b = pa[b, c0:c1], qa[b, c0:c1], rho[b, c0:c1]
        # Sweep 1, forward in time: recompute the state, accumulate gw and gu, store s_t and r_t.
        for t in range(T):
            k_t, v_t, y_t, gy_t = k[b, t, c0:c1], v[b, t, c0:c1], y[b, t, c0:c1], gy[b, t, c0:c1]
            s_t, r_t = s[b, t, c0:c1], r[b, t, c0:c1]
            for c in range(c1 - c0):
                ww = u_b[c] + k_t[c]
                e1, e2, q = exp_shifted_pair(pp_b[c], ww)
                s_t[c] = gy_t[c] / (e1 * bb_b[c] + e2)  # g_t / (D_t e^-q); |s_t| <= |g_t|
                r_t[c] = ww - q
                gw_b[c] += (dA_b[c] - y_t[c] * dB_b[c]) * e1 * s_t[c]
                gu_b[c] += (v_t[c] - y_t[c]) * e2 * s_t[c]
                ww = pp_b[c] + w_b[c]
                e1, e2, q = exp_shifted_pair(ww, k_t[c])
                dA_b[c] = e1 * (aa_b[c] + dA_b[c])  # A'_{t+1} = e^w (A'_t + a_t)
                dB_b[c] = e1 * (bb_b[c] + dB_b[c])  # B'_{t+1} = e^w (B'_t + b_t)
                aa_b[c] = e1 * aa_b[c] + e2 * v_t[c]
                bb_b[c] = e1 * bb_b[c] + e2
                pp_b[c] = q
        # Sweep 2, backward in time: the future's P, Q as (pa, qa) with log-scale rho give gk_i and gv_i.
        for i in range(T - 1, -1, -1):
            k_i, v_i, y_i, s_i, r_i = k[b, i, c0:c1], v[b, i, c0:c1], y[b, i, c0:c1], s[b, i, c0:c1], r[b, i, c0:c1]
            gk_i, gv_i = gk[b, i, c0:c1], gv[b, i, c0:c1]
            for c in range(c1 - c0):
                e1 = s_i[c] * exp_nonpositive(r_i[c])  # g_i e^{u+k_i} / D_i; r_i = u + k_i - q_i <= 0
                # e^{k_i} times the scale of P, Q (rho <= -k_i; rounding may put the sum a few ulp above 0: fine)
                e2 = exp_nonpositive(k_i[c] + rho_b[c])
                gk_i[c] = e1 * (v_i[c] - y_i[c]) + e2 * (pa_b[c] * v_i[c] + qa_b[c])
                gv_i[c] = e1 + e2 * pa_b[c]
                z = r_i[c] - u_b[c] - k_i[c]  # -q_i, so g_i / D_i = s_i e^z
                ww = rho_b[c] + w_b[c]
                e1, e2, q = exp_shifted_pair(ww, z)
                pa_b[c] = e1 * pa_b[c] + s_i[c] * e2
                qa_b[c] = e1 * qa_b[c] - s_i[c] * e2 * y_i[c]
                rho_b[c] = q


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
    _forward_kernel(w, u, k, v, y, aa, bb, pp, block_size(B, C))
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
    _backward_kernel(w, u, k, v, y, gy, aa, bb, pp, dA, dB, gw, gu, pa, qa, rho, s, r, gk, gv, block_size(B, C))
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
