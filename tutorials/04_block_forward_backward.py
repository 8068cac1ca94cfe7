# %% [markdown]
# # Tutorial 4: a whole block forward and backward, and the gradient check of the model
#
# Tutorials 1-3 took the pieces apart. Here they are assembled: one RWKV-4 block (the residual block of the paper's
# architecture figure), run forward and then backward by calling the layer pairs of `minirwkv.model` and
# `minirwkv.ops` in reverse order; then the gradient check of a whole model, with a lesson about *where* to check.
#
# Shapes: B batch, T time, C channels, F the channel-mixing width, V vocabulary. x is the residual stream (B, T, C).
# A block is two pre-LayerNorm residual sub-layers in series:
#
#     x = x + TimeMix(LN_ln1(x))        TimeMix(z)    = (sigmoid(r) * WKV(w, u, k, v)) Wo^T,
#                                                        k, v, r from mixes of z and its token shift (tutorial 1)
#     x = x + ChannelMix(LN_ln2(x))     ChannelMix(z) = sigmoid(xr Wr^T) * (relu(xk Wk^T)^2 Wv^T)
#
# The model around the blocks: x = LN_ln0(emb[idx]) before block 0, logits = LN_ln_out(x) head^T after the last.

# %%
import os
import textwrap

import numpy as np

import minirwkv
from minirwkv import layers as ops
from minirwkv.backends.engine import make_engine
from minirwkv.rwkv4 import model
from minirwkv.testing import assert_close
from _common import Checks

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
checks = Checks("Tutorial 4: a block forward and backward; the model's gradient check")
np.set_printoptions(precision=4, suppress=True, linewidth=120)

# %% [markdown]
# A tiny model in float64 (the dtype of a check: rounding errors of 1e-16 leave finite differences accurate to
# ~1e-10). The parameters are a flat dict keyed by the official checkpoint names. The engine is "numpy": the
# reference element-wise layers and the NumPy recurrent WKV of `rwkv4/wkv.py` (the default "auto" would pick the
# Numba kernels, which compile on first use; the result is the same).

# %%
V, C, F, L = (11, 6, 12, 1) if QUICK else (13, 8, 16, 2)
B, T = (2, 4) if QUICK else (2, 8)
config = minirwkv.ModelConfig(vocab_size=V, n_embd=C, n_layer=L, dim_ffn=F)
engine = make_engine("numpy")
init = minirwkv.init_params(config, seed=0, dtype=np.float64)
for name in model.param_shapes(config):
    if name.startswith("blocks.0.") or not name.startswith("blocks."):
        print(f"{name:32s} {str(init[name].shape):10s}")

# %% [markdown]
# ## 1. Zero matrices at init, and why a gradient check there is meaningless
#
# The official RWKV-v4neo init (docs/rwkv4.md §5.2) sets five matrices per layer to exactly zero:
# att.key, att.receptance, att.output, ffn.value, ffn.receptance. The reason: with att.output = ffn.value = 0,
# every block adds exactly zero to the residual stream, so the freshly initialised network is
# emb -> ln0 -> ln_out -> head, a well-behaved bigram model, and the blocks grow in as training moves those
# matrices away from zero (the same idea as zero-initialising the last layer of each residual branch, as in
# Fixup or ReZero). Zero keys make every token's key equal, so the WKV starts as a pure decay-weighted average,
# and zero receptance makes every gate sigmoid(0) = 1/2.
#
# The price for us: the gradient flowing into a block passes through att.output (or ffn.value) first, and
# multiplying by a zero matrix gives zero. So at init almost every gradient inside a block is *exactly* 0:

# %%
rng = np.random.default_rng(0)
idx = rng.integers(0, V, (B, T))  # (B, T) token ids
targets = rng.integers(0, V, (B, T))  # (B, T) the tokens to predict
loss0, grads0 = minirwkv.loss_and_grads(init, idx, targets, impl="numpy")
zero = [k for k, g in grads0.items() if not g.any()]
print(f"loss at init {loss0:.4f} (ln V = {np.log(V):.4f}); {len(zero)} of {len(grads0)} gradients are exactly 0:")
for l in range(L):
    print(textwrap.fill(", ".join(k.split(".", 2)[2] for k in zero if k.startswith(f"blocks.{l}.")),
                        width=110, initial_indent=f"  blocks.{l}.*: ", subsequent_indent=" " * 16))
print("  non-zero:", ", ".join(k for k in grads0 if k not in zero))

