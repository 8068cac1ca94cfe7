# %% [markdown]
# # Tutorial 2: the WKV three ways
#
# The WKV is RWKV's replacement for attention (the paper's WKV operator, eq. 14). For one batch element and one channel
# (every symbol below is a scalar), with keys k_t, values v_t, a per-channel log-decay w < 0 and a bonus u:
#
#     y_t = ( sum_{i<t} e^{(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t )
#         / ( sum_{i<t} e^{(t-1-i) w + k_i}      +  e^{u + k_t}      )
#
# The most recent past token (i = t-1) arrives undecayed, token i has decayed (t-1-i) times, and the current
# token gets the bonus e^u instead. In the checkpoints w is stored as time_decay = theta with w = -exp(theta), and
# u as time_first. The arrays are k, v, y of shape (B, T, C) and w, u of shape (C,): every (b, c) pair is an
# independent copy of the scalar formula above.
#
# We compute it three ways and check that they agree:
#
# 1. as a T x T matrix of weights (attention with no query): good for pictures and for testing;
# 2. as the naive recurrence of two running sums, and see it overflow in float32;
# 3. as the stable recurrence with a running maximum, which is what the kernels and RNN mode run.
#
# Derivations: docs/wkv.md; code: minirwkv/wkv.py.

# %%
import os

import numpy as np

from minirwkv.rwkv4 import wkv
from _common import Checks, ascii_heatmap, out_dir, pyplot

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
OUT = out_dir()
checks = Checks("Tutorial 2: the WKV three ways")
np.set_printoptions(precision=3, suppress=True, linewidth=120)

# %% [markdown]
# Four channels with very different memories. The per-step decay factor is e^w = exp(-exp(theta)):
# theta = -5 keeps 99.3% per step (a long memory), theta = 3 keeps 2e-9 (only the current and the previous token
# matter). u is the official init, ln(0.3) plus a zigzag of 0, +0.5, -0.5 across channels.

# %%
theta = np.array([-5.0, -2.0, 0.0, 3.0])  # (C,) time_decay
w = -np.exp(theta)  # (C,) log-decay per step
u = np.log(0.3) + 0.5 * (((np.arange(4) + 1) % 3) - 1)  # (C,) time_first
print("theta      :", theta)
print("decay e^w  :", np.exp(w))
print("u          :", u)

# %% [markdown]
# ## 1. The T x T weight matrix: a softmax over the past
#
# Write the exponents as a matrix per channel, E[t, i] = (t-1-i) w + k_i for i < t, u + k_t on the diagonal, and
# -inf above it (the future). Then y_t = sum_i softmax(E[t, :])_i v_i: a causal attention whose scores depend on the
# key and on the distance, never on a query (the AFT connection of the paper). `wkv.wkv_log_weights` builds E,
# shape (B, T, T, C). Softmax does not change when a row is shifted, so we subtract each row's maximum before exp
# and nothing can overflow.
#
# With all keys equal to 0, the weights depend on the distance only, so each channel's decay is plain to see:

# %%
T_pic = 12 if QUICK else 24
k0 = np.zeros((1, T_pic, 4))  # (B, T, C) all keys 0
rng = np.random.default_rng(0)
k_rand = rng.normal(0.0, 1.5, (1, T_pic, 4))  # (B, T, C) random keys


def softmax_rows(E):
    """Normalise each row E[b, t, :, c] over i: the weights of tokens 0..t in y_t."""
    E = E - E.max(axis=2, keepdims=True)  # the row maximum: every exp argument <= 0
    A = np.exp(E)
    return A / A.sum(axis=2, keepdims=True)  # (B, T, T, C)


A0 = softmax_rows(wkv.wkv_log_weights(w, u, k0))  # (B, T, T, C)
A1 = softmax_rows(wkv.wkv_log_weights(w, u, k_rand))  # (B, T, T, C)
print("row t = 5 of the weights with k = 0 (weights of tokens 0..5 in y_5), one line per channel:")
for c in range(4):
    print(f"  theta = {theta[c]:+.0f}:", A0[0, 5, :6, c])

# %% [markdown]
# Look at the long-memory channel (theta = -5): the past tokens share the weight almost equally, and the current
# token gets e^u = 0.3 times the weight of the previous one. At theta = 3 the row is the previous token and the
# current one only, in the ratio 1 : e^u. Below, the first 12 rows of the matrix for two channels as text (row
# t = output position, column i = input position, darker = larger, each row scaled to its own maximum), then the
# picture for all four channels, with zero keys (top) and with random keys (bottom), where a large k_i makes
# column i stand out in every later row.

# %%
for c in (0, 3):
    rows = A0[0, :12, :12, c]  # (12, 12)
    print(f"\nchannel theta = {theta[c]:+.0f}, k = 0:")
    print(ascii_heatmap(rows / rows.max(axis=1, keepdims=True)))

