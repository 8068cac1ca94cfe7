# %% [markdown]
# # Tutorial 3: backprop by hand through the WKV
#
# Training needs the gradient of the loss with respect to everything the WKV touches: the keys k and values v
# (B, T, C), and the two per-channel parameters w and u (C,). minirwkv has no autograd; the gradients are written
# out. This tutorial derives them in a few lines, computes them three ways (a literal O(T^2) transcription of the
# derivation, the library's parallel backward, the library's O(T) recurrent backward) and checks all of them
# against central finite differences in float64. The full derivation, including the stable two-sweep algorithm, is
# docs/wkv.md sections 2, 4 and 5.
#
# Notation as in tutorial 2, per (b, c) pair: the weight of token i in output t is
#
#     omega[t, i] = e^{(t-1-i) w + k_i}   (i < t),     omega[t, t] = e^{u + k_t}
#     D_t = sum_{i<=t} omega[t, i],       y_t = sum_{i<=t} omega[t, i] v_i / D_t
#
# and g_t = dL/dy_t is the gradient arriving from above, (B, T, C).

# %%
import os

import numpy as np

from minirwkv.rwkv4 import wkv
from minirwkv.backends import get_wkv
from minirwkv.testing import numerical_gradient
from _common import Checks

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
checks = Checks("Tutorial 3: backprop through the WKV")
np.set_printoptions(precision=4, suppress=True, linewidth=120)

# %% [markdown]
# ## 1. The derivation
#
# y_t is a ratio. Nudging one weight omega[t, i] moves the numerator by v_i and the denominator by 1:
#
#     d y_t / d omega[t, i] = v_i / D_t - y_t / D_t = (v_i - y_t) / D_t
#
# (a weighted average moves towards the value whose weight grew). Every weight is an exponential, so its own
# derivative is itself times the derivative of the exponent, and the exponents are linear in everything:
#
#     d omega[t, i] / d k_i = omega[t, i]                     (every t >= i)
#     d omega[t, t] / d u   = omega[t, t]                     (the diagonal only)
#     d omega[t, i] / d w   = (t-1-i) omega[t, i]             (i < t: the number of decays)
#     d y_t / d v_i         = omega[t, i] / D_t               (y is linear in v)
#
# Multiply by g_t and sum over every output t that uses the input:
#
#     dL/du   = sum_t  g_t omega[t, t] (v_t - y_t) / D_t
#     dL/dw   = sum_t  g_t sum_{i<t} (t-1-i) omega[t, i] (v_i - y_t) / D_t
#     dL/dk_i = sum_{t>=i} g_t omega[t, i] (v_i - y_t) / D_t
#     dL/dv_i = sum_{t>=i} g_t omega[t, i] / D_t
#
# In words: u and w collect over all outputs; k_i and v_i collect over every later output that still remembers
# token i. Since w, u are shared by the batch, their gradients are summed over b as well. The code below is that
# list, transcribed literally: a loop over the output position t, O(T^2) work, exp of raw keys (fine in float64 for
# moderate keys, which is all a reference needs).

# %%
def wkv_grads_by_hand(w, u, k, v, g):
    """(gw, gu, gk, gv) by the four sums above, one output position t at a time. Float64 reference only."""
    B, T, C = k.shape
    gw, gu = np.zeros(C), np.zeros(C)  # (C,)
    gk, gv = np.zeros_like(k), np.zeros_like(v)  # (B, T, C)
    for t in range(T):
        n = (t - 1 - np.arange(t))[None, :, None]  # (1, t, 1) decays of the past tokens i < t
        past = np.exp(n * w + k[:, :t])  # (B, t, C) omega[t, i] for i < t
        now = np.exp(u + k[:, t])  # (B, C) omega[t, t]
        D = past.sum(axis=1) + now  # (B, C)
        y = ((past * v[:, :t]).sum(axis=1) + now * v[:, t]) / D  # (B, C)
        s = g[:, t] / D  # (B, C) g_t / D_t, common to every term
        gu += (s * now * (v[:, t] - y)).sum(axis=0)
        gw += (s * (n * past * (v[:, :t] - y[:, None])).sum(axis=1)).sum(axis=0)
        gk[:, :t] += s[:, None] * past * (v[:, :t] - y[:, None])
        gk[:, t] += s * now * (v[:, t] - y)
        gv[:, :t] += s[:, None] * past
        gv[:, t] += s * now
    return gw, gu, gk, gv


