"""Test helpers: the per-dtype tolerance table and hypothesis strategies for WKV inputs.

Needs the ``dev`` extra (hypothesis). The core package never imports this module.

Tolerances live in ONE table, keyed by dtype name and by the kind of comparison, never in positional lists.
``assert_close`` compares |actual - expected| <= atol * max|expected| + rtol * |expected|: atol is relative to the
array's overall magnitude (gradients of extreme inputs span many orders), rtol to each element.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .devices import to_numpy


class Tol(NamedTuple):
    rtol: float
    atol: float  # relative to max|expected|


# Why these numbers: docs/numerics.md. "same" compares two algorithms run in the same dtype (summation order and
# exp rounding differ: a few ulp times the sequence length); "vs_f64" compares a float32 computation with the
# float64 reference of the same inputs (the kernels' target: relative error <= 1e-5).
TOLERANCES = {
    ("float64", "same"): Tol(rtol=1e-10, atol=1e-11),
    ("float32", "same"): Tol(rtol=2e-4, atol=2e-5),
    # normwise: max|float32 - float64| <= 1e-5 max|float64|, at T <= 64 on init-like inputs (docs/numerics.md: the
    # float32 log-scale p absorbs the rounding of p + w at every step, so the error grows with T; worst over 16
    # draws, the gradient of w, which cancels A' - y B', reaches 1.3e-5 at T = 128 and 2.6e-5 at T = 256)
    ("float32", "vs_f64"): Tol(rtol=0.0, atol=1e-5),
    ("float64", "vs_f64"): Tol(rtol=1e-10, atol=1e-11),
    # a whole small model in float32 vs float64: ~10 layers of rounding, normwise per tensor
    ("float32", "vs_f64_model"): Tol(rtol=0.0, atol=1e-4),
    # central finite differences in float64 (step 1e-6): truncation ~h^2, cancellation ~eps/h
    ("float64", "finite_diff"): Tol(rtol=1e-6, atol=1e-7),
}


def tol(dtype, kind: str = "same") -> Tol:
    return TOLERANCES[(np.dtype(dtype).name, kind)]


def assert_close(actual, expected, dtype=None, kind: str = "same", what: str = "value", scale=None):
    """Assert that two arrays agree to the named tolerance of ``dtype`` (default: ``expected``'s dtype).

    ``scale`` (default max|expected|) is what atol is relative to. Pass the magnitude of the terms a result sums
    when the result itself may cancel to ~0 (a float32 sum of terms of size s is only accurate to ~eps * s).
    """
    actual = to_numpy(actual)
    expected = to_numpy(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise AssertionError(f"{what}: non-finite values in the result")
    t = tol(dtype if dtype is not None else expected.dtype, kind)
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, float(scale or 0.0))
    err = np.abs(a - e)
    bound = t.atol * scale + t.rtol * np.abs(e)
    if e.size and not np.all(err <= bound + np.finfo(np.float64).tiny):
        i = np.unravel_index(int(np.argmax(err - bound)), err.shape)
        raise AssertionError(
            f"{what}: max excess at index {i}: actual {a[i]!r}, expected {e[i]!r}, |diff| {err[i]:.3e} > "
            f"bound {bound[i]:.3e} (rtol={t.rtol}, atol={t.atol} x max|expected| {scale:.3e}; "
            f"{np.dtype(dtype if dtype is not None else expected.dtype).name}/{kind})")


FINITE_DIFF_STEP = 1e-6  # the h of the "finite_diff" tolerances


def numerical_gradient(loss, x, h: float = FINITE_DIFF_STEP):
    """Central differences (loss(x + h e_i) - loss(x - h e_i)) / 2h of the scalar ``loss()`` for every entry of the
    float64 array ``x``, which is changed in place and restored."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        plus = float(loss())
        x[i] = old - h
        minus = float(loss())
        x[i] = old
        g[i] = (plus - minus) / (2 * h)
    return g


class WKVInputs(NamedTuple):
    time_decay: np.ndarray  # (C,) raw theta
    time_first: np.ndarray  # (C,) u
    k: np.ndarray  # (B, T, C)
    v: np.ndarray  # (B, T, C)
    gy: np.ndarray  # (B, T, C) an upstream gradient

    @property
    def w(self):
        return -np.exp(self.time_decay)

    def grad_scale(self, name: str | None = None) -> float:
        """The size of the terms a WKV gradient sums: |g| (1 + |v|). A floor for assert_close's ``scale``.

        ``name="gw"``: the terms of the gradient of w also carry the distance t-1-i (up to T-1), so its scale is
        T-1 times larger. Comparisons of two float32 algorithms on extreme inputs (|k| ~ 100, theta ~ -8) need
        it: measured over 300 draws, gw differed by up to 3.1e-5 of |g| (1 + |v|), and by 1.0e-6 of this scale.
        """
        scale = float(np.max(np.abs(self.gy), initial=0.0) * (1.0 + np.max(np.abs(self.v), initial=0.0)))
        return scale * max(self.k.shape[1] - 1, 1) if name == "gw" else scale

    def astype(self, dtype) -> "WKVInputs":
        return WKVInputs(*(np.ascontiguousarray(a, dtype=dtype) for a in self))


def make_wkv_inputs(B, T, C, seed=0, k_scale=3.0, dtype=np.float64, theta=(-8.0, 4.0), u=(-5.0, 5.0)) -> WKVInputs:
    """Random WKV inputs: theta, u uniform in their ranges, k ~ N(0, k_scale^2) clipped to [-100, 100]."""
    rng = np.random.default_rng(seed)
    return WKVInputs(
        time_decay=rng.uniform(*theta, C),
        time_first=rng.uniform(*u, C),
        k=np.clip(rng.normal(0.0, k_scale, (B, T, C)), -100, 100),
        v=rng.normal(0.0, 1.0, (B, T, C)),
        gy=rng.normal(0.0, 1.0, (B, T, C)),
    ).astype(dtype)


def init_like_wkv_inputs(B, T, C, seed=0, dtype=np.float64) -> WKVInputs:
    """Inputs like a freshly initialised layer 0 (docs/rwkv4.md §5.1): theta ramp -5..3, u = ln 0.3 + zigzag, k ~ N(0, 9)."""
    h = np.arange(C)
    rng = np.random.default_rng(seed)
    frac = h / (C - 1) if C > 1 else np.zeros(C)
    return WKVInputs(
        time_decay=-5 + 8 * frac ** 0.7,
        time_first=np.log(0.3) + 0.5 * (((h + 1) % 3) - 1),
        k=rng.normal(0.0, 3.0, (B, T, C)),
        v=rng.normal(0.0, 1.0, (B, T, C)),
        gy=rng.normal(0.0, 1.0, (B, T, C)),
    ).astype(dtype)


def wkv_inputs(dtype=np.float64, max_B=3, max_T=64, max_C=16):
    """Hypothesis strategy for WKVInputs: B 1..max_B, T 1..max_T, C 1..max_C, theta in [-8, 4], u in [-5, 5],
    k in [-100, 100] (beyond float32's exp overflow at ~88.7), with a few hand-placed extreme entries."""
    from hypothesis import strategies as st

    width = 32 if np.dtype(dtype) == np.float32 else 64

    @st.composite
    def strategy(draw):
        B = draw(st.integers(1, max_B))
        T = draw(st.integers(1, max_T))
        C = draw(st.integers(1, max_C))
        seed = draw(st.integers(0, 2**32 - 1))
        k_scale = draw(st.sampled_from([0.0, 1.0, 3.0, 20.0, 100.0]))
        x = make_wkv_inputs(B, T, C, seed=seed, k_scale=k_scale, dtype=np.float64)
        x = WKVInputs(*(a.copy() for a in x))
        ugly = st.floats(-100, 100, width=width, allow_nan=False) | st.sampled_from([-100.0, 100.0, 0.0, 88.75])
        for _ in range(draw(st.integers(0, 3))):
            x.k[draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1)), draw(st.integers(0, C - 1))] = draw(ugly)
        c = draw(st.integers(0, C - 1))
        x.time_decay[c] = draw(st.floats(-8, 4, width=width) | st.sampled_from([-8.0, 4.0]))
        x.time_first[c] = draw(st.floats(-5, 5, width=width) | st.sampled_from([-5.0, 5.0]))
        return x.astype(dtype)

    return strategy()
