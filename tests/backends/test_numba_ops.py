"""The Numba element-wise kernels (backends/numba_ops.py) and the vectorisable exp (backends/fastexp.py).

Every fused op == the reference composition of minirwkv.ops it replaces (its outputs and every gradient), float32
and float64; the whole model gives the same logits and gradients with impl="numba" and impl="numpy"; the AdamW
update == the plain NumPy formula; the fast exp is within 2 ulp of the correctly rounded exp over its whole domain,
exactly 1 at 0 and exactly 0 below the underflow threshold.
"""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st


import minirwkv  # noqa: E402
from minirwkv import layers as ops  # noqa: E402
from minirwkv.api import init_params  # noqa: E402
from minirwkv.backends.numba import ops as numba_ops  # noqa: E402
from minirwkv.backends.numba.fastexp import exp_nonpositive_array  # noqa: E402
from minirwkv.backends.engine import make_engine  # noqa: E402
from minirwkv.testing import assert_close  # noqa: E402

DTYPES = [np.float32, np.float64]
EXP_MAX_ULP = 2.0  # the bound stated in fastexp's docstring (measured: ~1.2 ulp in both dtypes)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: odd sizes (SIMD remainders, C = 1, T = 1) and values from tiny to large, drawn by hypothesis
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def shapes(draw, max_B=3, max_T=9, max_C=37):
    return draw(st.integers(1, max_B)), draw(st.integers(1, max_T)), draw(st.integers(1, max_C))


