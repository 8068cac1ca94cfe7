"""The whole model: gradients, GPT mode == RNN mode, state carried across chunks, dtypes."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minirwkv
from minirwkv import ModelConfig
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


def test_l2wrap_adds_its_gradient_and_keeps_the_loss():
    params = random_params(SMALL, seed=5)
    idx, targets = random_tokens(SMALL, 2, 4, seed=5), random_tokens(SMALL, 2, 4, seed=6)
    loss0, g0 = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    loss1, g1 = minirwkv.loss_and_grads(params, idx, targets, impl="numpy", l2wrap=True)
    assert loss0 == loss1
    assert not np.allclose(g0["head.weight"], g1["head.weight"])


def test_zero_gradients_at_the_official_init():
    """At init att.output and ffn.value are 0, so every block's inner gradients vanish (rwkv4-math 5.2)."""
    params = minirwkv.init_params(SMALL, dtype=np.float64)
    _, grads = minirwkv.loss_and_grads(params, random_tokens(SMALL, 1, 4), random_tokens(SMALL, 1, 4, 1), impl="numpy")
    for k in ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.time_decay", "ffn.key.weight",
              "ffn.receptance.weight", "ln1.weight", "ln2.bias"):
        assert not grads[f"blocks.1.{k}"].any(), k
    assert grads["blocks.1.att.output.weight"].any() and grads["head.weight"].any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("impl", REFERENCE_IMPLS)
def test_gpt_mode_equals_rnn_mode_token_by_token(dtype, impl):
    @given(B=st.integers(1, 3), T=st.integers(1, 12), seed=st.integers(0, 2**16))
    def check(B, T, seed):
        params = random_params(SMALL, seed=seed, dtype=dtype)
        idx = random_tokens(SMALL, B, T, seed=seed)
        logits = minirwkv.forward(params, idx, impl=impl)  # (B, T, V)
        assert logits.dtype == dtype
        state = minirwkv.init_state(params, B)
        for t in range(T):
            step_logits, state = minirwkv.rnn_step(params, idx[:, t], state)  # (B, V)
            assert step_logits.dtype == dtype
            assert_close(step_logits, logits[:, t], dtype, what=f"logits at t={t}")

    check()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prefill_then_steps_equals_one_longer_parallel_run(dtype):
    params = random_params(SMALL, seed=9, dtype=dtype)
    idx = random_tokens(SMALL, 2, 10, seed=9)
    full = minirwkv.forward(params, idx, impl="numpy")
    logits, state = minirwkv.prefill(params, idx[:, :6], impl="numpy")
    assert_close(logits, full[:, :6], dtype, what="prefill logits")
    for t in range(6, 10):
        step, state = minirwkv.rnn_step(params, idx[:, t], state)
        assert_close(step, full[:, t], dtype, what=f"step {t}")


@pytest.mark.parametrize("impl", REFERENCE_IMPLS)
def test_prefill_state_equals_the_rnn_state(impl):
    """The state a parallel run ends in (both WKV forms) is the state of stepping token by token."""
    params = random_params(SMALL, seed=4)
    idx = random_tokens(SMALL, 3, 7, seed=4)
    _, state_p = minirwkv.prefill(params, idx, impl=impl)
    state_r = minirwkv.init_state(params, 3)
    for t in range(7):
        _, state_r = minirwkv.rnn_step(params, idx[:, t], state_r)
    for i, (a, b) in enumerate(zip(state_p.layers, state_r.layers)):
        for f in ("att_x", "ffn_x", "att_pp"):
            assert_close(getattr(a, f), getattr(b, f), np.float64, what=f"layer {i} {f}")
        assert_close(a.att_aa / a.att_bb, b.att_aa / b.att_bb, np.float64, what=f"layer {i} aa/bb")
        assert_close(a.att_bb, b.att_bb, np.float64, what=f"layer {i} bb")


def test_two_halves_with_the_carried_state_equal_the_whole():
    params = random_params(SMALL, seed=2)
    idx = random_tokens(SMALL, 2, 12, seed=2)
    whole, state_whole = minirwkv.prefill(params, idx, impl="numpy")
    first, state = minirwkv.prefill(params, idx[:, :5], impl="numpy")
    second, state = minirwkv.prefill(params, idx[:, 5:], state=state, impl="numpy")
    assert_close(np.concatenate([first, second], axis=1), whole, np.float64, what="logits")
    for a, b in zip(state.layers, state_whole.layers):
        for x, y in zip(a, b):
            assert_close(x, y, np.float64, what="state")


def test_state_is_not_modified_in_place():
    params = random_params(SMALL, seed=1)
    state = minirwkv.init_state(params, 1)
    saved = state.copy()
    minirwkv.rnn_step(params, np.array([3]), state)
    for a, b in zip(state.layers, saved.layers):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_state_round_trips_through_arrays():
    params = random_params(SMALL, seed=1)
    _, state = minirwkv.prefill(params, random_tokens(SMALL, 2, 3), impl="numpy")
    again = minirwkv.State.from_arrays(state.to_arrays())
    l1, _ = minirwkv.rnn_step(params, np.array([1, 2]), state)
    l2, _ = minirwkv.rnn_step(params, np.array([1, 2]), again)
    np.testing.assert_array_equal(l1, l2)


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
