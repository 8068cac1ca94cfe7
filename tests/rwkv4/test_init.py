"""The official v4neo initialisation, value by value on small cases (docs/rwkv4.md §5)."""
import math

import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig


def test_time_parameters_exact_values():
    C, L = 4, 3
    p = minirwkv.init_params(ModelConfig(vocab_size=5, n_embd=C, n_layer=L), dtype=np.float64)
    d = np.arange(C) / C  # 0, 1/4, 1/2, 3/4
    h = np.arange(C)
    for layer in range(L):
        r01, r1a0 = layer / (L - 1), 1 - layer / L
        b = f"blocks.{layer}."
        np.testing.assert_allclose(p[b + "att.time_decay"], -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01), rtol=1e-15)
        np.testing.assert_allclose(p[b + "att.time_mix_k"][0, 0], d ** r1a0, rtol=1e-15)
        np.testing.assert_allclose(p[b + "att.time_mix_v"][0, 0], d ** r1a0 + 0.3 * r01, rtol=1e-15)
        np.testing.assert_allclose(p[b + "att.time_mix_r"][0, 0], d ** (0.5 * r1a0), rtol=1e-15)
        np.testing.assert_allclose(p[b + "ffn.time_mix_k"][0, 0], d ** r1a0, rtol=1e-15)
        np.testing.assert_allclose(p[b + "ffn.time_mix_r"][0, 0], d ** r1a0, rtol=1e-15)
    # the decay ramp runs from -5 (long memory) to +3 (forget at once)
    assert p["blocks.0.att.time_decay"][0] == -5 and p["blocks.0.att.time_decay"][-1] == pytest.approx(3)
    # time_first: ln 0.3 plus the zigzag 0, +0.5, -0.5 (h = 0, 1, 2, 3 -> 0, +0.5, -0.5, 0)
    np.testing.assert_allclose(p["blocks.1.att.time_first"], math.log(0.3) + np.array([0, 0.5, -0.5, 0]), rtol=1e-15)
    # channel 0 starts fully on the previous token
    assert p["blocks.0.att.time_mix_k"][0, 0, 0] == 0


def test_zero_matrices_layernorms_and_gains():
    V, C, L = 40, 8, 2
    p = minirwkv.init_params(ModelConfig(vocab_size=V, n_embd=C, n_layer=L), dtype=np.float64)
    for i in range(L):
        for name in ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"):
            assert not p[f"blocks.{i}.{name}.weight"].any(), name
        for ln in ("ln1", "ln2"):
            np.testing.assert_array_equal(p[f"blocks.{i}.{ln}.weight"], 1)
            np.testing.assert_array_equal(p[f"blocks.{i}.{ln}.bias"], 0)
        # att.value: orthogonal, gain 1 -> W W^T = I
        W = p[f"blocks.{i}.att.value.weight"]
        np.testing.assert_allclose(W @ W.T, np.eye(C), atol=1e-12)
        # ffn.key (4C, C): orthogonal columns with gain sqrt(4C / C) = 2 -> W^T W = 4 I
        K = p[f"blocks.{i}.ffn.key.weight"]
        np.testing.assert_allclose(K.T @ K, 4 * np.eye(C), atol=1e-12)
    head = p["head.weight"]  # (V, C): gain 0.5 sqrt(V / C)
    np.testing.assert_allclose(head.T @ head, 0.25 * V / C * np.eye(C), atol=1e-12)
    assert np.abs(p["emb.weight"]).max() <= 1e-4 and p["emb.weight"].std() > 1e-5  # tiny, not zero
    np.testing.assert_array_equal(p["blocks.0.ln0.weight"], 1)
    assert "blocks.1.ln0.weight" not in p


def test_one_layer_model_is_the_limit_r01_equals_zero():
    """The official r01 = l / (L - 1) divides by zero for L = 1; minirwkv takes r01 = 0 (layer 0 of a ramp)."""
    C = 6
    p = minirwkv.init_params(ModelConfig(vocab_size=5, n_embd=C, n_layer=1), dtype=np.float64)
    assert all(np.isfinite(v).all() for v in p.values())
    h = np.arange(C)
    np.testing.assert_allclose(p["blocks.0.att.time_decay"], -5 + 8 * (h / (C - 1)) ** 0.7, rtol=1e-15)
    np.testing.assert_allclose(p["blocks.0.att.time_mix_v"][0, 0], (h / C) ** 1.0, rtol=1e-15)
    logits = minirwkv.forward(p, np.array([[1, 2, 3]]), impl="numpy")
    assert np.isfinite(logits).all()


def test_single_channel_model():
    p = minirwkv.init_params(ModelConfig(vocab_size=3, n_embd=1, n_layer=2), dtype=np.float64)
    assert all(np.isfinite(v).all() for v in p.values())
    assert p["blocks.0.att.time_decay"][0] == -5


def test_seed_and_dtype():
    config = ModelConfig(vocab_size=9, n_embd=4, n_layer=2)
    a, b = minirwkv.init_params(config, seed=1), minirwkv.init_params(config, seed=1)
    c = minirwkv.init_params(config, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["emb.weight"], c["emb.weight"])
    assert all(v.dtype == np.float32 for v in a.values())
    assert all(v.dtype == np.float64 for v in minirwkv.init_params(config, dtype=np.float64).values())
    assert a["blocks.0.att.time_mix_k"].shape == (1, 1, 4)
    assert a["blocks.0.att.time_decay"].shape == (4,)
    with pytest.raises(ValueError, match="float32 or float64"):
        minirwkv.init_params(config, dtype=np.float16)
