"""The ops RWKV-5.2 and RWKV-6 add, each backward against central differences in float64: the ddlerp token shift,
RWKV-6's decay LoRA inputs, RWKV-5.2's static inputs, time mixing after its inputs, channel mixing."""
import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig
from minirwkv.backends.engine import make_engine
from minirwkv.rwkv5 import model as v5
from minirwkv.rwkv6 import blocks, model as v6
from minirwkv.testing import assert_close, numerical_gradient
from helpers import random_params

CONFIG = {
    "5": ModelConfig(vocab_size=5, n_embd=6, n_layer=1, dim_ffn=7, version="5", head_size=3),
    "6": ModelConfig(vocab_size=5, n_embd=6, n_layer=1, dim_ffn=7, version="6", head_size=3, d_mix_lora=2,
                     d_decay_lora=3),
}
P = "blocks.0."


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def check(what, analytic, loss, x):
    assert_close(analytic, numerical_gradient(loss, x), np.float64, kind="finite_diff", what=what)


def weighted(outputs, weights):
    return sum(float((o * w).sum()) for o, w in zip(outputs, weights))


@pytest.mark.parametrize("with_prev", [False, True])
def test_ddlerp(rng, with_prev):
    params = random_params(CONFIG["6"], seed=1)
    z = rng.normal(size=(2, 4, 6))
    x_prev = rng.normal(size=(2, 6)) if with_prev else None
    dxs = [rng.normal(size=z.shape) for _ in range(5)]
    outs, cache = v6.ddlerp_forward(params, P, z, x_prev, np.matmul)
    grads = {}
    dz = v6.ddlerp_backward(dxs, cache, P, grads)

    def loss():
        return weighted(v6.ddlerp_forward(params, P, z, x_prev, np.matmul)[0], dxs)

    check("dz", dz, loss, z)
    for name in ["time_maa_x", *(f"time_maa_{f}" for f in v6.TARGETS), "time_maa_w1", "time_maa_w2"]:
        check(name, grads[P + "att." + name], loss, params[P + "att." + name])


@pytest.mark.parametrize("version", ["5", "6"])
def test_time_mixing_inputs(rng, version):
    """RWKV-6: ddlerp + decay LoRA; RWKV-5.2: four static mixes + the static decay (dw summed over b, t)."""
    config = CONFIG[version]
    module = v6 if version == "6" else v5
    engine = make_engine("numpy")
    params = random_params(config, seed=2)
    z = rng.normal(size=(2, 4, 6))
    x_prev = rng.normal(size=(2, 6))
    (xr, xk, xv, xg), w, cache = module.inputs_forward(params, P, z, x_prev, engine, config)
    assert w.shape == (2, 4, config.n_head, config.head_size)
    douts = [rng.normal(size=a.shape) for a in (xr, xk, xv, xg, w)]
    grads = {}
    dz = module.inputs_backward(*douts, cache, P, grads, engine.ops)

    def loss():
        xs, w_, _ = module.inputs_forward(params, P, z, x_prev, engine, config)
        return weighted((*xs, w_), douts)

    check("dz", dz, loss, z)
    assert set(grads) == {k for k in params if k.startswith(P + "att.time_")} - {P + "att.time_faaaa"}
    for name, g in grads.items():
        check(name, g, loss, params[name])


@pytest.mark.parametrize("version", ["5", "6"])
def test_time_mixing_and_channel_mixing(rng, version):
    config = CONFIG[version]
    module = v6 if version == "6" else v5
    engine = make_engine("numpy")
    params = random_params(config, seed=3)
    z = rng.normal(size=(2, 5, 6))
    x_prev = rng.normal(size=(2, 6))
    S = rng.normal(size=(2, config.n_head, 3, 3))
    dout = rng.normal(size=z.shape)
    out, cache, _ = blocks.time_mixing_forward(params, P, z, x_prev, S, engine, config, module.INPUTS)
    grads = {}
    dz = blocks.time_mixing_backward(dout, cache, P, grads, engine.ops, module.INPUTS)

    def loss():
        return float((blocks.time_mixing_forward(params, P, z, x_prev, S, engine, config, module.INPUTS)[0]
                      * dout).sum())

    check("time mix dz", dz, loss, z)
    for name in (P + "att.time_faaaa", P + "att.ln_x.weight", P + "att.gate.weight", P + "att.output.weight"):
        check(name, grads[name], loss, params[name])

    mixes = module.FFN_MIXES.forward(params, P)
    out, cache, _ = blocks.channel_mixing_forward(params, P, z, x_prev, mixes, engine.ops)
    grads = {}
    dz, dmixes = blocks.channel_mixing_backward(dout, cache, P, grads, engine.ops)
    module.FFN_MIXES.backward(*dmixes, P, grads)

    def loss():
        return float((blocks.channel_mixing_forward(params, P, z, x_prev, module.FFN_MIXES.forward(params, P),
                                                    engine.ops)[0] * dout).sum())

    check("channel mix dz", dz, loss, z)
    for name, g in grads.items():
        check(name, g, loss, params[name])


def test_rwkv6_decay_gradient_vanishes_at_the_first_and_last_token():
    """With a zero initial state, w_0 only scales S_{-1} = 0 and w_{T-1} only the returned state: dw_hat = 0 there."""
    config = CONFIG["6"]
    params = random_params(config, seed=4)
    engine = make_engine("numpy")
    idx = np.random.default_rng(5).integers(0, 5, (2, 6))
    model = minirwkv.api.model_for(params, engine)
    logits, cache, _ = model.forward(params, idx)
    grads = model.backward(np.random.default_rng(6).normal(size=logits.shape), cache)
    assert grads  # the whole backward ran; now the WKV's own dw at the ends
    c = cache.blocks[0].att.wkv
    g = c.backend.backward(c.r, c.k, c.v, c.w, c.u, np.ones_like(c.r), None, None)
    assert np.abs(g.dw[:, 0]).max() == 0 and np.abs(g.dw[:, -1]).max() == 0
    assert np.abs(g.dw[:, 1:-1]).max() > 0