# %% [markdown]
# ## 2. The two library backwards
#
# **Parallel** (`wkv.wkv_parallel_backward`). With A = softmax of the log-weights E (the normalised omega), the
# four sums are a softmax backward, gE[t, i] = A[t, i] g_t (v_i - y_t), followed by sums of gE: over t for k_i,
# along the diagonal for u, weighted by the distance (t-1-i) for w. O(T^2) memory, like its forward.
#
# **Recurrent** (`wkv.wkv_recurrent_backward`). The sums over later outputs t > i satisfy backward-in-time
# recurrences: with P_i = sum_{t>i} e^{(t-1-i) w} g_t / D_t,
#
#     P_{T-1} = 0,      P_{i-1} = e^w P_i + g_i / D_i,      dL/dv_i = g_i omega[i, i] / D_i + e^{k_i} P_i
#
# and the same for Q_i (the y_t-weighted sum needed by dL/dk_i). The w-gradient needs
# A'_t = sum_{i<t} (t-1-i) omega[t, i] v_i, which follows a forward recurrence A'_{t+1} = e^w (A'_t + a_t). So the
# backward is two sweeps over time: forward (recompute the state, accumulate gw, gu), then backward (accumulate P,
# Q, emit gk, gv). Each accumulator is stored with its own running log-scale, exactly like (aa, bb, pp) in the
# forward, so nothing overflows. O(T) time, O(1) extra state per channel: the algorithm of the official CUDA kernel.
#
# Both take the forward's output y. Let us compute all three on a small problem.

# %%
rng = np.random.default_rng(0)
B, T, C = (1, 6, 3) if QUICK else (2, 12, 4)
theta = rng.uniform(-3.0, 1.0, C)  # (C,) time_decay
w = -np.exp(theta)  # (C,)
u = rng.uniform(-2.0, 2.0, C)  # (C,) time_first
k = rng.normal(0.0, 2.0, (B, T, C))  # (B, T, C)
v = rng.normal(0.0, 1.0, (B, T, C))  # (B, T, C)
g = rng.normal(0.0, 1.0, (B, T, C))  # (B, T, C) dL/dy, a random "upstream" gradient

y, cache, _ = wkv.wkv_parallel_forward(w, u, k, v)  # (B, T, C)
by_hand = wkv_grads_by_hand(w, u, k, v, g)
parallel = wkv.wkv_parallel_backward(g, cache)
recurrent = wkv.wkv_recurrent_backward(w, u, k, v, y, g)
print("gu by hand  :", by_hand[1])
print("gu parallel :", parallel[1])
print("gu recurrent:", recurrent[1])

# %% [markdown]
# ## 3. Finite differences
#
# The judge of all three: L(w, u, k, v) = sum(g * y) is a scalar whose gradient is exactly what we computed (since
# dL/dy = g). Nudge each input entry by +h and -h and take (L+ - L-) / 2h. In float64 with h = 1e-6 the error is
# about h^2 (truncation of the Taylor series) plus 1e-16 / h (rounding): around 1e-10, far below the tolerance.
# We differentiate the parallel forward; the forms agree (tutorial 2), so it does not matter which.

# %%
def loss(w, u, k, v):
    return float((g * wkv.wkv_parallel_forward(w, u, k, v)[0]).sum())


def central_differences(args):
    """dL/d(every entry of every array in args): minirwkv.testing.numerical_gradient, two evaluations of L per entry."""
    return [numerical_gradient(lambda: loss(*args), x) for x in args]


numeric = central_differences([w.copy(), u.copy(), k.copy(), v.copy()])
for name, i in (("gw", 0), ("gu", 1), ("gk", 2), ("gv", 3)):
    checks.close(f"{name}: by hand vs finite diff", by_hand[i], numeric[i], kind="finite_diff")
    checks.close(f"{name}: parallel backward vs finite diff", parallel[i], numeric[i], kind="finite_diff")
    checks.close(f"{name}: recurrent backward vs finite diff", recurrent[i], numeric[i], kind="finite_diff")

# %% [markdown]
# ## 4. From w back to the stored parameter time_decay
#
# The checkpoint stores theta = time_decay and the layer computes w = -exp(theta), so dw/dtheta = -exp(theta) = w
# and dL/dtheta = w dL/dw. `wkv.wkv_forward` / `wkv.wkv_backward` are the layer that does this around any backend
# (here the NumPy recurrent reference); check it against finite differences in theta.

# %%
backend = get_wkv("4", "numpy")
y_layer, layer_cache, _ = wkv.wkv_forward(theta, u, k, v, backend)
g_theta, g_u, _, _ = wkv.wkv_backward(g, layer_cache)


