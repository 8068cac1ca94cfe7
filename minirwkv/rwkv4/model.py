"""RWKV-4 in parallel ("GPT") mode: parameters, initialisation, forward, backward, loss.

Glossary (shapes are written in this notation everywhere):
    B batch, T time (sequence length), C channels = n_embd = dim_att, F = dim_ffn (4C by default), V vocab,
    L layers. x is the residual stream (B, T, C); z = LN(x) the input of a sub-layer; xx = z shifted by one token.
    theta = time_decay (raw, as stored in checkpoints), w = -exp(theta) the per-step log-decay (< 0),
    u = time_first the bonus of the current token. mu = time_mix_* the weight of the current token in a mix.

Architecture (paper section 4; BlinkDL/RWKV-LM ``RWKV-v4neo/src/model.py``; docs/rwkv4.md §2):
    x = LN_ln0(emb[idx])
    for each block:  x = x + TimeMix(LN_ln1(x));  x = x + ChannelMix(LN_ln2(x))
    logits = LN_ln_out(x) @ head.T
    TimeMix(z):    xk, xv, xr = mix(z, shift(z), mu_k / mu_v / mu_r);  k, v, r = xk Wk^T, xv Wv^T, xr Wr^T
                   out = (sigmoid(r) * WKV(w, u, k, v)) Wo^T
    ChannelMix(z): xk, xr = mix(z, shift(z), mu_k / mu_r);  out = sigmoid(xr Wr^T) * (relu(xk Wk^T)^2 Wv^T)

Parameters are one flat dict keyed by the official checkpoint names, with the official shapes (Linear weights are
(out, in); time_mix_* are (1, 1, C); time_decay and time_first are (C,)). Gradients use the same keys.
The parameters' dtype (float32 or float64) is the dtype of every activation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import layers
from ..layers.init import orthogonal
from ..config import ModelConfig
from . import wkv
from .state import LayerState, State

EMB_INIT = 1e-4  # half-width of the uniform embedding init ("SmallInitEmb" in the RWKV-LM README)
ZERO_INIT = ("att.key.weight", "att.receptance.weight", "att.output.weight", "ffn.value.weight",
             "ffn.receptance.weight")  # the five matrices per layer that start at exactly 0 (v4neo)


# ---------------------------------------------------------------------------------------------------------------
# Parameter names and shapes
# ---------------------------------------------------------------------------------------------------------------

def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's official name and shape, in the official registration order."""
    V, C, F = config.vocab_size, config.n_embd, config.dim_ffn
    shapes = {"emb.weight": (V, C)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        if i == 0:
            shapes[p + "ln0.weight"] = (C,)
            shapes[p + "ln0.bias"] = (C,)
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        shapes[p + "att.time_decay"] = (C,)
        shapes[p + "att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for name in ("key", "value", "receptance", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def config_from_params(params: dict) -> ModelConfig:
    """Read (V, C, L, F) from the shapes: emb.weight (V, C), the highest block index, ffn.key.weight (F, C)."""
    if "emb.weight" not in params or getattr(params["emb.weight"], "ndim", 0) != 2:
        raise ValueError("params has no 2-D 'emb.weight' (V, C): not an RWKV-4 parameter dict")
    V, C = params["emb.weight"].shape
    layers = {int(k.split(".")[1]) for k in params if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layers:
        raise ValueError("params has no 'blocks.N.*' entries: not an RWKV-4 parameter dict")
    key = "blocks.0.ffn.key.weight"
    if key not in params or getattr(params[key], "ndim", 0) != 2:
        raise ValueError(f"params has no 2-D {key!r} (F, C): cannot read dim_ffn")
    return ModelConfig(vocab_size=int(V), n_embd=int(C), n_layer=max(layers) + 1, dim_ffn=int(params[key].shape[0]))


def detect(params: dict) -> bool:
    """RWKV-4 has time_first (the bonus, exponentiated) and a 1-D time_decay, and no GroupNorm ln_x."""
    return ("blocks.0.att.time_first" in params and "blocks.0.att.ln_x.weight" not in params
            and getattr(params.get("blocks.0.att.time_decay"), "ndim", 0) == 1)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (docs/rwkv4.md §5; RWKV-v4neo model.py RWKV_TimeMix / RWKV_ChannelMix constructors and
# generate_init_weight)
# ---------------------------------------------------------------------------------------------------------------

def init_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """The official RWKV-4 (v4neo) initialisation. Returns {official name: array} in ``dtype``.

    Per layer l of L, with r01 = l / (L-1), r1a0 = 1 - l/L and the channel ramp d_i = i / C:
        time_decay[h] = -5 + 8 (h / (C-1))^(0.7 + 1.3 r01)     (from -5: long memory, to +3: forget at once)
        time_first[h] = ln(0.3) + ((h+1) mod 3 - 1) / 2          (ln 0.3 plus a zigzag 0, +0.5, -0.5)
        att.time_mix_k = d^r1a0, time_mix_v = d^r1a0 + 0.3 r01, time_mix_r = d^(r1a0 / 2)
        ffn.time_mix_k = ffn.time_mix_r = d^r1a0
    Limits where the official formulas divide by zero: r01 = 0 when L = 1 (the only layer is the first layer of
    the ramp), and h / (C-1) = 0 when C = 1.
    Matrices (out, in): orthogonal with gain sqrt(out/in) if out > in else 1; exactly zero for att.key,
    att.receptance, att.output, ffn.value, ffn.receptance; head gain times 0.5; emb uniform(-1e-4, 1e-4).
    LayerNorms: weight 1, bias 0.
    """
    rng = np.random.default_rng(seed)
    C, L = config.n_embd, config.n_layer
    d = np.arange(C) / C  # (C,) channel ramp, d_0 = 0
    h = np.arange(C)
    params = {}
    for name, shape in param_shapes(config).items():
        parts = name.split(".")
        if name == "emb.weight":
            value = rng.uniform(-EMB_INIT, EMB_INIT, shape)
        elif parts[-2].startswith("ln") or parts[0] == "ln_out":
            value = np.ones(shape) if parts[-1] == "weight" else np.zeros(shape)
        elif "time_" in name:
            layer = int(parts[1])
            r01 = layer / (L - 1) if L > 1 else 0.0
            r1a0 = 1.0 - layer / L
            leaf = parts[-1]
            if leaf == "time_decay":
                frac = h / (C - 1) if C > 1 else np.zeros(C)
                value = -5 + 8 * frac ** (0.7 + 1.3 * r01)
            elif leaf == "time_first":
                value = math.log(0.3) + 0.5 * (((h + 1) % 3) - 1)
            elif parts[2] == "att" and leaf == "time_mix_v":
                value = d ** r1a0 + 0.3 * r01
            elif parts[2] == "att" and leaf == "time_mix_r":
                value = d ** (0.5 * r1a0)
            else:  # att.time_mix_k, ffn.time_mix_k, ffn.time_mix_r
                value = d ** r1a0
            value = np.reshape(value, shape)
        else:  # a matrix (out, in)
            out_dim, in_dim = shape
            gain = math.sqrt(out_dim / in_dim) if out_dim > in_dim else 1.0
            scale = 0.0 if ".".join(parts[2:]) in ZERO_INIT else (0.5 if name == "head.weight" else 1.0)
            value = np.zeros(shape) if scale == 0.0 else orthogonal(rng, shape, gain * scale)
        params[name] = np.ascontiguousarray(value, dtype=dtype)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------------------------

class TimeMixCache(NamedTuple):
    mix_k: layers.MixCache
    mix_v: layers.MixCache
    mix_r: layers.MixCache
    key: layers.LinearCache
    value: layers.LinearCache
    receptance: layers.LinearCache
    wkv: wkv.WKVCache
    gate: layers.GateCache
    output: layers.LinearCache


def time_mixing_forward(params, p, z, x_prev, wkv_state, engine):
    """TimeMix of block ``p`` ("blocks.i.") on z = LN_ln1(x) (B, T, C). -> out (B, T, C), cache, state out.

    x_prev (B, C) is z of the token before this chunk (None: zeros), wkv_state the WKVState before it (None: zero).
    ``engine`` (minirwkv.backends.engine) gives the element-wise kernels and the WKV.
    """
    ops = engine.ops
    mixes = (params[p + "att.time_mix_k"], params[p + "att.time_mix_v"], params[p + "att.time_mix_r"])
    (xk, xv, xr), (c_mix_k, c_mix_v, c_mix_r) = ops.token_shift_mix_forward(z, x_prev, mixes)  # (B, T, C) each
    k, c_key = ops.linear_forward(xk, params[p + "att.key.weight"])  # (B, T, C)
    v, c_value = ops.linear_forward(xv, params[p + "att.value.weight"])  # (B, T, C)
    r, c_receptance = ops.linear_forward(xr, params[p + "att.receptance.weight"])  # (B, T, C)
    y, c_wkv, wkv_state = wkv.wkv_forward(params[p + "att.time_decay"], params[p + "att.time_first"],
                                          k, v, engine.wkv("4"), wkv_state)  # (B, T, C)
    g, c_gate = ops.gate_forward(r, y)  # (B, T, C)
    out, c_output = ops.linear_forward(g, params[p + "att.output.weight"])  # (B, T, C)
    cache = TimeMixCache(c_mix_k, c_mix_v, c_mix_r, c_key, c_value, c_receptance, c_wkv, c_gate, c_output)
    return out, cache, (z[:, -1], wkv_state)


def time_mixing_backward(dout, cache: TimeMixCache, p, grads, ops):
    """TimeMix read upwards. Writes parameter gradients into ``grads``; returns dz (B, T, C)."""
    dg, grads[p + "att.output.weight"] = ops.linear_backward(dout, cache.output)
    dr, dy = ops.gate_backward(dg, cache.gate)
    (grads[p + "att.time_decay"], grads[p + "att.time_first"], dk, dv) = wkv.wkv_backward(dy, cache.wkv)
    dxr, grads[p + "att.receptance.weight"] = ops.linear_backward(dr, cache.receptance)
    dxv, grads[p + "att.value.weight"] = ops.linear_backward(dv, cache.value)
    dxk, grads[p + "att.key.weight"] = ops.linear_backward(dk, cache.key)
    dz, (grads[p + "att.time_mix_k"], grads[p + "att.time_mix_v"], grads[p + "att.time_mix_r"]) = \
        ops.token_shift_mix_backward((dxk, dxv, dxr), (cache.mix_k, cache.mix_v, cache.mix_r))
    return dz  # (B, T, C); z feeds three mixes and the shift (summed inside)


class ChannelMixCache(NamedTuple):
    mix_k: layers.MixCache
    mix_r: layers.MixCache
    key: layers.LinearCache
    relu_square: np.ndarray
    value: layers.LinearCache
    receptance: layers.LinearCache
    gate: layers.GateCache


def channel_mixing_forward(params, p, z, x_prev, ops):
    """ChannelMix of block ``p`` on z = LN_ln2(x) (B, T, C). -> out (B, T, C), cache, z[:, -1] (the state)."""
    mixes = (params[p + "ffn.time_mix_k"], params[p + "ffn.time_mix_r"])
    (xk, xr), (c_mix_k, c_mix_r) = ops.token_shift_mix_forward(z, x_prev, mixes)  # (B, T, C) each
    k, c_key = ops.linear_forward(xk, params[p + "ffn.key.weight"])  # (B, T, F)
    h, c_relu = ops.relu_square_forward(k)  # (B, T, F)
    kv, c_value = ops.linear_forward(h, params[p + "ffn.value.weight"])  # (B, T, C)
    r, c_receptance = ops.linear_forward(xr, params[p + "ffn.receptance.weight"])  # (B, T, C)
    out, c_gate = ops.gate_forward(r, kv)  # (B, T, C)
    return out, ChannelMixCache(c_mix_k, c_mix_r, c_key, c_relu, c_value, c_receptance, c_gate), z[:, -1]


def channel_mixing_backward(dout, cache: ChannelMixCache, p, grads, ops):
    """ChannelMix read upwards. Writes parameter gradients into ``grads``; returns dz (B, T, C)."""
    dr, dkv = ops.gate_backward(dout, cache.gate)
    dxr, grads[p + "ffn.receptance.weight"] = ops.linear_backward(dr, cache.receptance)
    dh, grads[p + "ffn.value.weight"] = ops.linear_backward(dkv, cache.value)
    dk = ops.relu_square_backward(dh, cache.relu_square)
    dxk, grads[p + "ffn.key.weight"] = ops.linear_backward(dk, cache.key)
    dz, (grads[p + "ffn.time_mix_k"], grads[p + "ffn.time_mix_r"]) = \
        ops.token_shift_mix_backward((dxk, dxr), (cache.mix_k, cache.mix_r))
    return dz  # (B, T, C); z feeds two mixes and the shift (summed inside)


class BlockCache(NamedTuple):
    ln1: layers.LayerNormCache
    att: TimeMixCache
    ln2: layers.LayerNormCache
    ffn: ChannelMixCache


class ModelCache(NamedTuple):
    emb: layers.EmbeddingCache
    ln0: layers.LayerNormCache
    blocks: list
    ln_out: layers.LayerNormCache
    head: layers.LinearCache
    n_layer: int
    ops: object  # the element-wise kernels the forward used (engine.ops); the backward uses the same


def model_forward(params, idx, engine, config: ModelConfig, state: State | None = None):
    """Parallel-mode forward. -> logits (B, T, V), ModelCache, and the RNN state after the last token.

    ``state`` (a State of rwkv4.state.LayerState, or None for the zero state) continues from earlier tokens: the
    token shift starts from its att_x / ffn_x and the WKV from its (aa, bb, pp). Gradients never flow into
    ``state``. ``engine`` gives the element-wise kernels and the WKV; nothing is validated here (minirwkv.api is
    the edge that checks).
    """
    ops = engine.ops
    L = config.n_layer
    x, c_emb = ops.embedding_forward(params["emb.weight"], idx)  # (B, T, C)
    x, c_ln0 = ops.layernorm_forward(x, params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"])  # (B, T, C)
    blocks, layers_out = [], []
    for i in range(L):
        p = f"blocks.{i}."
        s = state.layers[i] if state is not None else None
        z, c_ln1 = ops.layernorm_forward(x, params[p + "ln1.weight"], params[p + "ln1.bias"])  # (B, T, C)
        wkv_in = wkv.WKVState(s.att_aa, s.att_bb, s.att_pp) if s is not None else None
        att, c_att, (att_x, wkv_out) = time_mixing_forward(params, p, z, s.att_x if s else None, wkv_in, engine)
        x = x + att  # (B, T, C)
        z, c_ln2 = ops.layernorm_forward(x, params[p + "ln2.weight"], params[p + "ln2.bias"])  # (B, T, C)
        ffn, c_ffn, ffn_x = channel_mixing_forward(params, p, z, s.ffn_x if s else None, ops)
        x = x + ffn  # (B, T, C)
        blocks.append(BlockCache(c_ln1, c_att, c_ln2, c_ffn))
        layers_out.append(LayerState(att_x, wkv_out.aa, wkv_out.bb, wkv_out.pp, ffn_x))
    x, c_ln_out = ops.layernorm_forward(x, params["ln_out.weight"], params["ln_out.bias"])  # (B, T, C)
    logits, c_head = ops.linear_forward(x, params["head.weight"])  # (B, T, V)
    return logits, ModelCache(c_emb, c_ln0, blocks, c_ln_out, c_head, L, ops), State(tuple(layers_out))


def model_backward(dlogits, cache: ModelCache) -> dict:
    """The forward read upwards. dlogits (B, T, V) -> grads, a dict with exactly the parameters' keys."""
    ops = cache.ops  # the kernels of the forward
    grads = {}
    dx, grads["head.weight"] = ops.linear_backward(dlogits, cache.head)  # (B, T, C)
    dx, grads["ln_out.weight"], grads["ln_out.bias"] = ops.layernorm_backward(dx, cache.ln_out)
    for i in reversed(range(cache.n_layer)):
        p = f"blocks.{i}."
        c = cache.blocks[i]
        dz = channel_mixing_backward(dx, c.ffn, p, grads, ops)
        dz, grads[p + "ln2.weight"], grads[p + "ln2.bias"] = ops.layernorm_backward(dz, c.ln2)
        dx = dx + dz  # x feeds the residual and ln2
        dz = time_mixing_backward(dx, c.att, p, grads, ops)
        dz, grads[p + "ln1.weight"], grads[p + "ln1.bias"] = ops.layernorm_backward(dz, c.ln1)
        dx = dx + dz  # x feeds the residual and ln1
    dx, grads["blocks.0.ln0.weight"], grads["blocks.0.ln0.bias"] = ops.layernorm_backward(dx, cache.ln0)
    grads["emb.weight"] = ops.embedding_backward(dx, cache.emb)
    return grads
