"""AdamW, clipping and schedules (minirwkv/optim.py) against hand computations and torch.optim.AdamW."""
import math

import numpy as np
import pytest

from minirwkv import optim
from minirwkv.io.checkpoint import load_checkpoint, save_checkpoint
from minirwkv.config import ModelConfig
from minirwkv import init_params
from minirwkv.testing import assert_close


def small_params(rng, dtype=np.float64):
    """A matrix, a time_decay, a time_first, a time_mix (1, 1, C) and a LayerNorm weight."""
    return {"blocks.0.att.key.weight": rng.standard_normal((4, 3)).astype(dtype),
            "blocks.0.att.time_decay": rng.standard_normal(3).astype(dtype),
            "blocks.0.att.time_first": rng.standard_normal(3).astype(dtype),
            "blocks.0.att.time_mix_k": rng.uniform(0, 1, (1, 1, 3)).astype(dtype),
            "blocks.0.ln1.weight": rng.standard_normal(3).astype(dtype)}


def test_one_step_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    params, grads = small_params(rng), small_params(rng)
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.99, 1e-8
    new, state = optim.adamw_step(params, grads, optim.adamw_init(params), lr, (b1, b2), eps, wd)
    assert state.step == 1
    for name, p in params.items():
        g = grads[name]
        lr_i = lr * {"time_decay": 2.0, "time_first": 3.0}.get(name.split(".")[-1], 1.0)
        decayed = p * (1 - lr_i * wd) if name.endswith("key.weight") else p  # matrices only
        m, v = (1 - b1) * g, (1 - b2) * g * g
        expected = decayed - lr_i * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)  # ~ p - lr_i sign(g)
        assert_close(new[name], expected, kind="same", what=name)
        assert_close(state.m[name], m, kind="same", what=f"m {name}")
        assert_close(state.v[name], v, kind="same", what=f"v {name}")
    assert params["blocks.0.att.key.weight"] is not new["blocks.0.att.key.weight"]  # functional: inputs untouched


def test_no_weight_decay_on_vectors():
    rng = np.random.default_rng(1)
    params = small_params(rng)
    zeros = {k: np.zeros_like(p) for k, p in params.items()}  # zero gradient: only the decay moves anything
    new, _ = optim.adamw_step(params, zeros, optim.adamw_init(params), lr=0.1, weight_decay=0.5)
    for name, p in params.items():
        if name.endswith("key.weight"):
            np.testing.assert_array_equal(new[name], p * (1 - 0.1 * 0.5))
        else:
            np.testing.assert_array_equal(new[name], p)  # time_decay/first, time_mix (1, 1, C), LayerNorm
    assert optim.decays("a.weight", (4, 3)) and optim.decays("a.weight", (1, 4, 3))
    assert not optim.decays("a.time_mix_k", (1, 1, 3)) and not optim.decays("a.ln1.weight", (3,))
    for name in ("blocks.0.att.time_decay", "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w1",
                 "blocks.0.att.time_decay_w2"):
        assert not optim.decays(name, (4, 3)), name  # 2-D, but not a weight matrix


def test_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    params = small_params(rng)
    lr, wd, betas = 3e-3, 0.05, (0.9, 0.99)
    tparams = {k: torch.tensor(p, requires_grad=True) for k, p in params.items()}
    groups = [{"params": [t], "lr": lr * optim.lr_multiplier(k),
               "weight_decay": wd if optim.decays(k, t.shape) else 0.0} for k, t in tparams.items()]
    topt = torch.optim.AdamW(groups, betas=betas, eps=1e-8)
    state = optim.adamw_init(params)
    for _ in range(5):
        grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        params, state = optim.adamw_step(params, grads, state, lr, betas, 1e-8, wd)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
    for k, t in tparams.items():
        assert_close(params[k], t.detach().numpy(), kind="same", what=k)


