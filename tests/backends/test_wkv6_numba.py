"""The Numba RWKV-6 WKV kernels against the NumPy recurrent reference of minirwkv/rwkv6/wkv.py (docs/rwkv6.md §2, §5).

Kernel == reference in the same dtype (y, final state, all six gradients) over hypothesis draws of shapes, decay
ranges, optional initial state and state gradient; the backward's checkpoint spacing does not matter; a
non-contiguous input gives the same results as its contiguous copy; results do not depend on Numba's thread count.
"""
import numba
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minirwkv.backends.numba import wkv6 as numba_wkv6
from minirwkv.rwkv6 import wkv
from minirwkv.testing import assert_close

DTYPES = [np.float64, np.float32]
GRAD_NAMES = wkv.WKV6Grads._fields  # dr, dk, dv, dw, du, dstate

# The raw decay w (decay factor exp(-exp(w))), as in tests/rwkv6/test_wkv.py: init, near 1, near 0, all of it.
DECAY_RANGES = {"init": (-6.0, -1.0), "near_one": (-12.0, -6.0), "near_zero": (1.0, 6.0), "wide": (-12.0, 6.0)}


def make_inputs(B, T, H, N, seed=0, decay="wide", with_state=True, with_dstate=True, dtype=np.float64):
    """(r, k, v, w, u, state, dy, dstate) in ``dtype``; state / dstate None when not drawn."""
    rng = np.random.default_rng(seed)
    lo, hi = DECAY_RANGES[decay]
    x = dict(r=rng.normal(0, 1, (B, T, H, N)), k=rng.normal(0, 1, (B, T, H, N)), v=rng.normal(0, 1, (B, T, H, N)),
             w=rng.uniform(lo, hi, (B, T, H, N)), u=rng.normal(0, 1, (H, N)),
             state=rng.normal(0, 1, (B, H, N, N)) if with_state else None,
             dy=rng.normal(0, 1, (B, T, H, N)),
             dstate=rng.normal(0, 1, (B, H, N, N)) if with_dstate else None)
    return {name: None if a is None else a.astype(dtype) for name, a in x.items()}


@st.composite
def inputs(draw):
    return dict(B=draw(st.integers(1, 3)), T=draw(st.integers(1, 40)), H=draw(st.integers(1, 3)),
                N=draw(st.sampled_from([1, 2, 4, 8, 16])), seed=draw(st.integers(0, 2**32 - 1)),
                decay=draw(st.sampled_from(sorted(DECAY_RANGES))), with_state=draw(st.booleans()),
                with_dstate=draw(st.booleans()))


def run(module_forward, module_backward, x):
    fwd = (x["r"], x["k"], x["v"], x["w"], x["u"])
    y, s = module_forward(*fwd, state=x["state"])
    return y, s, module_backward(*fwd, x["dy"], state=x["state"], dstate=x["dstate"])


def run_numba(x):
    return run(numba_wkv6.forward, numba_wkv6.backward, x)


def run_reference(x):
    return run(wkv.wkv6_recurrent_forward, wkv.wkv6_recurrent_backward, x)


def assert_same_run(a, b, dtype, what=""):
    (y_a, s_a, g_a), (y_b, s_b, g_b) = a, b
    assert y_a.dtype == s_a.dtype == dtype and y_a.shape == y_b.shape and s_a.shape == s_b.shape
    assert_close(y_a, y_b, dtype, "same", f"{what} y")
    assert_close(s_a, s_b, dtype, "same", f"{what} state")
    for name, ga, gb in zip(GRAD_NAMES, g_a, g_b):
        assert ga.dtype == dtype and ga.shape == gb.shape, name
        assert_close(ga, gb, dtype, "same", f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_equal_the_recurrent_reference(dtype):
    @given(shape=inputs())
    @example(shape=dict(B=2, T=1, H=3, N=4, seed=1, decay="wide", with_state=True, with_dstate=True))
    @example(shape=dict(B=1, T=37, H=2, N=16, seed=2, decay="near_zero", with_state=True, with_dstate=False))
    @example(shape=dict(B=3, T=40, H=1, N=8, seed=3, decay="near_one", with_state=False, with_dstate=True))
    def check(shape):
        x = make_inputs(**shape, dtype=dtype)
        inputs_before = {n: None if a is None else a.copy() for n, a in x.items()}
        assert_same_run(run_numba(x), run_reference(x), dtype, what=str(shape))
        for n, a in x.items():  # the kernels update copies, never the caller's arrays
            if a is not None:
                np.testing.assert_array_equal(a, inputs_before[n], err_msg=n)

    check()


@pytest.mark.parametrize("segment", [1, 3, 7, 100])
def test_checkpoint_spacing_does_not_matter(monkeypatch, segment):
    """Every checkpoint spacing (one per token, ragged last segment, one segment for all T) gives the reference."""
    x = make_inputs(2, 23, 2, 4, seed=4)
    monkeypatch.setattr(numba_wkv6, "segment_length", lambda T: segment)
    assert_same_run(run_numba(x), run_reference(x), np.float64, what=f"segment={segment}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    """Views with strides (time reversed, every other head, a transposed state) work and equal their copies."""
    big = make_inputs(2, 15, 6, 8, seed=5, dtype=dtype)
    x = {n: big[n][:, ::-1, ::2] for n in ("r", "k", "v", "w", "dy")}  # (2, 15, 3, 8) views
    x["u"] = big["u"][::2]  # (3, 8)
    x["state"] = big["state"][:, ::2].swapaxes(-1, -2)  # (2, 3, 8, 8)
    x["dstate"] = big["dstate"][:, 1::2]
    assert not x["r"].flags.c_contiguous and not x["state"].flags.c_contiguous
    contiguous = {n: np.ascontiguousarray(a) for n, a in x.items()}
    assert_same_run(run_numba(x), run_reference(contiguous), dtype, what="strided")
    assert_same_run(run_numba(x), run_numba(contiguous), dtype, what="strided vs copy")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba's thread pool has a single thread")
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype):
    x = make_inputs(3, 21, 3, 8, seed=6, dtype=dtype)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_numba(x)
        numba.set_num_threads(2)
        two = run_numba(x)
    finally:
        numba.set_num_threads(n)
    assert numba.get_num_threads() == n
    assert_same_run(two, one, dtype, what="2 threads vs 1")


def test_bad_inputs_raise_value_error():
    x = make_inputs(1, 3, 2, 4, dtype=np.float32)
    fwd = [x[n] for n in ("r", "k", "v", "w", "u")]
    with pytest.raises(ValueError, match="one dtype"):
        numba_wkv6.forward(*fwd[:4], fwd[4].astype(np.float64))
    with pytest.raises(ValueError, match=r"\(H, N\)"):
        numba_wkv6.forward(*fwd[:4], fwd[4][:1])
    with pytest.raises(ValueError, match="dstate"):
        numba_wkv6.backward(*fwd, x["dy"], dstate=x["dstate"].astype(np.float64))
    w = fwd[3].copy()
    w[0, 1, 0, 0] = 100.0  # exp(100) overflows float32, as the reference rejects
    with pytest.raises(ValueError, match="overflows"), np.errstate(over="ignore"):
        numba_wkv6.forward(*fwd[:3], w, fwd[4])
