"""RWKV-4 in RNN mode: the one-token step (docs/rwkv4.md §4).

Parallel mode with the zero-padded token shift is exactly RNN mode started from the zero state, so a prompt can be
processed in parallel (``model_forward`` with a state) and continued token by token (``rnn_step``); tests check
both ways agree. The step is written out on (B, C) vectors, independently of model.py's (B, T, C) code, and its WKV
is ``wkv.wkv_step``, the same function the recurrent reference form iterates. No validation here: the public
``minirwkv.rnn_step`` (minirwkv/api.py) checks its inputs once; the fast runner is minirwkv/engine/infer.py.
"""
from __future__ import annotations

from .. import layers
from ..config import ModelConfig
from ..state import State
from .state import LayerState
from .wkv import wkv_step


def _ln(x, params, name):
    return layers.layernorm_forward(x, params[name + ".weight"], params[name + ".bias"])[0]


def rnn_step(params: dict, tokens, state: State, engine, config: ModelConfig):
    """One token for each of B sequences. tokens (B,) int -> logits (B, V), the new state (the old is unchanged)."""
    xp = engine.xp
    x = params["emb.weight"][tokens]  # (B, C)
    x = _ln(x, params, "blocks.0.ln0")
    layers_out = []
    for i, s in enumerate(state.layers):
        p = f"blocks.{i}."
        z = _ln(x, params, p + "ln1")  # (B, C)
        mk, mv, mr = (params[p + f"att.time_mix_{m}"][0, 0] for m in "kvr")  # (C,)
        k = (z * mk + s.att_x * (1 - mk)) @ params[p + "att.key.weight"].T  # (B, C)
        v = (z * mv + s.att_x * (1 - mv)) @ params[p + "att.value.weight"].T  # (B, C)
        r = (z * mr + s.att_x * (1 - mr)) @ params[p + "att.receptance.weight"].T  # (B, C)
        w = -xp.exp(params[p + "att.time_decay"])  # (C,)
        y, aa, bb, pp = wkv_step(w, params[p + "att.time_first"], k, v, s.att_aa, s.att_bb, s.att_pp)
        x = x + (layers.sigmoid(r) * y) @ params[p + "att.output.weight"].T  # (B, C)
        z2 = _ln(x, params, p + "ln2")  # (B, C)
        mk, mr = params[p + "ffn.time_mix_k"][0, 0], params[p + "ffn.time_mix_r"][0, 0]
        k = (z2 * mk + s.ffn_x * (1 - mk)) @ params[p + "ffn.key.weight"].T  # (B, F)
        r = (z2 * mr + s.ffn_x * (1 - mr)) @ params[p + "ffn.receptance.weight"].T  # (B, C)
        x = x + layers.sigmoid(r) * ((xp.maximum(k, 0) ** 2) @ params[p + "ffn.value.weight"].T)  # (B, C)
        layers_out.append(LayerState(z, aa, bb, pp, z2))
    logits = _ln(x, params, "ln_out") @ params["head.weight"].T  # (B, V)
    return logits, State(tuple(layers_out))
