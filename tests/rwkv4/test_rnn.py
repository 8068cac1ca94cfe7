"""RWKV-4 in RNN mode: GPT mode == RNN mode token by token, prefill then steps, the carried state, the State type."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minirwkv
from minirwkv import ModelConfig
from minirwkv.testing import assert_close
from helpers import random_params, random_tokens

SMALL = ModelConfig(vocab_size=11, n_embd=6, n_layer=2, dim_ffn=10)
REFERENCE_IMPLS = ["numpy", "parallel"]


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
