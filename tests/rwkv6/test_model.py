"""The whole RWKV-5.2 and RWKV-6 models: gradients, the modes, the engines, the init, the config (one body for both
generations; the WKV alone: test_wkv.py; against PyTorch and the rwkv package: test_torch_crosscheck.py)."""
import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig
from minirwkv.api import model_for
from minirwkv.generation import detect_generation
from minirwkv.testing import FINITE_DIFF_STEP, assert_close, tol
from helpers import random_params, random_tokens

SMALL = {  # H = 2 heads of N = 4, and for RWKV-6 LoRA ranks that are neither equal nor the official 32 / 64
    "5": ModelConfig(vocab_size=11, n_embd=8, n_layer=2, dim_ffn=12, version="5", head_size=4),
    "6": ModelConfig(vocab_size=11, n_embd=8, n_layer=2, dim_ffn=12, version="6", head_size=4, d_mix_lora=3,
                     d_decay_lora=5),
}
VERSIONS = sorted(SMALL)
IMPLS = ["numpy", "parallel", "numba"]


def directional_check(params, idx, targets, impl, directions, config=None):
    """<grads, d> == d/de loss(params + e d), central differences, for each direction d (a dict like params)."""
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl=impl, config=config)
    h = FINITE_DIFF_STEP  # the step the "finite_diff" tolerances are stated for
    # A central difference cannot resolve less than its rounding floor ~ eps |loss| / h (about 5e-10 here), so a
    # derivative near that size is compared against the floor instead of its own magnitude. A gradient under the
    # wrong key or with a flipped sign still misses by the derivative itself, far above the floor.
    floor = 10 * np.finfo(np.float64).eps * abs(float(loss)) / h
    atol = tol(np.float64, "finite_diff").atol
    for what, d in directions:
        def loss_at(e):
            moved = {k: params[k] + e * d[k] if k in d else params[k] for k in params}
            return minirwkv.loss_and_grads(moved, idx, targets, impl=impl, config=config)[0]

        numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
        analytic = sum(float((grads[k] * d[k]).sum()) for k in d)
        assert_close(np.array(analytic), np.array(numeric), np.float64, kind="finite_diff", what=what,
                     scale=floor / atol)
    return grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("version", VERSIONS)
def test_gradient_matches_finite_differences_along_random_directions(version, impl):
    config = SMALL[version]
    params = random_params(config, seed=1)
    idx, targets = random_tokens(config, 2, 7, seed=2), random_tokens(config, 2, 7, seed=3)
    rng = np.random.default_rng(0)
    directions = [(f"random direction {i}", {k: rng.normal(size=v.shape) for k, v in params.items()})
                  for i in range(2)]
    grads = directional_check(params, idx, targets, impl, directions)
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape and grads[k].dtype == params[k].dtype, k


@pytest.mark.parametrize("version", VERSIONS)
def test_every_parameter_gets_its_own_correct_gradient(version):
    """Per-tensor directional checks: a gradient stored under the wrong key, or a sign flip of one mix, fails."""
    config = SMALL[version]
    params = random_params(config, seed=4)
    idx, targets = random_tokens(config, 2, 5, seed=5), random_tokens(config, 2, 5, seed=6)
    rng = np.random.default_rng(1)
    directional_check(params, idx, targets, "numpy", [(k, {k: rng.normal(size=v.shape)}) for k, v in params.items()])


@pytest.mark.parametrize("version", VERSIONS)
def test_engines_agree_on_logits_and_gradients(version):
    config = SMALL[version]
    params = random_params(config, seed=7)
    idx, targets = random_tokens(config, 3, 37, seed=8), random_tokens(config, 3, 37, seed=9)
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    for impl in ("parallel", "numba"):
        loss_i, grads_i = minirwkv.loss_and_grads(params, idx, targets, impl=impl)
        assert_close(np.array(loss_i), np.array(loss), np.float64, what=f"{impl} loss")
        for k in params:
            assert_close(grads_i[k], grads[k], np.float64, what=f"{impl} {k}")


@pytest.mark.parametrize("version", VERSIONS)
def test_float32_follows_float64(version):
    config = SMALL[version]
    params = random_params(config, seed=10)
    idx, targets = random_tokens(config, 2, 20, seed=11), random_tokens(config, 2, 20, seed=12)
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numba")
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    loss32, grads32 = minirwkv.loss_and_grads(p32, idx, targets, impl="numba")
    assert_close(np.array(loss32), np.array(loss), np.float32, kind="vs_f64_model", what="loss")
    for k in params:
        assert grads32[k].dtype == np.float32
        assert_close(grads32[k], grads[k], np.float32, kind="vs_f64_model", what=k)


