"""What one RWKV-5.2 or RWKV-6 layer remembers of the past (docs/rwkv5.md §6): the two shift inputs and the
per-head matrix state of the WKV."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..state import State


class LayerState(NamedTuple):
    """One block's RNN state."""

    att_x: np.ndarray  # (B, C) LN_ln1 output of the previous token (time mixing's shift input)
    wkv: np.ndarray  # (B, H, N, N) the WKV state S, indexed [b, h, key, value]
    ffn_x: np.ndarray  # (B, C) LN_ln2 output of the previous token (channel mixing's shift input)


def state_shapes(config, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of every field of a LayerState."""
    H, N = config.n_head, config.head_size
    return {"att_x": (batch_size, config.n_embd), "wkv": (batch_size, H, N, N), "ffn_x": (batch_size, config.n_embd)}


def init_state(config, batch_size: int, dtype, xp=np) -> State:
    """The zero state: shift inputs 0 and S = 0 (what training starts every sequence from)."""
    shapes = state_shapes(config, batch_size)
    return State(tuple(LayerState(*(xp.zeros(shapes[f], dtype) for f in LayerState._fields))
                       for _ in range(config.n_layer)))
