"""The Numba WKV kernels against the NumPy recurrent reference of wkv.py (docs/rwkv4.md §3.2-3.4).

Kernel == reference in the same dtype (forward y, final state, all four gradients); float32 kernel == float64
reference to the kernels' accuracy target; carrying the state across two halves == the whole sequence; finite
outputs on extreme inputs; y inside the range of the values seen so far (a convex combination).
"""
import numpy as np
import pytest


from minirwkv.backends.numba import wkv4 as numba_wkv  # noqa: E402
from minirwkv.testing import WKVInputs, assert_close, make_wkv_inputs  # noqa: E402
from minirwkv.rwkv4.wkv import WKVState, wkv_recurrent_backward, wkv_recurrent_forward  # noqa: E402

def _run_numba(x: WKVInputs):
    w = x.w.astype(x.k.dtype)  # the contract takes w = -exp(time_decay) in the inputs' dtype
    y, state = numba_wkv.forward(w, x.time_first, x.k, x.v)
    return y, state, numba_wkv.backward(w, x.time_first, x.k, x.v, y, x.gy)


def _check_same_as_reference(x: WKVInputs):
    dtype = x.k.dtype
    w = x.w.astype(dtype)
    y, state, grads = _run_numba(x)
    y_ref, state_ref = wkv_recurrent_forward(w, x.time_first, x.k, x.v)
    grads_ref = wkv_recurrent_backward(w, x.time_first, x.k, x.v, y_ref, x.gy)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(y, y_ref, dtype, "same", "y")
    for name, a, e in zip(WKVState._fields, state, state_ref):
        assert_close(a, e, dtype, "same", f"state.{name}")
    for name, a, e in zip(("gw", "gu", "gk", "gv"), grads, grads_ref):
        assert_close(a, e, dtype, "same", name, scale=x.grad_scale(name))


def test_bad_inputs_raise_value_error():
    x = make_wkv_inputs(1, 4, 3, dtype=np.float32)
    w = x.w.astype(np.float32)
    with pytest.raises(ValueError, match="one dtype"):
        numba_wkv.forward(w.astype(np.float64), x.time_first, x.k, x.v)
    with pytest.raises(ValueError, match=r"\(C,\)"):
        numba_wkv.forward(w[:2], x.time_first, x.k, x.v)
    with pytest.raises(ValueError, match="state.pp"):
        aa, bb, pp = numba_wkv.forward(w, x.time_first, x.k, x.v)[1]
        numba_wkv.forward(w, x.time_first, x.k, x.v, WKVState(aa, bb, pp.astype(np.float64)))


def test_threads_can_be_set_and_queried():
    n = numba_wkv.get_threads()
    try:
        numba_wkv.set_threads(1)
        assert numba_wkv.get_threads() == 1
    finally:
        numba_wkv.set_threads(n)
    with pytest.raises(ValueError, match="threads"):
        numba_wkv.set_threads(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [37, 64])
def test_results_do_not_depend_on_the_channel_blocks(monkeypatch, dtype, C):
    """Each (b, c) pair is its own recurrence: blocks of 16, 32 or a whole row (with a remainder block when C is not
    a multiple) give bit-identical results, and the same as the reference."""
    x = make_wkv_inputs(2, 9, C, seed=C, dtype=dtype)
    results = []
    for width in (16, 32, 4096):
        monkeypatch.setattr(numba_wkv, "block_size", lambda B, C, width=width: width)
        results.append(_run_numba(x))
    for y, state, grads in results[1:]:
        for a, e in zip((y, *state, *grads), (results[0][0], *results[0][1], *results[0][2])):
            np.testing.assert_array_equal(a, e)
    _check_same_as_reference(x)


def test_block_size_is_a_multiple_of_the_simd_width_and_feeds_every_thread():
    threads = numba_wkv.get_threads()
    for B, C in [(1, 1), (1, 37), (8, 512), (1, 512), (3, 1000), (64, 16)]:
        block = numba_wkv.block_size(B, C)
        assert block % numba_wkv.SIMD_WIDTH == 0 and block >= numba_wkv.SIMD_WIDTH
        tasks = B * -(-C // block)
        assert tasks >= min(numba_wkv.TASKS_PER_THREAD * threads, B * -(-C // numba_wkv.SIMD_WIDTH))
        assert block == numba_wkv.SIMD_WIDTH or block <= C + numba_wkv.SIMD_WIDTH - 1  # no wider than the row