# ---------------------------------------------------------------------------------------------------------------
# The modes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_gpt_mode_equals_rnn_mode_token_by_token(version):
    config = SMALL[version]
    params = random_params(config, seed=13)
    idx = random_tokens(config, 2, 9, seed=14)
    logits = minirwkv.forward(params, idx, impl="numpy")
    state = minirwkv.init_state(params, 2)
    for t in range(idx.shape[1]):
        step, state = minirwkv.rnn_step(params, idx[:, t], state)
        assert_close(step, logits[:, t], np.float64, what=f"token {t}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("version", VERSIONS)
def test_prefill_then_steps_equals_one_longer_run_and_halves_carry_the_state(version, impl):
    config = SMALL[version]
    params = random_params(config, seed=15)
    idx = random_tokens(config, 2, 40, seed=16)
    whole, whole_state = minirwkv.prefill(params, idx, impl=impl)
    first, state = minirwkv.prefill(params, idx[:, :23], impl=impl)
    second, state2 = minirwkv.prefill(params, idx[:, 23:], state, impl=impl)
    assert_close(np.concatenate([first, second], axis=1), whole, np.float64, what="two halves")
    for s_half, s_whole in zip(state2.layers, whole_state.layers):
        for f, a, b in zip(s_half._fields, s_half, s_whole):
            assert_close(a, b, np.float64, what=f"state {f}")
    steps = state
    for t in range(23, 26):
        logits, steps = minirwkv.rnn_step(params, idx[:, t], steps)
        assert_close(logits, whole[:, t], np.float64, what=f"step {t} after prefill")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_state_has_the_documented_fields_and_a_non_symmetric_matrix(version):
    """wkv is (B, H, N, N) in [key, value] order: after one token it is the outer product k v^T, not v k^T."""
    config = SMALL[version]
    params = random_params(config, seed=17)
    _, state = minirwkv.prefill(params, random_tokens(config, 1, 1, seed=18), impl="numpy")
    s = state.layers[0]
    assert s._fields == ("att_x", "wkv", "ffn_x")
    assert s.wkv.shape == (1, config.n_head, config.head_size, config.head_size)
    assert not np.allclose(s.wkv, s.wkv.swapaxes(-1, -2))
    model = model_for(params, "numpy")
    logits_t, cache, _ = model.forward(params, random_tokens(config, 1, 1, seed=18))
    S = s.wkv[0, 0]
    k = cache.blocks[0].att.wkv.k[0, 0, 0]  # (N,) the head's key of the one token
    v = cache.blocks[0].att.wkv.v[0, 0, 0]
    assert_close(S, np.outer(k, v), np.float64, what="S = k v^T")


# ---------------------------------------------------------------------------------------------------------------
# Config, detection, init
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_config_is_read_back_from_the_shapes(version):
    config = SMALL[version]
    params = minirwkv.init_params(config)
    assert minirwkv.config_from_params(params) == config
    assert detect_generation(params).version == version
    assert config.n_params() == sum(a.size for a in params.values())


def test_groupnorm_eps_is_overridden_through_config():
    config = SMALL["6"]
    params = random_params(config, seed=19)
    idx = random_tokens(config, 1, 6, seed=20)
    default = minirwkv.forward(params, idx, impl="numpy")
    same = minirwkv.forward(params, idx, impl="numpy", config=config)
    other = minirwkv.forward(params, idx, impl="numpy", config=ModelConfig(**{**config.__dict__, "ln_x_eps": 1e-5}))
    assert np.array_equal(default, same)
    assert not np.allclose(default, other)


def test_a_head_size_that_does_not_divide_n_embd_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"n_embd=12 is not a multiple of head_size=8.*e.g. 6"):
        ModelConfig(vocab_size=5, n_embd=12, n_layer=1, version="6", head_size=8)


def test_rwkv5_preview_checkpoints_are_refused_by_name():
    params = minirwkv.init_params(SMALL["5"])
    params["blocks.0.att.time_decay"] = np.zeros(2, np.float32)  # per head: 5.1
    with pytest.raises(ValueError, match=r"RWKV-5.1 preview checkpoint .*RWKV-5.2 only"):
        minirwkv.config_from_params(params)
    del params["blocks.0.att.gate.weight"], params["blocks.0.att.time_mix_g"]
    with pytest.raises(ValueError, match=r"RWKV-5.0 preview checkpoint .*no gate"):
        minirwkv.config_from_params(params)