@st.composite
def arrays(draw, shape, dtype, scale=None):
    """A seeded normal array times a scale from 1e-3 to 1e3, plus a few hand-placed ugly entries (0, +-100)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = scale if scale is not None else draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3]))
    a = scale * rng.standard_normal(shape)
    for _ in range(draw(st.integers(0, 3))):
        a[tuple(draw(st.integers(0, n - 1)) for n in shape)] = draw(st.sampled_from([0.0, 100.0, -100.0, 88.75]))
    return np.ascontiguousarray(a, dtype=dtype)


def _same(actual, expected, dtype, what, scale=None):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    assert_close(actual, expected, dtype, "same", what, scale=scale)


# ---------------------------------------------------------------------------------------------------------------
# Token shift + mixes
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def shift_mix_inputs(draw, dtype):
    B, T, C = draw(shapes())
    n = draw(st.sampled_from([2, 3]))  # channel mixing, time mixing
    x = draw(arrays((B, T, C), dtype))
    x_prev = draw(st.none() | arrays((B, C), dtype))
    mixes = tuple(draw(arrays((1, 1, C), dtype, scale=1.0)) for _ in range(n))
    dms = tuple(draw(arrays((B, T, C), dtype)) for _ in range(n))
    return x, x_prev, mixes, dms


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_shift_mix_equals_reference(dtype):
    @given(shift_mix_inputs(dtype))
    def check(inputs):
        x, x_prev, mixes, dms = inputs
        outs, caches = numba_ops.token_shift_mix_forward(x, x_prev, mixes)
        outs_ref, caches_ref = ops.token_shift_mix_forward(x, x_prev, mixes)
        scale = np.abs(x).max() + (0 if x_prev is None else np.abs(x_prev).max())  # m sums x and xx terms
        for j, (a, e) in enumerate(zip(outs, outs_ref)):
            _same(a, e, dtype, f"m_{j}", scale=scale)
        dx, dmix = numba_ops.token_shift_mix_backward(dms, caches)
        dx_ref, dmix_ref = ops.token_shift_mix_backward(dms, caches_ref)
        _same(dx, dx_ref, dtype, "dx", scale=sum(np.abs(d).max() for d in dms))
        n_terms = x.shape[0] * x.shape[1]  # dmix sums B T terms of size |dm| |x - xx|
        for j, (a, e) in enumerate(zip(dmix, dmix_ref)):
            assert a.shape == (1, 1, x.shape[2])
            _same(a, e, dtype, f"dmix_{j}", scale=n_terms * np.abs(dms[j]).max() * 2 * scale)

    check()


def test_token_shift_mix_reference_is_the_composition_of_the_pairs():
    """The composite in ops.py means: shift, then each mix; backward sums the fan-outs (checked by hand)."""
    rng = np.random.default_rng(0)
    x, dm = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    mix = rng.uniform(size=(1, 1, 3))
    (m,), (cache,) = ops.token_shift_mix_forward(x, None, (mix,))
    xx = ops.token_shift_forward(x)
    np.testing.assert_array_equal(m, ops.mix_forward(x, xx, mix)[0])
    dx, (dmix,) = ops.token_shift_mix_backward((dm,), (cache,))
    dx_direct, dxx, dmix_direct = ops.mix_backward(dm, cache)
    np.testing.assert_array_equal(dx, dx_direct + ops.token_shift_backward(dxx))
    np.testing.assert_array_equal(dmix, dmix_direct)


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm, gate, relu^2, embedding
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def layernorm_inputs(draw, dtype):
    """Rows with mean up to 10 standard deviations away from 0 (beyond that the float32 reference itself loses the
    row's variance to cancellation, and two correct implementations disagree)."""
    B, T, C = draw(shapes())
    spread = draw(st.sampled_from([1e-2, 1.0, 100.0]))
    offset = draw(st.sampled_from([0.0, 10.0, -3.0])) * spread
    x = np.ascontiguousarray(offset + spread * draw(arrays((B, T, C), np.float64, scale=1.0)), dtype=dtype)
    weight, bias, dy = (draw(arrays(s, dtype, scale=1.0)) for s in ((C,), (C,), (B, T, C)))
    return x, weight, bias, dy


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_equals_reference(dtype):
    @given(layernorm_inputs(dtype))
    def check(inputs):
        x, weight, bias, dy = inputs
        y, cache = numba_ops.layernorm_forward(x, weight, bias)
        y_ref, cache_ref = ops.layernorm_forward(x, weight, bias)
        _same(y, y_ref, dtype, "y", scale=np.abs(weight).max() * np.sqrt(x.shape[-1]) + np.abs(bias).max())
        assert cache.rstd.shape == cache_ref.rstd.shape and cache.xhat.shape == cache_ref.xhat.shape
        rows = x.shape[0] * x.shape[1]
        g_scale = np.abs(dy).max() * np.sqrt(x.shape[-1])  # |xhat| <= sqrt(C)
        for name, a, e, s in zip(("dx", "dweight", "dbias"), numba_ops.layernorm_backward(dy, cache),
                                 ops.layernorm_backward(dy, cache_ref),
                                 (g_scale * np.abs(weight).max() * cache_ref.rstd.max() * 3, rows * g_scale,
                                  rows * np.abs(dy).max())):
            _same(a, e, dtype, name, scale=s)

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_equals_reference(dtype):
    @given(shapes(), st.data())
    @example((1, 1, 5), None)
    def check(shape, data):
        rng = np.random.default_rng(0)
        if data is None:  # sigmoid near float32's exp overflow and at exactly 0
            r = np.array([-100.0, -88.75, 0.0, 88.75, 100.0], dtype).reshape(shape)
            y, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        else:
            r, y, dout = (data.draw(arrays(shape, dtype)) for _ in range(3))
        out, cache = numba_ops.gate_forward(r, y)
        out_ref, cache_ref = ops.gate_forward(r, y)
        _same(cache.sr, cache_ref.sr, dtype, "sigmoid(r)")
        _same(out, out_ref, dtype, "out")
        dr, dy = numba_ops.gate_backward(dout, cache)
        dr_ref, dy_ref = ops.gate_backward(dout, cache_ref)
        _same(dr, dr_ref, dtype, "dr", scale=np.abs(dout * y).max() / 4)
        _same(dy, dy_ref, dtype, "dy")

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_square_equals_reference(dtype):
    @given(shapes(max_C=70), st.data())
    def check(shape, data):
        x, dh = data.draw(arrays(shape, dtype)), data.draw(arrays(shape, dtype))
        h, cache = numba_ops.relu_square_forward(x)
        h_ref, cache_ref = ops.relu_square_forward(x)
        _same(h, h_ref, dtype, "h")
        _same(numba_ops.relu_square_backward(dh, cache), ops.relu_square_backward(dh, cache_ref), dtype, "dx")

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_equals_reference(dtype):
    @given(shapes(), st.integers(1, 7), st.data())
    def check(shape, V, data):
        B, T, C = shape
        idx = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).integers(0, V, (B, T))  # repeats
        dx = data.draw(arrays(shape, dtype))
        _, cache = ops.embedding_forward(np.zeros((V, C), dtype), idx)
        _same(numba_ops.embedding_backward(dx, cache), ops.embedding_backward(dx, cache), dtype, "dweight",
              scale=B * T * np.abs(dx).max())

    check()


