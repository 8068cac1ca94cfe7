"""What RWKV-5.2 and RWKV-6.0 share, written once: the matrix WKV on (B, T, A) activations, the time mixing after
its token-shift inputs, the channel mixing, and the model skeleton (docs/rwkv5.md §3, docs/rwkv6.md §10).

The two generations differ only in how time mixing makes its inputs from z = LN_ln1(x) and the previous token:
v5.2 mixes with static weights and a static decay (rwkv5/model.py), v6.0 with the data-dependent ddlerp and a
decay LoRA (rwkv6/model.py). Each passes its pair of functions to ``model_forward`` as a ``TimeMixInputs``:

    forward(params, p, z, x_prev, engine, config) -> (xr, xk, xv, xg) (B, T, C) each, w (B, T, H, N), cache
    backward(dxr, dxk, dxv, dxg, dw, cache, p, grads, ops) -> dz (B, T, C)

w is the raw decay of the WKV (decay factor exp(-exp(w)); minirwkv/rwkv6/wkv.py), per token and key channel.
Everything after the inputs (time mixing's tail) is:

    r, k, v = xr Wr^T, xk Wk^T, xv Wv^T                       (B, T, A)   r raw: no sigmoid (RWKV-4 had one)
    g = SiLU(xg Wg^T)                                         (B, T, A)
    y = WKV(r, k, v, w, u; S)                                 (B, T, A)   per (b, h), u = time_faaaa (H, N)
    o = GroupNorm_H(y; ln_x_eps) * ln_x.weight + ln_x.bias    (B, T, A)   per token and head
    out = (o * g) Wo^T                                        (B, T, C)

Channel mixing: out = sigmoid(xr Wr^T) * (relu(xk Wk^T)^2 Wv^T), with xk, xr mixes of z and its shift whose
current-token weights each generation supplies (v5.2 stores them, v6 stores one minus them).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .. import layers
from ..config import ModelConfig
from ..devices import array_module
from ..state import State
from .state import LayerState


class TimeMixInputs(NamedTuple):
    """A generation's token-shift inputs of time mixing: a forward/backward pair (the module docstring)."""

    forward: Callable
    backward: Callable


# ---------------------------------------------------------------------------------------------------------------
# The matrix WKV on (B, T, A) activations
# ---------------------------------------------------------------------------------------------------------------

class WKVCache(NamedTuple):
    r: np.ndarray  # (B, T, H, N)
    k: np.ndarray  # (B, T, H, N)
    v: np.ndarray  # (B, T, H, N)
    w: np.ndarray  # (B, T, H, N) raw decay
    u: np.ndarray  # (H, N)
    state: np.ndarray | None  # (B, H, N, N) S_{-1}, None for 0
    backend: object  # the WKVBackend of the forward


def wkv_forward(r, k, v, w, u, backend, state=None):
    """y (B, T, A) and S_out (B, H, N, N) of r, k, v (B, T, A), w (B, T, H, N), u (H, N), from S_{-1} = ``state``."""
    B, T, A = r.shape
    H, N = u.shape
    heads = (B, T, H, N)
    rh, kh, vh = r.reshape(heads), k.reshape(heads), v.reshape(heads)  # (B, T, H, N) views
    w = array_module(w).ascontiguousarray(w)  # the kernels take C-contiguous inputs; RWKV-5.2's is a broadcast view
    y, S = backend.forward(rh, kh, vh, w, u, state)  # (B, T, H, N), (B, H, N, N)
    return y.reshape(B, T, A), WKVCache(rh, kh, vh, w, u, state, backend), S


def wkv_backward(dy, cache: WKVCache):
    """-> dr, dk, dv (B, T, A), dw (B, T, H, N), du (H, N). The carried state gets no gradient (training starts
    from 0; a prefill is not differentiated)."""
    g = cache.backend.backward(cache.r, cache.k, cache.v, cache.w, cache.u, dy.reshape(cache.r.shape), cache.state,
                               None)
    flat = dy.shape
    return g.dr.reshape(flat), g.dk.reshape(flat), g.dv.reshape(flat), g.dw, g.du


# ---------------------------------------------------------------------------------------------------------------
# Time mixing after its inputs
# ---------------------------------------------------------------------------------------------------------------

class TimeMixCache(NamedTuple):
    inputs: object  # the generation's TimeMixInputs cache
    receptance: layers.LinearCache
    key: layers.LinearCache
    value: layers.LinearCache
    gate_linear: layers.LinearCache
    silu: tuple
    wkv: WKVCache
    ln_x: layers.GroupNormCache
    o: np.ndarray  # (B, T, A) GroupNorm output
    g: np.ndarray  # (B, T, A) SiLU gate
    output: layers.LinearCache