@pytest.mark.parametrize("version", VERSIONS)
def test_head_size_one_is_still_its_generation(version):
    """The pip package tells 5.2 by time_decay.shape[1] > 1, which misreads N = 1; minirwkv reads the names."""
    config = ModelConfig(vocab_size=5, n_embd=3, n_layer=1, version=version, head_size=1)
    assert minirwkv.config_from_params(minirwkv.init_params(config)) == config


def _layer(params, i, leaf):
    return params[f"blocks.{i}.{leaf}"].reshape(-1).astype(np.float64)


@pytest.mark.parametrize("L", [1, 3])
def test_rwkv6_init_values(L):
    """Exact values of the official x060 init, including the L = 1 case (r0 = 0) the official code divides by 0."""
    C = 4
    config = ModelConfig(vocab_size=7, n_embd=C, n_layer=L, version="6", head_size=2, d_mix_lora=2, d_decay_lora=3)
    params = minirwkv.init_params(config, seed=0, dtype=np.float64)
    ddd = np.arange(C) / C
    n = np.arange(C) / (C - 1)
    for i in range(L):
        r0 = i / (L - 1) if L > 1 else 0.0
        r1 = 1 - i / L
        for f in ("x", "w", "k"):
            np.testing.assert_allclose(_layer(params, i, f"att.time_maa_{f}"), 1 - ddd ** r1, rtol=1e-15)
        np.testing.assert_allclose(_layer(params, i, "att.time_maa_v"), 1 - (ddd ** r1 + 0.3 * r0), rtol=1e-15)
        for f in ("r", "g"):
            np.testing.assert_allclose(_layer(params, i, f"att.time_maa_{f}"), 1 - ddd ** (0.5 * r1), rtol=1e-15)
        np.testing.assert_allclose(_layer(params, i, "att.time_decay"), -6 + 5 * n ** (0.7 + 1.3 * r0), rtol=1e-15)
        zigzag = 0.1 * (((np.arange(C) + 1) % 3) - 1)
        np.testing.assert_allclose(_layer(params, i, "att.time_faaaa"), r0 * (1 - n) + zigzag, atol=1e-16)
        for f in ("ffn.time_maa_k", "ffn.time_maa_r"):
            np.testing.assert_allclose(_layer(params, i, f), 1 - ddd ** (r1 ** 3), rtol=1e-15)
        assert not _layer(params, i, "att.time_maa_w1").any() and not _layer(params, i, "att.time_decay_w1").any()
        for f in ("att.time_maa_w2", "att.time_decay_w2"):
            w2 = _layer(params, i, f)
            assert 0 < np.abs(w2).max() <= 0.01
        np.testing.assert_allclose(_layer(params, i, "att.ln_x.weight"), ((1 + i) / L) ** 0.7, rtol=1e-15)
        for f in ("att.output.weight", "ffn.value.weight", "ffn.receptance.weight"):
            assert not _layer(params, i, f).any(), f
        key = params[f"blocks.{i}.att.key.weight"]
        np.testing.assert_allclose(key @ key.T, 0.01 * np.eye(C), atol=1e-12)  # orthogonal, gain 0.1


@pytest.mark.parametrize("L", [1, 3])
def test_rwkv5_init_values(L):
    C = 6
    config = ModelConfig(vocab_size=7, n_embd=C, n_layer=L, version="5", head_size=3)
    params = minirwkv.init_params(config, seed=0, dtype=np.float64)
    ddd = np.arange(C) / C
    n = np.arange(C) / (C - 1)
    for i in range(L):
        r0 = i / (L - 1) if L > 1 else 0.0
        r1 = 1 - i / L
        np.testing.assert_allclose(_layer(params, i, "att.time_mix_k"), ddd ** r1, rtol=1e-15)
        np.testing.assert_allclose(_layer(params, i, "att.time_mix_v"), ddd ** r1 + 0.3 * r0, rtol=1e-15)
        np.testing.assert_allclose(_layer(params, i, "att.time_mix_r"), ddd ** (0.5 * r1), rtol=1e-15)
        np.testing.assert_allclose(_layer(params, i, "att.time_mix_g"), ddd ** (0.5 * r1), rtol=1e-15)
        assert params[f"blocks.{i}.att.time_decay"].shape == (2, 3)
        np.testing.assert_allclose(_layer(params, i, "att.time_decay"), -6 + 5 * n ** (0.7 + 1.3 * r0), rtol=1e-15)
        for f in ("ffn.time_mix_k", "ffn.time_mix_r"):
            np.testing.assert_allclose(_layer(params, i, f), ddd ** r1, rtol=1e-15)
    V = 7
    head = params["head.weight"]
    np.testing.assert_allclose(head.T @ head, (0.5 * np.sqrt(V / C)) ** 2 * np.eye(C), atol=1e-12)  # V > C
