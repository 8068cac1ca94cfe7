"""RWKV-6.0 'Finch' (x060): a matrix-valued state per head, with a per-token, per-key-channel decay made by a LoRA
of the input, and a data-dependent token shift (ddlerp). RWKV-5.2 (minirwkv/rwkv5/) is built from the same pieces.

    wkv.py     the matrix WKV, written twice and independently: the recurrent reference (``wkv6_step``, the one
               token RNN mode shares) and the chunked parallel form built on matrix products, each with its own
               hand-written backward. RWKV-5.2 is its constant-decay case.
    blocks.py  what RWKV-5.2 and RWKV-6 share: the WKV on (B, T, A) activations, time mixing after its inputs,
               channel mixing, the model skeleton
    model.py   RWKV-6's parameter names and shapes, the official init, the ddlerp and the decay LoRA
    state.py   LayerState: what one layer remembers (att_x, wkv (B, H, N, N), ffn_x), shared with RWKV-5.2
    rnn.py     the one-token step (shared with RWKV-5.2, which brings its own inputs)

The math: docs/rwkv6.md. ``GENERATION`` is this package's side of the generation seam (minirwkv/generation.py).
"""
from ..generation import Generation
from . import model, rnn, state

WKV_BACKENDS = {  # the matrix WKV on each engine; RWKV-5.2 uses the same
    "numpy": "minirwkv.rwkv6.wkv:recurrent_backend",
    "parallel": "minirwkv.rwkv6.wkv:chunked_backend",
    "numba": "minirwkv.backends.numba.wkv6:make_backend",
    "cupy": "minirwkv.backends.cuda.cupy_wkv6:make_backend",
    "cuda-shim": "minirwkv.backends.cuda.shim_wkv6:make_backend",
}

GENERATION = Generation(
    version="6",
    title="RWKV-6",
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