def test_clipping_scales_to_the_max_norm():
    g = {"a": np.full(4, 2.0), "b": np.full((1, 1, 9), 1.0)}  # norm sqrt(16 + 9) = 5
    clipped, norm = optim.clip_grad_norm(g, 1.0)
    assert norm == 5.0
    assert math.isclose(optim.global_norm(clipped), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(clipped["a"], g["a"] / (5.0 + 1e-6))
    same, _ = optim.clip_grad_norm(g, 10.0)
    assert same is g  # below the threshold: untouched
    off, _ = optim.clip_grad_norm(g, 0.0)
    assert off is g  # 0 disables clipping


def test_schedules_at_key_steps():
    lr, final, warm, total = 1e-3, 1e-5, 10, 110

    def at(step, decay="cosine", warmup="rwkv"):
        return optim.learning_rate(step, lr, final, warm, total, decay, warmup)

    assert at(0) == pytest.approx(0.2 * lr)  # v4neo warmup starts at a fifth
    assert at(5) == pytest.approx((0.2 + 0.8 * 0.5) * lr)
    assert at(0, warmup="linear") == pytest.approx(lr / 11)  # nanoGPT: (step + 1) / (warmup + 1)
    assert at(total - 1) == pytest.approx(final)  # progress = (step - warm + 1) / (total - warm) = 1
    assert at(total - 1, "exponential") == pytest.approx(final)
    mid = warm + 49  # progress 1/2
    assert at(mid) == pytest.approx((lr + final) / 2)  # cosine: the arithmetic mean halfway
    assert at(mid, "exponential") == pytest.approx(math.sqrt(lr * final))  # exponential: the geometric mean
    assert at(mid, "linear") == pytest.approx((lr + final) / 2)
    assert at(mid, "constant") == lr
    assert at(10 * total) == pytest.approx(final)  # after the end: stays at lr_final
    assert optim.learning_rate(20, lr, final, warm, total, progress=1.0) == pytest.approx(final)
    with pytest.raises(ValueError, match="unknown lr_decay 'cosin'; choose one of: cosine"):
        at(20, "cosin")


def test_state_round_trips_through_a_checkpoint(tmp_path):
    params = init_params(ModelConfig(vocab_size=7, n_embd=4, n_layer=1), seed=0)
    rng = np.random.default_rng(3)
    grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
    params, state = optim.adamw_step(params, grads, optim.adamw_init(params), 1e-3)
    save_checkpoint(tmp_path / "c.ckpt", params, meta={"step": state.step}, arrays=optim.state_to_arrays(state))
    ckpt = load_checkpoint(tmp_path / "c.ckpt")
    back = optim.state_from_arrays(ckpt.arrays, ckpt.meta["step"], ckpt.params)
    assert back.step == 1
    for k in params:
        np.testing.assert_array_equal(back.m[k], state.m[k])
        np.testing.assert_array_equal(back.v[k], state.v[k])
    with pytest.raises(ValueError, match="does not match the model's parameters"):
        optim.state_from_arrays({"adam_m": {}, "adam_v": {}}, 1, ckpt.params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_step_is_bit_identical_to_the_reference(dtype):
    rng = np.random.default_rng(0)
    params = {"blocks.0.att.key.weight": rng.normal(size=(4, 3)).astype(dtype),
              "blocks.0.att.time_decay": rng.normal(size=3).astype(dtype)}
    state = optim.adamw_init(params)
    original = {k: v.copy() for k, v in params.items()}
    ref_p, ref_s = params, state
    fus_p, fus_s = params, state
    for _ in range(3):
        grads = {k: rng.normal(size=v.shape).astype(dtype) for k, v in params.items()}
        ref_p, ref_s = optim.adamw_step(ref_p, grads, ref_s, 1e-2, weight_decay=0.1)
        fus_p, fus_s = optim.adamw_step(fus_p, grads, fus_s, 1e-2, weight_decay=0.1, fused=True)
    for k in params:
        np.testing.assert_array_equal(fus_p[k], ref_p[k])
        np.testing.assert_array_equal(fus_s.m[k], ref_s.m[k])
        np.testing.assert_array_equal(fus_s.v[k], ref_s.v[k])
    for k in params:  # the step is functional: its inputs are untouched
        np.testing.assert_array_equal(params[k], original[k])
        assert not state.m[k].any() and not state.v[k].any()
