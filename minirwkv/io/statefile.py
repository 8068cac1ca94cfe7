"""Saving and restoring an RNN state (a system prompt, a long document: processed once, continued many times).

The file is an .npz of plain arrays: ``blocks.i.<field>`` as State.to_arrays, the optional ``logits`` (B, V) of the
last token (the first sampled token of a continuation needs them), and ``format``. Loading executes nothing
(numpy.load with allow_pickle=False); the generation is read from the field names. Writes are atomic.
"""
from __future__ import annotations

import os

import numpy as np

from ..devices import to_numpy
from ..state import State
from .atomic import atomic_write, remove_orphan_temps


STATE_FORMAT = "minirwkv-rnn-state"


def save_state(path, state: State, logits=None) -> None:
    """Write ``state`` (and optionally the logits (B, V) of the last token, which the first sampled token of a
    continuation needs) to ``path`` as an .npz of plain arrays: keys ``blocks.i.att_x``, ... as State.to_arrays,
    ``logits``, and ``format``. Loading it executes nothing (numpy.load with allow_pickle=False)."""
    arrays = {k: to_numpy(v) for k, v in state.to_arrays().items()}  # a GPU state is saved from the host
    if logits is not None:
        arrays["logits"] = to_numpy(logits)
    arrays["format"] = np.array(STATE_FORMAT)
    remove_orphan_temps(os.path.dirname(os.path.abspath(path)))  # what an earlier, killed save left behind
    with atomic_write(path) as f:  # a reader never sees half a file; a failed write keeps the old one
        np.savez(f, **arrays)


def load_state(path):
    """-> (State, logits or None) from a file written by ``save_state``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a saved RNN state ({e})") from None
    if str(arrays.pop("format", "")) != STATE_FORMAT:
        raise ValueError(f"{path}: not a saved RNN state (no 'format' entry {STATE_FORMAT!r}); write one with "
                         f"minirwkv.io.statefile.save_state")
    logits = arrays.pop("logits", None)
    return State.from_arrays(arrays), logits


