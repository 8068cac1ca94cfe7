"""The public edge: every function a user calls with parameters, for any generation, checked once here.

    config_from_params(params)            the ModelConfig a state dict holds (generation detected from its names)
    check_params(params)                  names, shapes, one dtype, one device, finite values -> ModelConfig
    init_params(config, seed, dtype)      the official initialisation of config.version
    forward(params, idx)                  logits (B, T, V), parallel ("GPT") mode from the zero state
    loss_and_grads(params, idx, targets)  mean cross-entropy and the gradient of every parameter
    init_state(params, B)                 the zero RNN state
    prefill(params, idx, state)           parallel mode from a state: logits and the state after the last token
    rnn_step(params, tokens, state)       one token per sequence in RNN mode

Each function validates its inputs, resolves the engine once (``impl=``: a name or an Engine), and calls a
``Model``: a generation, its config and an engine bound together, whose methods do no checking. The trainer and the
runners build one ``Model`` at setup (``model_for``) and call it in their loops. ``config=`` overrides what is read
from the params (values the shapes cannot tell, such as a GroupNorm eps); its shapes must match the params'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import layers
from .backends.engine import Engine, make_engine
from .config import ModelConfig
from .devices import array_module, device_of
from .generation import Generation, detect_generation, get_generation
from .state import State

DTYPES = (np.float32, np.float64)


@dataclass(frozen=True)
class Model:
    """A generation, its config and an engine, checked once; the methods below do no validation."""

    generation: Generation
    config: ModelConfig
    engine: Engine

    def forward(self, params, idx, state: State | None = None):
        """-> logits (B, T, V), the cache for ``backward``, the State after the last token."""
        return self.generation.model_forward(params, idx, self.engine, self.config, state)

    def backward(self, dlogits, cache) -> dict:
        return self.generation.model_backward(dlogits, cache)

    def loss_and_grads(self, params, idx, targets, l2wrap: bool = False):
        logits, cache, _ = self.forward(params, idx)  # (B, T, V)
        loss, c_ce = layers.cross_entropy_forward(logits, targets)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss}: the forward pass produced non-finite logits")
        dlogits = layers.cross_entropy_backward(c_ce)  # (B, T, V)
        if l2wrap:
            dlogits = dlogits + layers.l2wrap_backward(logits)  # logits feed the loss and the L2Wrap penalty
        return loss, self.backward(dlogits, cache)

    def step(self, params, tokens, state: State):
        """One RNN-mode token: tokens (B,) -> logits (B, V), the next State."""
        return self.generation.rnn_step(params, tokens, state, self.engine, self.config)

    def init_state(self, batch_size: int, dtype) -> State:
        return self.generation.init_state(self.config, batch_size, dtype, self.engine.xp)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def config_from_params(params: dict) -> ModelConfig:
    """The ModelConfig of a state dict: its generation from the parameter names, its sizes from the shapes."""
    return detect_generation(params).config_from_params(params)


def check_params(params: dict, check_finite: bool = True, config: ModelConfig | None = None) -> ModelConfig:
    """Validate a parameter dict and return its config (``config`` if given). Raises ValueError naming every problem.

    Checks: the exact set of official keys (lists what is missing and what is extra), every shape, one floating
    dtype (float32 or float64) shared by all, one array module (NumPy or CuPy), and (optionally) finite values.
    """
    if config is None:
        config = config_from_params(params)
    elif not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a minirwkv.ModelConfig, got {type(config).__name__}")
    elif not isinstance(params, dict):
        raise ValueError(f"params must be a dict of official RWKV parameter names to arrays, got "
                         f"{type(params).__name__}")
    generation = get_generation(config.version)
    expected = generation.param_shapes(config)
    missing = [k for k in expected if k not in params]
    extra = [k for k in params if k not in expected]
    wrong = [f"{k}: {tuple(params[k].shape)} (expected {s})" for k, s in expected.items()
             if k in params and tuple(getattr(params[k], "shape", ())) != s]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected keys: {', '.join(extra)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong)}")
    if problems:
        raise ValueError(f"not a valid {generation.title} parameter dict for {config}: " + " | ".join(problems))
    dtypes = {np.dtype(a.dtype) for a in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise ValueError(f"parameters must all be float32 or all float64, got dtypes {sorted(map(str, dtypes))}; "
                         f"convert with {{k: v.astype(np.float32) for k, v in params.items()}}")
    modules = {type(a).__module__.split(".")[0] for a in params.values()}
    if len(modules) != 1:
        raise ValueError(f"parameters mix array types {sorted(modules)}; move them all to one device first")
    if check_finite:
        xp = array_module(params["emb.weight"])
        bad = [k for k, a in params.items() if not bool(xp.isfinite(a).all())]
        if bad:
            raise ValueError(f"non-finite values (NaN or inf) in parameters: {', '.join(bad)}")
    return config


def check_tokens(idx, vocab_size: int, xp=np, name: str = "idx", ndim: int = 2):
    """Token ids must be an integer array of the given rank, non-empty, with every id in [0, vocab_size)."""
    if type(idx).__module__.split(".")[0] != xp.__name__:
        where = "the GPU (CuPy)" if xp.__name__ == "cupy" else "the CPU (NumPy)"
        raise ValueError(f"{name} must be on the same device as the parameters ({where}); move it explicitly, "
                         f"e.g. cupy.asarray({name}) or cupy.asnumpy({name})")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of token ids, got dtype {idx.dtype}")
    if idx.ndim != ndim:
        want = "(B, T)" if ndim == 2 else "(B,)"
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(idx.shape)}")
    if idx.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(idx.shape)}): need at least one token")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} has token ids outside [0, {vocab_size}): min {lo}, max {hi}; "
                         f"the tokenizer does not match this model's vocabulary (vocab_size={vocab_size})")


def check_state(state: State, model, batch_size: int):
    """A State of the model's generation (``model``: a Model, or the params), one layer per block, every field of
    the expected shape."""
    if not isinstance(model, Model):
        model = model_for(model, "numpy", check_finite=False)
    generation, config = model.generation, model.config
    if not isinstance(state, State):
        raise ValueError(f"state must be a minirwkv.State (from init_state or prefill), got {type(state).__name__}")
    if len(state.layers) != config.n_layer:
        raise ValueError(f"state has {len(state.layers)} layers, the model has {config.n_layer}")
    shapes = generation.state_shapes(config, batch_size)
    for i, s in enumerate(state.layers):
        if not isinstance(s, generation.LayerState):
            raise ValueError(f"state layer {i} is a {type(s).__name__}, not the {generation.title} LayerState: a "
                             f"state of another model")
        for f, a in zip(s._fields, s):
            if tuple(a.shape) != shapes[f]:
                raise ValueError(f"state blocks.{i}.{f} has shape {tuple(a.shape)}, expected {shapes[f]} "
                                 f"(batch size {batch_size}, n_embd {config.n_embd})")


def model_for(params: dict, impl="auto", config: ModelConfig | None = None, check_finite: bool = True) -> Model:
    """Validate ``params`` once and bind its generation, config and engine: what a loop calls many times."""
    config = check_params(params, check_finite, config)
    engine = make_engine(impl, device_of(params["emb.weight"]))
    return Model(get_generation(config.version), config, engine)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------

def init_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """The official initialisation of ``config.version``. Returns {official name: array} in ``dtype``."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"init_params needs a ModelConfig, got {type(config).__name__}")
    if np.dtype(dtype) not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    return get_generation(config.version).init_params(config, seed, dtype)