def time_mixing_forward(params, p, z, x_prev, wkv_state, engine, config: ModelConfig, inputs: TimeMixInputs):
    """TimeMix of block ``p`` ("blocks.i.") on z = LN_ln1(x) (B, T, C). -> out (B, T, C), cache, S_out.

    x_prev (B, C) is z of the token before this chunk (None: zeros), wkv_state (B, H, N, N) the WKV state before it
    (None: zeros)."""
    ops = engine.ops
    (xr, xk, xv, xg), w, c_inputs = inputs.forward(params, p, z, x_prev, engine, config)  # (B, T, C) x 4
    r, c_receptance = ops.linear_forward(xr, params[p + "att.receptance.weight"])  # (B, T, A)
    k, c_key = ops.linear_forward(xk, params[p + "att.key.weight"])  # (B, T, A)
    v, c_value = ops.linear_forward(xv, params[p + "att.value.weight"])  # (B, T, A)
    a, c_gate_linear = ops.linear_forward(xg, params[p + "att.gate.weight"])  # (B, T, A)
    g, c_silu = ops.silu_forward(a)  # (B, T, A)
    y, c_wkv, S = wkv_forward(r, k, v, w, params[p + "att.time_faaaa"], engine.wkv(config.version), wkv_state)
    o, c_ln_x = ops.groupnorm_forward(y, params[p + "att.ln_x.weight"], params[p + "att.ln_x.bias"], config.n_head,
                                      config.ln_x_eps)  # (B, T, A)
    out, c_output = ops.linear_forward(o * g, params[p + "att.output.weight"])  # (B, T, C)
    cache = TimeMixCache(c_inputs, c_receptance, c_key, c_value, c_gate_linear, c_silu, c_wkv, c_ln_x, o, g, c_output)
    return out, cache, S


def time_mixing_backward(dout, cache: TimeMixCache, p, grads, ops, inputs: TimeMixInputs):
    """TimeMix read upwards. Writes parameter gradients into ``grads``; returns dz (B, T, C)."""
    dog, grads[p + "att.output.weight"] = ops.linear_backward(dout, cache.output)  # (B, T, A)
    do = dog * cache.g  # o * g feeds the output
    dg = dog * cache.o
    dy, grads[p + "att.ln_x.weight"], grads[p + "att.ln_x.bias"] = ops.groupnorm_backward(do, cache.ln_x)
    dr, dk, dv, dw, grads[p + "att.time_faaaa"] = wkv_backward(dy, cache.wkv)
    da = ops.silu_backward(dg, cache.silu)  # (B, T, A)
    dxg, grads[p + "att.gate.weight"] = ops.linear_backward(da, cache.gate_linear)
    dxv, grads[p + "att.value.weight"] = ops.linear_backward(dv, cache.value)
    dxk, grads[p + "att.key.weight"] = ops.linear_backward(dk, cache.key)
    dxr, grads[p + "att.receptance.weight"] = ops.linear_backward(dr, cache.receptance)
    return inputs.backward(dxr, dxk, dxv, dxg, dw, cache.inputs, p, grads, ops)  # (B, T, C)


# ---------------------------------------------------------------------------------------------------------------
# Channel mixing
# ---------------------------------------------------------------------------------------------------------------

class ChannelMixCache(NamedTuple):
    mix_k: layers.MixCache
    mix_r: layers.MixCache
    key: layers.LinearCache
    relu_square: np.ndarray
    value: layers.LinearCache
    receptance: layers.LinearCache
    gate: layers.GateCache


def channel_mixing_forward(params, p, z, x_prev, mixes, ops):
    """ChannelMix of block ``p`` on z = LN_ln2(x) (B, T, C); ``mixes`` = (mu_k, mu_r) (1, 1, C), the weights of the
    current token. -> out (B, T, C), cache, z[:, -1] (the state)."""
    (xk, xr), (c_mix_k, c_mix_r) = ops.token_shift_mix_forward(z, x_prev, mixes)  # (B, T, C) each
    k, c_key = ops.linear_forward(xk, params[p + "ffn.key.weight"])  # (B, T, F)
    h, c_relu = ops.relu_square_forward(k)  # (B, T, F)
    kv, c_value = ops.linear_forward(h, params[p + "ffn.value.weight"])  # (B, T, C)
    r, c_receptance = ops.linear_forward(xr, params[p + "ffn.receptance.weight"])  # (B, T, C)
    out, c_gate = ops.gate_forward(r, kv)  # (B, T, C)
    return out, ChannelMixCache(c_mix_k, c_mix_r, c_key, c_relu, c_value, c_receptance, c_gate), z[:, -1]


