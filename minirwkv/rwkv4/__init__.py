"""RWKV-4 ("RWKV: Reinventing RNNs for the Transformer Era"): one (numerator, denominator) pair per channel.

    wkv.py     the WKV operator twice, independently: parallel (T x T) and recurrent, each with its backward;
               ``wkv_step``, the one token that RNN mode shares
    model.py   glossary, parameter names and shapes, the official init, time/channel mixing, forward and backward
    state.py   LayerState: what one layer remembers (att_x, att_aa, att_bb, att_pp, ffn_x)
    rnn.py     the one-token step

The math: docs/rwkv4.md (the model) and docs/wkv.md (the WKV derivation). ``GENERATION`` is this package's side of
the generation seam (minirwkv/generation.py).
"""
from ..generation import Generation
from . import model, rnn, state

GENERATION = Generation(
    version="4",
    title="RWKV-4",
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
    wkv_backends={
        "numpy": "minirwkv.rwkv4.wkv:recurrent_backend",
        "parallel": "minirwkv.rwkv4.wkv:parallel_backend",
        "numba": "minirwkv.backends.numba.wkv4:make_backend",
        "cupy": "minirwkv.backends.cuda.cupy_wkv4:make_backend",
        "cuda-shim": "minirwkv.backends.cuda.shim_wkv4:make_backend",
    },
)
