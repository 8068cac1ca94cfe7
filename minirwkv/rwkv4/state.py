"""What one RWKV-4 layer remembers of the past (docs/rwkv4.md §4): the two shift inputs and the WKV's (aa, bb, pp)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..state import State
from .wkv import MIN_VALUE


class LayerState(NamedTuple):
    """One block's RNN state, all (B, C)."""

    att_x: np.ndarray  # LN_ln1 output of the previous token (time mixing's shift input)
    att_aa: np.ndarray  # WKV scaled numerator alpha
    att_bb: np.ndarray  # WKV scaled denominator beta
    att_pp: np.ndarray  # WKV log-scale p (MIN_VALUE before the first token)
    ffn_x: np.ndarray  # LN_ln2 output of the previous token (channel mixing's shift input)


def state_shapes(config, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of every field of a LayerState."""
    return {f: (batch_size, config.n_embd) for f in LayerState._fields}


def init_state(config, batch_size: int, dtype, xp=np) -> State:
    """The zero state: shift inputs 0, aa = bb = 0, pp = MIN_VALUE (stands for -inf)."""
    shape = (batch_size, config.n_embd)

    def layer():
        return LayerState(xp.zeros(shape, dtype), xp.zeros(shape, dtype), xp.zeros(shape, dtype),
                          xp.full(shape, MIN_VALUE, dtype), xp.zeros(shape, dtype))

    return State(tuple(layer() for _ in range(config.n_layer)))