def channel_mixing_backward(dout, cache: ChannelMixCache, p, grads, ops):
    """ChannelMix read upwards. Writes the matrices' gradients into ``grads``; returns dz (B, T, C) and
    (dmu_k, dmu_r), the gradients of the current-token weights (the generation stores them its own way)."""
    dr, dkv = ops.gate_backward(dout, cache.gate)
    dxr, grads[p + "ffn.receptance.weight"] = ops.linear_backward(dr, cache.receptance)
    dh, grads[p + "ffn.value.weight"] = ops.linear_backward(dkv, cache.value)
    dk = ops.relu_square_backward(dh, cache.relu_square)
    dxk, grads[p + "ffn.key.weight"] = ops.linear_backward(dk, cache.key)
    dz, dmixes = ops.token_shift_mix_backward((dxk, dxr), (cache.mix_k, cache.mix_r))
    return dz, dmixes  # z feeds two mixes and the shift (summed inside)


class ChannelMixWeights(NamedTuple):
    """How a generation stores channel mixing's two mixes: ``forward(params, p) -> (mu_k, mu_r)`` current-token
    weights (1, 1, C); ``backward(dmu_k, dmu_r, p, grads)`` writes the stored parameters' gradients."""

    forward: Callable
    backward: Callable


# ---------------------------------------------------------------------------------------------------------------
# The model: emb -> ln0 -> blocks -> ln_out -> head
# ---------------------------------------------------------------------------------------------------------------

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
    inputs: TimeMixInputs
    ffn_mixes: ChannelMixWeights


def model_forward(params, idx, engine, config: ModelConfig, state: State | None, inputs: TimeMixInputs,
                  ffn_mixes: ChannelMixWeights):
    """Parallel-mode forward. -> logits (B, T, V), ModelCache, and the RNN state after the last token.

    ``state`` (a State of rwkv6.state.LayerState, or None for the zero state) continues from earlier tokens: the
    token shifts start from its att_x / ffn_x, the WKV from its wkv. Gradients never flow into ``state``.
    """
    ops = engine.ops
    x, c_emb = ops.embedding_forward(params["emb.weight"], idx)  # (B, T, C)
    x, c_ln0 = ops.layernorm_forward(x, params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"])  # (B, T, C)
    blocks, layers_out = [], []
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        s = state.layers[i] if state is not None else None
        z, c_ln1 = ops.layernorm_forward(x, params[p + "ln1.weight"], params[p + "ln1.bias"])  # (B, T, C)
        att, c_att, wkv_out = time_mixing_forward(params, p, z, s.att_x if s else None, s.wkv if s else None,
                                                  engine, config, inputs)
        x = x + att  # (B, T, C)
        att_x = z[:, -1]
        z, c_ln2 = ops.layernorm_forward(x, params[p + "ln2.weight"], params[p + "ln2.bias"])  # (B, T, C)
        ffn, c_ffn, ffn_x = channel_mixing_forward(params, p, z, s.ffn_x if s else None,
                                                   ffn_mixes.forward(params, p), ops)
        x = x + ffn  # (B, T, C)
        blocks.append(BlockCache(c_ln1, c_att, c_ln2, c_ffn))
        layers_out.append(LayerState(att_x, wkv_out, ffn_x))
    x, c_ln_out = ops.layernorm_forward(x, params["ln_out.weight"], params["ln_out.bias"])  # (B, T, C)
    logits, c_head = ops.linear_forward(x, params["head.weight"])  # (B, T, V)
    cache = ModelCache(c_emb, c_ln0, blocks, c_ln_out, c_head, config.n_layer, ops, inputs, ffn_mixes)
    return logits, cache, State(tuple(layers_out))


def model_backward(dlogits, cache: ModelCache) -> dict:
    """The forward read upwards. dlogits (B, T, V) -> grads, a dict with exactly the parameters' keys."""
    ops = cache.ops
    grads = {}
    dx, grads["head.weight"] = ops.linear_backward(dlogits, cache.head)  # (B, T, C)
    dx, grads["ln_out.weight"], grads["ln_out.bias"] = ops.layernorm_backward(dx, cache.ln_out)
    for i in reversed(range(cache.n_layer)):
        p = f"blocks.{i}."
        c = cache.blocks[i]
        dz, dmixes = channel_mixing_backward(dx, c.ffn, p, grads, ops)
        cache.ffn_mixes.backward(*dmixes, p, grads)
        dz, grads[p + "ln2.weight"], grads[p + "ln2.bias"] = ops.layernorm_backward(dz, c.ln2)
        dx = dx + dz  # x feeds the residual and ln2
        dz = time_mixing_backward(dx, c.att, p, grads, ops, cache.inputs)
        dz, grads[p + "ln1.weight"], grads[p + "ln1.bias"] = ops.layernorm_backward(dz, c.ln1)
        dx = dx + dz  # x feeds the residual and ln1
    dx, grads["blocks.0.ln0.weight"], grads["blocks.0.ln0.bias"] = ops.layernorm_backward(dx, cache.ln0)
    grads["emb.weight"] = ops.embedding_backward(dx, cache.emb)
    return grads
