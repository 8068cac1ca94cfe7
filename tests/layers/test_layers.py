"""Every op's backward against central finite differences, in float64."""
import numpy as np
import pytest

from minirwkv import layers as ops
from minirwkv.testing import assert_close, numerical_gradient

def numeric_grad(f, x, dy):
    """d/dx of sum(f(x) * dy) by central differences."""
    return numerical_gradient(lambda: (f() * dy).sum(), x)


def check(name, analytic, f, x, dy):
    assert_close(analytic, numeric_grad(f, x, dy), np.float64, kind="finite_diff", what=name)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_layernorm(rng):
    x, w, b = rng.normal(size=(2, 3, 5)), rng.normal(size=5), rng.normal(size=5)
    dy = rng.normal(size=(2, 3, 5))
    y, cache = ops.layernorm_forward(x, w, b)
    dx, dw, db = ops.layernorm_backward(dy, cache)
    f = lambda: ops.layernorm_forward(x, w, b)[0]  # noqa: E731
    check("dx", dx, f, x, dy)
    check("dw", dw, f, w, dy)
    check("db", db, f, b, dy)


def test_layernorm_matches_definition(rng):
    x = rng.normal(size=(4, 7)) * 3 + 1
    y, _ = ops.layernorm_forward(x, np.ones(7), np.zeros(7))
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    assert_close(y, expected, np.float64, what="layernorm")


def test_linear(rng):
    x, W = rng.normal(size=(2, 3, 4)), rng.normal(size=(6, 4))
    dy = rng.normal(size=(2, 3, 6))
    y, cache = ops.linear_forward(x, W)
    assert y.shape == (2, 3, 6)
    dx, dW = ops.linear_backward(dy, cache)
    f = lambda: ops.linear_forward(x, W)[0]  # noqa: E731
    check("dx", dx, f, x, dy)
    check("dW", dW, f, W, dy)


@pytest.mark.parametrize("eps", [64e-5, 1e-5, 1.0])
def test_groupnorm(rng, eps):
    """Per (b, t, head) over the head's N channels; eps on the input as given. Small-variance heads make the eps
    matter (the last head is nearly constant)."""
    H, N = 3, 4
    x, w, b = rng.normal(size=(2, 3, H * N)), rng.normal(size=H * N), rng.normal(size=H * N)
    x[..., -N:] = 0.5 + 0.01 * x[..., -N:]
    dy = rng.normal(size=x.shape)
    y, cache = ops.groupnorm_forward(x, w, b, H, eps)
    dx, dw, db = ops.groupnorm_backward(dy, cache)
    f = lambda: ops.groupnorm_forward(x, w, b, H, eps)[0]  # noqa: E731
    check("dx", dx, f, x, dy)
    check("dw", dw, f, w, dy)
    check("db", db, f, b, dy)
    g = x.reshape(2, 3, H, N)
    expected = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)
    assert_close(y, expected * w + b, np.float64, what="groupnorm definition")


def test_groupnorm_never_mixes_tokens(rng):
    """One token's output depends on that token alone (an early RWKV-5 normalised across time)."""
    x = rng.normal(size=(1, 5, 8))
    y, _ = ops.groupnorm_forward(x, np.ones(8), np.zeros(8), 2, 64e-5)
    x2 = x.copy()
    x2[:, 3:] *= 7
    y2, _ = ops.groupnorm_forward(x2, np.ones(8), np.zeros(8), 2, 64e-5)
    assert np.array_equal(y[:, :3], y2[:, :3])


def test_silu(rng):
    a = rng.normal(size=(2, 3, 5)) * 4
    dg = rng.normal(size=a.shape)
    g, cache = ops.silu_forward(a)
    assert_close(g, a / (1 + np.exp(-a)), np.float64, what="silu")
    check("da", ops.silu_backward(dg, cache), lambda: ops.silu_forward(a)[0], a, dg)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", None])
def test_lora(rng, act):
    x, w1, w2 = rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    dy = rng.normal(size=(2, 3, 4))
    y, cache = ops.lora_forward(x, w1, w2, act)
    middle = {"tanh": np.tanh, "sigmoid": lambda p: 1 / (1 + np.exp(-p)), None: lambda p: p}[act]
    assert_close(y, middle(x @ w1) @ w2, np.float64, what="lora")
    dx, dw1, dw2 = ops.lora_backward(dy, cache)
    f = lambda: ops.lora_forward(x, w1, w2, act)[0]  # noqa: E731
    check("dx", dx, f, x, dy)
    check("dw1", dw1, f, w1, dy)
    check("dw2", dw2, f, w2, dy)


