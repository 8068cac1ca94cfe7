"""The whole RWKV-4 model in parallel mode: gradients, L2Wrap, the init, dtypes (RNN mode: test_rnn.py)."""
import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig, layers
from minirwkv.api import model_for
from minirwkv.testing import assert_close
from helpers import random_params, random_tokens

SMALL = ModelConfig(vocab_size=11, n_embd=6, n_layer=2, dim_ffn=10)
REFERENCE_IMPLS = ["numpy", "parallel"]


@pytest.mark.parametrize("impl", REFERENCE_IMPLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_finite_differences_along_random_directions(impl, seed):
    """Random-projection check (as HIPS/autograd check_vjp): <grads, d> == d/de loss(params + e d)."""
    params = random_params(SMALL, seed=seed)
    idx = random_tokens(SMALL, 2, 5, seed=seed)
    targets = random_tokens(SMALL, 2, 5, seed=seed + 7)
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl=impl)
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape and grads[k].dtype == params[k].dtype, k
    rng = np.random.default_rng(seed)
    for _ in range(3):
        d = {k: rng.normal(size=v.shape) for k, v in params.items()}
        h = 1e-5

        def loss_at(e):
            return minirwkv.loss_and_grads({k: params[k] + e * d[k] for k in params}, idx, targets, impl=impl)[0]

        numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
        analytic = sum(float((grads[k] * d[k]).sum()) for k in params)
        assert_close(np.array(analytic), np.array(numeric), np.float64, kind="finite_diff", what="directional")


def test_every_parameter_gets_its_own_correct_gradient():
    """Per-tensor directional checks: a gradient stored under the wrong key would fail here."""
    params = random_params(SMALL, seed=3)
    idx, targets = random_tokens(SMALL, 2, 4, seed=3), random_tokens(SMALL, 2, 4, seed=4)
    _, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    rng = np.random.default_rng(0)
    for k in params:
        d = rng.normal(size=params[k].shape)
        h = 1e-5
        lp = minirwkv.loss_and_grads({**params, k: params[k] + h * d}, idx, targets, impl="numpy")[0]
        lm = minirwkv.loss_and_grads({**params, k: params[k] - h * d}, idx, targets, impl="numpy")[0]
        assert_close(np.array(float((grads[k] * d).sum())), np.array((lp - lm) / (2 * h)), np.float64,
                     kind="finite_diff", what=k)


def test_l2wrap_equals_the_plain_model_plus_its_logits_gradient():
    """l2wrap=True: the same loss, and exactly the gradient of the plain model fed dlogits + l2wrap_backward(logits)."""
    params = random_params(SMALL, seed=5)
    idx, targets = random_tokens(SMALL, 2, 4, seed=5), random_tokens(SMALL, 2, 4, seed=6)
    loss0, _ = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    loss1, g1 = minirwkv.loss_and_grads(params, idx, targets, impl="numpy", l2wrap=True)
    assert loss0 == loss1
    model = model_for(params, "numpy")
    logits, cache, _ = model.forward(params, idx)  # (B, T, V)
    _, c_ce = layers.cross_entropy_forward(logits, targets)
    dlogits = layers.cross_entropy_backward(c_ce) + layers.l2wrap_backward(logits)  # (B, T, V)
    expected = model.backward(dlogits, cache)
    assert set(g1) == set(expected)
    for k in expected:
        assert_close(g1[k], expected[k], np.float64, what=k)
    assert np.abs(layers.l2wrap_backward(logits)).max() > 0  # the penalty is not zero here: the test means something


def test_zero_gradients_at_the_official_init():
    """At init att.output and ffn.value are 0, so every block's inner gradients vanish (docs/rwkv4.md §5.2)."""
    params = minirwkv.init_params(SMALL, dtype=np.float64)
    _, grads = minirwkv.loss_and_grads(params, random_tokens(SMALL, 1, 4), random_tokens(SMALL, 1, 4, 1), impl="numpy")
    for k in ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.time_decay", "ffn.key.weight",
              "ffn.receptance.weight", "ln1.weight", "ln2.bias"):
        assert not grads[f"blocks.1.{k}"].any(), k
    assert grads["blocks.1.att.output.weight"].any() and grads["head.weight"].any()


def test_float32_model_close_to_float64():
    params64 = random_params(SMALL, seed=8)
    params32 = {k: v.astype(np.float32) for k, v in params64.items()}
    idx = random_tokens(SMALL, 2, 16, seed=8)
    targets = random_tokens(SMALL, 2, 16, seed=18)
    l64, g64 = minirwkv.loss_and_grads(params64, idx, targets, impl="numpy")
    l32, g32 = minirwkv.loss_and_grads(params32, idx, targets, impl="numpy")
    assert abs(l32 - l64) <= 1e-5 * abs(l64)
    for k in params64:
        assert g32[k].dtype == np.float32
        assert_close(g32[k], g64[k], np.float32, kind="vs_f64_model", what=k)


def test_config_from_params_reads_the_shapes():
    config = ModelConfig(vocab_size=7, n_embd=4, n_layer=3, dim_ffn=9)
    params = minirwkv.init_params(config)
    assert minirwkv.config_from_params(params) == config
    assert ModelConfig(vocab_size=7, n_embd=4, n_layer=1).dim_ffn == 16
    assert config.n_params() == sum(v.size for v in params.values())