# %% [markdown]
# A gradient check compares the hand-written gradient with finite differences. At init both sides are 0 for these
# tensors whatever the backward of the WKV, the mixes or the LayerNorms inside the blocks computes, so the check
# would pass with a broken backward. To see it, plant a bug (double the time_decay gradient of block 0, a
# classic chain-rule slip) and run the same directional check at init and at random weights.

# %%
def random_weights(params, seed, scale=0.3):
    """Init plus Gaussian noise on every tensor: no gradient is trivially zero any more."""
    r = np.random.default_rng(seed)
    return {k: p + r.normal(0.0, scale, p.shape) for k, p in params.items()}


def loss(params):
    return minirwkv.loss_and_grads(params, idx, targets, impl="numpy")[0]


def directional_fd(params, name, d, h=1e-5):
    """d/de loss(params with params[name] + e d) at e = 0, by central differences."""
    return (loss({**params, name: params[name] + h * d}) - loss({**params, name: params[name] - h * d})) / (2 * h)


def planted_bug_caught(params, name="blocks.0.att.time_decay"):
    _, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    buggy = 2 * grads[name]  # the planted bug
    d = np.random.default_rng(1).normal(size=params[name].shape)
    analytic, numeric = float((buggy * d).sum()), directional_fd(params, name, d)
    print(f"   analytic {analytic:+.6e}   finite diff {numeric:+.6e}")
    try:
        assert_close(analytic, numeric, np.float64, kind="finite_diff", what=name)
    except AssertionError:
        return True
    return False


print("at init:")
caught_at_init = planted_bug_caught(init)
rand = random_weights(init, seed=1)
print("at random weights:")
caught_at_random = planted_bug_caught(rand)
checks.true("planted bug in g(time_decay) invisible at init", not caught_at_init, "both sides exactly 0")
checks.true("planted bug caught with random weights", caught_at_random, "analytic != finite diff")

# %% [markdown]
# So every check below uses random, non-zero weights (`rand`).
#
# ## 2. One block, forward
#
# The block is a list of layer calls; each returns its output and a cache of what its backward needs. We run
# block 0 on a random residual stream x. `time_mixing_forward` also returns the RNN state after the last token
# (the last z and the WKV state (aa, bb, pp)); a training forward ignores it.

# %%
p = "blocks.0."
x_in = rng.normal(size=(B, T, C))  # (B, T, C) the residual stream entering the block


def block_forward(params, x):
    z, c_ln1 = ops.layernorm_forward(x, params[p + "ln1.weight"], params[p + "ln1.bias"])  # (B, T, C)
    att, c_att, _ = model.time_mixing_forward(params, p, z, None, None, engine)  # (B, T, C)
    x = x + att  # (B, T, C)
    z, c_ln2 = ops.layernorm_forward(x, params[p + "ln2.weight"], params[p + "ln2.bias"])  # (B, T, C)
    ffn, c_ffn, _ = model.channel_mixing_forward(params, p, z, None, engine.ops)  # (B, T, C)
    x = x + ffn  # (B, T, C)
    return x, (c_ln1, c_att, c_ln2, c_ffn)


x_out, block_cache = block_forward(rand, x_in)
print("x in ", x_in.shape, "-> x out", x_out.shape)
print("TimeMix k, v, r (inputs of the WKV):", [c.x.shape for c in block_cache[1][3:6]])
print("ChannelMix hidden relu(xk Wk^T)^2:", block_cache[3].relu_square.shape, "(B, T, F)")

# %% [markdown]
# ## 3. One block, backward: the forward read upwards
#
# Start from dL/dx_out and undo each line of `block_forward` from the bottom. The only subtlety is fan-out: x is
# used twice in each residual line (`x = x + ffn` uses x and ffn(LN(x))), so its gradient is the sum of both
# paths, each on its own line. Parameter gradients are written into a dict under the parameters' own names.

# %%
def block_backward(dx, cache):
    c_ln1, c_att, c_ln2, c_ffn = cache
    grads = {}
    dz = model.channel_mixing_backward(dx, c_ffn, p, grads, engine.ops)  # x = x + ffn: through ffn ...
    dz, grads[p + "ln2.weight"], grads[p + "ln2.bias"] = ops.layernorm_backward(dz, c_ln2)
    dx = dx + dz  # ... and straight through the residual
    dz = model.time_mixing_backward(dx, c_att, p, grads, engine.ops)  # x = x + att: through att ...
    dz, grads[p + "ln1.weight"], grads[p + "ln1.bias"] = ops.layernorm_backward(dz, c_ln1)
    dx = dx + dz  # ... and straight through the residual
    return dx, grads


