# %% [markdown]
# # Tutorial 7: RNN mode, generation and the state
#
# Tutorials 1-4 ran RWKV in "GPT mode": a whole sequence (B, T) at once, as in training. But everything a block
# takes from the past goes through two narrow doors:
#
# * the token shift: time mixing and channel mixing see the previous token's LayerNorm output (tutorial 1);
# * the WKV: the past enters only through the running sums a_t, b_t, kept as (aa, bb, pp) (tutorial 2).
#
# So the model can also run as an RNN, one token at a time, carrying a fixed-size state: per layer five (B, C)
# arrays, whatever the length of the text (the paper's "RNN mode", docs/rwkv4.md §4). That is how RWKV
# generates text: no attention over a growing cache, the same cost for token 10 as for token 10 000.
#
# This tutorial trains a tiny model for a few seconds so that its generations mean something, then shows:
#
# 1. the state: its named fields and shapes;
# 2. GPT mode == RNN mode: the parallel logits equal the RNN logits token by token;
# 3. prefill a prompt in parallel, then continue token by token: equal to one longer parallel run;
# 4. generation with the fast runner and the sampler;
# 5. saving the state after a prompt and reusing it for two continuations (the same seed gives the same text);
# 6. a picture of how the state evolves over a text.
#
# Code: minirwkv/rwkv4/rnn.py (the readable reference: `init_state`, `rnn_step`, `prefill`), minirwkv/engine/infer.py
# (the fast `RNNRunner`, `save_state`), minirwkv/engine/sampling.py, minirwkv/engine/generate.py. Design:
# docs/inference.md.

# %%
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import minirwkv
from minirwkv.backends.engine import make_engine
from minirwkv.config import TrainConfig
from minirwkv.engine.generate import generate_text
from minirwkv.engine.infer import RNNRunner, load_state, save_state
from minirwkv.rwkv4.state import LayerState
from minirwkv.engine.train import train
from minirwkv.tokenizers.core import ByteTokenizer
from _common import Checks, out_dir, pyplot

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
OUT = out_dir()
checks = Checks("Tutorial 7: RNN mode")
np.set_printoptions(precision=4, suppress=True, linewidth=120)

# %% [markdown]
# ## 0. A tiny model worth talking to
#
# A random model generates noise, which makes for dull examples. So we train one, for a few dozen steps, on a text
# made here: a few short sentences repeated. The tokenizer is the byte tokenizer (vocabulary 256, one token per
# byte of UTF-8: nothing to train or download). Each sentence pairs an animal with a rhyme ("cat ... mat",
# "dog ... log"), so to finish a sentence the model must remember its animal for a dozen tokens: in RNN mode, that
# memory can live nowhere but in the state.
#
# The training is the library's trainer, `minirwkv.engine.train.train(TrainConfig(...))` (tutorials 5 and 6), on
# that text saved as a file, in a fresh temporary out_dir. We work in float64 (`dtype="float64"`) so that the
# comparisons below can use the tight float64 tolerance. The engine is the NumPy reference ("numpy", which
# compiles nothing): the trainer makes it from the name, once, at the edge; below, we make the same engine with
# `make_engine("numpy")` and pass it to every call that runs the model in parallel.

# %%
tokenizer = ByteTokenizer()
sentences = ["the cat sat on the mat.", "the dog sat on the log.", "the hen sat on the pen.", "a fox ran to a box."]
text = " ".join(sentences[i % 4] for i in np.random.default_rng(0).permutation(200)) + " "
print(f"training text: {len(text)} bytes, starts {text[:72]!r}")

