"""RWKV-4 in parallel ("GPT") mode: parameters, initialisation, forward, backward, loss.

Glossary (shapes are written in this notation everywhere):
    B batch, T time (sequence length), C channels = n_embd = dim_att, F = dim_ffn (4C by default), V vocab,
    L layers. x is the residual stream (B, T, C); z = LN(x) the input of a sub-layer; xx = z shifted by one token.
    theta = time_decay (raw, as stored in checkpoints), w = -exp(theta) the per-step log-decay (< 0),
    u = time_first the bonus of the current token. mu = time_mix_* the weight of the current token in a mix.

Architecture (paper section 4; BlinkDL/RWKV-LM ``RWKV-v4neo/src/model.py``; rwkv4-math section 2):
    x = LN_ln0(emb[idx])
    for each block:  x = x + TimeMix(LN_ln1(x));  x = x + ChannelMix(LN_ln2(x))
    logits = LN_ln_out(x) @ head.T
    TimeMix(z):    xk, xv, xr = mix(z, shift(z), mu_k / mu_v / mu_r);  k, v, r = xk Wk^T, xv Wv^T, xr Wr^T
                   out = (sigmoid(r) * WKV(w, u, k, v)) Wo^T
    ChannelMix(z): xk, xr = mix(z, shift(z), mu_k / mu_r);  out = sigmoid(xr Wr^T) * (relu(xk Wk^T)^2 Wv^T)

Parameters are one flat dict keyed by the official checkpoint names, with the official shapes (Linear weights are
(out, in); time_mix_* are (1, 1, C); time_decay and time_first are (C,)). Gradients use the same keys.
The parameters' dtype (float32 or float64) is the dtype of every activation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import ops, wkv
from .backends import get_backend
from .backends.ops_registry import get_ops
from .config import ModelConfig
from .xp import array_module, is_cupy

EMB_INIT = 1e-4  # half-width of the uniform embedding init ("SmallInitEmb" in the RWKV-LM README)
ZERO_INIT = ("att.key.weight", "att.receptance.weight", "att.output.weight", "ffn.value.weight",
             "ffn.receptance.weight")  # the five matrices per layer that start at exactly 0 (v4neo)


# ---------------------------------------------------------------------------------------------------------------
# Parameter names and shapes
# ---------------------------------------------------------------------------------------------------------------

def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's official name and shape, in the official registration order."""
    V, C, F = config.vocab_size, config.n_embd, config.dim_ffn
    shapes = {"emb.weight": (V, C)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        if i == 0:
            shapes[p + "ln0.weight"] = (C,)
            shapes[p + "ln0.bias"] = (C,)
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        shapes[p + "att.time_decay"] = (C,)
        shapes[p + "att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for name in ("key", "value", "receptance", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def config_from_params(params: dict) -> ModelConfig:
    """Read (V, C, L, F) from the shapes: emb.weight (V, C), the highest block index, ffn.key.weight (F, C)."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of official RWKV-4 names to arrays, got {type(params).__name__}")
    if "emb.weight" not in params or getattr(params["emb.weight"], "ndim", 0) != 2:
        raise ValueError("params has no 2-D 'emb.weight' (V, C): not an RWKV-4 parameter dict")
    V, C = params["emb.weight"].shape
    layers = {int(k.split(".")[1]) for k in params if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layers:
        raise ValueError("params has no 'blocks.N.*' entries: not an RWKV-4 parameter dict")
    key = "blocks.0.ffn.key.weight"
    if key not in params or getattr(params[key], "ndim", 0) != 2:
        raise ValueError(f"params has no 2-D {key!r} (F, C): cannot read dim_ffn")
    return ModelConfig(vocab_size=int(V), n_embd=int(C), n_layer=max(layers) + 1, dim_ffn=int(params[key].shape[0]))


def check_params(params: dict, check_finite: bool = True) -> ModelConfig:
    """Validate a parameter dict and return its config. Raises ValueError naming every problem.

    Checks: the exact set of official keys (lists what is missing and what is extra), every shape, one floating
    dtype (float32 or float64) shared by all, one array module (NumPy or CuPy), and (optionally) finite values.
    """
    config = config_from_params(params)
    expected = param_shapes(config)
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
        raise ValueError(f"not a valid RWKV-4 parameter dict for {config}: " + " | ".join(problems))
    dtypes = {np.dtype(a.dtype) for a in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
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


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (rwkv4-math section 5; RWKV-v4neo model.py RWKV_TimeMix / RWKV_ChannelMix constructors and
# generate_init_weight)
# ---------------------------------------------------------------------------------------------------------------

def _orthogonal(rng, shape, gain):
    """torch.nn.init.orthogonal_: QR of a Gaussian matrix, signs fixed by diag(R), scaled by gain."""
    rows, cols = shape
    a = rng.standard_normal((rows, cols) if rows >= cols else (cols, rows))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    return gain * (q if rows >= cols else q.T)


def init_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """The official RWKV-4 (v4neo) initialisation. Returns {official name: array} in ``dtype``.

    Per layer l of L, with r01 = l / (L-1), r1a0 = 1 - l/L and the channel ramp d_i = i / C:
        time_decay[h] = -5 + 8 (h / (C-1))^(0.7 + 1.3 r01)     (from -5: long memory, to +3: forget at once)
        time_first[h] = ln(0.3) + ((h+1) mod 3 - 1) / 2          (ln 0.3 plus a zigzag 0, +0.5, -0.5)
        att.time_mix_k = d^r1a0, time_mix_v = d^r1a0 + 0.3 r01, time_mix_r = d^(r1a0 / 2)
        ffn.time_mix_k = ffn.time_mix_r = d^r1a0
    Limits where the official formulas divide by zero: r01 = 0 when L = 1 (the only layer is the first layer of
    the ramp), and h / (C-1) = 0 when C = 1.
    Matrices (out, in): orthogonal with gain sqrt(out/in) if out > in else 1; exactly zero for att.key,
    att.receptance, att.output, ffn.value, ffn.receptance; head gain times 0.5; emb uniform(-1e-4, 1e-4).
    LayerNorms: weight 1, bias 0.
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"init_params needs a ModelConfig, got {type(config).__name__}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    rng = np.random.default_rng(seed)
    C, L = config.n_embd, config.n_layer
    d = np.arange(C) / C  # (C,) channel ramp, d_0 = 0
    h = np.arange(C)
    params = {}
    for name, shape in param_shapes(config).items():
        parts = name.split(".")
        if name == "emb.weight":
            value = rng.uniform(-EMB_INIT, EMB_INIT, shape)
        elif parts[-2].startswith("ln") or parts[0] == "ln_out":
            value = np.ones(shape) if parts[-1] == "weight" else np.zeros(shape)
        elif "time_" in name:
            layer = int(parts[1])
            r01 = layer / (L - 1) if L > 1 else 0.0
            r1a0 = 1.0 - layer / L
            leaf = parts[-1]
            if leaf == "time_decay":
                frac = h / (C - 1) if C > 1 else np.zeros(C)
                value = -5 + 8 * frac ** (0.7 + 1.3 * r01)
            elif leaf == "time_first":
                value = math.log(0.3) + 0.5 * (((h + 1) % 3) - 1)
            elif parts[2] == "att" and leaf == "time_mix_v":
                value = d ** r1a0 + 0.3 * r01
            elif parts[2] == "att" and leaf == "time_mix_r":
                value = d ** (0.5 * r1a0)
            else:  # att.time_mix_k, ffn.time_mix_k, ffn.time_mix_r
                value = d ** r1a0
            value = np.reshape(value, shape)
        else:  # a matrix (out, in)
            out_dim, in_dim = shape
            gain = math.sqrt(out_dim / in_dim) if out_dim > in_dim else 1.0
            scale = 0.0 if ".".join(parts[2:]) in ZERO_INIT else (0.5 if name == "head.weight" else 1.0)
            value = np.zeros(shape) if scale == 0.0 else _orthogonal(rng, shape, gain * scale)
        params[name] = np.ascontiguousarray(value, dtype=dtype)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------------------------

class TimeMixCache(NamedTuple):
    mix_k: ops.MixCache
    mix_v: ops.MixCache
    mix_r: ops.MixCache
    key: ops.LinearCache
    value: ops.LinearCache
    receptance: ops.LinearCache
    wkv: wkv.WKVCache
    gate: ops.GateCache
    output: ops.LinearCache


def time_mixing_forward(params, p, z, x_prev, wkv_state, backend, ops=ops):
    """TimeMix of block ``p`` ("blocks.i.") on z = LN_ln1(x) (B, T, C). -> out (B, T, C), cache, state out.

    x_prev (B, C) is z of the token before this chunk (None: zeros), wkv_state the WKVState before it (None: zero).
    ``ops`` is the set of element-wise kernels: minirwkv.ops, or its Numba overrides (backends/ops_registry.py).
    """
    mixes = (params[p + "att.time_mix_k"], params[p + "att.time_mix_v"], params[p + "att.time_mix_r"])
    (xk, xv, xr), (c_mix_k, c_mix_v, c_mix_r) = ops.token_shift_mix_forward(z, x_prev, mixes)  # (B, T, C) each
    k, c_key = ops.linear_forward(xk, params[p + "att.key.weight"])  # (B, T, C)
    v, c_value = ops.linear_forward(xv, params[p + "att.value.weight"])  # (B, T, C)
    r, c_receptance = ops.linear_forward(xr, params[p + "att.receptance.weight"])  # (B, T, C)
    y, c_wkv, wkv_state = wkv.wkv_forward(params[p + "att.time_decay"], params[p + "att.time_first"],
                                          k, v, backend, wkv_state)  # (B, T, C)
    g, c_gate = ops.gate_forward(r, y)  # (B, T, C)
    out, c_output = ops.linear_forward(g, params[p + "att.output.weight"])  # (B, T, C)
    cache = TimeMixCache(c_mix_k, c_mix_v, c_mix_r, c_key, c_value, c_receptance, c_wkv, c_gate, c_output)
    return out, cache, (z[:, -1], wkv_state)


def time_mixing_backward(dout, cache: TimeMixCache, p, grads, ops=ops):
    """TimeMix read upwards. Writes parameter gradients into ``grads``; returns dz (B, T, C)."""
    dg, grads[p + "att.output.weight"] = ops.linear_backward(dout, cache.output)
    dr, dy = ops.gate_backward(dg, cache.gate)
    (grads[p + "att.time_decay"], grads[p + "att.time_first"], dk, dv) = wkv.wkv_backward(dy, cache.wkv)
    dxr, grads[p + "att.receptance.weight"] = ops.linear_backward(dr, cache.receptance)
    dxv, grads[p + "att.value.weight"] = ops.linear_backward(dv, cache.value)
    dxk, grads[p + "att.key.weight"] = ops.linear_backward(dk, cache.key)
    dz, (grads[p + "att.time_mix_k"], grads[p + "att.time_mix_v"], grads[p + "att.time_mix_r"]) = \
        ops.token_shift_mix_backward((dxk, dxv, dxr), (cache.mix_k, cache.mix_v, cache.mix_r))
    return dz  # (B, T, C); z feeds three mixes and the shift (summed inside)


class ChannelMixCache(NamedTuple):
    mix_k: ops.MixCache
    mix_r: ops.MixCache
    key: ops.LinearCache
    relu_square: np.ndarray
    value: ops.LinearCache
    receptance: ops.LinearCache
    gate: ops.GateCache


def channel_mixing_forward(params, p, z, x_prev, ops=ops):
    """ChannelMix of block ``p`` on z = LN_ln2(x) (B, T, C). -> out (B, T, C), cache, z[:, -1] (the state)."""
    mixes = (params[p + "ffn.time_mix_k"], params[p + "ffn.time_mix_r"])
    (xk, xr), (c_mix_k, c_mix_r) = ops.token_shift_mix_forward(z, x_prev, mixes)  # (B, T, C) each
    k, c_key = ops.linear_forward(xk, params[p + "ffn.key.weight"])  # (B, T, F)
    h, c_relu = ops.relu_square_forward(k)  # (B, T, F)
    kv, c_value = ops.linear_forward(h, params[p + "ffn.value.weight"])  # (B, T, C)
    r, c_receptance = ops.linear_forward(xr, params[p + "ffn.receptance.weight"])  # (B, T, C)
    out, c_gate = ops.gate_forward(r, kv)  # (B, T, C)
    return out, ChannelMixCache(c_mix_k, c_mix_r, c_key, c_relu, c_value, c_receptance, c_gate), z[:, -1]


def channel_mixing_backward(dout, cache: ChannelMixCache, p, grads, ops=ops):
    """ChannelMix read upwards. Writes parameter gradients into ``grads``; returns dz (B, T, C)."""
    dr, dkv = ops.gate_backward(dout, cache.gate)
    dxr, grads[p + "ffn.receptance.weight"] = ops.linear_backward(dr, cache.receptance)
    dh, grads[p + "ffn.value.weight"] = ops.linear_backward(dkv, cache.value)
    dk = ops.relu_square_backward(dh, cache.relu_square)
    dxk, grads[p + "ffn.key.weight"] = ops.linear_backward(dk, cache.key)
    dz, (grads[p + "ffn.time_mix_k"], grads[p + "ffn.time_mix_r"]) = \
        ops.token_shift_mix_backward((dxk, dxr), (cache.mix_k, cache.mix_r))
    return dz  # (B, T, C); z feeds two mixes and the shift (summed inside)


class BlockCache(NamedTuple):
    ln1: ops.LayerNormCache
    att: TimeMixCache
    ln2: ops.LayerNormCache
    ffn: ChannelMixCache


class ModelCache(NamedTuple):
    emb: ops.EmbeddingCache
    ln0: ops.LayerNormCache
    blocks: list
    ln_out: ops.LayerNormCache
    head: ops.LinearCache
    n_layer: int
    ops: object  # the element-wise kernels the forward used; the backward uses the same


def model_forward(params, idx, backend, state=None, ops=None):
    """Parallel-mode forward. -> logits (B, T, V), ModelCache, and the RNN state after the last token.

    ``state`` (a ``minirwkv.rnn.State`` or None for the zero state) continues from earlier tokens: the token shift
    starts from its att_x / ffn_x and the WKV from its (aa, bb, pp). Gradients never flow into ``state``.
    ``ops``: the element-wise kernels; None: those that go with the WKV backend (``get_ops(backend.name)``: the
    Numba overrides with the numba backend, minirwkv.ops otherwise).
    """
    from .rnn import LayerState, State  # rnn.py builds on this module; the State type lives there

    if ops is None:
        ops = get_ops(backend.name)

    L = len([k for k in params if k.endswith(".ln1.weight")])
    x, c_emb = ops.embedding_forward(params["emb.weight"], idx)  # (B, T, C)
    x, c_ln0 = ops.layernorm_forward(x, params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"])  # (B, T, C)
    blocks, layers_out = [], []
    for i in range(L):
        p = f"blocks.{i}."
        s = state.layers[i] if state is not None else None
        z, c_ln1 = ops.layernorm_forward(x, params[p + "ln1.weight"], params[p + "ln1.bias"])  # (B, T, C)
        wkv_in = wkv.WKVState(s.att_aa, s.att_bb, s.att_pp) if s is not None else None
        att, c_att, (att_x, wkv_out) = time_mixing_forward(params, p, z, s.att_x if s else None, wkv_in, backend,
                                                           ops)
        x = x + att  # (B, T, C)
        z, c_ln2 = ops.layernorm_forward(x, params[p + "ln2.weight"], params[p + "ln2.bias"])  # (B, T, C)
        ffn, c_ffn, ffn_x = channel_mixing_forward(params, p, z, s.ffn_x if s else None, ops)
        x = x + ffn  # (B, T, C)
        blocks.append(BlockCache(c_ln1, c_att, c_ln2, c_ffn))
        layers_out.append(LayerState(att_x, wkv_out.aa, wkv_out.bb, wkv_out.pp, ffn_x))
    x, c_ln_out = ops.layernorm_forward(x, params["ln_out.weight"], params["ln_out.bias"])  # (B, T, C)
    logits, c_head = ops.linear_forward(x, params["head.weight"])  # (B, T, V)
    return logits, ModelCache(c_emb, c_ln0, blocks, c_ln_out, c_head, L, ops), State(tuple(layers_out))


def model_backward(dlogits, cache: ModelCache) -> dict:
    """The forward read upwards. dlogits (B, T, V) -> grads, a dict with exactly the parameters' keys."""
    ops = cache.ops  # the kernels of the forward
    grads = {}
    dx, grads["head.weight"] = ops.linear_backward(dlogits, cache.head)  # (B, T, C)
    dx, grads["ln_out.weight"], grads["ln_out.bias"] = ops.layernorm_backward(dx, cache.ln_out)
    for i in reversed(range(cache.n_layer)):
        p = f"blocks.{i}."
        c = cache.blocks[i]
        dz = channel_mixing_backward(dx, c.ffn, p, grads, ops)
        dz, grads[p + "ln2.weight"], grads[p + "ln2.bias"] = ops.layernorm_backward(dz, c.ln2)
        dx = dx + dz  # x feeds the residual and ln2
        dz = time_mixing_backward(dx, c.att, p, grads, ops)
        dz, grads[p + "ln1.weight"], grads[p + "ln1.bias"] = ops.layernorm_backward(dz, c.ln1)
        dx = dx + dz  # x feeds the residual and ln1
    dx, grads["blocks.0.ln0.weight"], grads["blocks.0.ln0.bias"] = ops.layernorm_backward(dx, cache.ln0)
    grads["emb.weight"] = ops.embedding_backward(dx, cache.emb)
    return grads


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------

def _backend_for(params, impl):
    return get_backend(impl, on_gpu=is_cupy(params["emb.weight"]))


def forward(params: dict, idx, impl: str = "auto"):
    """Logits (B, T, V) for token ids idx (B, T), in parallel mode from the zero state."""
    config = check_params(params)
    check_tokens(idx, config.vocab_size, array_module(params["emb.weight"]))
    logits, _, _ = model_forward(params, idx, _backend_for(params, impl))
    return logits


def loss_and_grads(params: dict, idx, targets, impl: str = "auto", l2wrap: bool = False):
    """Mean cross-entropy of predicting targets (B, T) from idx (B, T), and its gradient for every parameter.

    ``l2wrap`` adds RWKV-LM's L2Wrap gradient (ops.l2wrap_backward), which does not change the reported loss.
    """
    config = check_params(params)
    xp = array_module(params["emb.weight"])
    check_tokens(idx, config.vocab_size, xp)
    check_tokens(targets, config.vocab_size, xp, name="targets")
    if targets.shape != idx.shape:
        raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
    logits, cache, _ = model_forward(params, idx, _backend_for(params, impl))
    loss, c_ce = ops.cross_entropy_forward(logits, targets)
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss}: the forward pass produced non-finite logits")
    dlogits = ops.cross_entropy_backward(c_ce)  # (B, T, V)
    if l2wrap:
        dlogits += ops.l2wrap_backward(logits)
    return loss, model_backward(dlogits, cache)
