"""RWKV-5.2 'Eagle' (x052): a matrix-valued state per head with a static per-key-channel decay, a SiLU output gate
and a per-head GroupNorm. Built from RWKV-6's pieces (minirwkv/rwkv6/: the WKV, whose constant-decay case this is,
the shared time-mix tail, channel mix, state and RNN step); what is RWKV-5.2's own is here:

    model.py   parameter names and shapes, the official init, detection (and refusal of the 5.0/5.1 previews),
               time mixing's static inputs
    rnn.py     the static inputs of the one-token step

The math: docs/rwkv5.md. ``GENERATION`` is this package's side of the generation seam (minirwkv/generation.py).
"""
from ..generation import Generation
from ..rwkv6 import WKV_BACKENDS, state
from . import model, rnn

GENERATION = Generation(
    version="5",
    title="RWKV-5.2",
    LayerState=state.LayerState,
    config_from_params=model.config_from_params,
    param_shapes=model.param_shapes,
    init_params=model.init_params,
    model_forward=model.model_forward,
    model_backward=model.model_backward,
    init_state=state.init_state,
    state_shapes=state.state_shapes,
    rnn_step=rnn.rnn_step,
    detect=model.detect,
    wkv_backends=WKV_BACKENDS,
)