def test_embedding_scatter_adds_repeated_tokens(rng):
    weight = rng.normal(size=(5, 3))
    idx = np.array([[0, 2, 2], [4, 2, 0]])
    dy = rng.normal(size=(2, 3, 3))
    x, cache = ops.embedding_forward(weight, idx)
    np.testing.assert_array_equal(x, weight[idx])
    dweight = ops.embedding_backward(dy, cache)
    check("dweight", dweight, lambda: ops.embedding_forward(weight, idx)[0], weight, dy)
    np.testing.assert_allclose(dweight[2], dy[0, 1] + dy[0, 2] + dy[1, 1])  # three occurrences of token 2
    np.testing.assert_array_equal(dweight[[1, 3]], 0)


def test_token_shift_and_mix(rng):
    x, mix = rng.normal(size=(2, 4, 3)), rng.uniform(size=(1, 1, 3))
    dm = rng.normal(size=(2, 4, 3))

    def f():
        return ops.mix_forward(x, ops.token_shift_forward(x), mix)[0]

    xx = ops.token_shift_forward(x)
    np.testing.assert_array_equal(xx[:, 0], 0)  # nn.ZeroPad2d((0, 0, 1, -1))
    np.testing.assert_array_equal(xx[:, 1:], x[:, :-1])
    _, cache = ops.mix_forward(x, xx, mix)
    dx, dxx, dmix = ops.mix_backward(dm, cache)
    dx = dx + ops.token_shift_backward(dxx)
    check("dx", dx, f, x, dm)
    check("dmix", dmix, f, mix, dm)


def test_token_shift_with_previous_token(rng):
    x, prev = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4))
    xx = ops.token_shift_forward(x, prev)
    np.testing.assert_array_equal(xx[:, 0], prev)


def test_gate(rng):
    r, y = rng.normal(size=(2, 3, 4)) * 5, rng.normal(size=(2, 3, 4))
    dout = rng.normal(size=(2, 3, 4))
    _, cache = ops.gate_forward(r, y)
    dr, dy = ops.gate_backward(dout, cache)
    f = lambda: ops.gate_forward(r, y)[0]  # noqa: E731
    check("dr", dr, f, r, dout)
    check("dy", dy, f, y, dout)


def test_sigmoid_is_stable_at_extremes():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is benign
        s = ops.sigmoid(x)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, [0.0, 1.9287499e-22, 0.5, 1.0, 1.0], rtol=1e-6)


