"""minirwkv: the RWKV family from scratch in NumPy, with backpropagation written by hand.

Importing the package does no work: it compiles no kernel, imports neither Numba nor CuPy, and reads nothing from
the environment. The layout (docs/architecture.md):

    api.py, config.py, generation.py, state.py   the public edge, configuration, the generation seam, RNN states
    layers/      what every generation shares, as forward/backward pairs
    rwkv4/       one generation: its WKV, model and RNN step (RWKV-5/6/7 sit beside it)
    backends/    engines: Numba and CUDA kernels, the Engine object chosen once at the edge
    engine/      training, optimizer, data, RNN runners, generation of text, data parallelism
    io/          checkpoints, official .pth files, atomic writes;  tokenizers/
    tools/       plots;  bench/ (top level) holds the benchmarks

Read in this order: README -> tutorials 01-03 -> rwkv4/wkv.py -> layers/ -> rwkv4/model.py -> rwkv4/rnn.py ->
engine/train.py -> kernels/README.md.
"""
from . import _moved

_moved.install()  # old module paths (minirwkv.model, ...) keep working

from .api import (check_params, config_from_params, forward, init_params, init_state, loss_and_grads,  # noqa: E402
                  prefill, rnn_step)
from .io.checkpoint import load_params  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .engine.generate import generate  # noqa: E402
from .engine.infer import RNNRunner  # noqa: E402
from .engine.sampling import SamplingConfig  # noqa: E402
from .state import State  # noqa: E402

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
