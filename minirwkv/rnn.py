"""RWKV-4 in RNN mode: a named per-layer state and a one-token step (rwkv4-math section 4).

Parallel mode with the zero-padded token shift is exactly RNN mode started from the zero state, so a prompt can be
processed in parallel (``prefill``) and continued token by token (``rnn_step``); tests check both ways agree.
The step is written out on (B, C) vectors, independently of model.py's (B, T, C) code, and its WKV is
``wkv.wkv_step``, the same function the recurrent reference form iterates.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import ops
from .model import _backend_for, check_params, check_tokens, model_forward
from .wkv import MIN_VALUE, wkv_step
from .xp import array_module


class LayerState(NamedTuple):
    """What one layer remembers of the past (all (B, C)). Named, never indexed as state[5*i+k]."""

    att_x: np.ndarray  # LN_ln1 output of the previous token (time mixing's shift input)
    att_aa: np.ndarray  # WKV scaled numerator alpha
    att_bb: np.ndarray  # WKV scaled denominator beta
    att_pp: np.ndarray  # WKV log-scale p (MIN_VALUE before the first token)
    ffn_x: np.ndarray  # LN_ln2 output of the previous token (channel mixing's shift input)


class State(NamedTuple):
    layers: tuple  # one LayerState per block

    @property
    def batch_size(self) -> int:
        return self.layers[0].att_x.shape[0]

    def copy(self) -> "State":
        return State(tuple(LayerState(*(a.copy() for a in s)) for s in self.layers))

    def to_arrays(self) -> dict:
        """Flat {"blocks.i.att_x": array, ...} for saving (e.g. with numpy.savez)."""
        return {f"blocks.{i}.{f}": a for i, s in enumerate(self.layers) for f, a in zip(LayerState._fields, s)}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "State":
        n = len({k.split(".")[1] for k in arrays})
        try:
            return cls(tuple(LayerState(*(arrays[f"blocks.{i}.{f}"] for f in LayerState._fields)) for i in range(n)))
        except KeyError as e:
            raise ValueError(f"incomplete RNN state: missing {e.args[0]!r}") from None


def init_state(params: dict, batch_size: int) -> State:
    """The zero state: shift inputs 0, aa = bb = 0, pp = MIN_VALUE (-inf). dtype and device of the params."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    config = check_params(params, check_finite=False)
    xp = array_module(params["emb.weight"])
    dtype = params["emb.weight"].dtype
    shape = (int(batch_size), config.n_embd)

    def layer():
        return LayerState(xp.zeros(shape, dtype), xp.zeros(shape, dtype), xp.zeros(shape, dtype),
                          xp.full(shape, MIN_VALUE, dtype), xp.zeros(shape, dtype))

    return State(tuple(layer() for _ in range(config.n_layer)))


def check_state(state: State, params: dict, batch_size: int):
    config = check_params(params, check_finite=False)
    if not isinstance(state, State):
        raise ValueError(f"state must be a minirwkv.State (from init_state or prefill), got {type(state).__name__}")
    if len(state.layers) != config.n_layer:
        raise ValueError(f"state has {len(state.layers)} layers, the model has {config.n_layer}")
    want = (batch_size, config.n_embd)
    for i, s in enumerate(state.layers):
        for f, a in zip(LayerState._fields, s):
            if tuple(a.shape) != want:
                raise ValueError(f"state blocks.{i}.{f} has shape {tuple(a.shape)}, expected {want} "
                                 f"(batch size {batch_size}, n_embd {config.n_embd})")
    return config


def _ln(x, params, name):
    return ops.layernorm_forward(x, params[name + ".weight"], params[name + ".bias"])[0]


def rnn_step(params: dict, tokens, state: State):
    """One token for each of B sequences. tokens (B,) int -> logits (B, V), the new state (the old is unchanged)."""
    config = check_params(params, check_finite=False)
    xp = array_module(params["emb.weight"])
    check_tokens(tokens, config.vocab_size, xp, name="tokens", ndim=1)
    check_state(state, params, tokens.shape[0])
    x = params["emb.weight"][tokens]  # (B, C)
    x = _ln(x, params, "blocks.0.ln0")
    layers = []
    for i, s in enumerate(state.layers):
        p = f"blocks.{i}."
        z = _ln(x, params, p + "ln1")  # (B, C)
        mk, mv, mr = (params[p + f"att.time_mix_{m}"][0, 0] for m in "kvr")  # (C,)
        k = (z * mk + s.att_x * (1 - mk)) @ params[p + "att.key.weight"].T  # (B, C)
        v = (z * mv + s.att_x * (1 - mv)) @ params[p + "att.value.weight"].T  # (B, C)
        r = (z * mr + s.att_x * (1 - mr)) @ params[p + "att.receptance.weight"].T  # (B, C)
        w = -xp.exp(params[p + "att.time_decay"])  # (C,)
        y, aa, bb, pp = wkv_step(w, params[p + "att.time_first"], k, v, s.att_aa, s.att_bb, s.att_pp)
        x = x + (ops.sigmoid(r) * y) @ params[p + "att.output.weight"].T  # (B, C)
        z2 = _ln(x, params, p + "ln2")  # (B, C)
        mk, mr = params[p + "ffn.time_mix_k"][0, 0], params[p + "ffn.time_mix_r"][0, 0]
        k = (z2 * mk + s.ffn_x * (1 - mk)) @ params[p + "ffn.key.weight"].T  # (B, F)
        r = (z2 * mr + s.ffn_x * (1 - mr)) @ params[p + "ffn.receptance.weight"].T  # (B, C)
        x = x + ops.sigmoid(r) * ((xp.maximum(k, 0) ** 2) @ params[p + "ffn.value.weight"].T)  # (B, C)
        layers.append(LayerState(z, aa, bb, pp, z2))
    logits = _ln(x, params, "ln_out") @ params["head.weight"].T  # (B, V)
    if not bool(xp.isfinite(logits).all()):
        raise FloatingPointError("rnn_step produced non-finite logits: the parameters or the state contain NaN/inf")
    return logits, State(tuple(layers))


def prefill(params: dict, idx, state: State | None = None, impl: str = "auto"):
    """Process a prompt idx (B, T) in parallel mode. -> logits (B, T, V) and the state after its last token.

    Starting from ``state`` (default: the zero state) it continues earlier tokens, so a long prompt can be fed in
    chunks; the result equals feeding the tokens one by one to ``rnn_step``.
    """
    config = check_params(params)
    check_tokens(idx, config.vocab_size, array_module(params["emb.weight"]))
    if state is not None:
        check_state(state, params, idx.shape[0])
    logits, _, state_out = model_forward(params, idx, _backend_for(params, impl), state)
    return logits, state_out
