"""Shared fixtures-as-functions for the model tests."""
import numpy as np

import minirwkv


def random_params(config, seed=0, dtype=np.float64, scale=0.3):
    """Official init plus random perturbations of every tensor, so no gradient is trivially zero.

    (The official init zeroes five matrices per layer: a gradient check at init tests almost nothing.)
    """
    params = minirwkv.init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1000)
    out = {}
    for k, v in params.items():
        noise = rng.normal(0.0, scale, v.shape)
        if k.endswith("time_decay"):
            noise *= 2
        out[k] = (v + noise).astype(dtype)
    return out


def random_tokens(config, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (B, T))