G = rng.normal(size=(B, T, C))  # (B, T, C) dL/dx_out for the scalar L = sum(G * x_out)
dx_in, block_grads = block_backward(G, block_cache)
print("block parameter gradients:", sorted(k[len(p):] for k in block_grads))

# %% [markdown]
# Check it against finite differences of L = sum(G * block(x)): every entry of dx (B T C entries, two forwards
# each), and the parameters along random directions d: the directional derivative d/de L(params + e d) must equal
# sum over tensors of <grad, d> (the random-projection check of HIPS autograd's `check_vjp`). A gradient stored
# under the wrong name, or with the wrong sign, changes the sum.

# %%
def block_loss(params, x):
    return float((G * block_forward(params, x)[0]).sum())


h = 1e-6
dx_fd = np.zeros_like(x_in)
for i in np.ndindex(x_in.shape):
    e = np.zeros_like(x_in)
    e[i] = h
    dx_fd[i] = (block_loss(rand, x_in + e) - block_loss(rand, x_in - e)) / (2 * h)
checks.close("block: dx vs finite diff (every entry)", dx_in, dx_fd, kind="finite_diff")

n_directions = 2 if QUICK else 4
analytic, numeric = [], []
for j in range(n_directions):
    d = {k: np.random.default_rng(100 + j).normal(size=rand[k].shape) for k in block_grads}
    shifted = [{**rand, **{k: rand[k] + s * h * d[k] for k in d}} for s in (1, -1)]
    numeric.append((block_loss(shifted[0], x_in) - block_loss(shifted[1], x_in)) / (2 * h))
    analytic.append(sum(float((block_grads[k] * d[k]).sum()) for k in d))
checks.close(f"block: params along {n_directions} random directions", np.array(analytic), np.array(numeric),
             kind="finite_diff")

# %% [markdown]
# ## 4. The gradient check of the whole model
#
# `minirwkv.loss_and_grads` runs the same blocks inside the model (embedding, ln0, every block, ln_out, head,
# cross-entropy) and `model.model_backward` reads it upwards. Two checks, both with random weights:
#
# * all parameters at once along random directions (cheap: two losses per direction);
# * every tensor on its own along a random direction, so that a gradient filed under the wrong name (for instance
#   two layers swapped) cannot hide in a sum. Finite differences use h = 1e-5 on the mean cross-entropy.
#
# And the backend must not matter: the T x T "parallel" WKV gives the same gradients as the recurrent one.

# %%
loss_r, grads = minirwkv.loss_and_grads(rand, idx, targets, impl="numpy")
print(f"loss with random weights: {loss_r:.4f}")
checks.true("grads has exactly the parameters' keys and shapes",
            set(grads) == set(rand) and all(grads[k].shape == rand[k].shape for k in rand), f"{len(grads)} tensors")

h = 1e-5
analytic, numeric = [], []
for j in range(n_directions):
    d = {k: np.random.default_rng(200 + j).normal(size=v.shape) for k, v in rand.items()}
    numeric.append((loss({k: rand[k] + h * d[k] for k in rand}) - loss({k: rand[k] - h * d[k] for k in rand}))
                   / (2 * h))
    analytic.append(sum(float((grads[k] * d[k]).sum()) for k in rand))
checks.close(f"model: all params along {n_directions} random directions", np.array(analytic), np.array(numeric),
             kind="finite_diff")

for j, name in enumerate(rand):
    d = np.random.default_rng(300 + j).normal(size=rand[name].shape)
    checks.close(f"model: {name}", float((grads[name] * d).sum()), directional_fd(rand, name, d),
                 kind="finite_diff")

_, grads_parallel = minirwkv.loss_and_grads(rand, idx, targets, impl="parallel")
checks.close("model: every gradient, numpy vs parallel WKV", np.concatenate([grads[k].ravel() for k in rand]),
             np.concatenate([grads_parallel[k].ravel() for k in rand]))

# %% [markdown]
# ## Summary
#
# * A block is two residual sub-layers; its backward calls the layers' backwards in reverse order and adds the
#   residual path to each sub-layer's input gradient.
# * The official init zeroes att.output and ffn.value (and att.key, att.receptance, ffn.receptance) so blocks start
#   as the identity. That makes nearly every block gradient exactly 0 at init: check gradients at random weights.
# * Finite differences along random directions check all gradients at once; one direction per tensor checks that
#   each gradient is filed under the right name.
#
# Next (tutorials 5-9): the data and the optimizer, the training loop with checkpoints and exact resume, RNN mode,
# the CUDA kernel, property-based kernel testing.

# %%
checks.report()