def test_relu_square(rng):
    x = rng.normal(size=(3, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kink for finite differences
    dh = rng.normal(size=(3, 5))
    h, cache = ops.relu_square_forward(x)
    np.testing.assert_array_equal(h, np.maximum(x, 0) ** 2)
    check("dx", ops.relu_square_backward(dh, cache), lambda: ops.relu_square_forward(x)[0], x, dh)


def test_cross_entropy(rng):
    logits = rng.normal(size=(2, 3, 7)) * 4
    targets = rng.integers(0, 7, (2, 3))
    loss, cache = ops.cross_entropy_forward(logits, targets)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert abs(loss - expected) < 1e-12
    d = ops.cross_entropy_backward(cache)
    check("dlogits", d, lambda: np.array(ops.cross_entropy_forward(logits, targets)[0]), logits, np.array(1.0))


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[1e4, 0.0, -1e4]]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is benign
        loss, cache = ops.cross_entropy_forward(logits, np.array([[1]]))
    assert loss == pytest.approx(1e4)
    assert np.isfinite(ops.cross_entropy_backward(cache)).all()


def test_l2wrap_is_the_gradient_of_its_penalty(rng):
    logits = rng.normal(size=(2, 3, 5))
    factor = 1e-4
    B, T, _ = logits.shape

    def penalty():
        return np.array(factor / (2 * B * T) * (logits.max(-1) ** 2).sum())

    check("dlogits", ops.l2wrap_backward(logits, factor), penalty, logits, np.array(1.0))


# ---------------------------------------------------------------------------------------------------------------
# One body for every engine: each element-wise pair an engine computes (the reference layers, or the Numba kernels
# that replace some of them) equals the reference, and its backward equals central differences of its forward
# ---------------------------------------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from minirwkv.backends.engine import make_engine  # noqa: E402

ENGINES = ["numpy", "numba"]


def _op_cases(ops, rng, B, T, C, scale, dtype=np.float64):
    """(name, forward() -> output, backward(dy) -> {input name: grad}, {input name: array}) for every pair, on
    inputs of ``dtype`` drawn from ``rng`` (the same seed gives the same values for every engine)."""
    x = (rng.normal(size=(B, T, C)) * scale).astype(dtype)
    x_prev = rng.normal(size=(B, C)).astype(dtype)
    w, b = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    mixes = tuple(rng.uniform(0, 1, (1, 1, C)).astype(dtype) for _ in range(3))
    W = rng.normal(size=(C + 2, C)).astype(dtype)
    r, y = (rng.normal(size=(B, T, C)) * scale).astype(dtype), rng.normal(size=(B, T, C)).astype(dtype)

    def shift_mix():
        outs, _ = ops.token_shift_mix_forward(x, x_prev, mixes)
        return np.stack(outs)  # (3, B, T, C)

    def shift_mix_back(dy):
        _, caches = ops.token_shift_mix_forward(x, x_prev, mixes)
        dx, dmixes = ops.token_shift_mix_backward(tuple(dy), caches)
        return {"x": dx, **{f"mix{j}": d for j, d in enumerate(dmixes)}}

    return [
        ("layernorm", lambda: ops.layernorm_forward(x, w, b)[0],
         lambda dy: dict(zip(("x", "w", "b"), ops.layernorm_backward(dy, ops.layernorm_forward(x, w, b)[1]))),
         {"x": x, "w": w, "b": b}),
        ("linear", lambda: ops.linear_forward(x, W)[0],
         lambda dy: dict(zip(("x", "W"), ops.linear_backward(dy, ops.linear_forward(x, W)[1]))), {"x": x, "W": W}),
        ("token_shift_mix", shift_mix, shift_mix_back, {"x": x, **{f"mix{j}": m for j, m in enumerate(mixes)}}),
        ("gate", lambda: ops.gate_forward(r, y)[0],
         lambda dy: dict(zip(("r", "y"), ops.gate_backward(dy, ops.gate_forward(r, y)[1]))), {"r": r, "y": y}),
        ("relu_square", lambda: ops.relu_square_forward(x)[0],
         lambda dy: {"x": ops.relu_square_backward(dy, ops.relu_square_forward(x)[1])}, {"x": x}),
    ]


@pytest.mark.parametrize("engine_name", ENGINES)
@settings(max_examples=15)
@given(B=st.integers(1, 2), T=st.integers(1, 5), C=st.integers(1, 9), scale=st.sampled_from([0.1, 1.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_engine_op_backward_equals_finite_differences(engine_name, B, T, C, scale, seed):
    ops = make_engine(engine_name).ops
    for name, forward, backward, inputs in _op_cases(ops, np.random.default_rng(seed), B, T, C, scale):
        out = forward()
        dy = np.random.default_rng(seed + 1).normal(size=out.shape)
        grads = backward(dy)
        for arg, a in inputs.items():
            numeric = numerical_gradient(lambda: (forward() * dy).sum(), a)
            assert_close(grads[arg], numeric, np.float64, kind="finite_diff", what=f"{engine_name} {name} d{arg}",
                         scale=max(1.0, float(np.abs(numeric).max())))


@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(B=st.integers(1, 3), T=st.integers(1, 9), C=st.integers(1, 17), scale=st.sampled_from([0.1, 1.0, 100.0]),
       seed=st.integers(0, 2**16))
def test_engine_ops_equal_the_reference_layers(engine_name, dtype, B, T, C, scale, seed):
    """Forward and backward of every pair on the engine equal minirwkv.layers' within the dtype's tolerance."""
    got = _op_cases(make_engine(engine_name).ops, np.random.default_rng(seed), B, T, C, scale, dtype)
    ref = _op_cases(ops, np.random.default_rng(seed), B, T, C, scale, dtype)
    for (name, forward, backward, _), (_, forward_ref, backward_ref, _) in zip(got, ref):
        out, out_ref = forward(), forward_ref()
        assert out.dtype == dtype, f"{engine_name} {name}: dtype {out.dtype}"
        assert_close(out, out_ref, dtype, what=f"{engine_name} {name} forward")
        dy = np.random.default_rng(seed + 1).normal(size=out.shape).astype(dtype)
        expected = backward_ref(dy)
        for arg, g in backward(dy).items():
            assert g.dtype == dtype, f"{engine_name} {name} d{arg}: dtype {g.dtype}"
            assert_close(g, expected[arg], dtype, what=f"{engine_name} {name} d{arg}",
                         scale=max(1.0, float(np.abs(expected[arg]).max())))
