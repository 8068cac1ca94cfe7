"""AdamW over parameter dicts, global-norm gradient clipping, and the learning-rate schedule (docs/rwkv4.md §5.3).

Mirrors what RWKV-LM ``RWKV-v4neo`` trains with: DeepSpeed ``FusedAdam`` with bias correction, betas (0.9, 0.99),
eps 1e-8, decoupled weight decay on the weight matrices only (``*.weight`` with a squeezed shape of >= 2 dims, so
emb and head decay too; RWKV-5/6's (H, N) decays and LoRA matrices do not, see ``decays``), the layer-wise multipliers ``my_lr_scale`` (time_decay x2, time_first x3, everything else x1),
Lightning's ``gradient_clip_val = 1.0`` (global norm), and v4neo's warmup-then-exponential schedule (``trainer.py``
``on_train_batch_start``), with cosine as an alternative.

Parameters, gradients and the moments m, v are dicts keyed by the official checkpoint names. Every update is
functional: ``adamw_step`` returns new dicts and leaves its inputs untouched, so a training loop that is interrupted
mid-update (Ctrl-C) still holds a consistent (params, state) pair.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..devices import array_module as _xp
from ..devices import to_numpy

# v4neo model.py configure_optimizers, layerwise_lr = 1 (my_pile_stage != 2): the decay speeds learn faster
LR_MULTIPLIERS = {"time_decay": 2.0, "time_first": 3.0}


def lr_multiplier(name: str) -> float:
    """The per-parameter learning-rate scale ``my_lr_scale``: x2 for time_decay, x3 for time_first, else x1."""
    return LR_MULTIPLIERS.get(name.rsplit(".", 1)[-1], 1.0)


def decays(name: str, shape) -> bool:
    """Weight decay applies to the weight matrices: ``*.weight`` parameters whose squeezed shape has >= 2 dims
    (v4neo's and RWKV-v5's decay group).

    time_mix_* (1, 1, C) squeeze to (C,) and do not decay; LayerNorm weights and biases do not either; nor do the
    2-D parameters that are not ``.weight``: RWKV-5.2's time_decay and time_faaaa (H, N), RWKV-6's LoRA matrices
    time_maa_w1/w2 and time_decay_w1/w2 (their official group has no weight decay).
    """
    return name.endswith(".weight") and sum(1 for n in shape if n != 1) >= 2


class AdamWState(NamedTuple):
    step: int  # number of updates taken so far (t in the bias corrections is step + 1 for the next update)
    m: dict  # first moment, one array per parameter, same dtype and device
    v: dict  # second moment


def adamw_init(params: dict) -> AdamWState:
    """Zero moments shaped like ``params``."""
    xp = _xp(next(iter(params.values())))
    return AdamWState(0, {k: xp.zeros_like(p) for k, p in params.items()},
                      {k: xp.zeros_like(p) for k, p in params.items()})


def adamw_step(params: dict, grads: dict, state: AdamWState, lr: float, betas=(0.9, 0.99), eps: float = 1e-8,
               weight_decay: float = 0.0, fused: bool = False):
    """One AdamW update (Loshchilov & Hutter; the form of ``torch.optim.AdamW``). -> (new params, new state).

    With t = step + 1, lr_i = lr * lr_multiplier(name), for each parameter p with gradient g:
        p <- p (1 - lr_i wd)                    only for matrices (``decays``): decoupled from the gradient
        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g^2
        p <- p - lr_i (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)
    Computed in the parameters' dtype, in the order torch uses, so a float32 run matches torch to rounding.
    ``fused=True`` (NumPy arrays only) runs the same update as one Numba pass per parameter
    (``backends.numba_ops.adamw_update``, bit-identical: tests/test_numba_ops.py) on fresh copies, so the step
    stays functional.
    """
    missing = sorted(set(params) ^ set(grads))
    if missing:
        raise ValueError(f"params and grads must have the same keys; differing: {', '.join(missing[:5])}")
    b1, b2 = betas
    t = state.step + 1
    bias1 = 1 - b1 ** t
    bias2_sqrt = math.sqrt(1 - b2 ** t)
    new_params, new_m, new_v = {}, {}, {}
    if fused:
        from ..backends.numba.ops import adamw_update

    for name, p in params.items():
        g = grads[name]
        xp = _xp(p)
        lr_i = lr * lr_multiplier(name)
        if fused:
            p, m, v = p.copy(), state.m[name].copy(), state.v[name].copy()
            adamw_update(p, np.ascontiguousarray(g), m, v, lr_i, b1, b2, eps,
                         weight_decay if decays(name, p.shape) else 0.0, bias1, 1 - b2 ** t)
            new_params[name], new_m[name], new_v[name] = p, m, v
            continue
        if weight_decay and decays(name, p.shape):
            p = p * p.dtype.type(1 - lr_i * weight_decay)
        m = state.m[name] * p.dtype.type(b1) + g * p.dtype.type(1 - b1)
        v = state.v[name] * p.dtype.type(b2) + (g * g) * p.dtype.type(1 - b2)
        denom = xp.sqrt(v) / p.dtype.type(bias2_sqrt) + p.dtype.type(eps)
        new_params[name] = p - p.dtype.type(lr_i / bias1) * (m / denom)
        new_m[name], new_v[name] = m, v
    return new_params, AdamWState(t, new_m, new_v)


def state_to_arrays(state: AdamWState) -> dict:
    """The moments as checkpoint ``arrays`` groups (the step is saved in the checkpoint's meta)."""
    return {"adam_m": {k: to_numpy(a) for k, a in state.m.items()}, "adam_v": {k: to_numpy(a) for k, a in state.v.items()}}


def state_from_arrays(arrays: dict, step: int, params: dict) -> AdamWState:
    """Rebuild the state saved by ``state_to_arrays``; checks it covers exactly the parameters, with their shapes."""
    xp = _xp(next(iter(params.values())))
    for group in ("adam_m", "adam_v"):
        saved = arrays.get(group, {})
        if set(saved) != set(params) or any(tuple(saved[k].shape) != tuple(params[k].shape) for k in params):
            raise ValueError(f"the checkpoint's optimizer state ({group}) does not match the model's parameters; "
                             f"start a new run instead of resuming (a different out_dir)")
    dtype = next(iter(params.values())).dtype
    m = {k: xp.asarray(arrays["adam_m"][k], dtype=dtype) for k in params}
    v = {k: xp.asarray(arrays["adam_v"][k], dtype=dtype) for k in params}
    return AdamWState(int(step), m, v)


# ---------------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------------

def global_norm(grads: dict) -> float:
    """sqrt of the sum of squares of every gradient entry, accumulated in float64 (a Python float)."""
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))


