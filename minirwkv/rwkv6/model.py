"""RWKV-6.0 ("Finch", x060) in parallel ("GPT") mode: parameters, initialisation, the ddlerp token shift and the
decay LoRA, forward and backward (docs/rwkv6.md §10-§12).

Glossary (as rwkv4/model.py, plus): A = dim_att = C, H heads of N = head_size channels, D_mix and D_dec the LoRA
ranks (config.d_mix_lora, config.d_decay_lora). z = LN_ln1(x), zz its token shift, delta = zz - z.
``time_maa_*`` is the weight of the PREVIOUS token in a mix (x = z + delta * maa), the opposite of RWKV-4/5's
``time_mix_*``. w_hat is the raw per-token decay: decay factor exp(-exp(w_hat)).

Time mixing's inputs (what differs from RWKV-5.2; the rest is rwkv6/blocks.py):
    xi  = z + delta * time_maa_x                                           (B, T, C)
    h   = tanh(xi @ time_maa_w1)      (B, T, 5 D_mix): block f of D_mix columns for f = w, k, v, r, g
    m_f = h_f @ time_maa_w2[f]                                             (B, T, C) each
    x_f = z + delta * (time_maa_f + m_f)                                   (B, T, C) each: "ddlerp"
    w_hat = time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2         (B, T, A)
Channel mixing is RWKV-5.2's, with ffn.time_maa_k/r = 1 - its time_mix_k/r.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import layers
from ..config import ModelConfig
from ..devices import array_module
from ..layers.init import orthogonal
from . import blocks

TARGETS = ("w", "k", "v", "r", "g")  # the ddlerp's five targets, in the order of time_maa_w1's column blocks
EMB_INIT = 1e-4  # half-width of the uniform embedding init
LORA_UP_INIT = 0.01  # time_maa_w2 and time_decay_w2 ~ U(-0.01, 0.01); the down-projections start at 0
ZERO_INIT = ("att.output.weight", "ffn.value.weight", "ffn.receptance.weight")  # matrices that start at 0
SMALL_INIT = ("att.key.weight", "att.gate.weight")  # orthogonal with gain 0.1


# ---------------------------------------------------------------------------------------------------------------
# Parameter names and shapes
# ---------------------------------------------------------------------------------------------------------------

def shared_shapes(config: ModelConfig, layer_shapes) -> dict[str, tuple[int, ...]]:
    """The whole model's names and shapes around each block's ``layer_shapes(p)`` (emb, ln0, ln1/ln2, ln_out, head):
    RWKV-5.2 and RWKV-6 differ only inside the blocks."""
    V, C = config.vocab_size, config.n_embd
    shapes = {"emb.weight": (V, C)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        if i == 0:
            shapes[p + "ln0.weight"] = (C,)
            shapes[p + "ln0.bias"] = (C,)
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        shapes.update(layer_shapes(p))
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def matrix_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The matrices, bonus and GroupNorm of a block, the same in RWKV-5.2 and RWKV-6."""
    C, A, F = config.n_embd, config.dim_att, config.dim_ffn
    shapes = {p + "att.time_faaaa": (config.n_head, config.head_size)}
    for name in ("receptance", "key", "value"):
        shapes[p + f"att.{name}.weight"] = (A, C)
    shapes[p + "att.output.weight"] = (C, A)
    shapes[p + "att.gate.weight"] = (A, C)
    shapes[p + "att.ln_x.weight"] = (A,)
    shapes[p + "att.ln_x.bias"] = (A,)
    shapes[p + "ffn.key.weight"] = (F, C)
    shapes[p + "ffn.receptance.weight"] = (C, C)
    shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's official name and shape (RWKV-LM ``RWKV_Tmix_x060``, ``RWKV_CMix_x060``)."""
    C, A, D_mix, D_dec = config.n_embd, config.dim_att, config.d_mix_lora, config.d_decay_lora

    def layer(p):
        shapes = {p + f"att.time_maa_{f}": (1, 1, C) for f in ("x",) + TARGETS}
        shapes[p + "att.time_maa_w1"] = (C, 5 * D_mix)
        shapes[p + "att.time_maa_w2"] = (5, D_mix, C)
        shapes[p + "att.time_decay"] = (1, 1, A)
        shapes[p + "att.time_decay_w1"] = (C, D_dec)
        shapes[p + "att.time_decay_w2"] = (D_dec, A)
        shapes[p + "ffn.time_maa_k"] = (1, 1, C)
        shapes[p + "ffn.time_maa_r"] = (1, 1, C)
        shapes.update(matrix_shapes(config, p))
        return shapes

    return shared_shapes(config, layer)


