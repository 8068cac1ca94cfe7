"""RWKV-5.2 ("Eagle", x052) in parallel ("GPT") mode: parameters, initialisation, time mixing's static inputs
(docs/rwkv5.md). Everything after the inputs is shared with RWKV-6 (minirwkv/rwkv6/blocks.py).

Glossary (as rwkv6/model.py): ``time_mix_*`` is the weight of the CURRENT token in a mix, as in RWKV-4;
``time_decay`` (H, N) is the raw decay theta, the same for every token (decay factor exp(-exp(theta)) per key
channel); ``time_faaaa`` (H, N) the bonus u, raw.

Time mixing's inputs:
    x_q = z * time_mix_q + zz * (1 - time_mix_q)     q = k, v, r, g         (B, T, C) each
    w   = time_decay for every token                                       (B, T, H, N), a broadcast view
"""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..devices import array_module
from ..rwkv6 import blocks
from ..rwkv6.model import decay_ramp, matrix_shapes, ramps, shared_config, shared_matrix_init, shared_shapes

MIXES = ("k", "v", "r", "g")  # time mixing's four static mixes


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's official name and shape (RWKV-LM ``RWKV_Tmix_x052``, ``RWKV_CMix_x052``)."""
    C = config.n_embd

    def layer(p):
        shapes = {p + f"att.time_mix_{m}": (1, 1, C) for m in MIXES}
        shapes[p + "att.time_decay"] = (config.n_head, config.head_size)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes.update(matrix_shapes(config, p))
        return shapes

    return shared_shapes(config, layer)


def config_from_params(params: dict) -> ModelConfig:
    """The shapes of a RWKV-5.2 state dict: V, C from emb.weight, F from ffn.key.weight, H, N from time_faaaa."""
    return shared_config(params, "5")


# The RWKV-5 checkpoints before 5.2 share its recurrence but not its parameters (docs/rwkv5.md §2): a per-head
# decay (H,), a bonus that may be exponentiated (time_first), no gate in 5.0. Loading them as 5.2 would misread them.
PREVIEW_HINT = ("minirwkv runs RWKV-5.2 only (per-key-channel time_decay (H, N), time_faaaa, gate); use a v5.2 or "
                "later checkpoint (every RWKV-5 World release is 5.2)")


def detect(params: dict) -> bool:
    """RWKV-5.2: ln_x with a gate, time_mix_g, time_faaaa and a 2-D time_decay (H, N). Keyed on the parameter set,
    not on a size (a size test misreads N = 1). An older RWKV-5 (ln_x without those) raises, naming what it is."""
    p = "blocks.0.att."
    later = any("time_maa" in k for k in params) or p + "r_k" in params or p + "x_r" in params  # RWKV-6, RWKV-7
    if p + "ln_x.weight" not in params or later:
        return False
    is_52 = (p + "gate.weight" in params and p + "time_mix_g" in params and p + "time_faaaa" in params
             and getattr(params.get(p + "time_decay"), "ndim", 0) == 2)
    if not is_52:
        decay = params.get(p + "time_decay")
        what = "5.1" if p + "gate.weight" in params else "5.0"
        raise ValueError(f"an RWKV-{what} preview checkpoint (blocks.0.att.time_decay "
                         f"{tuple(getattr(decay, 'shape', ()))}, "
                         f"{'time_first' if p + 'time_first' in params else 'time_faaaa'}"
                         f"{'' if p + 'gate.weight' in params else ', no gate'}): {PREVIEW_HINT}")
    return True


def init_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """The official RWKV-5.2 initialisation. Returns {official name: array} in ``dtype``.

    Per layer (rwkv6.model.Ramps r0, r1, ddd = c / C): time_mix_k = ddd^r1, time_mix_v = ddd^r1 + 0.3 r0,
    time_mix_r = time_mix_g = ddd^(0.5 r1); time_decay the decay ramp reshaped (H, N); ffn.time_mix_k =
    ffn.time_mix_r = ddd^r1; the rest as rwkv6.model.shared_matrix_init (time_faaaa, ln_x, the matrices).
    L = 1 takes r0 = 0 (docs/rwkv5.md §8).
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        value = shared_matrix_init(rng, config, name, shape)
        if value is None:
            rp = ramps(config, int(name.split(".")[1]))
            leaf = name.split(".", 2)[2]
            if leaf in ("att.time_mix_k", "ffn.time_mix_k", "ffn.time_mix_r"):
                value = rp.ddd ** rp.r1
            elif leaf == "att.time_mix_v":
                value = rp.ddd ** rp.r1 + 0.3 * rp.r0
            elif leaf in ("att.time_mix_r", "att.time_mix_g"):
                value = rp.ddd ** (0.5 * rp.r1)
            elif leaf == "att.time_decay":
                value = decay_ramp(rp)
            else:
                raise AssertionError(f"no initialisation for {name}")
        params[name] = np.ascontiguousarray(np.reshape(value, shape), dtype=dtype)
    return params


def inputs_forward(params, p, z, x_prev, engine, config: ModelConfig):
    """RWKV-5.2 time mixing's inputs: four static mixes and the static decay. -> (xr, xk, xv, xg), w, caches."""
    mixes = tuple(params[p + f"att.time_mix_{m}"] for m in MIXES)
    (xk, xv, xr, xg), c_mixes = engine.ops.token_shift_mix_forward(z, x_prev, mixes)  # (B, T, C) each
    B, T, _ = z.shape
    w = array_module(z).broadcast_to(params[p + "att.time_decay"], (B, T, config.n_head, config.head_size))
    return (xr, xk, xv, xg), w, c_mixes  # w: (B, T, H, N), the same theta at every token


def inputs_backward(dxr, dxk, dxv, dxg, dw, c_mixes, p, grads, ops):
    """-> dz (B, T, C); d time_decay sums dw over batch and time (one theta serves every token)."""
    grads[p + "att.time_decay"] = dw.sum(axis=(0, 1))  # (H, N)
    dz, dmixes = ops.token_shift_mix_backward((dxk, dxv, dxr, dxg), c_mixes)
    for m, dmix in zip(MIXES, dmixes):
        grads[p + f"att.time_mix_{m}"] = dmix
    return dz  # (B, T, C)


INPUTS = blocks.TimeMixInputs(inputs_forward, inputs_backward)


def _ffn_mixes_forward(params, p):
    return params[p + "ffn.time_mix_k"], params[p + "ffn.time_mix_r"]


def _ffn_mixes_backward(dmu_k, dmu_r, p, grads):
    grads[p + "ffn.time_mix_k"] = dmu_k
    grads[p + "ffn.time_mix_r"] = dmu_r


FFN_MIXES = blocks.ChannelMixWeights(_ffn_mixes_forward, _ffn_mixes_backward)


def model_forward(params, idx, engine, config: ModelConfig, state=None):
    """Parallel-mode forward (rwkv6/blocks.py) with RWKV-5.2's inputs. -> logits (B, T, V), cache, State."""
    return blocks.model_forward(params, idx, engine, config, state, INPUTS, FFN_MIXES)


model_backward = blocks.model_backward
