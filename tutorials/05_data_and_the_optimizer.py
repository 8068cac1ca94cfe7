# %% [markdown]
# # Tutorial 5: the data and the optimizer
#
# Tutorial 4 ended with a gradient we can trust: `minirwkv.loss_and_grads(params, idx, targets)` returns the mean
# cross-entropy of predicting each next token and, for every parameter, its derivative. Training is what we do
# with it, step after step:
#
#     for step in range(max_iters):
#         lr          = schedule(step)                     # warmup, then decay
#         x, y        = batch(seed, step)                  # (B, T) token ids, y is x shifted by one
#         loss, grads = loss_and_grads(params, x, y)       # forward and backward (tutorials 1-4)
#         grads       = clip(grads)                        # global norm <= 1
#         params      = adamw(params, grads, lr)           # one step downhill, per-parameter scale
#
# This tutorial is about what goes into that loop: the data it reads and the optimizer that moves the weights.
# Tutorial 6 is the loop itself (the trainer, its loss curve, checkpoints and exact resume).
#
# 1. the data: Python's own standard library as text, one token per byte, and two reference losses;
# 2. batches that are a pure function of (seed, step);
# 3. AdamW with RWKV's official per-parameter multipliers, and the learning-rate schedule;
# 4. one training step written out by hand, checked bit for bit against the trainer's first steps.
#
# Code: minirwkv/engine/data.py, minirwkv/engine/optim.py, and the loop in minirwkv/engine/train.py. Design and
# measured figures: docs/training.md.

# %%
import dataclasses
import os
import shutil
import time

import numpy as np

import minirwkv
from minirwkv.backends.engine import make_engine
from minirwkv.config import TrainConfig
from minirwkv.engine import optim
from minirwkv.engine.data import format_stats, get_batch, load_dataset
from minirwkv.engine.train import to_numpy, train
from _common import Checks, out_dir, pyplot

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
OUT = out_dir()
RUNS = OUT / "05_runs"  # the trainer's folders (checkpoints, log.jsonl); emptied at every run of this tutorial
shutil.rmtree(RUNS, ignore_errors=True)
checks = Checks("Tutorial 5: the data and the optimizer")
np.set_printoptions(precision=4, suppress=True, linewidth=120)
t_tutorial = time.perf_counter()

# %% [markdown]
# ## 0. The run's configuration
#
# Everything a run needs is one frozen dataclass, `TrainConfig` (minirwkv/config.py); `minirwkv train --key=value`
# overrides its fields from the command line. The full-size configuration is the default run of `minirwkv train`
# (4 layers, n_embd = 128, about 0.9 M parameters, 12 sequences of 128 bytes per step) cut to 500 steps, the run
# tutorial 6 trains. The quick one (MINIRWKV_QUICK=1, what CI runs) is a 2-layer model of width 32 for 40 steps, at
# a higher learning rate so that it gets somewhere in that time.
#
# `impl` names the engine that computes: "auto" is the Numba engine on a CPU, the fastest at the full size, but
# it compiles the first time it runs (about 20 s, then cached on disk). The quick run names "numpy", the NumPy
# reference, which compiles nothing and, at width 32, is no slower. The name is read once, at the edge: the trainer
# turns it into an `Engine` with `make_engine(impl, device)` and passes that object down (section 4 does the same).

# %%
if QUICK:
    config = TrainConfig(n_layer=2, n_embd=32, block_size=64, batch_size=8, max_iters=40, warmup_iters=5,
                         learning_rate=5e-3, lr_final=5e-4, eval_interval=10, eval_iters=4, log_interval=2,
                         impl="numpy", plot=False)
else:
    config = TrainConfig(max_iters=500, eval_interval=50, log_interval=10, plot=False)
for field in ("data", "tokenizer", "n_layer", "n_embd", "block_size", "batch_size", "max_iters", "learning_rate",
              "lr_final", "lr_decay", "warmup_iters", "weight_decay", "grad_clip", "seed", "impl"):
    print(f"{field:14s} {getattr(config, field)!r}")

