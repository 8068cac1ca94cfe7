# %% [markdown]
# # Tutorial 1: token shift and time mixing
#
# *What does an RWKV-4 layer see of the previous token?*
#
# Before anything clever happens, every sub-layer of RWKV-4 (time mixing and channel mixing) blends each token's
# input with the input of the token just before it. This is the "token shift" of the paper: the
# mu-interpolations between x_t and x_{t-1} in its time-mixing and channel-mixing equations. It is cheap, it is
# the only way channel mixing ever looks at the past, and it is where the model gets its first, one-token-wide
# view of context.
#
# Shapes: B batch, T time, C channels. `z` is the LayerNorm output that enters the sub-layer, (B, T, C).
#
# This tutorial: (1) the shift, (2) the per-channel mix mu, (3) how the official init sets mu across layers,
# (4) the backward of both, checked against a hand-written loop and finite differences.

# %%
import os

import numpy as np

import minirwkv
from minirwkv import layers as ops
from minirwkv.testing import numerical_gradient
from _common import Checks, out_dir, pyplot

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
OUT = out_dir()
checks = Checks("Tutorial 1: token shift and time mixing")
np.set_printoptions(precision=3, suppress=True, linewidth=120)

# %% [markdown]
# ## 1. The shift
#
# The official code writes the shift as `nn.ZeroPad2d((0, 0, 1, -1))` applied to a (B, T, C) tensor: pad one row
# of zeros at the top of the T axis and crop one row at the bottom. Row t of the result is row t-1 of the input:
#
#     xx[:, t] = z[:, t-1]   for t >= 1
#     xx[:, 0] = 0           (nothing came before the first token)
#
# `ops.token_shift_forward` does this. Take a tiny input whose value tells us where it came from:
# z[0, t, c] = 10 t + c, so "31" means "token 3, channel 1".

# %%
B, T, C = 1, 5, 4
z = (10.0 * np.arange(T)[:, None] + np.arange(C)[None, :])[None]  # (B, T, C)
xx = ops.token_shift_forward(z)  # (B, T, C)
print("z[0]  (row t = token t):\n", z[0])
print("xx[0] (row t holds token t-1; row 0 is the zero pad):\n", xx[0])

# %% [markdown]
# When the model runs as an RNN, one chunk of text at a time, the "token before the first one" is not zero but the
# last token of the previous chunk. `token_shift_forward(z, x_prev)` takes it as a (B, C) argument, so splitting a
# sequence in two and carrying `x_prev` gives the same shifted input as one pass:

# %%
xx_second_half = ops.token_shift_forward(z[:, 2:], x_prev=z[:, 1])  # (B, T-2, C)
print("second half, shifted with x_prev = z[:, 1]:\n", xx_second_half[0])

# %% [markdown]
# ## 2. The mix
#
# Each sub-layer does not take `z` or `xx`, but a per-channel interpolation between them. For the key of time
# mixing:
#
#     xk = z * mu_k + xx * (1 - mu_k)          mu_k = time_mix_k, shape (1, 1, C)
#
# mu is the weight of the *current* token: mu = 1 ignores the past, mu = 0 looks only at the previous token.
# Time mixing has three of them (mu_k, mu_v, mu_r, one per projection) and channel mixing two (mu_k, mu_r). They are
# trained, so each channel learns how much "previous token" it wants.

# %%
mu = np.array([0.0, 0.25, 0.75, 1.0]).reshape(1, 1, C)  # (1, 1, C)
xk, _ = ops.mix_forward(z, xx, mu)  # (B, T, C)
print("mu =", mu.ravel())
print("xk[0]:\n", xk[0])
print("channel 0 (mu = 0) is the previous token:", xk[0, :, 0], "  channel 3 (mu = 1) the current:", xk[0, :, 3])

# %% [markdown]
# ## 3. The official init: a ramp across channels and layers
#
# RWKV-v4neo initialises the mixes (docs/rwkv4.md §5.1) with the channel ramp d_i = i / C and, for layer l of L,
#
#     time_mix_k = d^(1 - l/L)      time_mix_v = d^(1 - l/L) + 0.3 l/(L-1)      time_mix_r = d^((1 - l/L) / 2)
#
# Read it channel by channel: d_0 = 0, so **channel 0 starts fully on the previous token in every layer**
# (0 to any positive power is 0; this holds for every mix except time_mix_v, which adds 0.3 l/(L-1)), while the
# last channel starts almost fully on the current token. Read it layer by layer: the exponent 1 - l/L shrinks
# with depth, d^small is close to 1, so deeper layers lean towards the current token. The first layer gets the
# widest spread of "how much past".
#
# We do not copy the formula into the model: `minirwkv.init_params` builds the official parameters, and we
# re-derive the ramp here in one line to check it.