def shared_config(params: dict, version: str, **extra) -> ModelConfig:
    """V, C, L, F, H, N of a RWKV-5.2 / RWKV-6 state dict, read from the shapes (never from a label)."""
    V, C = params["emb.weight"].shape
    layer_ids = {int(k.split(".")[1]) for k in params if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    for key in ("blocks.0.ffn.key.weight", "blocks.0.att.time_faaaa"):
        if key not in params or getattr(params[key], "ndim", 0) != 2:
            raise ValueError(f"params has no 2-D {key!r}: not an RWKV-{version} parameter dict")
    H, N = params["blocks.0.att.time_faaaa"].shape
    if H * N != C:
        raise ValueError(f"blocks.0.att.time_faaaa is (H, N) = ({H}, {N}) but n_embd is {C}: dim_att != n_embd is "
                         f"not supported")
    return ModelConfig(vocab_size=int(V), n_embd=int(C), n_layer=max(layer_ids) + 1,
                       dim_ffn=int(params["blocks.0.ffn.key.weight"].shape[0]), version=version, head_size=int(N),
                       **extra)


def config_from_params(params: dict) -> ModelConfig:
    """The shapes of a RWKV-6 state dict; the LoRA ranks from time_maa_w1 (C, 5 D_mix) and time_decay_w1 (C, D_dec)."""
    w1, dw1 = params.get("blocks.0.att.time_maa_w1"), params.get("blocks.0.att.time_decay_w1")
    if getattr(w1, "ndim", 0) != 2 or w1.shape[1] % 5 or getattr(dw1, "ndim", 0) != 2:
        raise ValueError("params has no 2-D blocks.0.att.time_maa_w1 (C, 5 D_mix) and time_decay_w1 (C, D_dec): not "
                         "an RWKV-6.0 parameter dict")
    return shared_config(params, "6", d_mix_lora=int(w1.shape[1] // 5), d_decay_lora=int(dw1.shape[1]))


def detect(params: dict) -> bool:
    """RWKV-6 has time_maa_* mixes (RWKV-7, detected first, has att.r_k / att.x_r)."""
    return any("time_maa" in k for k in params if k.startswith("blocks.0.att."))


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (docs/rwkv6.md §12; RWKV-LM RWKV-v5/src/model.py RWKV_Tmix_x060 and generate_init_weight)
# ---------------------------------------------------------------------------------------------------------------

class Ramps(NamedTuple):
    """The official init's layer and channel ramps for layer l of L."""

    r0: float  # l / (L-1), "0 to 1"; 0 when L = 1 (the official code divides by zero: the one layer is the first)
    r1: float  # 1 - l / L, "1 to almost 0"
    ddd: np.ndarray  # (C,) c / C
    n: np.ndarray  # (A,) n / (A-1) over the attention channels; 0 when A = 1


def ramps(config: ModelConfig, layer: int) -> Ramps:
    L, C, A = config.n_layer, config.n_embd, config.dim_att
    r0 = layer / (L - 1) if L > 1 else 0.0
    n = np.arange(A) / (A - 1) if A > 1 else np.zeros(A)
    return Ramps(r0, 1.0 - layer / L, np.arange(C) / C, n)


def decay_ramp(rp: Ramps) -> np.ndarray:
    """(A,) the initial decay -6 + 5 (n / (A-1))^(0.7 + 1.3 r0): from slow (decay 0.9975) to fast (0.692)."""
    return -6 + 5 * rp.n ** (0.7 + 1.3 * rp.r0)


def bonus_ramp(rp: Ramps) -> np.ndarray:
    """(A,) the initial time_faaaa r0 (1 - n / (A-1)) + 0.1 zigzag(0, +0.1, -0.1, ...)."""
    A = rp.n.shape[0]
    return rp.r0 * (1 - rp.n) + 0.1 * (((np.arange(A) + 1) % 3) - 1)


def shared_matrix_init(rng, config: ModelConfig, name: str, shape):
    """The official value of a parameter RWKV-5.2 and RWKV-6 initialise alike (generate_init_weight), or None.

    emb ~ U(+-1e-4); LayerNorms 1 / 0; ln_x.weight ((1+l)/L)^0.7; time_faaaa the bonus ramp; head orthogonal with
    gain 0.5 sqrt(V/C) (V > C) else 0.5; att.output, ffn.value, ffn.receptance 0; att.key, att.gate orthogonal
    gain 0.1; every other matrix orthogonal gain 1.
    """
    parts = name.split(".")
    if name == "emb.weight":
        return rng.uniform(-EMB_INIT, EMB_INIT, shape)
    if name.endswith("att.ln_x.weight"):
        layer = int(parts[1])
        return np.full(shape, ((1 + layer) / config.n_layer) ** 0.7)
    if parts[-2].startswith("ln") or parts[0] == "ln_out":
        return np.ones(shape) if parts[-1] == "weight" else np.zeros(shape)
    if name.endswith("att.time_faaaa"):
        return bonus_ramp(ramps(config, int(parts[1]))).reshape(shape)
    if name == "head.weight":
        V, C = shape
        return orthogonal(rng, shape, 0.5 * math.sqrt(V / C) if V > C else 0.5)
    if name.endswith(".weight") and len(shape) == 2:
        leaf = ".".join(parts[2:])
        if leaf in ZERO_INIT:
            return np.zeros(shape)
        return orthogonal(rng, shape, 0.1 if leaf in SMALL_INIT else 1.0)
    return None


def init_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """The official RWKV-6.0 initialisation. Returns {official name: array} in ``dtype``.

    Per layer (Ramps r0, r1, ddd = c / C): time_maa_x = time_maa_w = time_maa_k = 1 - ddd^r1, time_maa_v =
    1 - (ddd^r1 + 0.3 r0), time_maa_r = time_maa_g = 1 - ddd^(0.5 r1); time_maa_w1 = 0, time_maa_w2 ~ U(+-0.01);
    time_decay the decay ramp, time_decay_w1 = 0, time_decay_w2 ~ U(+-0.01); ffn.time_maa_k = ffn.time_maa_r =
    1 - ddd^(r1^3); the rest as ``shared_matrix_init``. L = 1 takes r0 = 0 (docs/rwkv6.md §12).
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        value = shared_matrix_init(rng, config, name, shape)
        if value is None:
            rp = ramps(config, int(name.split(".")[1]))
            leaf = name.split(".", 2)[2]
            if leaf in ("att.time_maa_x", "att.time_maa_w", "att.time_maa_k"):
                value = 1 - rp.ddd ** rp.r1
            elif leaf == "att.time_maa_v":
                value = 1 - (rp.ddd ** rp.r1 + 0.3 * rp.r0)
            elif leaf in ("att.time_maa_r", "att.time_maa_g"):
                value = 1 - rp.ddd ** (0.5 * rp.r1)
            elif leaf in ("att.time_maa_w1", "att.time_decay_w1"):
                value = np.zeros(shape)
            elif leaf in ("att.time_maa_w2", "att.time_decay_w2"):
                value = rng.uniform(-LORA_UP_INIT, LORA_UP_INIT, shape)
            elif leaf == "att.time_decay":
                value = decay_ramp(rp)
            elif leaf in ("ffn.time_maa_k", "ffn.time_maa_r"):
                value = 1 - rp.ddd ** (rp.r1 ** 3)
            else:
                raise AssertionError(f"no initialisation for {name}")
        params[name] = np.ascontiguousarray(np.reshape(value, shape), dtype=dtype)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Time mixing's inputs: the ddlerp token shift and the decay LoRA
# ---------------------------------------------------------------------------------------------------------------

class DdlerpCache(NamedTuple):
    z: np.ndarray  # (B, T, C)
    delta: np.ndarray  # (B, T, C) zz - z
    xi: np.ndarray  # (B T, C) z + delta * time_maa_x, flattened
    h: np.ndarray  # (B T, 5 D_mix) tanh(xi @ time_maa_w1)
    mixes: tuple  # (B, T, C) x 5: time_maa_f + m_f, for f in TARGETS
    maa_x: np.ndarray  # (1, 1, C) time_maa_x
    w1: np.ndarray  # (C, 5 D_mix) time_maa_w1
    w2: np.ndarray  # (5, D_mix, C) time_maa_w2
    matmul: object  # the 2-D product of the forward (engine.matmul); the backward uses the same


def ddlerp_forward(params, p, z, x_prev, matmul):
    """The data-dependent token shift: x_f = z + delta * (time_maa_f + m_f(xi)) for f = w, k, v, r, g.
    z (B, T, C), x_prev (B, C) or None -> a tuple of five (B, T, C) in TARGETS order, DdlerpCache."""
    xp = array_module(z)
    B, T, C = z.shape
    maa_x, w1, w2 = params[p + "att.time_maa_x"], params[p + "att.time_maa_w1"], params[p + "att.time_maa_w2"]
    D = w2.shape[1]
    zz = layers.token_shift_forward(z, x_prev)  # (B, T, C)
    delta = zz - z  # (B, T, C)
    xi = (z + delta * maa_x).reshape(-1, C)  # (B T, C)
    h = xp.tanh(matmul(xi, w1))  # (B T, 5 D): the shared down-projection
    mixes, outs = [], []
    for f, target in enumerate(TARGETS):
        m = matmul(h[:, f * D:(f + 1) * D], w2[f]).reshape(B, T, C)  # (B, T, C) target f's up-projection
        mix = params[p + f"att.time_maa_{target}"] + m  # (B, T, C)
        mixes.append(mix)
        outs.append(z + delta * mix)  # (B, T, C)
    return tuple(outs), DdlerpCache(z, delta, xi, h, tuple(mixes), maa_x, w1, w2, matmul)


def ddlerp_backward(dxs, cache: DdlerpCache, p, grads):
    """The ddlerp read upwards. dxs: five (B, T, C) in TARGETS order -> dz (B, T, C); writes the gradients of
    time_maa_x, time_maa_{w,k,v,r,g}, time_maa_w1 and time_maa_w2 into ``grads``."""
    z, delta, xi, h, mixes, maa_x, w1, w2, matmul = cache
    xp = array_module(z)
    B, T, C = z.shape
    D = w2.shape[1]
    dz = sum(dxs)  # z feeds every x_f directly ...
    ddelta = sum(dx * mix for dx, mix in zip(dxs, mixes))  # ... and so does delta
    dw2, dh = [], []
    for f, target in enumerate(TARGETS):
        dmix = dxs[f] * delta  # (B, T, C) d(time_maa_f + m_f)
        grads[p + f"att.time_maa_{target}"] = dmix.sum(axis=(0, 1), keepdims=True)  # (1, 1, C)
        dm = dmix.reshape(-1, C)  # (B T, C)
        dw2.append(matmul(h[:, f * D:(f + 1) * D].T, dm))  # (D, C)
        dh.append(matmul(dm, w2[f].T))  # (B T, D)
    grads[p + "att.time_maa_w2"] = xp.stack(dw2)  # (5, D, C)
    dpre = xp.concatenate(dh, axis=1) * (1 - h * h)  # (B T, 5 D) through the tanh
    grads[p + "att.time_maa_w1"] = matmul(xi.T, dpre)  # (C, 5 D)
    dxi = matmul(dpre, w1.T).reshape(B, T, C)  # (B, T, C)
    grads[p + "att.time_maa_x"] = (dxi * delta).sum(axis=(0, 1), keepdims=True)  # (1, 1, C)
    dz = dz + dxi  # xi = z + delta * time_maa_x
    ddelta = ddelta + dxi * maa_x
    dz = dz - ddelta  # delta = zz - z
    return dz + layers.token_shift_backward(ddelta)  # zz = shift(z)


class InputsCache(NamedTuple):
    ddlerp: DdlerpCache
    decay: layers.LoraCache


def inputs_forward(params, p, z, x_prev, engine, config: ModelConfig):
    """RWKV-6 time mixing's inputs: (xr, xk, xv, xg), w_hat (B, T, H, N), cache (blocks.TimeMixInputs)."""
    (xw, xk, xv, xr, xg), c_ddlerp = ddlerp_forward(params, p, z, x_prev, engine.matmul)  # (B, T, C) x 5
    q, c_decay = engine.ops.lora_forward(xw, params[p + "att.time_decay_w1"], params[p + "att.time_decay_w2"],
                                         "tanh")  # (B, T, A)
    w = params[p + "att.time_decay"] + q  # (B, T, A) w_hat
    B, T, A = w.shape
    return (xr, xk, xv, xg), w.reshape(B, T, config.n_head, config.head_size), InputsCache(c_ddlerp, c_decay)


def inputs_backward(dxr, dxk, dxv, dxg, dw, cache: InputsCache, p, grads, ops):
    """The inputs read upwards: dw (B, T, H, N) through the decay LoRA into x_w, then the ddlerp. -> dz (B, T, C)."""
    B, T = dw.shape[:2]
    dq = dw.reshape(B, T, -1)  # (B, T, A) w_hat = time_decay + q
    grads[p + "att.time_decay"] = dq.sum(axis=(0, 1), keepdims=True)  # (1, 1, A)
    dxw, grads[p + "att.time_decay_w1"], grads[p + "att.time_decay_w2"] = ops.lora_backward(dq, cache.decay)
    return ddlerp_backward((dxw, dxk, dxv, dxr, dxg), cache.ddlerp, p, grads)


INPUTS = blocks.TimeMixInputs(inputs_forward, inputs_backward)


def _ffn_mixes_forward(params, p):
    """(mu_k, mu_r): the current token's weights, 1 - time_maa."""
    return 1 - params[p + "ffn.time_maa_k"], 1 - params[p + "ffn.time_maa_r"]


def _ffn_mixes_backward(dmu_k, dmu_r, p, grads):
    grads[p + "ffn.time_maa_k"] = -dmu_k  # mu = 1 - time_maa
    grads[p + "ffn.time_maa_r"] = -dmu_r


FFN_MIXES = blocks.ChannelMixWeights(_ffn_mixes_forward, _ffn_mixes_backward)


def model_forward(params, idx, engine, config: ModelConfig, state=None):
    """Parallel-mode forward (rwkv6/blocks.py) with RWKV-6's inputs. -> logits (B, T, V), cache, State."""
    return blocks.model_forward(params, idx, engine, config, state, INPUTS, FFN_MIXES)


model_backward = blocks.model_backward