# %% [markdown]
# ## 1. The data
#
# The default corpus, `data = "stdlib"`, is text that every Python installation already carries: the source of
# the standard library's top-level modules, in alphabetical order, about 2 MB. Nothing to download, and a model
# of it can be judged by eye: it should learn to write something that looks like Python.
#
# The tokenizer is the byte tokenizer: a token is one byte of the UTF-8 text, so the vocabulary is 256, nothing
# needs training, and any text can be encoded. `load_dataset` reads the corpus, encodes it, and splits off its
# last 10% as the validation split (`minirwkv prepare` does the same once and saves the token files, as nanoGPT's
# prepare.py does).

# %%
data = load_dataset(config.data, config.tokenizer, config.val_fraction)
tokenizer = data.tokenizer
print(format_stats(data.stats))
example = "def f(x):\n    return x"
ids = tokenizer.encode(example)
print(f"\n{example!r} -> {ids.tolist()}\n  decoded back: {tokenizer.decode(ids)!r}")
print(f"\nthe train split begins: {tokenizer.decode(data.train[:90])!r}")

# %% [markdown]
# Two numbers to measure the loss against (cross-entropy in nats per token, the natural log):
#
# * ln 256 = 5.55: a model that guesses uniformly over the 256 bytes. A freshly initialised RWKV-4 scores close
#   to it: the official init keeps its logits small (the head at half gain), so every byte starts near 1/256.
# * the unigram entropy of the corpus: a model that knows how often each byte occurs but nothing about order
#   (spaces and `e` are common, `\x07` is not). A loss below it means the model uses the context.

# %%
counts = np.bincount(data.train, minlength=256).astype(np.float64)  # (256,) occurrences of each byte
freq = counts[counts > 0] / counts.sum()
unigram = float(-(freq * np.log(freq)).sum())
print(f"uniform guess: ln 256 = {np.log(256):.3f} nats per byte; unigram entropy of the train split: "
      f"{unigram:.3f} nats per byte ({int((counts > 0).sum())} distinct bytes)")

# %% [markdown]
# ## 2. Batches from (seed, step)
#
# A batch is `batch_size` windows of `block_size + 1` consecutive tokens at random offsets: the inputs x are the
# first block_size tokens of each window and the targets y the last block_size, so y[b, t] is the token that
# follows x[b, t]. The offsets come from `np.random.default_rng([seed, 0, step])`: batch number `step` is a pure
# function of the two numbers, with no random generator carried from one step to the next. That is what will make
# a resumed run replay exactly the batches of an uninterrupted one (tutorial 6). Validation draws from stream 1,
# `default_rng([seed, 1, i])` for i < eval_iters: the same batches at every evaluation, so successive val losses
# measure the model, not the luck of the draw.

# %%
x, y = get_batch(data.train, config.block_size, config.batch_size, config.seed, step=0)  # (B, T) each
x_again, _ = get_batch(data.train, config.block_size, config.batch_size, config.seed, step=0)
x_next, _ = get_batch(data.train, config.block_size, config.batch_size, config.seed, step=1)
print(f"x {x.shape} {x.dtype}, y {y.shape}")
print(f"x[0, :40] as text: {tokenizer.decode(x[0, :40])!r}")
print(f"y[0, :40] as text: {tokenizer.decode(y[0, :40])!r}")
checks.exact("batch (seed, step=0) drawn twice", x_again, x)
checks.exact("targets are the inputs shifted by one", y[:, :-1], x[:, 1:])
checks.true("batch of step 1 differs from step 0", not np.array_equal(x_next, x), "another (seed, step)")

# %% [markdown]
# ## 3. AdamW, RWKV's multipliers, and the schedule
#
# The optimizer is AdamW (Loshchilov & Hutter), as RWKV-LM trains RWKV-4 (`RWKV-v4neo`, DeepSpeed's FusedAdam with
# betas (0.9, 0.99)). For a parameter p with gradient g, at update t = 1, 2, ...:
#
#     p <- p (1 - lr_i wd)                          weight decay: matrices only, decoupled from the gradient
#     m <- b1 m + (1 - b1) g                         running mean of the gradient
#     v <- b2 v + (1 - b2) g^2                       running mean of its square
#     p <- p - lr_i (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
#
# The divisions by 1 - b^t undo the bias of m and v towards their zero start. The step size is per parameter:
# lr_i = lr x the official multiplier (`my_lr_scale` in v4neo's `configure_optimizers`): the decay speeds
# time_decay learn 2x faster and the bonus time_first 3x; everything else 1x. Weight decay applies to the
# parameters whose shape, with the 1s squeezed out, has two dimensions or more: the matrices, embedding and head
# included; not the LayerNorms, not the mixes time_mix_* (shape (1, 1, C)), not time_decay and time_first.