def loss_theta(theta):
    return float((g * wkv.wkv_forward(theta, u, k, v, backend)[0]).sum())


h = 1e-6
g_theta_fd = np.array([(loss_theta(theta + h * e) - loss_theta(theta - h * e)) / (2 * h) for e in np.eye(C)])
print("dL/dtheta:", g_theta, " finite diff:", g_theta_fd)
checks.close("g_time_decay (wkv_backward) vs finite diff", g_theta, g_theta_fd, kind="finite_diff")

# %% [markdown]
# ## 5. Longer sequences, large keys, float32
#
# Finite differences cost two forwards per input entry, so they are for small shapes. For longer ones the three
# implementations check each other, here with one key of 100 in every channel (beyond float32's exp overflow at
# ~88.7; float64 takes it in its stride).
#
# Then float32, which is what training runs in. The by-hand formula takes exp of raw keys and would overflow; the
# recurrent backward works with log-scales and stays finite. How accurate is it? On init-like inputs, within 1e-5 of
# the float64 answer, measured against the size of the terms each gradient sums, |g| (1 + |v|), rather than the
# possibly cancelled result (docs/numerics.md). With the key of 100 the log-scale pp sits near 100, where a float32
# ulp is 8e-6 instead of 1e-6 near 10, so the decay gradient gw, a difference of two large sums, loses about a
# digit: we print that error rather than pretend it is small, and only require it to be finite.

# %%
B, T, C = (2, 32, 8) if QUICK else (2, 128, 16)
hh = np.arange(C)
theta = -5 + 8 * (hh / (C - 1)) ** 0.7  # (C,) the layer-0 init ramp
w = -np.exp(theta)  # (C,)
u = np.log(0.3) + 0.5 * (((hh + 1) % 3) - 1)  # (C,)
k = rng.normal(0.0, 3.0, (B, T, C))  # (B, T, C) init-like keys
k_big = k.copy()
k_big[0, T // 3, :] = 100.0  # (B, T, C) one huge key per channel
v = rng.normal(0.0, 1.0, (B, T, C))  # (B, T, C)
g = rng.normal(0.0, 1.0, (B, T, C))  # (B, T, C)
names = ("gw", "gu", "gk", "gv")

y, cache, _ = wkv.wkv_parallel_forward(w, u, k_big, v)
by_hand = wkv_grads_by_hand(w, u, k_big, v, g)
parallel = wkv.wkv_parallel_backward(g, cache)
recurrent = wkv.wkv_recurrent_backward(w, u, k_big, v, y, g)
for name, a, b, c in zip(names, by_hand, parallel, recurrent):
    checks.close(f"{name}: recurrent vs by hand, T={T}, k up to 100", c, a)
    checks.close(f"{name}: recurrent vs parallel, T={T}, k up to 100", c, b)

f32 = np.float32


def recurrent_float32(w, u, k, v, g):
    w, u, k, v, g = (a.astype(f32) for a in (w, u, k, v, g))
    y, _ = wkv.wkv_recurrent_forward(w, u, k, v)
    return wkv.wkv_recurrent_backward(w, u, k, v, y, g)


scale = float(np.abs(g).max() * (1 + np.abs(v).max()))  # the size of the terms each gradient sums
reference = wkv_grads_by_hand(w, u, k, v, g)  # float64, init-like keys
for name, a32, a64 in zip(names, recurrent_float32(w, u, k, v, g), reference):
    checks.close(f"{name}: recurrent float32 vs float64", a32, a64, f32, kind="vs_f64", scale=scale)

print("float32 with the key of 100: max |float32 - float64| / |g|(1+|v|) per gradient")
for name, a32, a64 in zip(names, recurrent_float32(w, u, k_big, v, g), by_hand):
    print(f"  {name}: {np.abs(a32 - a64).max() / scale:.1e}")
    checks.true(f"{name}: recurrent float32 finite with k = 100", np.isfinite(a32).all(), "no inf/NaN")


# %% [markdown]
# ## Summary
#
# * Every WKV gradient comes from one fact: d y_t / d omega[t, i] = (v_i - y_t) / D_t, times the derivative of an
#   exponent that is linear in k, u and w.
# * Summing over outputs naively costs O(T^2); reverse-time recurrences (P, Q) and a forward one (A', B') make it
#   O(T), and running log-scales keep it finite in float32.
# * The layer converts dL/dw into dL/dtime_decay by one multiplication by w.
#
# Next: tutorial 4, a whole block and the gradient check of the whole model.

# %%
checks.report()