# ---------------------------------------------------------------------------------------------------------------
# The whole model: impl="numba" (Numba WKV + Numba element-wise ops) == impl="numpy" (the reference)
# ---------------------------------------------------------------------------------------------------------------

def _random_model(dtype, seed=0):
    config = minirwkv.ModelConfig(vocab_size=13, n_embd=9, n_layer=2)
    params = init_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for k, a in params.items():  # no zero matrices and non-trivial norms, so every gradient path carries signal
        params[k] = np.ascontiguousarray(a + 0.3 * rng.standard_normal(a.shape), dtype=dtype)
    return config, params


@pytest.mark.parametrize("dtype, kind", [(np.float64, "same"), (np.float32, "vs_f64_model")])
@pytest.mark.parametrize("T", [1, 7])
def test_model_numba_equals_numpy(dtype, kind, T):
    config, params = _random_model(dtype, seed=T)
    rng = np.random.default_rng(T)
    idx = rng.integers(0, config.vocab_size, (2, T))
    targets = rng.integers(0, config.vocab_size, (2, T))
    assert_close(minirwkv.forward(params, idx, impl="numba"), minirwkv.forward(params, idx, impl="numpy"), dtype,
                 kind, "logits")
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numba")
    loss_ref, grads_ref = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    assert abs(loss - loss_ref) <= 1e-4 * abs(loss_ref)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name].dtype == dtype and grads[name].shape == grads_ref[name].shape
        assert_close(grads[name], grads_ref[name], dtype, kind, name)


def test_ops_registry_overrides_are_explicit():
    numba_namespace, reference = make_engine("numba").ops, make_engine("numpy").ops
    assert make_engine("auto") is make_engine("numba")
    assert numba_namespace.overridden == numba_ops.OVERRIDES and reference.overridden == ()
    for name in numba_ops.OVERRIDES:
        assert getattr(numba_namespace, name) is getattr(numba_ops, name)
        assert getattr(reference, name) is getattr(ops, name)
    for engine_ops in (numba_namespace, reference):  # not overridden: the reference, its products on the pool
        assert engine_ops.linear_forward.func is ops.linear_forward and engine_ops.linear_backward.func is \
            ops.linear_backward
        assert engine_ops.linear_forward.keywords["matmul"].__self__ is make_engine("numba").pool
    assert make_engine("parallel").ops.overridden == ()


# ---------------------------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_update_equals_numpy_formula(dtype, weight_decay):
    rng = np.random.default_rng(1)
    shape = (7, 33)
    param, grad = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    m, v = (0.1 * rng.standard_normal(shape)).astype(dtype), (0.1 * rng.random(shape)).astype(dtype)
    lr, b1, b2, eps, t = 3e-3, 0.9, 0.99, 1e-8, 5
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    f = np.dtype(dtype).type  # the plain formula, in torch.optim.AdamW's order
    p_ref = param * f(1 - lr * weight_decay)
    m_ref = m * f(b1) + grad * f(1 - b1)
    v_ref = v * f(b2) + (grad * grad) * f(1 - b2)
    p_ref = p_ref - f(lr / bc1) * (m_ref / (np.sqrt(v_ref) / f(np.sqrt(bc2)) + f(eps)))
    numba_ops.adamw_update(param, grad, m, v, lr, b1, b2, eps, weight_decay, bc1, bc2)
    for name, a, e in (("param", param, p_ref), ("m", m, m_ref), ("v", v, v_ref)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, e, err_msg=f"{name}: the same operations in the same order, no FMA")