# %%
model_config = config.model_config(tokenizer.vocab_size)
params0 = minirwkv.init_params(model_config, config.seed, np.dtype(config.dtype))
print(f"{sum(p.size for p in params0.values()):,} parameters; the optimizer's view of block 0 and the rest:")
print(f"{'parameter':32s} {'shape':14s} lr x  weight decay")
for name, p in params0.items():
    if name.startswith("blocks.") and not name.startswith("blocks.0."):
        continue
    print(f"{name:32s} {str(p.shape):14s} {optim.lr_multiplier(name):<5} {optim.decays(name, p.shape)}")

# %% [markdown]
# The learning rate also changes with the step (`optim.learning_rate`). First a warmup: v4neo's form starts at a
# fifth of the peak and climbs linearly to it over `warmup_iters` steps, so the first updates, computed from
# moments that have seen a single gradient, stay small. Then a cosine decay from `learning_rate` to `lr_final` at
# the last step (v4neo's exponential decay is `lr_decay = "exponential"`).

# %%
def lr_at(step, cfg=config):
    """The learning rate the trainer uses at update ``step`` of a run configured by ``cfg``."""
    return optim.learning_rate(step, cfg.learning_rate, cfg.lr_final, cfg.warmup_iters, cfg.max_iters,
                               cfg.lr_decay, cfg.warmup)


lr_curve = np.array([lr_at(s) for s in range(config.max_iters)])  # (max_iters,)
shown = sorted({0, config.warmup_iters // 2, config.warmup_iters, *range(0, config.max_iters,
                                                                         max(config.max_iters // 8, 1)),
                config.max_iters - 1})
for s in shown:
    print(f"step {s:4d}  lr {lr_curve[s]:.2e}  {'#' * int(round(40 * lr_curve[s] / config.learning_rate))}")

# %% [markdown]
# ## 4. One training step, written out
#
# Here is one update of the loop in minirwkv/engine/train.py, from the library's pieces: the learning rate of the step,
# the batch of the step, the loss and every gradient (`minirwkv.loss_and_grads`, with `l2wrap`, RWKV-LM's small
# extra gradient that keeps the logits near zero, docs/rwkv4.md §2.7), clipping of the global gradient norm to 1
# (torch's `clip_grad_norm_` rule, what v4neo gets from Lightning's `gradient_clip_val`), and AdamW. The update is
# functional: `adamw_step` returns new dicts and leaves its inputs as they were.
#
# Which code computes is an `Engine` (minirwkv/backends/engine.py), chosen once at the edge and passed down:
# `make_engine(config.impl, config.device)` is what the trainer calls, once, before its loop. The engine carries
# the WKV, the element-wise forward/backward pairs, and `adamw_update`: a fused in-place AdamW (one Numba loop per
# parameter, the same arithmetic) or None. Nothing in the step looks at the name again; we pass the engine to
# `loss_and_grads`, and ask AdamW for the fused form exactly when the engine offers one, as the trainer does. The
# trainer also limits the BLAS library to one thread (faster for matrices this small); we do the same, so that
# both compute every product in the same order.

# %%
engine = make_engine(config.impl, config.device)  # once, at the edge; "auto" resolved to a concrete engine
print(f"engine {engine.name} on {engine.device}: element-wise ops replaced by kernels: {list(engine.ops.overridden)}; "
      f"fused AdamW: {engine.adamw_update is not None}")


def train_step(params, opt, step, cfg, tokens):
    """One update of ``minirwkv.engine.train.train``: -> (params, opt state, loss, clipped grads, grad norm, lr)."""
    lr = lr_at(step, cfg)
    x, y = get_batch(tokens, cfg.block_size, cfg.batch_size, cfg.seed, step)  # (B, T) inputs and targets
    loss, grads = minirwkv.loss_and_grads(params, x, y, impl=engine, l2wrap=cfg.l2wrap)
    grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)  # norm: before clipping
    params, opt = optim.adamw_step(params, grads, opt, lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay,
                                   fused=engine.adamw_update is not None)
    return params, opt, loss, grads, norm, lr