# %%
L = 6
C_init = 16 if QUICK else 64
config = minirwkv.ModelConfig(vocab_size=8, n_embd=C_init, n_layer=L)
params = minirwkv.init_params(config, dtype=np.float64)
mu_k = np.stack([params[f"blocks.{l}.att.time_mix_k"].ravel() for l in range(L)])  # (L, C)
d = np.arange(C_init) / C_init
ramp = np.stack([d ** (1 - l / L) for l in range(L)])  # (L, C): the formula, re-derived
for l in range(L):
    print(f"layer {l}: time_mix_k at channels 0, C/4, C/2, C-1 =", mu_k[l, [0, C_init // 4, C_init // 2, -1]])
checks.close("init time_mix_k vs d^(1-l/L)", mu_k, ramp)
checks.true("channel 0 sees only the previous token at init", np.all(mu_k[:, 0] == 0), "mu_k[:, 0] == 0, all layers")

# %% [markdown]
# A picture of the same table: one curve per layer, mu against the channel index.

# %%
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for l in range(L):
        ax.plot(np.arange(C_init), mu_k[l], label=f"layer {l}")
    ax.set_xlabel("channel i")
    ax.set_ylabel("time_mix_k (weight of the current token)")
    ax.set_title("Official init: mu = (i/C)^(1 - l/L)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "01_time_mix_init.png", dpi=100)
    plt.close(fig)
    print("saved", OUT / "01_time_mix_init.png")

# %% [markdown]
# ## 4. The backward
#
# Both operations are linear, so their gradients are short (docs/backward.md). With dm the gradient arriving at
# the mix's output:
#
#     dz  = dm * mu,   dxx = dm * (1 - mu),   dmu = sum over (b, t) of dm * (z - xx)
#
# and the shift sends each gradient one step back in time: xx[:, t+1] came from z[:, t], so
# dz[:, t] += dxx[:, t+1], and the last token, which fed no later position, gets nothing from the shift.
# In a layer z feeds both the mix directly and the shift, so its gradient is the sum of both paths.
#
# First, the forward against a plain loop over (b, t, c), the most literal reading of the equations:

# %%
rng = np.random.default_rng(0)
B, T, C = 2, (4 if QUICK else 7), 3
z = rng.normal(size=(B, T, C))  # (B, T, C)
mu = rng.uniform(size=(1, 1, C))  # (1, 1, C)

xx_loop = np.zeros_like(z)
m_loop = np.zeros_like(z)
for b in range(B):
    for t in range(T):
        for c in range(C):
            xx_loop[b, t, c] = z[b, t - 1, c] if t > 0 else 0.0
            m_loop[b, t, c] = z[b, t, c] * mu[0, 0, c] + xx_loop[b, t, c] * (1 - mu[0, 0, c])

xx = ops.token_shift_forward(z)  # (B, T, C)
m, cache = ops.mix_forward(z, xx, mu)  # (B, T, C)
checks.exact("token_shift_forward vs loop", xx, xx_loop)
checks.close("mix_forward vs loop", m, m_loop)
checks.exact("shift with x_prev vs one pass", ops.token_shift_forward(z[:, 3:], z[:, 2]), xx[:, 3:])

# %% [markdown]
# Now the backward, against central finite differences of the scalar L = sum(G * m) for a random "upstream
# gradient" G (so dL/dm = G): nudge one input by +h and -h, and (L+ - L-) / 2h is its derivative. In float64 with
# h = 1e-6 the error is about h^2 (truncation) plus 1e-16 / h (rounding): far below the tolerance.

# %%
G = rng.normal(size=(B, T, C))  # (B, T, C) dL/dm
dz_mix, dxx, dmu = ops.mix_backward(G, cache)
dz = dz_mix + ops.token_shift_backward(dxx)  # z feeds the mix directly and through the shift


def loss(z, mu):
    return float((G * ops.mix_forward(z, ops.token_shift_forward(z), mu)[0]).sum())


# `numerical_gradient` (minirwkv/testing.py, ten lines) nudges each entry of x by +h and -h, h = 1e-6, and takes
# (f+ - f-) / 2h: two evaluations of the loss per entry, the same judge every backward in the tests faces.
dz_fd = numerical_gradient(lambda: loss(z, mu), z)
dmu_fd = numerical_gradient(lambda: loss(z, mu), mu)
checks.close("dz (mix + shift backward) vs finite diff", dz, dz_fd, kind="finite_diff")
checks.close("dmu (mix_backward) vs finite diff", dmu, dmu_fd, kind="finite_diff")
checks.exact("shift backward: last token gets 0", ops.token_shift_backward(dxx)[:, -1], np.zeros((B, C)))

# %% [markdown]
# ## Summary
#
# * The token shift hands each position the previous token's sub-layer input (zero before the first token, or the
#   previous chunk's last token in RNN mode).
# * The mix mu decides per channel how much of it to use; at init, channel 0 uses only the previous token in every
#   layer and deeper layers lean towards the current token.
# * Gradients: the mix splits dm into mu and 1 - mu parts, the shift moves the second part one step back in time.
#
# Next: tutorial 2, the WKV, which lets a channel see arbitrarily far back.

# %%
checks.report()