plt = pyplot()
if plt is not None:
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.4))
    for row, (A, name) in enumerate([(A0, "k = 0"), (A1, "random k")]):
        for c in range(4):
            ax = axes[row, c]
            ax.imshow(A[0, :, :, c], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"theta = {theta[c]:+.0f}, {name}", fontsize=9)
            ax.set_xlabel("input token i")
            ax.set_ylabel("output position t")
    fig.suptitle("WKV weights softmax(E[t, :]): the parallel form as a T x T matrix per channel")
    fig.tight_layout()
    fig.savefig(OUT / "02_wkv_weights.png", dpi=100)
    plt.close(fig)
    print("saved", OUT / "02_wkv_weights.png")

# %% [markdown]
# The library's parallel form, `wkv.wkv_parallel_forward`, does exactly this in O(T^2) memory per channel. Our
# softmax-by-hand above, times v, must give its output:

# %%
v_pic = rng.normal(size=(1, T_pic, 4))  # (B, T, C)
y_by_hand = np.einsum("btic,bic->btc", A1, v_pic)  # (B, T, C) y_t = sum_i A[t, i] v_i
y_parallel, _, _ = wkv.wkv_parallel_forward(w, u, k_rand, v_pic)
checks.close("softmax(E) @ v by hand vs wkv_parallel_forward", y_by_hand, y_parallel)
checks.close("each row of weights sums to 1", A1.sum(axis=2), np.ones((1, T_pic, 4)))

# %% [markdown]
# ## 2. The naive recurrence, and where it breaks
#
# The T x T matrix costs T^2. But the sums over the past obey a recurrence: with
# a_t = sum_{i<t} e^{(t-1-i) w + k_i} v_i and b_t the same sum without v_i (a_0 = b_0 = 0),
#
#     y_t     = (a_t + e^{u + k_t} v_t) / (b_t + e^{u + k_t})
#     a_{t+1} = e^w a_t + e^{k_t} v_t          (everything in the past decays once; the current token joins it)
#     b_{t+1} = e^w b_t + e^{k_t}
#
# O(T) time and O(1) memory per channel: this is why RWKV can run as an RNN. Written as literally as possible:

# %%
def naive_wkv(w, u, k, v):
    """The recurrence of running sums a, b, exactly as written above. Computes in the dtype of k."""
    B, T, C = k.shape
    a = np.zeros((B, C), dtype=k.dtype)  # (B, C)
    b = np.zeros((B, C), dtype=k.dtype)  # (B, C)
    y = np.empty_like(k)  # (B, T, C)
    for t in range(T):
        bonus = np.exp(u + k[:, t])  # (B, C) e^{u + k_t}
        y[:, t] = (a + bonus * v[:, t]) / (b + bonus)
        a = np.exp(w) * a + np.exp(k[:, t]) * v[:, t]
        b = np.exp(w) * b + np.exp(k[:, t])
    return y


checks.close("naive recurrence vs parallel (float64)", naive_wkv(w, u, k_rand, v_pic), y_parallel)

# %% [markdown]
# Now give one token a large key. Keys are outputs of a linear layer and nothing bounds them. exp overflows
# float32 above about 88.7 (float16 above about 11). With k = 100 at t = 3, e^k is inf, the output is
# inf / inf = NaN, and since a and b are now inf, every later output is NaN too:

# %%
k_big = k_rand.copy()
k_big[0, 3, :] = 100.0  # one huge key, every channel
f32 = np.float32
with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point of this cell
    y_naive32 = naive_wkv(w.astype(f32), u.astype(f32), k_big.astype(f32), v_pic.astype(f32))
print("naive float32, channel 0, t = 0..7:", y_naive32[0, :8, 0])
checks.true("naive float32 recurrence overflows at k = 100", not np.isfinite(y_naive32).all(),
            f"{int((~np.isfinite(y_naive32)).sum())} of {y_naive32.size} outputs inf/NaN")

# %% [markdown]
# In float64 the same input is fine (e^100 = 2.7e43 is far below float64's limit of 1.8e308), so float64 naive is
# our reference for what the answer should be. But float64 only moves the cliff (to k of about 709), and
# a kernel that runs in float32 or bf16 must not depend on it.

# %%
y_naive64 = naive_wkv(w, u, k_big, v_pic)
print("naive float64, channel 0, t = 0..7:", y_naive64[0, :8, 0])

# %% [markdown]
# ## 3. The stable recurrence: store the scale separately
#
# The fix (used by the official CUDA kernel and by `wkv.wkv_step`): store a = aa e^pp and b = bb e^pp, where pp is a
# running log-scale, and at every step choose the new scale as the largest exponent involved:
#
#     output:  q = max(pp, u + k_t);   e1 = e^{pp - q};   e2 = e^{u + k_t - q}
#              y_t = (e1 aa + e2 v_t) / (e1 bb + e2)
#     update:  q = max(pp + w, k_t);   e1 = e^{pp + w - q};   e2 = e^{k_t - q}
#              aa = e1 aa + e2 v_t;   bb = e1 bb + e2;   pp = q
#
# Every exp argument is <= 0, so nothing overflows, and one of e1, e2 is exactly 1. The state before the first token
# is aa = bb = 0, pp = -1e38 (a finite "log 0", so pp + w stays finite). Watch pp jump to 100 when the big key
# arrives, while aa and bb stay of order 1:

# %%
B, T_big, C = k_big.shape
aa, bb, pp = wkv.zero_state(B, C, f32)
kk, vv, ww, uu = k_big.astype(f32), v_pic.astype(f32), w.astype(f32), u.astype(f32)
print(" t |   k_t    |    y_t    |    aa     |    bb     |    pp       (channel 0, float32)")
for t in range(6):
    y_t, aa, bb, pp = wkv.wkv_step(ww, uu, kk[:, t], vv[:, t], aa, bb, pp)
    print(f"{t:2d} | {kk[0, t, 0]:8.3f} | {y_t[0, 0]:9.4f} | {aa[0, 0]:9.4f} | {bb[0, 0]:9.4f} | {pp[0, 0]:9.3f}")

# %% [markdown]
# `wkv.wkv_recurrent_forward` runs this step over all T and returns y and the final state. In float32 it now matches
# the float64 naive reference, huge key and all (in the slow channel 0 the token with k = 100 outweighs everything
# else for thousands of steps, so y stays at its value v_3), and so does the parallel form (it subtracts each
# row's maximum, the same idea in matrix form).

# %%
y_stable32, _ = wkv.wkv_recurrent_forward(ww, uu, kk, vv)
y_parallel32, _, _ = wkv.wkv_parallel_forward(ww, uu, kk, vv)
print("stable float32, channel 0, t = 0..7:", y_stable32[0, :8, 0])
checks.close("stable recurrent float32 (k = 100) vs naive float64", y_stable32, y_naive64, f32, kind="vs_f64")
checks.close("parallel float32 (k = 100) vs naive float64", y_parallel32, y_naive64, f32, kind="vs_f64")

# %% [markdown]
# ## 4. The three ways on a realistic layer
#
# Finally, a layer as the official init makes it: C channels with theta ramping from -5 to 3 and the u zigzag,
# keys of size about 3, a batch of sequences. Parallel and recurrent share no code (one is a softmax over a
# matrix, the other a loop with a running maximum), so their agreement is a real test of both. They also end in
# the same state: the parallel form sums a_T and b_T directly from their definition.

# %%
B, T, C = (2, 48, 8) if QUICK else (2, 256, 16)
h = np.arange(C)
theta = -5 + 8 * (h / (C - 1)) ** 0.7  # (C,) layer-0 init ramp
w = -np.exp(theta)  # (C,)
u = np.log(0.3) + 0.5 * (((h + 1) % 3) - 1)  # (C,)
k = rng.normal(0.0, 3.0, (B, T, C))  # (B, T, C)
v = rng.normal(0.0, 1.0, (B, T, C))  # (B, T, C)

y_par, _, s_par = wkv.wkv_parallel_forward(w, u, k, v)
y_rec, s_rec = wkv.wkv_recurrent_forward(w, u, k, v)
y_nai = naive_wkv(w, u, k, v)
y_rec32, _ = wkv.wkv_recurrent_forward(*(a.astype(f32) for a in (w, u, k, v)))
y_par32, _, _ = wkv.wkv_parallel_forward(*(a.astype(f32) for a in (w, u, k, v)))

checks.close(f"parallel vs recurrent, float64, T={T}", y_par, y_rec)
checks.close("parallel vs naive, float64", y_par, y_nai)
checks.close("recurrent vs naive, float64", y_rec, y_nai)
checks.close("final state: log b_T (pp + log bb)", s_par.pp + np.log(s_par.bb), s_rec.pp + np.log(s_rec.bb))
checks.close("final state: a_T / b_T (aa / bb)", s_par.aa / s_par.bb, s_rec.aa / s_rec.bb)
checks.close("recurrent float32 vs naive float64", y_rec32, y_nai, f32, kind="vs_f64")
checks.close("parallel float32 vs naive float64", y_par32, y_nai, f32, kind="vs_f64")

# %% [markdown]
# ## Summary
#
# * The WKV is a causal softmax over log-weights (t-1-i) w + k_i, with u + k_t for the current token.
# * The recurrence makes it O(T) and O(1) memory, but exp of raw keys overflows float32 at k of about 88.7.
# * Keeping the scale pp apart from aa, bb (a running max, like the max in a stable softmax) fixes it. The same
#   function, `wkv_step`, serves the recurrent reference, RNN-mode inference, and is what the kernels transcribe.
#
# Next: tutorial 3, the gradients of the WKV, derived by hand and checked.

# %%
checks.report()
