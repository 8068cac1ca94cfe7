"""The layers every RWKV generation shares, each a forward/backward pair (derivations: docs/backward.md).

    embedding.py    token embedding (row lookup) and its scatter-add backward
    layernorm.py    LayerNorm over the channels
    linear.py       bias-free linear layers, weights (out, in)
    shift.py        the token shift and the per-channel mixes that read it
    activations.py  sigmoid, the receptance gate sigmoid(r) * y, relu^2, SiLU
    groupnorm.py    GroupNorm over the heads (RWKV-5 and later: ln_x)
    lora.py         the low-rank adapters act(x @ w1) @ w2 (RWKV-6 and later)
    init.py         the official initialisers (orthogonal)
    loss.py         cross-entropy, RWKV-LM's L2Wrap

Each ``*_forward`` returns its output and a cache (a NamedTuple of what the backward needs); each ``*_backward``
takes the gradient of the output and the cache and returns the gradients of the inputs, in argument order. Every
function works on NumPy or CuPy arrays alike (the array module is taken from the inputs) and keeps their dtype.

This package is also the reference set of element-wise kernels: an engine's ``ops`` (minirwkv/backends/engine.py)
is these functions by name, some replaced by Numba kernels of the same name and signature.
"""
from .activations import (GateCache, gate_backward, gate_forward, relu_square_backward, relu_square_forward, sigmoid,
                          silu_backward, silu_forward)
from .groupnorm import GroupNormCache, groupnorm_backward, groupnorm_forward
from .lora import LoraCache, lora_backward, lora_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .layernorm import LN_EPS, LayerNormCache, layernorm_backward, layernorm_forward
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward, l2wrap_backward
from .shift import (MixCache, mix_backward, mix_forward, token_shift_backward, token_shift_forward,
                    token_shift_mix_backward, token_shift_mix_forward)

FUNCTIONS = (
    "embedding_forward", "embedding_backward", "layernorm_forward", "layernorm_backward", "linear_forward",
    "linear_backward", "token_shift_forward", "token_shift_backward", "mix_forward", "mix_backward",
    "token_shift_mix_forward", "token_shift_mix_backward", "sigmoid", "gate_forward", "gate_backward",
    "relu_square_forward", "relu_square_backward", "cross_entropy_forward", "cross_entropy_backward",
    "l2wrap_backward", "groupnorm_forward", "groupnorm_backward", "silu_forward", "silu_backward", "lora_forward",
    "lora_backward",
)  # the reference kernels an engine's ops namespace holds, by name
