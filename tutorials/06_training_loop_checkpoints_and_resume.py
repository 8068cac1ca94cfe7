# %% [markdown]
# # Tutorial 6: the training loop, checkpoints and exact resume
#
# Tutorial 5 built one step of training from the library's pieces (the batch of (seed, step), `loss_and_grads`,
# clipping, AdamW with RWKV's multipliers and its schedule) and showed it equal, bit for bit, to the trainer's.
# Here is the trainer itself, `minirwkv.engine.train.train(config)`: those steps repeated, plus the bookkeeping
# that makes a run useful and safe to interrupt:
#
# 1. a short run, and its loss curve against two reference losses;
# 2. a sample of text from the trained model;
# 3. checkpoints, written atomically: a failed or interrupted write never leaves a torn file;
# 4. stop, resume, and end bit-identical to a run that was never interrupted.
#
# Code: minirwkv/engine/train.py (the loop, top to bottom), minirwkv/io/checkpoint.py, minirwkv/io/atomic.py.
# Design and measured figures: docs/training.md. The command-line version of all this is `minirwkv train`.

# %%
import dataclasses
import hashlib
import os
import shutil
import time

import numpy as np

import minirwkv
from minirwkv.backends.engine import make_engine
from minirwkv.config import TrainConfig
from minirwkv.engine import optim
from minirwkv.engine.data import get_batch, load_dataset
from minirwkv.engine.generate import generate_text, load_model
from minirwkv.engine.train import LAST, to_numpy, train
from minirwkv.io.atomic import atomic_write
from minirwkv.io.checkpoint import load_checkpoint
from minirwkv.tools.plot import read_log
from _common import Checks, out_dir, pyplot

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
OUT = out_dir()
RUNS = OUT / "06_runs"  # the trainer's folders (checkpoints, log.jsonl); emptied at every run of this tutorial
shutil.rmtree(RUNS, ignore_errors=True)
checks = Checks("Tutorial 6: the training loop, checkpoints and exact resume")
np.set_printoptions(precision=4, suppress=True, linewidth=120)
t_tutorial = time.perf_counter()


def run_dir(name):
    """A fresh folder for one run: the trainer refuses an out_dir that already holds a run (unless resume)."""
    path = RUNS / name
    assert not path.exists(), path
    return str(path)


# %% [markdown]
# ## 0. The configuration, the data, and the step of tutorial 5
#
# The same `TrainConfig` as tutorial 5: at full size the default run of `minirwkv train` cut to 500 steps (about a
# minute on a laptop), in CI (MINIRWKV_QUICK=1) a 2-layer model of width 32 for 40 steps. The engine is named once
# here (`impl`); the trainer turns the name into an `Engine` at the edge and passes it down. We also need the
# data (for the unigram entropy, a reference loss) and, for section 4, the step of tutorial 5 written out.

# %%
if QUICK:
    config = TrainConfig(n_layer=2, n_embd=32, block_size=64, batch_size=8, max_iters=40, warmup_iters=5,
                         learning_rate=5e-3, lr_final=5e-4, eval_interval=10, eval_iters=4, log_interval=2,
                         impl="numpy", plot=False, out_dir=run_dir("main"))
    LOSS_TARGET = 3.0  # measured: 2.69 after 40 steps
else:
    config = TrainConfig(max_iters=500, eval_interval=50, log_interval=10, plot=False, out_dir=run_dir("main"))
    LOSS_TARGET = 1.9  # measured: 1.62 after 500 steps
for field in ("data", "tokenizer", "n_layer", "n_embd", "block_size", "batch_size", "max_iters", "learning_rate",
              "lr_final", "lr_decay", "warmup_iters", "weight_decay", "grad_clip", "seed", "impl"):
    print(f"{field:14s} {getattr(config, field)!r}")
data = load_dataset(config.data, config.tokenizer, config.val_fraction)
counts = np.bincount(data.train, minlength=256).astype(np.float64)  # (256,) occurrences of each byte
freq = counts[counts > 0] / counts.sum()
unigram = float(-(freq * np.log(freq)).sum())  # a model that knows byte frequencies but not their order
print(f"uniform guess ln 256 = {np.log(256):.3f}, unigram entropy {unigram:.3f} nats per byte; this run must reach "
      f"a val loss below {LOSS_TARGET}")
engine = make_engine(config.impl, config.device)  # what the trainer makes from config.impl, once