def forward(params: dict, idx, impl="auto", config: ModelConfig | None = None):
    """Logits (B, T, V) for token ids idx (B, T), in parallel mode from the zero state."""
    model = model_for(params, impl, config)
    check_tokens(idx, model.config.vocab_size, model.engine.xp)
    logits, _, _ = model.forward(params, idx)
    return logits


def loss_and_grads(params: dict, idx, targets, impl="auto", l2wrap: bool = False, config: ModelConfig | None = None):
    """Mean cross-entropy of predicting targets (B, T) from idx (B, T), and its gradient for every parameter.

    ``l2wrap`` adds RWKV-LM's L2Wrap gradient (layers.l2wrap_backward), which does not change the reported loss.
    """
    model = model_for(params, impl, config)
    check_tokens(idx, model.config.vocab_size, model.engine.xp)
    check_tokens(targets, model.config.vocab_size, model.engine.xp, name="targets")
    if targets.shape != idx.shape:
        raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
    return model.loss_and_grads(params, idx, targets, l2wrap)


def init_state(params: dict, batch_size: int, config: ModelConfig | None = None) -> State:
    """The zero state of the model ``params`` belongs to, for ``batch_size`` sequences; dtype and device of the
    params."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = model_for(params, "numpy", config, check_finite=False)
    return model.init_state(int(batch_size), params["emb.weight"].dtype)


def prefill(params: dict, idx, state: State | None = None, impl="auto", config: ModelConfig | None = None):
    """Process a prompt idx (B, T) in parallel mode. -> logits (B, T, V) and the state after its last token.

    Starting from ``state`` (default: the zero state) it continues earlier tokens, so a long prompt can be fed in
    chunks; the result equals feeding the tokens one by one to ``rnn_step``.
    """
    model = model_for(params, impl, config)
    check_tokens(idx, model.config.vocab_size, model.engine.xp)
    if state is not None:
        check_state(state, model, idx.shape[0])
    logits, _, state_out = model.forward(params, idx, state)
    return logits, state_out


def rnn_step(params: dict, tokens, state: State, config: ModelConfig | None = None):
    """One token for each of B sequences. tokens (B,) int -> logits (B, V), the new state (the old is unchanged)."""
    model = model_for(params, "numpy", config, check_finite=False)
    check_tokens(tokens, model.config.vocab_size, model.engine.xp, name="tokens", ndim=1)
    check_state(state, model, tokens.shape[0])
    logits, state = model.step(params, tokens, state)
    if not bool(model.engine.xp.isfinite(logits).all()):
        raise FloatingPointError("rnn_step produced non-finite logits: the parameters or the state contain NaN/inf")
    return logits, state
