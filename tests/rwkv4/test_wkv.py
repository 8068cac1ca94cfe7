"""The two reference forms of the WKV test each other; finite differences test both backwards."""
import numpy as np
import pytest
from hypothesis import example, given

from minirwkv.rwkv4 import wkv
from minirwkv.testing import assert_close, init_like_wkv_inputs, make_wkv_inputs, numerical_gradient, wkv_inputs

DTYPES = [np.float64, np.float32]


def run_recurrent(x):
    y, state = wkv.wkv_recurrent_forward(x.w.astype(x.k.dtype), x.time_first, x.k, x.v)
    grads = wkv.wkv_recurrent_backward(x.w.astype(x.k.dtype), x.time_first, x.k, x.v, y, x.gy)
    return y, state, grads


def run_parallel(x):
    y, cache, state = wkv.wkv_parallel_forward(x.w.astype(x.k.dtype), x.time_first, x.k, x.v)
    return y, state, wkv.wkv_parallel_backward(x.gy, cache)


EXTREME = make_wkv_inputs(2, 5, 3, seed=7, k_scale=100.0)  # |k| near 100: e^k overflows float32
EXTREME.k[0, 0, :] = [100.0, -100.0, 88.75]
T1 = make_wkv_inputs(3, 1, 4, seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_equals_recurrent(dtype):
    @given(x=wkv_inputs(dtype))
    @example(x=EXTREME.astype(dtype))
    @example(x=T1.astype(dtype))
    def check(x):
        y_r, s_r, g_r = run_recurrent(x)
        y_p, s_p, g_p = run_parallel(x)
        assert y_r.dtype == y_p.dtype == dtype
        assert_close(y_r, y_p, dtype, what="y")
        for name, a, b in zip(("gw", "gu", "gk", "gv"), g_r, g_p):
            assert a.dtype == dtype
            assert_close(a, b, dtype, what=name, scale=x.grad_scale(name))
        # the final state: a = aa e^pp and b = bb e^pp, compared through their ratio and scale
        assert_close(s_r.pp, s_p.pp, dtype, what="pp")
        assert_close(s_r.aa / s_r.bb, s_p.aa / s_p.bb, dtype, what="aa/bb")
        assert_close(s_r.bb, s_p.bb, dtype, what="bb")

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_is_a_convex_combination_and_finite(dtype):
    @given(x=wkv_inputs(dtype))
    @example(x=EXTREME.astype(dtype))
    def check(x):
        for y, state, grads in (run_recurrent(x), run_parallel(x)):
            assert all(np.isfinite(a).all() for a in (y, *state, *grads))
            lo = np.minimum.accumulate(x.v, axis=1)
            hi = np.maximum.accumulate(x.v, axis=1)
            slack = 4 * np.finfo(dtype).eps * np.maximum(np.abs(lo), np.abs(hi))
            assert np.all(y >= lo - slack) and np.all(y <= hi + slack)

    check()


@pytest.mark.parametrize("seed", range(4))
def test_float32_recurrent_close_to_float64(seed):
    """The stable recurrence in float32 stays within 1e-5 (normwise) of float64 at T = 64, init-like inputs."""
    x = init_like_wkv_inputs(3, 64, 33, seed=seed)
    y64, _, g64 = run_recurrent(x)
    y32, _, g32 = run_recurrent(x.astype(np.float32))
    assert_close(y32, y64, np.float32, kind="vs_f64", what="y")
    for name, a, b in zip(("gw", "gu", "gk", "gv"), g32, g64):
        assert_close(a, b, np.float32, kind="vs_f64", what=name, scale=x.grad_scale())


def numerical_grads(x, forward):
    """Central differences of L = sum(gy * y) with respect to theta, u, k, v (float64)."""
    args = [x.time_decay.copy(), x.time_first.copy(), x.k.copy(), x.v.copy()]

    def L():
        return (forward(-np.exp(args[0]), args[1], args[2], args[3]) * x.gy).sum()

    return [numerical_gradient(L, a) for a in args]


@pytest.mark.parametrize("form", ["recurrent", "parallel"])
@pytest.mark.parametrize("seed,k_scale", [(0, 1.0), (1, 3.0), (2, 10.0)])
def test_gradients_match_finite_differences(form, seed, k_scale):
    x = make_wkv_inputs(2, 6, 3, seed=seed, k_scale=k_scale, theta=(-3, 1), u=(-2, 2))
    w = x.w
    if form == "recurrent":
        def fwd(w_, u_, k_, v_):
            return wkv.wkv_recurrent_forward(w_, u_, k_, v_)[0]
        y = fwd(w, x.time_first, x.k, x.v)
        gw, gu, gk, gv = wkv.wkv_recurrent_backward(w, x.time_first, x.k, x.v, y, x.gy)
    else:
        def fwd(w_, u_, k_, v_):
            return wkv.wkv_parallel_forward(w_, u_, k_, v_)[0]
        _, cache, _ = wkv.wkv_parallel_forward(w, x.time_first, x.k, x.v)
        gw, gu, gk, gv = wkv.wkv_parallel_backward(x.gy, cache)
    num = numerical_grads(x, fwd)
    for name, a, b in zip(("g_theta", "gu", "gk", "gv"), (gw * w, gu, gk, gv), num):
        assert_close(a, b, np.float64, kind="finite_diff", what=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_carried_across_chunks_equals_whole(dtype):
    @given(x=wkv_inputs(dtype, max_T=32))
    def check(x):
        T = x.k.shape[1]
        cut = T // 2
        w = x.w.astype(dtype)
        y, state = wkv.wkv_recurrent_forward(w, x.time_first, x.k, x.v)
        y1, s1 = wkv.wkv_recurrent_forward(w, x.time_first, x.k[:, :cut], x.v[:, :cut])
        y2, s2 = wkv.wkv_recurrent_forward(w, x.time_first, x.k[:, cut:], x.v[:, cut:], s1)
        np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y)  # the same arithmetic: bit-identical
        for a, b in zip(s2, state):
            np.testing.assert_array_equal(a, b)

    check()


def naive_wkv(w, u, k, v):
    """The defining sum, evaluated directly in float64 (no log-scale): moderate inputs only. (B, T, C) -> (B, T, C)."""
    B, T, C = k.shape
    y = np.empty_like(v)
    for t in range(T):
        past = np.exp((t - 1 - np.arange(t))[None, :, None] * w + k[:, :t])  # (B, t, C) e^{(t-1-i) w + k_i}
        now = np.exp(u + k[:, t])  # (B, C) e^{u + k_t}
        y[:, t] = ((past * v[:, :t]).sum(axis=1) + now * v[:, t]) / (past.sum(axis=1) + now)
    return y


def test_wkv_step_from_a_carried_state_equals_the_defining_sum():
    """wkv_step, started from the (aa, bb, pp) of a prefix and stepped on, gives the defining sum over the whole
    sequence: the state update (decay once, then add the token) and the output (bonus u on the current token only)
    are both checked against the formula, not against the loop that calls wkv_step."""
    x = make_wkv_inputs(2, 6, 3, seed=5, k_scale=2.0)
    expected = naive_wkv(x.w, x.time_first, x.k, x.v)
    aa, bb, pp = wkv.zero_state(2, 3, np.float64)
    for t in range(6):
        yt, aa, bb, pp = wkv.wkv_step(x.w, x.time_first, x.k[:, t], x.v[:, t], aa, bb, pp)
        assert_close(yt, expected[:, t], np.float64, what=f"y at t={t}")
    # the state is (a, b) = sum_{i<=T-1} e^{(T-1-i) w + k_i} (v_i, 1) scaled by e^{-pp}
    decay = np.exp((5 - np.arange(6))[None, :, None] * x.w + x.k)  # (B, T, C)
    assert_close(aa * np.exp(pp), (decay * x.v).sum(axis=1), np.float64, what="numerator a")
    assert_close(bb * np.exp(pp), decay.sum(axis=1), np.float64, what="denominator b")


@pytest.mark.parametrize("k", [100.0, -100.0, 95.0])
def test_stable_recurrence_in_float32_at_extreme_keys_equals_float64(k):
    """At |k| = 100, e^k overflows (or underflows to 0 in) float32; the stable recurrence must stay finite and agree
    with the float64 parallel form (log-weights with the row maximum subtracted)."""
    x = make_wkv_inputs(2, 7, 4, seed=0)
    x.k[:, ::2] = k  # every other token extreme, the rest moderate
    x32 = x.astype(np.float32)
    y32, _ = wkv.wkv_recurrent_forward(x32.w.astype(np.float32), x32.time_first, x32.k, x32.v)
    y64, _, _ = wkv.wkv_parallel_forward(x.w, x.time_first, x.k, x.v)
    assert np.isfinite(y32).all()
    assert_close(y32, y64, np.float32, kind="vs_f64", what=f"y at k = {k}")


def test_parallel_form_refuses_a_carried_state():
    x = make_wkv_inputs(1, 2, 2)
    with pytest.raises(ValueError, match="zero state"):
        wkv._parallel_backend_forward(x.w, x.time_first, x.k, x.v, wkv.zero_state(1, 2, np.float64))