def lr_at(step, cfg=config):
    """The learning rate the trainer uses at update ``step`` of a run configured by ``cfg``."""
    return optim.learning_rate(step, cfg.learning_rate, cfg.lr_final, cfg.warmup_iters, cfg.max_iters,
                               cfg.lr_decay, cfg.warmup)


def train_step(params, opt, step, cfg, tokens):
    """One update of the trainer, as tutorial 5 wrote it out: -> (params, opt state)."""
    x, y = get_batch(tokens, cfg.block_size, cfg.batch_size, cfg.seed, step)  # (B, T) inputs and targets
    loss, grads = minirwkv.loss_and_grads(params, x, y, impl=engine, l2wrap=cfg.l2wrap)
    grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
    return optim.adamw_step(params, grads, opt, lr_at(step, cfg), (cfg.beta1, cfg.beta2), cfg.eps,
                            cfg.weight_decay, fused=engine.adamw_update is not None)


lr_curve = np.array([lr_at(s) for s in range(config.max_iters)])  # (max_iters,)

# %% [markdown]
# ## 1. The trainer: a short run
#
# `train(config)` runs the loop for `max_iters` steps. Every `eval_interval` steps (and at the end) it measures
# the val loss on the fixed validation batches and saves `last.ckpt` (weights, AdamW moments, step, configs,
# tokenizer) and `best.ckpt` when the val loss improved. Every `log_interval` steps it prints the mean train loss
# of the window, the learning rate and the speed, and appends the same numbers to `log.jsonl`, from which we draw
# the loss curve. (`minirwkv train` is this call plus a sample at the end; `minirwkv plot OUT_DIR` draws the same
# curve against steps and seconds.)

# %%
t0 = time.perf_counter()
result = train(config)
train_seconds = time.perf_counter() - t0
records = read_log(RUNS / "main" / "log.jsonl")
train_log = [r for r in records if r["kind"] == "train"]
val_log = [r for r in records if r["kind"] == "eval"]
print(f"\n{result.step} steps in {train_seconds:.1f} s; val loss {val_log[0]['val_loss']:.3f} -> {result.val_loss:.3f}")
print(f"{'step':>6} {'val loss':>9}")
for r in val_log:
    print(f"{r['step']:6d} {r['val_loss']:9.3f}")
checks.true(f"val loss fell below {LOSS_TARGET}", result.val_loss < LOSS_TARGET,
            f"{val_log[0]['val_loss']:.2f} -> {result.val_loss:.3f}")
checks.true("val loss below the unigram entropy", result.val_loss < unigram, f"{unigram:.2f} nats/byte")

# %% [markdown]
# The curve. The train loss (the mean over each logging window, so each point averages several batches) falls
# fast in the first steps: learning which bytes are common takes it from ln 256 to the unigram entropy. Below
# that line the model is using the context: indentation, keywords, names seen earlier in the window. The val
# loss is measured on the last modules of the alphabet, which the model never trains on. It sits above the train
# loss because those modules are different code, not because the model memorised its training text: 500 steps of
# 12 x 128 bytes see under half of the 1.7 M training bytes once.

# %%
plt = pyplot()
if plt is not None:
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], label="train (window mean)")
    ax_loss.plot([r["step"] for r in val_log], [r["val_loss"] for r in val_log], "o-", label="val")
    ax_loss.axhline(np.log(256), color="gray", ls=":", label="uniform, ln 256")
    ax_loss.axhline(unigram, color="gray", ls="--", label="unigram entropy")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats per byte)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(lr_curve, label="learning_rate(step)")
    ax_lr.plot([r["step"] - 1 for r in train_log], [r["lr"] for r in train_log], ".", label="logged by the trainer")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend()
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"RWKV-4, {config.n_layer} layers x {config.n_embd}, byte-level, {config.data} corpus")
    fig.tight_layout()
    fig.savefig(OUT / "06_loss_curve.png", dpi=100)
    plt.close(fig)
    print("saved", OUT / "06_loss_curve.png")

# %% [markdown]
# ## 2. A sample
#
# `best.ckpt` holds everything needed to use the model: `load_model` (what `minirwkv sample --checkpoint` calls)
# returns its weights and rebuilds its tokenizer from the spec stored with them. `generate_text` runs the model in
# RNN mode (tutorial 7): it reads the prompt, then draws one byte at a time at temperature 0.8 with a fixed seed.
# After the full run the text has Python's shape (indentation, `def`, docstrings, comments, `self._name`); the
# quick run's 40 steps give spaces, line breaks and fragments of keywords, not yet code. A byte model can also draw
# half of a multi-byte character; decoding shows it as U+FFFD rather than failing.

