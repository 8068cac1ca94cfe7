"""The matrix WKV of RWKV-6 / RWKV-5.2: the recurrent reference and the chunked form test each other, finite
differences test both backwards, a hand-worked example pins the convention both could share (where u enters,
when the decay acts, which index of the state is the key), and a T x T constant-decay form checks the RWKV-5.2 case.
"""
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minirwkv.rwkv6 import wkv
from minirwkv.testing import FINITE_DIFF_STEP, assert_close, numerical_gradient, tol

DTYPES = [np.float64, np.float32]
GRAD_NAMES = ("dr", "dk", "dv", "dw", "du", "dstate")

# The raw decay w (decay factor exp(-exp(w))) over what init and training produce: the official init puts it in
# [-6, -1] (factors 0.9975 .. 0.69); training leaves it unbounded, so also near 1 (w = -12: 1 - 6e-6) and near 0
# (w = 6: exp(-403), zero in float32).
DECAY_RANGES = {
    "init": (-6.0, -1.0),
    "near_one": (-12.0, -6.0),
    "near_zero": (1.0, 6.0),
    "wide": (-12.0, 6.0),
}
CHUNKS = [1, 3, 7, 16, wkv.DEFAULT_CHUNK, 64]


class Inputs(NamedTuple):
    r: np.ndarray  # (B, T, H, N)
    k: np.ndarray  # (B, T, H, N)
    v: np.ndarray  # (B, T, H, N)
    w: np.ndarray  # (B, T, H, N) raw decay
    u: np.ndarray  # (H, N)
    state: np.ndarray | None  # (B, H, N, N)
    dy: np.ndarray  # (B, T, H, N)
    dstate: np.ndarray | None  # (B, H, N, N)

    def astype(self, dtype):
        return Inputs(*(None if a is None else np.ascontiguousarray(a, dtype=dtype) for a in self))

    def fwd(self):
        return self.r, self.k, self.v, self.w, self.u


