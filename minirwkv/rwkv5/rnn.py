"""RWKV-5.2 in RNN mode: the one-token step is RWKV-6's (minirwkv/rwkv6/rnn.py) with the static inputs below."""
from __future__ import annotations

from ..config import ModelConfig
from ..devices import array_module
from ..rwkv6.rnn import rnn_step_with
from ..state import State
from .model import FFN_MIXES, MIXES


def step_inputs(params, p, z, att_x, config: ModelConfig):
    """z, att_x (B, C) -> (xr, xk, xv, xg) = z * mu + att_x * (1 - mu), and w = time_decay (B, H, N)."""
    x = {}
    for m in MIXES:
        mu = params[p + f"att.time_mix_{m}"][0, 0]  # (C,)
        x[m] = z * mu + att_x * (1 - mu)  # (B, C)
    w = array_module(z).broadcast_to(params[p + "att.time_decay"], (z.shape[0], config.n_head, config.head_size))
    return (x["r"], x["k"], x["v"], x["g"]), w


def rnn_step(params: dict, tokens, state: State, engine, config: ModelConfig):
    """RWKV-5.2: one token for each of B sequences. tokens (B,) int -> logits (B, V), the new state."""
    return rnn_step_with(step_inputs, FFN_MIXES.forward, params, tokens, state, config)