def clip_grad_norm(grads: dict, max_norm: float):
    """Scale all gradients by max_norm / (norm + 1e-6) when their global norm exceeds max_norm.

    The rule of ``torch.nn.utils.clip_grad_norm_`` (what Lightning's ``gradient_clip_val`` calls). -> (grads, norm),
    the norm measured before clipping. max_norm <= 0 disables clipping.
    """
    norm = global_norm(grads)
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return grads, norm
    scale = max_norm / (norm + 1e-6)
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, norm


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "exponential", "linear", "constant")
WARMUPS = ("rwkv", "linear")


def learning_rate(step: int, lr: float, lr_final: float, warmup_iters: int, max_iters: int,
                  decay: str = "cosine", warmup: str = "rwkv", progress: float | None = None) -> float:
    """The learning rate of update ``step`` (0-based).

    Warmup, for step < warmup_iters: "rwkv" multiplies lr by 0.2 + 0.8 step / warmup_iters (v4neo: starts at a
    fifth of lr), "linear" by (step + 1) / (warmup_iters + 1) (nanoGPT).
    Then, with v4neo's progress = clamp((step - warmup_iters + 1) / (max_iters - warmup_iters), 0, 1):
        exponential  lr * exp(ln(lr_final / lr) * progress)        (v4neo; linear if either end is 0)
        cosine       lr_final + (lr - lr_final) (1 + cos(pi progress)) / 2
        linear       lr + (lr_final - lr) progress
        constant     lr
    ``progress`` overrides the step-based value (a wall-clock budget passes elapsed / max_seconds).
    """
    if decay not in SCHEDULES:
        raise ValueError(f"unknown lr_decay {decay!r}; choose one of: {', '.join(SCHEDULES)}")
    if warmup not in WARMUPS:
        raise ValueError(f"unknown warmup {warmup!r}; choose one of: {', '.join(WARMUPS)}")
    if step < warmup_iters:
        factor = 0.2 + 0.8 * step / warmup_iters if warmup == "rwkv" else (step + 1) / (warmup_iters + 1)
        return lr * factor
    if progress is None:
        span = max(max_iters - warmup_iters, 1)
        progress = (step - warmup_iters + 1) / span
    progress = min(max(progress, 0.0), 1.0)
    if decay == "constant" or lr == lr_final:
        return lr
    if decay == "exponential" and lr > 0 and lr_final > 0:
        return lr * math.exp(math.log(lr_final / lr) * progress)
    if decay == "cosine":
        return lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr + (lr_final - lr) * progress  # linear, or exponential with a zero end
