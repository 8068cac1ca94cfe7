"""The generation seam: the one interface every RWKV generation implements, and the registry of generations.

The engine (trainer, runners, generate, checkpoints, convert, the CLI, data parallelism) calls a generation only
through a ``Generation`` and never imports a generation's modules. Adding a generation adds its package
(``minirwkv/rwkvN/``, exporting ``GENERATION``) and one line in ``REGISTRY``. docs/architecture.md describes the seam.

What a generation provides, with the shapes the engine may rely on (B batch, T time, V vocab):

    config_from_params(params) -> ModelConfig         read the shapes of a state dict (its keys are official names)
    param_shapes(config) -> {name: shape}             every parameter, official name and shape, registration order
    init_params(config, seed, dtype) -> params        the official initialisation
    model_forward(params, idx, engine, config, state) -> logits (B, T, V), cache, State after the last token
    model_backward(dlogits, cache) -> grads           keyed like params
    init_state(config, B, dtype, xp) -> State         the zero state: one LayerState per block
    state_shapes(config, B) -> {field: shape}         the shape of every LayerState field
    rnn_step(params, tokens, state, engine, config) -> logits (B, V), State        one token per sequence
    detect(params) -> bool                            does this state dict belong to this generation?
    wkv_backends: {engine name: "module:function"}   the WKV of each engine (the function makes a WKVBackend)

``model_forward``, ``model_backward`` and ``rnn_step`` do no validation: ``minirwkv.api`` checks the inputs once at
the public edge. A generation's state is a ``minirwkv.state.State`` of its own ``LayerState`` (named fields): RWKV-4
keeps (att_x, att_aa, att_bb, att_pp, ffn_x), the matrix-state generations (att_x, wkv (B, H, N, N), ffn_x), and
whatever else a generation carries between layers within one token (RWKV-7's value residual) stays inside its step.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

REGISTRY = {  # version -> the package that implements it, newest first (detection tries them in this order)
    "6": "minirwkv.rwkv6",
    "5": "minirwkv.rwkv5",
    "4": "minirwkv.rwkv4",
}


@dataclass(frozen=True)
class Generation:
    version: str  # "4", "5" (v5.2), "6", "7": ModelConfig.version
    title: str  # "RWKV-4"
    LayerState: type  # the named per-layer RNN state
    config_from_params: Callable
    param_shapes: Callable
    init_params: Callable
    model_forward: Callable
    model_backward: Callable
    init_state: Callable
    state_shapes: Callable
    rnn_step: Callable
    detect: Callable
    wkv_backends: Mapping[str, str] = field(default_factory=dict)


def get_generation(version: str) -> Generation:
    """The Generation of ``version`` ("4", ...); a ValueError lists the known ones."""
    version = str(version)
    if version not in REGISTRY:
        raise ValueError(f"unknown RWKV version {version!r}; this minirwkv knows: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[version]).GENERATION


def generations() -> list[Generation]:
    return [get_generation(v) for v in REGISTRY]


def detect_generation(params: Mapping) -> Generation:
    """The generation a state dict belongs to, by its parameter names (never by a size)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of official RWKV parameter names to arrays, got "
                         f"{type(params).__name__}")
    if "emb.weight" not in params:
        raise ValueError("params has no 'emb.weight' (V, C): not an RWKV parameter dict (official checkpoint names "
                         "such as emb.weight, blocks.0.att.key.weight, head.weight)")
    for generation in generations():
        if generation.detect(params):
            return generation
    some = ", ".join(sorted(params)[:6])
    raise ValueError(f"these parameters belong to no RWKV generation this minirwkv knows "
                     f"({', '.join('RWKV-' + v for v in REGISTRY)}); its first keys: {some}")


def layer_type_for_fields(fields: set) -> type:
    """The LayerState whose field names are ``fields`` (reading a saved state)."""
    for generation in generations():
        if set(generation.LayerState._fields) == set(fields):
            return generation.LayerState
    raise ValueError(f"an RNN state with fields {sorted(fields)} belongs to no known generation")