# %%
sample_params, sample_tokenizer = load_model(RUNS / "main" / "best.ckpt")
prompt = "def "
sample = prompt + generate_text(sample_params, sample_tokenizer, prompt, max_new_tokens=120 if QUICK else 400,
                                temperature=0.8, seed=0)[0]
print(sample)
readable = sum(c.isprintable() and c.isascii() or c in "\n\t" for c in sample) / len(sample)
print(f"\n{100 * readable:.0f}% of the characters are printable ASCII, newlines or tabs")
checks.true("the sample decodes to text", isinstance(sample, str) and len(sample) > len(prompt) and readable > 0.9,
            f"{len(sample)} chars, {100 * readable:.0f}% printable")

# %% [markdown]
# ## 3. Checkpoints, written atomically
#
# The run's folder now holds `last.ckpt` and `best.ckpt` (weights, AdamW moments, step, the configs, the
# tokenizer's spec, the engine's name, the corpus's sha256), `log.jsonl` and `run_config.json`. A checkpoint is
# rewritten at every evaluation, and a write can fail half-way: a full disk, a Ctrl-C, a crash. Overwriting the
# file in place would then leave a torn checkpoint and lose the run. So every file is written atomically
# (`minirwkv.io.atomic.atomic_write`): into a temporary file in the same folder, flushed and fsynced, then moved
# over the old one with `os.replace`, which readers see as all or nothing. On any failure, KeyboardInterrupt
# included, the temporary file is removed and the old file is untouched.
#
# Three facts to check: the folder holds no temporary file after the run; a write interrupted half-way leaves
# the previous checkpoint byte for byte as it was; and a torn file (what a plain in-place write would leave) is
# refused by `load_checkpoint` with an error rather than read as a model.

# %%
main_dir = RUNS / "main"
print("the run's folder:", sorted(f.name for f in main_dir.iterdir()))
checks.true("after the run: checkpoints and log, no temporary files",
            {"last.ckpt", "best.ckpt", "log.jsonl"} <= {f.name for f in main_dir.iterdir()}
            and not any(f.name.endswith(".tmp") for f in main_dir.iterdir()), "last, best, log.jsonl")