work = Path(tempfile.mkdtemp(prefix="07_rnn_mode_", dir=OUT))  # removed at the end of this cell
(work / "rhymes.txt").write_text(text)
steps = 30 if QUICK else 150
train_config = TrainConfig(data=str(work / "rhymes.txt"), tokenizer="byte", n_layer=2, n_embd=32, dtype="float64",
                           block_size=32, batch_size=8, max_iters=steps, warmup_iters=2, learning_rate=2e-2,
                           lr_final=2e-3, weight_decay=0.0, eval_interval=steps, eval_iters=2,
                           log_interval=max(steps // 5, 1), impl="numpy", plot=False, seed=1,
                           out_dir=str(work / "run"))
losses = []
start = time.perf_counter()
result = train(train_config, on_step=lambda step, loss: losses.append(loss))  # on_step: after every update
shutil.rmtree(work)
params = result.params  # {official name: float64 array}
config = minirwkv.config_from_params(params)
engine = make_engine("numpy")  # the engine of the calls below, chosen once here and passed down
print(config, f"({sum(p.size for p in params.values())} parameters)")
print(f"{result.step} steps in {time.perf_counter() - start:.1f} s; loss {losses[0]:.2f} -> "
      f"{np.mean(losses[-5:]):.2f} (ln 256 = {np.log(256):.2f} is a uniform guess)")
checks.true("the trainer ran every step, in float64", result.step == steps == len(losses)
            and all(p.dtype == np.float64 for p in params.values()), f"{result.step} steps")
checks.true("training lowered the loss", np.mean(losses[-5:]) < 0.5 * losses[0],
            f"{losses[0]:.2f} -> {np.mean(losses[-5:]):.2f}")

# %% [markdown]
# ## 1. The state
#
# `minirwkv.init_state(params, B)` is the state before the first token, for B sequences. It is a `State`: one
# `LayerState` per block, with five named (B, C) arrays (named, never indexed as `state[5*i+k]` as the official
# code does):
#
# | field | what it holds | zero state |
# |---|---|---|
# | `att_x`  | LN_ln1 output of the previous token: the token shift of time mixing | 0 (as the zero padding) |
# | `att_aa` | WKV numerator a_t, scaled: a = aa e^pp | 0 |
# | `att_bb` | WKV denominator b_t, scaled: b = bb e^pp | 0 |
# | `att_pp` | the log-scale pp (the running maximum of tutorial 2) | -1e38, a finite "log 0" |
# | `ffn_x`  | LN_ln2 output of the previous token: the token shift of channel mixing | 0 |

# %%
state0 = minirwkv.init_state(params, 2)
for i, layer in enumerate(state0.layers):
    for name, a in zip(LayerState._fields, layer):
        print(f"blocks.{i}.{name:7s} {str(a.shape):8s} {a.dtype}  first entries {a[0, :3]}")
n_state = sum(a[0].size for layer in state0.layers for a in layer)
print(f"\nper sequence: {n_state} numbers = 5 fields x {config.n_layer} layers x C = {config.n_embd}, for any length."
      f"\nA transformer's KV cache would hold 2 x L x C = {2 * config.n_layer * config.n_embd} numbers per token.")
checks.true("state: 5 named (B, C) fields per layer",
            all(a.shape == (2, config.n_embd) for layer in state0.layers for a in layer)
            and len(state0.layers) == config.n_layer and LayerState._fields[1:4] == ("att_aa", "att_bb", "att_pp"),
            f"{config.n_layer} layers x 5 x {(2, config.n_embd)}")

# %% [markdown]
# ## 2. GPT mode == RNN mode, token by token
#
# `minirwkv.forward(params, idx)` is GPT mode: logits (B, T, V) for the whole sequence at once, the token shift a
# zero-padded shift of a (B, T, C) array and the WKV over all T. `minirwkv.rnn_step(params, tokens, state)` is one
# token for each of B sequences: tokens (B,) in, logits (B, V) and the next state out. It is written independently
# of the GPT-mode code, on (B, C) vectors, and its WKV is `wkv.wkv_step`, the step of tutorial 2. If the state
# holds everything the model uses of the past, feeding the tokens one at a time must give the same logits at every
# position. (RWKV's `verify.py` prints this comparison; here it is a check.)

# %%
idx = tokenizer.encode("the dog sat on the log. the cat sat").astype(np.int64)[None, :].repeat(2, axis=0)
idx[1, :3] = tokenizer.encode("a f")  # a second sequence, different from the first
B2, T2 = idx.shape
logits_gpt = minirwkv.forward(params, idx, impl=engine)  # (B, T, V)

state = minirwkv.init_state(params, B2)
logits_rnn = np.empty_like(logits_gpt)  # (B, T, V)
for t in range(T2):
    logits_rnn[:, t], state = minirwkv.rnn_step(params, idx[:, t], state)
print(f"{T2} tokens, B = {B2}: max |GPT - RNN| over all logits = {np.abs(logits_gpt - logits_rnn).max():.2e}")
checks.close(f"GPT-mode logits vs RNN steps (T={T2})", logits_rnn, logits_gpt)

# %% [markdown]
# ## 3. Prefill in parallel, then continue token by token
#
# Generation starts with a prompt. Running it token by token would waste the parallel form: `minirwkv.prefill`
# runs the prompt in GPT mode and also returns the state after its last token (the WKV forward of every backend
# returns its final state, and the shift inputs are the last rows of the LayerNorm outputs). From there `rnn_step`
# continues. The logits of "prefill P tokens, then step the rest" must equal one parallel run over all tokens; and
# the state after the prompt must equal the state the RNN loop had at the same point.
#
# `prefill` also takes a state to start from, so a long prompt can be fed in chunks: the second chunk continues
# the first.

# %%
P = 12  # prompt length
logits_prompt, state_p = minirwkv.prefill(params, idx[:, :P], impl=engine)  # (B, P, V) and the state after it
rest = []
for t in range(P, T2):
    logits_t, state_p = minirwkv.rnn_step(params, idx[:, t], state_p)
    rest.append(logits_t)
logits_mixed = np.concatenate([logits_prompt, np.stack(rest, axis=1)], axis=1)  # (B, T, V)
checks.close(f"prefill {P} + {T2 - P} RNN steps vs one parallel run", logits_mixed, logits_gpt)

state_loop = minirwkv.init_state(params, B2)
for t in range(P):
    _, state_loop = minirwkv.rnn_step(params, idx[:, t], state_loop)
_, state_after_prompt = minirwkv.prefill(params, idx[:, :P], impl=engine)
flat_prefill, flat_loop = state_after_prompt.to_arrays(), state_loop.to_arrays()
checks.close("state after the prompt: prefill vs RNN loop (every field)",
             np.concatenate([flat_prefill[k].ravel() for k in flat_loop]),
             np.concatenate([flat_loop[k].ravel() for k in flat_loop]))

logits_c1, state_c = minirwkv.prefill(params, idx[:, :5], impl=engine)  # chunk 1: tokens 0..4
logits_c2, state_c = minirwkv.prefill(params, idx[:, 5:P], state=state_c, impl=engine)  # chunk 2 continues it
checks.close("prefill in 2 chunks vs in one", np.concatenate([logits_c1, logits_c2], axis=1), logits_prompt)

# %% [markdown]
# ## 4. Generation
#
# To generate, repeat: pick a token from the last logits, feed it to the RNN, get new logits. The picking is
# `minirwkv.sampling.sample` (temperature, top-k, top-p, penalties, in ChatRWKV's order; temperature 0 is greedy).
# `rnn_step` is the readable reference; `minirwkv.infer.RNNRunner` computes the same function fast (weights
# prepared once, buffers allocated once, the element-wise work fused in Numba) and `generate` / `generate_text`
# drive it: prefill the prompts, then step all sequences together. First, the runner agrees with the reference:

# %%
runner = RNNRunner(params, batch_size=B2)
runner_logits = np.stack([runner.step(idx[:, t]) for t in range(T2)], axis=1)  # (B, T, V)
checks.close("RNNRunner.step vs rnn_step, every token", runner_logits, logits_rnn)

# %% [markdown]
# Now let it talk. Greedy decoding (temperature 0) from the start of each sentence, then sampling at temperature
# 0.8 with a fixed seed. After the full 150 training steps the model finishes each animal's sentence with its
# rhyme ("the dog" ... "log"): the animal was read a dozen bytes earlier and survives only in the state. The 30
# steps of the quick run (MINIRWKV_QUICK=1) are too few: it has learned the words and the sentence frame, and
# mixes up the rhymes.

# %%
prompts = ["the cat", "the dog", "the hen", "a fox"]
greedy = generate_text(params, tokenizer, prompts, max_new_tokens=24, temperature=0)
for p, g in zip(prompts, greedy):
    print(f"greedy   {p!r:10} -> {p + g!r}")
sampled = generate_text(params, tokenizer, prompts, max_new_tokens=24, temperature=0.8, seed=0)
for p, g in zip(prompts, sampled):
    print(f"T = 0.8  {p!r:10} -> {p + g!r}")
rhymes = {"cat": "mat", "dog": "log", "hen": "pen", "fox": "box"}
n_right = sum(rhymes[p.split()[1]] in g.split(".")[0] for p, g in zip(prompts, greedy))
print(f"{n_right} of 4 greedy sentences end with their animal's rhyme")

# %% [markdown]
# ## 5. Save the state after a prompt, continue it twice
#
# The state after a prompt is everything the model knows about it. Save it (with the logits of the last token,
# from which the first new token is drawn) and any number of continuations can start from it without reading the
# prompt again: a system prompt, a long document. `save_state` writes an .npz of plain arrays; `load_state` reads
# it back without pickle. With an empty prompt, `generate` continues from the given state and logits.
#
# Three facts to check: the same seed gives the same text; the restored state gives exactly what running the
# prompt in one go gives; and a batch of two continuations of one saved state (the state broadcast to two rows)
# gives two different texts, each repeatable.

# %%
prompt = "the dog sat on the log. the"
runner = RNNRunner(params, batch_size=1)
last_logits = runner.prefill([tokenizer.encode(prompt)])  # (1, V)
path = OUT / "07_prompt_state.npz"
save_state(path, runner.get_state(), last_logits)
saved_state, saved_logits = load_state(path)
print(f"saved {path.name}: {path.stat().st_size} bytes, fields {list(saved_state.to_arrays())[:5]} ...")


def continue_saved(seed, n_rows=1):
    return generate_text(params, tokenizer, [""] * n_rows, max_new_tokens=30, temperature=0.8, seed=seed,
                         state=saved_state, logits=saved_logits)


first = continue_saved(seed=1)[0]
again = continue_saved(seed=1)[0]
in_one_go = generate_text(params, tokenizer, prompt, max_new_tokens=30, temperature=0.8, seed=1)[0]
two = continue_saved(seed=2, n_rows=2)
two_again = continue_saved(seed=2, n_rows=2)
print(f"seed 1:              {prompt}|{first!r}")
print(f"seed 1 again:        {prompt}|{again!r}")
print(f"prompt in one go:    {prompt}|{in_one_go!r}")
for i, t in enumerate(two):
    print(f"seed 2, batch row {i}: {prompt}|{t!r}")
checks.true("saved state, same seed: identical text", first == again, f"{len(first)} characters")
checks.true("saved state == whole prompt (same seed)", first == in_one_go, "seed 1")
checks.true("two continuations of one state: differ, repeat", two[0] != two[1] and two == two_again,
            "seed 2, batch of 2")
checks.exact("state after save/load is bitwise the runner's",
             np.concatenate([a.ravel() for a in saved_state.to_arrays().values()]),
             np.concatenate([a.ravel() for a in runner.get_state().to_arrays().values()]))

# %% [markdown]
# ## 6. How the state evolves over a text
#
# What does the WKV state hold? a_t / b_t = aa / bb is a weighted average of the values v_i of all past tokens
# (weights e^{(t-1-i) w + k_i}, tutorial 2): the channel's memory, before the current token adds its bonus. The
# decay w of the channel sets how long that memory is. pp is the log of the largest weight, and moves with the
# keys. We run `rnn_step` over a text, record layer 0's aa / bb and pp after every token, and plot four channels,
# from the slowest decay to the fastest. The slow channels change little from token to token (a long average);
# the fast ones follow the last token or two.

# %%
story = "the cat sat on the mat. the dog sat on the log. a fox ran to a box. the hen sat on the pen."
if QUICK:
    story = story[:48]
ids = tokenizer.encode(story).astype(np.int64)  # (T,)
decay = np.exp(-np.exp(params["blocks.0.att.time_decay"]))  # (C,) the factor e^w per step
order = np.argsort(decay)[::-1]  # slowest decay (longest memory) first
channels = order[[0, len(order) // 3, 2 * len(order) // 3, -1]]
state = minirwkv.init_state(params, 1)
ratio, pp = [], []
for t in range(len(ids)):
    _, state = minirwkv.rnn_step(params, ids[t:t + 1], state)
    layer0 = state.layers[0]
    ratio.append(layer0.att_aa[0, channels] / layer0.att_bb[0, channels])  # (4,)
    pp.append(layer0.att_pp[0, channels])  # (4,)
ratio, pp = np.array(ratio), np.array(pp)  # (T, 4)
for j, c in enumerate(channels):
    print(f"channel {c:2d}: decay e^w = {decay[c]:.4f}  aa/bb over the first 8 tokens {ratio[:8, j]}")

# the state after the text, by steps and by prefill (the parallel form computes a_T and b_T directly)
_, state_par = minirwkv.prefill(params, ids[None, :], impl=engine)
checks.close("after the text: aa/bb of layer 0, steps vs prefill",
             state.layers[0].att_aa / state.layers[0].att_bb, state_par.layers[0].att_aa / state_par.layers[0].att_bb)
steps_a = np.abs(np.diff(ratio, axis=0)).mean(axis=0)  # (4,) mean change per token
print("mean |change| of aa/bb per token, slowest to fastest channel:", steps_a)

plt = pyplot()
if plt is not None:
    fig, axes = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    for j, c in enumerate(channels):
        axes[0].plot(ratio[:, j], marker=".", label=f"channel {c}, e^w = {decay[c]:.3f}")
        axes[1].plot(pp[:, j], marker=".")
    axes[0].set_ylabel("aa / bb (memory)")
    axes[1].set_ylabel("pp (log-scale)")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].set_xticks(range(len(ids)))
    axes[1].set_xticklabels([ch if ch != " " else "_" for ch in story], fontsize=7)
    axes[1].set_xlabel("token (after reading it)")
    fig.suptitle("Layer 0 WKV state over a text, four channels from the slowest decay to the fastest")
    fig.tight_layout()
    fig.savefig(OUT / "07_state_over_text.png", dpi=100)
    plt.close(fig)
    print("saved", OUT / "07_state_over_text.png")

# %% [markdown]
# ## Summary
#
# * RWKV-4 reads the past only through the token shift and the WKV sums, so its whole memory is a fixed state:
#   five (B, C) arrays per layer (`att_x, att_aa, att_bb, att_pp, ffn_x`).
# * GPT mode and RNN mode compute the same function: the logits agree token by token, and a prompt prefilled in
#   parallel (in one piece or in chunks) continues exactly like one processed token by token.
# * Generation is prefill, then sample / step / sample. A state saved after a prompt replaces the prompt: the same
#   seed gives the same text as processing the prompt again.
#
# Next: tutorial 8, the CUDA kernel that runs the WKV of training on a GPU.

# %%
checks.report()
