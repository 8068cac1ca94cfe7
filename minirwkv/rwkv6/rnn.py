"""RWKV-5.2 and RWKV-6 in RNN mode: the one-token step (docs/rwkv5.md §6, docs/rwkv6.md §13).

Written out on (B, C) vectors, independently of the parallel-mode code in blocks.py / model.py, and stepping the
WKV with ``wkv.wkv6_step``, the function the recurrent reference form iterates. The two generations differ only
in time mixing's inputs, so each gives its own ``step_inputs`` (below for RWKV-6, rwkv5/rnn.py for RWKV-5.2):

    step_inputs(params, p, z, att_x, config) -> (xr, xk, xv, xg) (B, C) each, w (B, H, N) the raw decay

Parallel mode with the zero-padded token shift is exactly RNN mode from the zero state; tests check it token by
token. No validation here: the public ``minirwkv.rnn_step`` (minirwkv/api.py) checks its inputs once.
"""
from __future__ import annotations

from .. import layers
from ..config import ModelConfig
from ..devices import array_module
from ..state import State
from .model import FFN_MIXES, TARGETS
from .state import LayerState
from .wkv import wkv6_step


def _ln(x, params, name):
    return layers.layernorm_forward(x, params[name + ".weight"], params[name + ".bias"])[0]


def step_inputs(params, p, z, att_x, config: ModelConfig):
    """RWKV-6's ddlerp and decay LoRA for one token: z, att_x (B, C) -> (xr, xk, xv, xg), w_hat (B, H, N)."""
    xp = array_module(z)
    B = z.shape[0]
    delta = att_x - z  # (B, C) the previous token minus this one
    xi = z + delta * params[p + "att.time_maa_x"][0, 0]  # (B, C)
    w2 = params[p + "att.time_maa_w2"]  # (5, D, C)
    D = w2.shape[1]
    h = xp.tanh(xi @ params[p + "att.time_maa_w1"])  # (B, 5 D)
    x = {f: z + delta * (params[p + f"att.time_maa_{f}"][0, 0] + h[:, i * D:(i + 1) * D] @ w2[i])  # (B, C)
         for i, f in enumerate(TARGETS)}
    q = xp.tanh(x["w"] @ params[p + "att.time_decay_w1"]) @ params[p + "att.time_decay_w2"]  # (B, A)
    w = params[p + "att.time_decay"][0, 0] + q  # (B, A)
    return (x["r"], x["k"], x["v"], x["g"]), w.reshape(B, config.n_head, config.head_size)


def rnn_step_with(step_inputs, ffn_mixes, params: dict, tokens, state: State, config: ModelConfig):
    """One token for each of B sequences with a generation's ``step_inputs`` and channel-mix weights
    (``ffn_mixes(params, p) -> (mu_k, mu_r)``, current-token weights). -> logits (B, V), the new State."""
    H, N = config.n_head, config.head_size
    x = params["emb.weight"][tokens]  # (B, C)
    B = x.shape[0]
    x = _ln(x, params, "blocks.0.ln0")
    layers_out = []
    for i, s in enumerate(state.layers):
        p = f"blocks.{i}."
        z = _ln(x, params, p + "ln1")  # (B, C)
        (xr, xk, xv, xg), w = step_inputs(params, p, z, s.att_x, config)  # (B, C) x 4, (B, H, N)
        r = xr @ params[p + "att.receptance.weight"].T  # (B, A)
        k = xk @ params[p + "att.key.weight"].T  # (B, A)
        v = xv @ params[p + "att.value.weight"].T  # (B, A)
        g = layers.silu_forward(xg @ params[p + "att.gate.weight"].T)[0]  # (B, A)
        y, S = wkv6_step(r.reshape(B, H, N), k.reshape(B, H, N), v.reshape(B, H, N), w,
                         params[p + "att.time_faaaa"], s.wkv)  # (B, H, N), (B, H, N, N)
        o = layers.groupnorm_forward(y.reshape(B, -1), params[p + "att.ln_x.weight"], params[p + "att.ln_x.bias"], H,
                                     config.ln_x_eps)[0]  # (B, A)
        x = x + (o * g) @ params[p + "att.output.weight"].T  # (B, C)
        z2 = _ln(x, params, p + "ln2")  # (B, C)
        mk, mr = (m[0, 0] for m in ffn_mixes(params, p))  # (C,) current-token weights
        k = (z2 * mk + s.ffn_x * (1 - mk)) @ params[p + "ffn.key.weight"].T  # (B, F)
        r = (z2 * mr + s.ffn_x * (1 - mr)) @ params[p + "ffn.receptance.weight"].T  # (B, C)
        x = x + layers.sigmoid(r) * ((array_module(k).maximum(k, 0) ** 2) @ params[p + "ffn.value.weight"].T)
        layers_out.append(LayerState(z, S, z2))
    logits = _ln(x, params, "ln_out") @ params["head.weight"].T  # (B, V)
    return logits, State(tuple(layers_out))


def rnn_step(params: dict, tokens, state: State, engine, config: ModelConfig):
    """RWKV-6: one token for each of B sequences. tokens (B,) int -> logits (B, V), the new state."""
    return rnn_step_with(step_inputs, FFN_MIXES.forward, params, tokens, state, config)