demo = RUNS / "atomic_demo"
demo.mkdir()
target = demo / LAST
shutil.copyfile(main_dir / LAST, target)
digest_before = hashlib.sha256(target.read_bytes()).hexdigest()
try:
    with atomic_write(target) as f:
        f.write(b"the first half of a new checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write
except KeyboardInterrupt:
    print("interrupted while writing", target.name)
checks.true("an interrupted write leaves the old checkpoint intact",
            hashlib.sha256(target.read_bytes()).hexdigest() == digest_before
            and sorted(f.name for f in demo.iterdir()) == [LAST], "same sha256, no .tmp left")
intact = load_checkpoint(target)
checks.exact("the checkpoint still loads, weights as saved",
             np.concatenate([intact.params[k].ravel() for k in sorted(intact.params)]),
             np.concatenate([to_numpy(result.params)[k].ravel() for k in sorted(intact.params)]))

whole = (main_dir / LAST).read_bytes()
torn = demo / "torn.ckpt"
torn.write_bytes(whole[: len(whole) // 2])  # what an in-place write cut off half-way would leave
try:
    load_checkpoint(torn)
    torn_error = None
except ValueError as e:
    torn_error = str(e)
print(f"a torn checkpoint: {torn_error}")
checks.true("a torn checkpoint is refused, not read", torn_error is not None, "ValueError")

# %% [markdown]
# ## 4. Stop, resume, and end where an uninterrupted run ends
#
# A long run gets interrupted: a laptop lid, a Ctrl-C. The trainer catches Ctrl-C (Python's KeyboardInterrupt),
# saves `last.ckpt` at the last completed step and returns; `resume=True` (`minirwkv train --resume`) loads it and
# carries on. Resuming is exact, not approximately right, when three things are restored: the weights, the AdamW
# moments m and v with the step counter (the learning rate and the bias corrections depend on it), and the
# batches, which need nothing saved since they are a function of (seed, step).
#
# We check it with a small model, so that it takes seconds: run A trains 24 steps without a break; run B is
# stopped after step 13 by a callback that raises KeyboardInterrupt, exactly as Ctrl-C would, and is resumed to
# step 24. The two must end with bitwise equal weights and moments.

# %%
small = dataclasses.replace(config, n_layer=2, n_embd=32, block_size=32, batch_size=4, max_iters=24,
                            warmup_iters=4, eval_interval=8, eval_iters=2, log_interval=8)
STOP = 13


def ctrl_c_at(step_to_stop):
    def on_step(step, loss):  # called by the trainer after every update
        if step == step_to_stop:
            raise KeyboardInterrupt
    return on_step


def quiet(line):
    pass


run_a = train(dataclasses.replace(small, out_dir=run_dir("a_whole")), echo=quiet)
run_b1 = train(dataclasses.replace(small, out_dir=str(RUNS / "b_stopped")), on_step=ctrl_c_at(STOP), echo=quiet)
stopped_at = load_checkpoint(RUNS / "b_stopped" / LAST)  # what the interruption left on disk
run_b2 = train(dataclasses.replace(small, out_dir=str(RUNS / "b_stopped"), resume=True), echo=print)
print(f"run A: {run_a.step} steps; run B: stopped at step {run_b1.step} (interrupted: {run_b1.interrupted}), "
      f"resumed to step {run_b2.step}")

ckpt_a, ckpt_b = load_checkpoint(RUNS / "a_whole" / LAST), load_checkpoint(RUNS / "b_stopped" / LAST)
names = sorted(ckpt_a.params)
checks.true("Ctrl-C saved last.ckpt at the step it stopped", run_b1.interrupted and stopped_at.meta["step"] == STOP,
            f"step {stopped_at.meta['step']}")
checks.exact("resumed run == uninterrupted run: params",
             np.concatenate([to_numpy(run_b2.params)[k].ravel() for k in names]),
             np.concatenate([to_numpy(run_a.params)[k].ravel() for k in names]))
checks.exact("resumed run == uninterrupted run: AdamW m and v",
             np.concatenate([ckpt_b.arrays[g][k].ravel() for g in ("adam_m", "adam_v") for k in names]),
             np.concatenate([ckpt_a.arrays[g][k].ravel() for g in ("adam_m", "adam_v") for k in names]))

# %% [markdown]
# Why save the moments at all? Resume by hand from the same checkpoint, with the step of tutorial 5, but with fresh
# moments, as a restart that kept only the weights would: m = v = 0 and AdamW's update counter t back at 1 (the
# learning rate still follows the step). The run ends somewhere else. With the saved moments, the same hand loop
# lands bitwise where the trainer landed.

# %%
saved_params = {k: a.astype(np.dtype(small.dtype)) for k, a in stopped_at.params.items()}
saved_opt = optim.state_from_arrays(stopped_at.arrays, stopped_at.meta["step"], saved_params)
p_saved, opt_saved = saved_params, saved_opt
p_fresh, opt_fresh = saved_params, optim.adamw_init(saved_params)
for step in range(STOP, small.max_iters):
    p_saved, opt_saved = train_step(p_saved, opt_saved, step, small, data.train)
    p_fresh, opt_fresh = train_step(p_fresh, opt_fresh, step, small, data.train)
end_a = np.concatenate([to_numpy(run_a.params)[k].ravel() for k in names])
end_fresh = np.concatenate([p_fresh[k].ravel() for k in names])
print(f"resumed with fresh moments: max |difference| from run A = {np.abs(end_fresh - end_a).max():.2e}")
checks.exact("hand loop from last.ckpt (saved moments) == run A", np.concatenate([p_saved[k].ravel() for k in names]),
             end_a)
checks.true("resume with fresh moments does not reach run A", not np.array_equal(end_fresh, end_a),
            f"max diff {np.abs(end_fresh - end_a).max():.1e}")
print(f"\nthe whole tutorial ran in {time.perf_counter() - t_tutorial:.0f} s")


# %% [markdown]
# ## Summary
#
# * The trainer is the step of tutorial 5 repeated, plus evaluation on fixed batches, logs and checkpoints. The
#   model learns the byte frequencies first (the unigram entropy), then the context; its samples come from
#   `best.ckpt`.
# * Every checkpoint is written atomically: a temporary file, fsync, `os.replace`. An interrupted write leaves the
#   previous checkpoint as it was; a torn file is refused when loaded.
# * A batch is a function of (seed, step) and the checkpoint holds the AdamW moments and step, so a stopped and
#   resumed run ends bitwise where an uninterrupted one does; restarting the moments from zero does not.
#
# Next: tutorial 7, RNN mode, the way the trained model generates text.

# %%
checks.report()