def make_inputs(B, T, H, N, seed=0, decay="wide", with_state=True, with_dstate=True, mixed=False) -> Inputs:
    rng = np.random.default_rng(seed)
    lo, hi = DECAY_RANGES[decay]
    w = rng.uniform(lo, hi, (B, T, H, N))  # (B, T, H, N)
    if mixed:  # runs of large decays followed by runs of small ones: a difference of cumulative sums would cancel
        w = np.where((np.arange(T) // 5 % 2 == 0)[None, :, None, None], rng.uniform(3, 6, w.shape), w)
    return Inputs(
        r=rng.normal(0, 1, (B, T, H, N)), k=rng.normal(0, 1, (B, T, H, N)), v=rng.normal(0, 1, (B, T, H, N)),
        w=w, u=rng.normal(0, 1, (H, N)),
        state=rng.normal(0, 1, (B, H, N, N)) if with_state else None,
        dy=rng.normal(0, 1, (B, T, H, N)),
        dstate=rng.normal(0, 1, (B, H, N, N)) if with_dstate else None,
    )


@st.composite
def inputs(draw, max_T=70):
    return make_inputs(
        B=draw(st.integers(1, 3)), T=draw(st.integers(1, max_T)), H=draw(st.integers(1, 3)),
        N=draw(st.sampled_from([1, 2, 4, 8])), seed=draw(st.integers(0, 2**32 - 1)),
        decay=draw(st.sampled_from(sorted(DECAY_RANGES))), with_state=draw(st.booleans()),
        with_dstate=draw(st.booleans()), mixed=draw(st.booleans()))


def recurrent(x: Inputs):
    y, s = wkv.wkv6_recurrent_forward(*x.fwd(), state=x.state)
    return y, s, wkv.wkv6_recurrent_backward(*x.fwd(), x.dy, state=x.state, dstate=x.dstate)


def chunked(x: Inputs, chunk=wkv.DEFAULT_CHUNK):
    y, s = wkv.wkv6_chunked_forward(*x.fwd(), state=x.state, chunk=chunk)
    return y, s, wkv.wkv6_chunked_backward(*x.fwd(), x.dy, state=x.state, dstate=x.dstate, chunk=chunk)


def assert_same_run(a, b, x: Inputs, dtype, kind="same", what=""):
    (y_a, s_a, g_a), (y_b, s_b, g_b) = a, b
    assert y_a.dtype == y_b.dtype == s_a.dtype == s_b.dtype == dtype
    assert_close(y_a, y_b, dtype, kind=kind, what=f"{what} y")
    assert_close(s_a, s_b, dtype, kind=kind, what=f"{what} state")
    for name, ga, gb in zip(GRAD_NAMES, g_a, g_b):
        assert ga.dtype == dtype, name
        assert_close(ga, gb, dtype, kind=kind, what=f"{what} {name}")


T1 = make_inputs(2, 1, 3, 4, seed=1)
RAGGED = make_inputs(1, 37, 2, 8, seed=2, mixed=True)
NEAR_ZERO = make_inputs(2, 70, 1, 4, seed=3, decay="near_zero")
NEAR_ONE = make_inputs(2, 70, 1, 4, seed=4, decay="near_one")


# ---------------------------------------------------------------------------------------------------------------
# The convention, by hand: what both forms could get wrong together
# ---------------------------------------------------------------------------------------------------------------

def test_hand_worked_example_pins_the_convention():
    """N = 2, two tokens, a non-symmetric initial state: y_0 reads S_{-1} (not decayed by w_0), u scales the key
    channel of the current token, and the state is indexed [key, value]."""
    r = np.array([[[[1.0, 2.0]]], [[[0.5, -1.0]]]]).reshape(1, 2, 1, 2)  # (B, T, H, N)
    k = np.array([3.0, -1.0, 2.0, 1.0]).reshape(1, 2, 1, 2)
    v = np.array([1.0, 4.0, -2.0, 0.5]).reshape(1, 2, 1, 2)
    w = np.log(np.log(1 / np.array([0.5, 0.25, 0.1, 0.2]))).reshape(1, 2, 1, 2)  # factors 0.5, 0.25 | 0.1, 0.2
    u = np.array([[10.0, 100.0]])  # (H, N)
    S0 = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)  # S0[key, value]
    r0, r1, k0, k1, v0, v1 = r[0, 0, 0], r[0, 1, 0], k[0, 0, 0], k[0, 1, 0], v[0, 0, 0], v[0, 1, 0]
    S = S0[0, 0]
    y0 = S.T @ r0 + (r0 * u[0] * k0).sum() * v0  # [1 + 6, 2 + 8] + (30 - 200) v0
    S = np.diag([0.5, 0.25]) @ S + np.outer(k0, v0)
    y1 = S.T @ r1 + (r1 * u[0] * k1).sum() * v1
    S = np.diag([0.1, 0.2]) @ S + np.outer(k1, v1)
    np.testing.assert_allclose(y0, [7 - 170, 10 - 680])
    for forward in (wkv.wkv6_recurrent_forward, wkv.wkv6_chunked_forward):
        y, s = forward(r, k, v, w, u, state=S0)
        np.testing.assert_allclose(y[0, :, 0], [y0, y1], rtol=1e-12)
        np.testing.assert_allclose(s[0, 0], S, rtol=1e-12)


def test_first_and_last_decays_get_no_gradient_from_the_outputs():
    """w_t decays S_{t-1} when token t is written: with S_{-1} = 0 and no state gradient, w_0 scales nothing and
    w_{T-1} only shapes the returned state, so dw_0 = dw_{T-1} = 0 (and the middle ones are not)."""
    x = make_inputs(2, 9, 2, 4, seed=5, decay="init", with_state=False, with_dstate=False)
    for g in (recurrent(x)[2], chunked(x, chunk=4)[2]):
        assert np.all(g.dw[:, 0] == 0) and np.all(g.dw[:, -1] == 0)
        assert np.all(np.abs(g.dw[:, 1:-1]).max(axis=(0, 2, 3)) > 0)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_an_overflowing_decay_is_rejected():
    x = make_inputs(1, 3, 1, 2)
    w = x.w.astype(np.float32)
    w[0, 1, 0, 0] = 100.0  # exp(100) overflows float32
    for f in (wkv.wkv6_recurrent_forward, wkv.wkv6_chunked_forward):
        with pytest.raises(ValueError, match="overflows"):
            f(*(a.astype(np.float32) for a in (x.r, x.k, x.v)), w, x.u.astype(np.float32))
    with pytest.raises(ValueError, match="chunk"):
        wkv.wkv6_chunked_forward(*x.fwd(), chunk=0)


# ---------------------------------------------------------------------------------------------------------------
# Two forms, one meaning
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_equals_recurrent(dtype):
    @given(x=inputs(), chunk=st.sampled_from(CHUNKS))
    @example(x=T1, chunk=16)
    @example(x=RAGGED, chunk=16)
    @example(x=NEAR_ZERO, chunk=64)
    @example(x=NEAR_ONE, chunk=7)
    def check(x, chunk):
        x = x.astype(dtype)
        assert_same_run(chunked(x, chunk), recurrent(x), x, dtype, what=f"chunk={chunk}")

    check()


def test_step_by_step_equals_the_recurrent_forward():
    x = make_inputs(2, 23, 3, 4, seed=6, mixed=True)
    S = x.state
    ys = []
    for t in range(x.r.shape[1]):
        y_t, S = wkv.wkv6_step(x.r[:, t], x.k[:, t], x.v[:, t], x.w[:, t], x.u, S)
        ys.append(y_t)
    y, s = wkv.wkv6_recurrent_forward(*x.fwd(), state=x.state)
    np.testing.assert_array_equal(np.stack(ys, axis=1), y)
    np.testing.assert_array_equal(S, s)
    y_c, s_c = wkv.wkv6_chunked_forward(*x.fwd(), state=x.state, chunk=5)
    assert_close(y_c, y, np.float64, what="chunked y")
    assert_close(s_c, s, np.float64, what="chunked state")


def split(x: Inputs, t0, t1, state, dstate):
    cut = lambda a: a[:, t0:t1]  # noqa: E731
    return Inputs(cut(x.r), cut(x.k), cut(x.v), cut(x.w), x.u, state, cut(x.dy), dstate)


@given(x=inputs(), frac=st.floats(0, 1), chunk=st.sampled_from(CHUNKS))
def test_two_halves_with_the_carried_state_equal_the_whole(x, frac, chunk):
    """Forward: the second half starts from the first half's final state. Backward: the first half receives the
    second half's gradient of its initial state as the gradient of its final state; du adds up."""
    T = x.r.shape[1]
    cut = int(round(frac * T))
    for forward, backward, kw in ((wkv.wkv6_recurrent_forward, wkv.wkv6_recurrent_backward, {}),
                                  (wkv.wkv6_chunked_forward, wkv.wkv6_chunked_backward, {"chunk": chunk})):
        y, s = forward(*x.fwd(), state=x.state, **kw)
        g = backward(*x.fwd(), x.dy, state=x.state, dstate=x.dstate, **kw)
        first = split(x, 0, cut, x.state, None)
        y1, s1 = forward(*first.fwd(), state=first.state, **kw)
        second = split(x, cut, T, s1, x.dstate)
        y2, s2 = forward(*second.fwd(), state=s1, **kw)
        g2 = backward(*second.fwd(), second.dy, state=s1, dstate=x.dstate, **kw)
        g1 = backward(*first.fwd(), first.dy, state=x.state, dstate=g2.dstate, **kw)
        assert_close(np.concatenate([y1, y2], axis=1), y, np.float64, what="y")
        assert_close(s2, s, np.float64, what="state")
        for name in ("dr", "dk", "dv", "dw"):
            both = np.concatenate([getattr(g1, name), getattr(g2, name)], axis=1)
            assert_close(both, getattr(g, name), np.float64, what=name)
        assert_close(g1.du + g2.du, g.du, np.float64, what="du")
        assert_close(g1.dstate, g.dstate, np.float64, what="dstate")


# ---------------------------------------------------------------------------------------------------------------
# Gradients against central differences (float64)
# ---------------------------------------------------------------------------------------------------------------

def loss_of(forward, x: Inputs, terms=False, **kw):
    """L = sum(dy * y) + sum(dstate * S_out): its gradients are exactly what the backwards return.
    ``terms=True``: the sum of the magnitudes of its terms instead (what the rounding of L is relative to)."""
    mag = np.abs if terms else (lambda a: a)

    def L(r, k, v, w, u, state):
        y, s = forward(r, k, v, w, u, state=state, **kw)
        return mag(x.dy * y).sum() + (0 if x.dstate is None else mag(x.dstate * s).sum())
    return L


def finite_diff_floor(x: Inputs, forward, h=FINITE_DIFF_STEP, **kw) -> float:
    """A floor for assert_close's scale: a central difference of L carries a rounding error of about
    eps |terms of L| / h whatever the gradient's size (near-1 decays make dw tiny: d exp(-exp(w))/dw = lambda w)."""
    noise = 10 * np.finfo(np.float64).eps * loss_of(forward, x, terms=True, **kw)(*x.fwd(), x.state) / h
    return noise / tol(np.float64, "finite_diff").atol


@pytest.mark.parametrize("decay", sorted(DECAY_RANGES))
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_gradients_match_finite_differences(form, decay):
    """Every entry of every input, on a small shape (T = 7 over chunks of 3: a ragged last chunk)."""
    x = make_inputs(2, 7, 2, 2, seed=hash(decay) % 1000, decay=decay, mixed=(decay == "wide"))
    if form == "recurrent":
        forward, g, kw = wkv.wkv6_recurrent_forward, recurrent(x)[2], {}
    else:
        forward, g, kw = wkv.wkv6_chunked_forward, chunked(x, chunk=3)[2], {"chunk": 3}
    L = loss_of(forward, x, **kw)
    floor = finite_diff_floor(x, forward, **kw)
    args = [a.copy() for a in (x.r, x.k, x.v, x.w, x.u, x.state)]
    for name, arg, analytic in zip(GRAD_NAMES, args, g):
        numeric = numerical_gradient(lambda: L(*args), arg)
        assert_close(analytic, numeric, np.float64, kind="finite_diff", what=f"{form} {name}", scale=floor)


@pytest.mark.parametrize("seed", range(2))
def test_directional_derivatives_on_a_larger_shape(seed):
    """A random direction per input (the check_vjp idea): <grad, d> == (L(x + h d) - L(x - h d)) / 2h, at T = 45,
    N = 8, for both backwards."""
    x = make_inputs(2, 45, 2, 8, seed=10 + seed, mixed=True)
    rng = np.random.default_rng(seed)
    h = FINITE_DIFF_STEP
    for forward, g, kw in ((wkv.wkv6_recurrent_forward, recurrent(x)[2], {}),
                           (wkv.wkv6_chunked_forward, chunked(x, chunk=16)[2], {"chunk": 16})):
        L = loss_of(forward, x, **kw)
        floor = finite_diff_floor(x, forward, **kw)
        args = [x.r, x.k, x.v, x.w, x.u, x.state]
        for i, (name, analytic) in enumerate(zip(GRAD_NAMES, g)):
            d = rng.normal(0, 1, args[i].shape)
            plus, minus = list(args), list(args)
            plus[i], minus[i] = args[i] + h * d, args[i] - h * d
            numeric = (L(*plus) - L(*minus)) / (2 * h)
            assert_close(np.array((analytic * d).sum()), np.array(numeric), np.float64, kind="finite_diff",
                         what=f"{forward.__name__} {name}", scale=floor)


# ---------------------------------------------------------------------------------------------------------------
# RWKV-5.2: the decay constant over time
# ---------------------------------------------------------------------------------------------------------------

def v5_full_form(r, k, v, theta, u, state):
    """A third spelling, for a decay constant over time: the T x T form with powers w^{t-1-s} = exp((t-1-s) lambda).
    r, k, v (B, T, H, N); theta, u (H, N); state (B, H, N, N)."""
    T = r.shape[1]
    lam = -np.exp(theta)  # (H, N)
    t = np.arange(T)
    lag = (t[:, None] - 1 - t[None, :]).astype(float)  # (T, T)
    pair = np.exp(np.maximum(lag, 0)[:, :, None, None] * lam)  # (T, T, H, N) w^{t-1-s}
    A = np.einsum("bthi,bshi,tshi->bhts", r, k, pair) * (lag >= 0)  # (B, H, T, T) strictly causal part
    A += np.einsum("bthi,hi,bthi->bht", r, u, k)[..., None] * np.eye(T)  # the bonus on the diagonal
    y = np.einsum("bhts,bshj->bthj", A, v)  # (B, T, H, N)
    y += np.einsum("bthi,bhij->bthj", r * np.exp(t[:, None, None] * lam), state)  # S_{-1} decayed t times
    return y


@given(x=inputs(max_T=40), chunk=st.sampled_from(CHUNKS))
def test_constant_decay_is_rwkv5(x, chunk):
    theta = x.w[0, 0]  # (H, N) one raw decay per key channel, for every token
    w = np.broadcast_to(theta, x.w.shape).copy()  # (B, T, H, N)
    state = x.state if x.state is not None else np.zeros(x.r.shape[:1] + x.u.shape + x.u.shape[-1:])
    expected = v5_full_form(x.r, x.k, x.v, theta, x.u, state)
    for forward, kw in ((wkv.wkv6_recurrent_forward, {}), (wkv.wkv6_chunked_forward, {"chunk": chunk})):
        y, _ = forward(x.r, x.k, x.v, w, x.u, state=state, **kw)
        assert_close(y, expected, np.float64, what=forward.__name__)


def test_constant_decay_gradient_is_the_sum_over_time():
    """d time_decay of RWKV-5.2 = sum over (b, t) of dw, checked against central differences of the T x T form."""
    x = make_inputs(2, 11, 2, 2, seed=8, decay="init", with_dstate=False)
    theta = x.w[0, 0].copy()  # (H, N)
    w = np.broadcast_to(theta, x.w.shape).copy()  # (B, T, H, N)
    numeric = numerical_gradient(lambda: (x.dy * v5_full_form(x.r, x.k, x.v, theta, x.u, x.state)).sum(), theta)
    g = wkv.wkv6_chunked_backward(x.r, x.k, x.v, w, x.u, x.dy, state=x.state, chunk=4)
    assert_close(g.dw.sum(axis=(0, 1)), numeric, np.float64, kind="finite_diff", what="d time_decay")


# ---------------------------------------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", sorted(DECAY_RANGES))
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_float32_with_extreme_decays_is_finite_and_close_to_float64(form, decay):
    """The same (float32-representable) inputs in float32 and float64, at T = 70 with decays up to exp(-exp(6))
    (0 in float32) and down to 1 - 6e-6, incl. runs of large then small decays."""
    run = recurrent if form == "recurrent" else (lambda x: chunked(x, chunk=64))
    x32 = make_inputs(3, 70, 2, 8, seed=20, decay=decay, mixed=(decay in ("wide", "near_one"))).astype(np.float32)
    x64 = x32.astype(np.float64)
    y32, s32, g32 = run(x32)
    y64, s64, g64 = run(x64)
    for a in (y32, s32, *g32):
        assert a.dtype == np.float32 and np.isfinite(a).all()
    assert_close(y32, y64, np.float32, kind="vs_f64", what="y")
    assert_close(s32, s64, np.float32, kind="vs_f64", what="state")
    for name, a, b in zip(GRAD_NAMES, g32, g64):
        assert_close(a, b, np.float32, kind="vs_f64", what=name)
