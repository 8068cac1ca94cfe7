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