opt0 = optim.adamw_init(params0)  # m = v = 0, step = 0
params1, opt1, loss0, grads0, norm0, lr0 = train_step(params0, opt0, 0, config, data.train)
print(f"step 0: engine {engine.name}, loss {loss0:.4f} (ln 256 = {np.log(256):.4f}), gradient norm {norm0:.3f} "
      f"(clipped to {config.grad_clip}), lr {lr0:.2e}")

# %% [markdown]
# What does AdamW's first update do? With m = v = 0 before it, m / (1 - b1) = g and sqrt(v / (1 - b2)) = |g|,
# so the step is lr_i x g / (|g| + eps): every parameter moves by lr_i against the sign of its gradient, however
# large or small the gradient. To see the multipliers alone, give `adamw_step` a gradient of ones (no weight
# decay, float64 so that rounding stays out of the way): each parameter moves by exactly lr x its multiplier.

# %%
params0_64 = {k: p.astype(np.float64) for k, p in params0.items()}
ones = {k: np.ones_like(p) for k, p in params0_64.items()}
probe, _ = optim.adamw_step(params0_64, ones, optim.adamw_init(params0_64), lr0, (config.beta1, config.beta2),
                            config.eps, weight_decay=0.0)
names = list(params0)
probe_steps = np.concatenate([((params0_64[k] - probe[k]) / lr0).ravel() for k in names])  # change / lr
expected_steps = np.concatenate([np.full(params0[k].size, optim.lr_multiplier(k) / (1 + config.eps)) for k in names])
for name in ("blocks.0.att.time_decay", "blocks.0.att.time_first", "blocks.0.att.time_mix_k", "head.weight"):
    print(f"gradient of ones: {name:26s} moves by {((params0_64[name] - probe[name]) / lr0).ravel()[0]:.6f} x lr")
checks.close("first step with g = 1: change / lr == lr multiplier", probe_steps, expected_steps)

# %% [markdown]
# Now the real step 0. The largest change of each parameter is lr (a little more for the matrices, which also
# shrink by the factor 1 - lr wd). But look which parameters moved: only those the official init lets the
# gradient reach. att.output and ffn.value start at zero (tutorial 4), so each block adds nothing to the residual
# stream and no gradient flows into anything before them: time_decay, time_first, the mixes, the other matrices
# all get exactly zero. The step makes those two matrices nonzero, and the blocks wake up.

# %%
def moved(name, before, after, lr):
    """(fraction of entries that changed, max |change| / lr) of one parameter."""
    change = np.abs(after[name].astype(np.float64) - before[name])
    return float((change > 0).mean()), float(change.max()) / lr


SHOWN = ("blocks.0.att.time_decay", "blocks.0.att.time_first", "blocks.0.att.time_mix_v", "blocks.0.ln1.weight",
         "blocks.0.att.key.weight", "blocks.0.att.output.weight", "blocks.0.ffn.value.weight", "emb.weight",
         "head.weight")
print(f"step 0, lr = {lr0:.2e}\n{'parameter':28s} lr x  moved   max |change| / lr")
for name in SHOWN:
    frac, ratio = moved(name, params0, params1, lr0)
    print(f"{name:28s} {optim.lr_multiplier(name):<4} {100 * frac:4.0f}%   {ratio:.4f}")
frac_head, ratio_head = moved("head.weight", params0, params1, lr0)
checks.true("step 0: every entry of head moved by ~lr", frac_head == 1.0 and abs(ratio_head - 1) < 1e-2,
            f"max |change| / lr = {ratio_head:.4f}")
checks.true("step 0: time_decay and time_first did not move",
            moved("blocks.0.att.time_decay", params0, params1, lr0)[0] == 0
            and moved("blocks.0.att.time_first", params0, params1, lr0)[0] == 0, "zero gradient at init")

# %% [markdown]
# The second update (step 1) reaches the rest of the block, with two exceptions. time_mix_k stays put: its
# gradient passes through att.key, which was still zero during this step. And the channels of time_decay with the
# fastest decay may not move: their gradients are tiny (~1e-13 here: a key from far back decays by e^w per step),
# and Adam's eps = 1e-8 in the denominator shrinks their step below float32's resolution.

