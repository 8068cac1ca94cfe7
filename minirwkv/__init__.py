"""minirwkv: RWKV-4 from scratch in NumPy, with backpropagation written by hand.

Importing the package does no work: it compiles no kernel and reads nothing from the environment.
Read in this order: README -> tutorials 01-03 -> wkv.py -> ops.py -> model.py -> rnn.py -> train.py.
"""
from .config import ModelConfig
from .model import config_from_params, forward, init_params, loss_and_grads, check_params
from .rnn import State, init_state, prefill, rnn_step

__all__ = [
    "ModelConfig",
    "State",
    "check_params",
    "config_from_params",
    "forward",
    "init_params",
    "init_state",
    "loss_and_grads",
    "prefill",
    "rnn_step",
]
__version__ = "0.1.0"