def test_adamw_update_rejects_mismatched_arrays():
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="one shape and dtype"):
        numba_ops.adamw_update(a, np.zeros(4), a.copy(), a.copy(), 1e-3, 0.9, 0.99, 1e-8, 0.0, 0.1, 0.01)
    with pytest.raises(ValueError, match="C-contiguous"):
        numba_ops.adamw_update(np.zeros((4, 4), np.float32).T, a, a, a, 1e-3, 0.9, 0.99, 1e-8, 0.0, 0.1, 0.01)


# ---------------------------------------------------------------------------------------------------------------
# The vectorisable exp
# ---------------------------------------------------------------------------------------------------------------

def _ulp_errors(x, dtype):
    """|fast exp - exact| in units of the last place of the correctly rounded result, and that result."""
    wide = np.float64 if dtype == np.float32 else np.longdouble  # long double: 64-bit mantissa on x86
    if dtype == np.float64 and np.finfo(np.longdouble).nmant < 63:
        pytest.skip("no extended-precision long double to check float64 against")
    exact = np.exp(x.astype(wide))
    rounded = exact.astype(dtype)
    ulp = np.spacing(rounded).astype(wide)
    return np.abs(exp_nonpositive_array(x).astype(wide) - exact) / ulp, rounded


@pytest.mark.parametrize("dtype, lo", [(np.float32, -87.33), (np.float64, -708.39)])
def test_fast_exp_within_2_ulp_over_the_normal_range(dtype, lo):
    """Dense samples of [lo, 0] (results normal), plus the neighbourhood of 0 where r is tiny."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(lo, 0, 200_000), -rng.uniform(0, 1e-3, 20_000), np.linspace(lo, 0, 50_001)])
    x = x.astype(dtype)
    err, rounded = _ulp_errors(x, dtype)
    assert np.all(rounded >= np.finfo(dtype).tiny)
    assert err.max() <= EXP_MAX_ULP, f"max error {err.max():.2f} ulp at x = {x[np.argmax(err)]!r}"


@pytest.mark.parametrize("dtype, lo", [(np.float32, -103.98), (np.float64, -745.2)])
def test_fast_exp_subnormal_results_within_one_subnormal_unit(dtype, lo):
    x = np.linspace(lo, np.log(np.finfo(dtype).tiny) + 0.01, 20_001).astype(dtype)
    exact = np.exp(x.astype(np.longdouble))
    smallest = np.longdouble(np.finfo(dtype).smallest_subnormal)
    assert np.max(np.abs(exp_nonpositive_array(x).astype(np.longdouble) - exact)) <= smallest


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_exp_exact_values(dtype):
    f = np.dtype(dtype).type
    underflow = {np.float32: -103.98, np.float64: -745.14}[dtype]  # below ln(smallest subnormal / 2)
    x = np.array([0.0, -0.0, underflow, 2 * underflow, -1e4, -1e38, -np.finfo(dtype).max], dtype)
    y = exp_nonpositive_array(x)
    assert y.dtype == dtype
    assert y[0] == f(1) and y[1] == f(1), "exp(0) must be exactly 1"
    assert np.all(y[2:] == 0), f"exp below the underflow threshold must be exactly 0, got {y[2:]}"
    np.testing.assert_array_equal(exp_nonpositive_array(x.reshape(7, 1)), y.reshape(7, 1))  # any shape


def test_fast_exp_all_float32_in_a_binade():
    """Every float32 in [-2, -1) (2^23 values): the whole mantissa range through the polynomial."""
    x = -(np.uint32(0x3F800000) + np.arange(2**23, dtype=np.uint32)).view(np.float32)  # 0x3F800000 is 1.0
    err, _ = _ulp_errors(x, np.float32)
    assert err.max() <= EXP_MAX_ULP