# %%
params2, opt2, loss1, grads1, norm1, lr1 = train_step(params1, opt1, 1, config, data.train)
print(f"step 1, lr = {lr1:.2e}\n{'parameter':28s} moved")
for name in SHOWN[:5] + ("blocks.0.att.time_mix_k",):
    print(f"{name:28s} {100 * moved(name, params1, params2, lr1)[0]:4.0f}%")

# %% [markdown]
# The same second update in float64, from the formula of section 3 (m and v carried over from step 0), for three
# parameters with different multipliers and decay, compared with `adamw_step`'s float32 result. We compare the
# change in p: its float32 rounding is relative to |p|, so the tolerance is scaled by max |p|.

# %%
b1, b2, t = config.beta1, config.beta2, 2
for name in ("blocks.0.att.time_first", "blocks.0.att.time_decay", "blocks.0.att.value.weight"):
    p, g = params1[name].astype(np.float64), grads1[name].astype(np.float64)
    lr_i = lr1 * optim.lr_multiplier(name)
    if optim.decays(name, p.shape):
        p = p * (1 - lr_i * config.weight_decay)
    m = b1 * opt1.m[name] + (1 - b1) * g
    v = b2 * opt1.v[name] + (1 - b2) * g * g
    p_new = p - lr_i * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + config.eps)
    checks.close(f"AdamW formula vs adamw_step, step 1: {name.split('.')[-1]}", params2[name] - params1[name],
                 p_new - params1[name], np.float32, scale=np.abs(params1[name]).max())

# %% [markdown]
# Now the trainer, from the same configuration, for one update and then for two: `minirwkv.engine.train.train(config)`
# builds the same initial parameters from the seed, draws the same batches and takes the same steps. Every
# parameter must be bitwise equal to ours: not approximately, since both ran the same arithmetic in the same order.

# %%
for n_steps, ours in ((1, params1), (2, params2)):
    # a run of n_steps: both steps lie in the warmup, whose learning rate does not depend on max_iters
    # a fresh out_dir per run: the trainer refuses a folder that already holds a run (unless resume/overwrite)
    short = dataclasses.replace(config, max_iters=n_steps, eval_iters=1, out_dir=str(RUNS / f"{n_steps}_step"))
    short_result = train(short, echo=lambda line: print("  [trainer]", line))
    checks.exact(f"hand-written loop == trainer, after {n_steps} step{'s' * (n_steps > 1)} (all params)",
                 np.concatenate([to_numpy(short_result.params)[k].ravel() for k in ours]),
                 np.concatenate([ours[k].ravel() for k in ours]))
    checks.true(f"the trainer ran on the engine we made ({n_steps} step{'s' * (n_steps > 1)})",
                short_result.backend == engine.name, f"{short_result.backend}")

# %% [markdown]
# The schedule as a picture: the warmup from a fifth of the peak, then the cosine down to `lr_final`.

# %%
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(lr_curve, label="optim.learning_rate(step)")
    ax.axvline(config.warmup_iters, color="gray", ls=":", label=f"end of warmup (step {config.warmup_iters})")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "05_lr_schedule.png", dpi=100)
    plt.close(fig)
    print("saved", OUT / "05_lr_schedule.png")
print(f"\nthe whole tutorial ran in {time.perf_counter() - t_tutorial:.0f} s")

# %% [markdown]
# ## Summary
#
# * The data is a function of the configuration: the stdlib corpus as bytes, split 90/10, and batch number `step`
#   a pure function of (seed, step), with validation on fixed batches of its own stream.
# * AdamW's first step moves every parameter that has a gradient by lr_i, with RWKV-4's official multipliers:
#   time_decay 2x, time_first 3x. At the official init only the parameters after the zero matrices have one; the
#   blocks join in from the second step. Weight decay touches the matrices only. The learning rate warms up from a
#   fifth of its peak, then decays.
# * The engine is chosen once at the edge (`make_engine`) and passed down; one step written out from the library's
#   pieces is bitwise the trainer's step.
#
# Next: tutorial 6, the training loop itself: the loss curve, a sample, checkpoints and exact resume.

# %%
checks.report()
