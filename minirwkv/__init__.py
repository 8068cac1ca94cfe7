"""minirwkv: RWKV-4 from scratch in NumPy, with backpropagation written by hand.

Importing the package does no work: it compiles no kernel, imports neither Numba nor CuPy, and reads nothing from
the environment. Read in this order: README -> tutorials 01-03 -> wkv.py -> ops.py -> model.py -> rnn.py ->
train.py -> kernels/README.md.
"""
from .checkpoint import load_params
from .config import ModelConfig
from .generate import generate
from .infer import RNNRunner
from .model import check_params, config_from_params, forward, init_params, loss_and_grads
from .rnn import State, init_state, prefill, rnn_step
from .sampling import SamplingConfig

__all__ = [
    "ModelConfig",
    "RNNRunner",
    "SamplingConfig",
    "State",
    "check_params",
    "config_from_params",
    "forward",
    "generate",
    "init_params",
    "init_state",
    "load_params",
    "loss_and_grads",
    "prefill",
    "rnn_step",
]
__version__ = "0.1.0"
