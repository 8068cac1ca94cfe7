# %% [markdown]
# # Tutorial 9: property-based kernel testing: plant a bug, watch hypothesis find it and shrink it
#
# A kernel is tested by comparing it with a reference on some inputs. Which inputs? Hand-picked ones test what its
# author thought of; random ones (k ~ N(0, 1), say) test the typical case, many times over. The bugs that survive
# both live at the edges: one huge key, a sequence of length 1, a channel that decays in one step, a branch
# taken only when the new key is the largest so far.
#
# Property-based testing (the `hypothesis` library) states a property that must hold for *every* input ("the
# kernel agrees with the reference to the dtype's tolerance"), draws inputs from a strategy that is told to
# favour the edges, and, when the property fails, *shrinks* the failing input: it tries smaller and simpler
# variants (shorter T, fewer channels, rounder numbers) as long as they still fail, and reports the simplest one.
# A 40-token, 12-channel failure becomes "T = 1, one channel, one key of -100", which says what is wrong.
#
# We write a small WKV kernel here, in NumPy, shaped like wkv4.cu (a loop over time, every (b, c) "thread" at
# once), plant two bugs that typical tests miss, and let hypothesis find them. The strategy is
# `minirwkv.testing.wkv_inputs`, the one the test suite uses, and the tolerance is `assert_close` with the
# suite's table: the same rule as CI.

# %%
import os

import numpy as np
from hypothesis import HealthCheck, find, given, settings
from hypothesis.errors import NoSuchExample

from minirwkv.rwkv4 import wkv
from minirwkv.testing import assert_close, make_wkv_inputs, wkv_inputs
from _common import Checks

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
checks = Checks("Tutorial 9: property-based kernel testing")
np.set_printoptions(precision=4, suppress=False, linewidth=120)

MAX_EXAMPLES = 60 if QUICK else 300
MAX_T = 16 if QUICK else 48
# derandomize: the same examples on every run, so CI is deterministic; database=None: no memory of past failures
# (a saved failure would be replayed first and make the search look easier than it is).
SEARCH = settings(derandomize=True, database=None, max_examples=MAX_EXAMPLES, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# %% [markdown]
# ## 1. The kernel, and the property it must have
#
# The stable recurrence of tutorial 2, written as a kernel would be: one loop over t; each "thread" (b, c) is a
# lane of the (B, C) arrays. One difference from `wkv.wkv_step`: the state update computes ONE exponential instead
# of two. Of e^{(pp + w) - q} and e^{k - q} with q = max(pp + w, k), one is e^0 = 1, so only the other needs an exp
# (the fused inference kernel in backends/numba_infer.py does the same). Which one depends on which side is
# larger: a branch, here a `np.where`.

# %%
def wkv_kernel(w, u, k, v):
    """WKV forward from the zero state: w, u (C,); k, v (B, T, C) -> y (B, T, C), in the dtype of k."""
    B, T, C = k.shape
    aa = np.zeros((B, C), k.dtype)  # (B, C)
    bb = np.zeros((B, C), k.dtype)  # (B, C)
    pp = np.full((B, C), wkv.MIN_VALUE, k.dtype)  # (B, C) log(0)
    y = np.empty_like(k)  # (B, T, C)
    for t in range(T):
        kk, vv = k[:, t], v[:, t]  # (B, C)
        ww = u + kk  # output: the current token with its bonus
        q = np.maximum(pp, ww)
        e1, e2 = np.exp(pp - q), np.exp(ww - q)
        y[:, t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
        ww = pp + w  # update: the past decays once, then the current token joins it
        past_wins = ww >= kk
        e = np.exp(-np.abs(ww - kk))  # the smaller of the two weights, relative to the larger (<= 1)
        aa = np.where(past_wins, aa + e * vv, e * aa + vv)
        bb = np.where(past_wins, bb + e, e * bb + 1)
        pp = np.maximum(ww, kk)
    return y


# %% [markdown]
# The property: for every input the strategy can draw, the kernel agrees with the reference within the "same"
# tolerance of its dtype. The reference is the parallel (T x T softmax) form `wkv.wkv_parallel_forward`, in the
# same dtype: derived independently of any recurrence, so the two cannot share a mistake.
#
# `wkv_inputs(dtype)` draws B in 1..3, T in 1..max_T, C in 1..16, decays theta in [-8, 4], bonuses u in [-5, 5],
# keys of a scale from {0, 1, 3, 20, 100}, and then overwrites up to three keys with "ugly" values (anything in
# [-100, 100], or exactly -100, 100, 0, 88.75), and one channel's theta and u with values from the ends of
# their ranges. Values are drawn at the dtype's width, so float32 examples are exact float32 numbers.

# %%
def kernel_matches_reference(kernel, x, dtype):
    """The property, as an assertion (assert_close raises AssertionError, non-finite results included)."""
    x = x.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a buggy kernel may overflow: we check
        y = kernel(x.w.astype(dtype), x.time_first, x.k, x.v)
    y_ref, _, _ = wkv.wkv_parallel_forward(x.w.astype(dtype), x.time_first, x.k, x.v)
    assert_close(y, y_ref, dtype, kind="same", what="y")


def fails(kernel, x, dtype):
    try:
        kernel_matches_reference(kernel, x, dtype)
    except AssertionError:
        return True
    return False


def describe(x):
    """A falsifying example in a few lines."""
    B, T, C = x.k.shape
    lines = [f"B={B}, T={T}, C={C}", f"time_decay (theta) = {x.time_decay}   (w = -exp(theta) = {x.w})",
             f"time_first (u)     = {x.time_first}"]
    for b in range(B):
        lines.append(f"k[{b}] = {x.k[b].tolist()}")
        lines.append(f"v[{b}] = {x.v[b].tolist()}")
    return "\n".join("    " + line for line in lines)


# %% [markdown]
# Before any bug, the kernel as written must pass. A `@given` test runs the property on MAX_EXAMPLES drawn inputs
# (derandomized: the same ones every run).

# %%
def hunt(kernel, dtype):
    """Run the property as a @given test. -> (the shrunk falsifying example or None, the error message)."""
    tried = []

    @SEARCH
    @given(x=wkv_inputs(dtype, max_T=MAX_T))
    def test_kernel_matches_reference(x):
        tried.append(x)
        kernel_matches_reference(kernel, x, dtype)

    try:
        test_kernel_matches_reference()
    except AssertionError as e:
        # after shrinking, hypothesis runs the minimal failing example once more: it is the last one tried
        return tried[-1], str(e).splitlines()[0], len(tried)
    return None, "", len(tried)


found, _, n_tried = hunt(wkv_kernel, np.float32)
print(f"the kernel as written, float32: {n_tried} examples, falsifying example: {found}")
checks.true("correct kernel passes the property (float32)", found is None, f"{n_tried} examples")
found, _, n_tried = hunt(wkv_kernel, np.float64)
checks.true("correct kernel passes the property (float64)", found is None, f"{n_tried} examples")

# %% [markdown]
# ## 2. Bug 1: no max-subtraction
#
# Someone "simplifies" the kernel back to the naive recurrence of running sums (tutorial 2, section 2): no pp, no
# max, just a = e^w a + e^k v. It is shorter, and it is right in exact arithmetic. In float32 it is right only
# while e^{u+k} and e^k stay in float32's normal range, e^-87.3 to e^88.7. Above, exp overflows to inf and
# y = inf / inf = NaN. Below, exp falls into the denormal numbers, which keep fewer and fewer significant bits
# (none below e^-103.3, where it is 0 and y = 0 / 0).
#
# First the kind of test that is usually written: random inputs of a realistic size, 20 seeds. They all pass.

# %%
def wkv_kernel_naive(w, u, k, v):
    """BUG: the running sums a, b stored as they are. Correct in exact arithmetic; overflows float32 exp."""
    B, T, C = k.shape
    a = np.zeros((B, C), k.dtype)  # (B, C)
    b = np.zeros((B, C), k.dtype)  # (B, C)
    y = np.empty_like(k)  # (B, T, C)
    for t in range(T):
        bonus = np.exp(u + k[:, t])  # (B, C) e^{u + k_t}: inf when u + k_t > 88.7
        y[:, t] = (a + bonus * v[:, t]) / (b + bonus)
        a = np.exp(w) * a + np.exp(k[:, t]) * v[:, t]
        b = np.exp(w) * b + np.exp(k[:, t])
    return y


typical = [make_wkv_inputs(2, 32, 8, seed=s, k_scale=3.0, theta=(-5.0, 3.0)) for s in range(20)]
n_caught = sum(fails(wkv_kernel_naive, x, np.float32) for x in typical)
print(f"typical random tests (k ~ N(0, 9), B=2, T=32, C=8): {20 - n_caught} of 20 pass the naive kernel")
checks.true("bug 1 slips through 20 typical random tests", n_caught == 0, f"{n_caught} of 20 caught it")

# %% [markdown]
# Now hypothesis. `hypothesis.find(strategy, condition)` is the search without the test around it: it returns the
# simplest input it can find for which the condition holds, here "the kernel fails the property". (A `@given`
# test does the same search and raises with the example; section 3 uses that form.)

# %%
try:
    shrunk = find(wkv_inputs(np.float32, max_T=MAX_T), lambda x: fails(wkv_kernel_naive, x, np.float32),
                  settings=SEARCH)
except NoSuchExample:
    shrunk = None
checks.true("bug 1 found by hypothesis", shrunk is not None, "find() returned a failure")
if shrunk is not None:
    print("hypothesis's minimal falsifying example for the naive kernel:")
    print(describe(shrunk))
    x32 = shrunk.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        y_bad = wkv_kernel_naive(x32.w, x32.time_first, x32.k, x32.v)
        exponent = (x32.time_first + x32.k).ravel()[np.argmax(np.abs(x32.time_first + x32.k))]  # the worst u + k
        bonus = np.exp(exponent)  # float32
    y_ref, _, _ = wkv.wkv_parallel_forward(x32.w, x32.time_first, x32.k, x32.v)
    print(f"    naive kernel y = {y_bad.ravel()}, reference y = {y_ref.ravel()}")
    tiny = np.finfo(np.float32).tiny  # the smallest normal float32, 1.2e-38 = e^-87.3
    kind = ("overflows to inf" if np.isinf(bonus) else f"is {bonus:.3g}, a denormal (below {tiny:.3g}) with "
            f"about {int(np.log2(bonus / np.float32(1e-45))) + 1} significant bits of float32's 24"
            if 0 < bonus < tiny else f"is {bonus:.3g}")
    print(f"    e^(u + k) = e^{exponent:g} in float32 {kind}")
    checks.true("bug 1 shrunk to T <= 3, B = C = 1",
                shrunk.k.shape[1] <= 3 and shrunk.k.shape[0] == shrunk.k.shape[2] == 1, f"(B, T, C) = {shrunk.k.shape}")
    checks.true("bug 1 example: u + k outside exp's normal range", not -87.3 < exponent < 88.7,
                f"u + k = {exponent:g}")

# %% [markdown]
# Read the example: a single token (T = 1), a single channel, and one key of extreme size; every other value has
# shrunk to something plain (zeros, the first seed), which says it does not matter. Hypothesis prefers simple
# numbers, so the key is an end of its range or a hand-placed value, not -97.31843. That is the whole diagnosis:
# the kernel exponentiates a raw key. (Which end it reports, the overflow at +88.7 or the loss of precision below
# -87.3, depends on the order of the search; both are the same missing max-subtraction.) The 20 passing tests above
# said nothing.
#
# ## 3. Bug 2: the decay forgotten on one branch
#
# Back to the one-exp kernel. Its update has two branches, and this time the bug is in one of them: when the new
# key wins (k_t > pp + w), the old state must be scaled by e^{(pp + w) - k_t}; the buggy line writes
# e^{pp - k_t}, forgetting the decay w. A one-character slip, in a branch that is taken only when a key is larger
# than the decayed past. It needs a past to decay (a token before), a key that wins the max after it, and then a
# token that reads the wrongly decayed state: at least three tokens.

# %%
def wkv_kernel_forgot_decay(w, u, k, v):
    """The one-exp kernel of section 1 with a planted bug in the branch where the current key wins."""
    B, T, C = k.shape
    aa = np.zeros((B, C), k.dtype)  # (B, C)
    bb = np.zeros((B, C), k.dtype)  # (B, C)
    pp = np.full((B, C), wkv.MIN_VALUE, k.dtype)  # (B, C)
    y = np.empty_like(k)  # (B, T, C)
    for t in range(T):
        kk, vv = k[:, t], v[:, t]
        ww = u + kk
        q = np.maximum(pp, ww)
        e1, e2 = np.exp(pp - q), np.exp(ww - q)
        y[:, t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
        ww = pp + w
        past_wins = ww >= kk
        e = np.exp(-np.abs(ww - kk))
        e_old = np.exp(np.minimum(pp - kk, 0))  # BUG: pp - kk, should be ww - kk (= pp + w - kk)
        aa = np.where(past_wins, aa + e * vv, e_old * aa + vv)
        bb = np.where(past_wins, bb + e, e_old * bb + 1)
        pp = np.maximum(ww, kk)
    return y


n_caught = sum(fails(wkv_kernel_forgot_decay, x, np.float64) for x in typical)
print(f"typical random tests: {n_caught} of 20 catch bug 2")

# %% [markdown]
# This one the typical tests do catch (with k ~ N(0, 9), keys often beat the decayed past). But what did they
# catch? A failing (2, 32, 8) example is 512 keys and 512 values to stare at. Hypothesis, as a `@given` test that
# fails, shrinks it first:

# %%
shrunk2, message, n_tried = hunt(wkv_kernel_forgot_decay, np.float64)
print(f"@given test failed; after {n_tried} runs (search and shrinking) the minimal example is:")
print(describe(shrunk2))
print(f"    and the assertion: {message}")
checks.true("bug 2 found by the @given test", shrunk2 is not None, "AssertionError" if message else "not found")
checks.true("bug 2 shrunk to T <= 3, B = C = 1",
            shrunk2 is not None and shrunk2.k.shape[1] <= 3 and shrunk2.k.shape[0] == shrunk2.k.shape[2] == 1,
            f"(B, T, C) = {None if shrunk2 is None else shrunk2.k.shape}")

# %% [markdown]
# Three tokens, one channel: exactly the minimum the analysis above predicted. The third output is wrong because
# the second token's key won the max and the first token's weight was not decayed. Had we not known where the bug
# was, "T = 3, one channel, and only y_2 differs" points straight at the state update of the step before.

# %%
if shrunk2 is not None:
    x64 = shrunk2.astype(np.float64)
    y_bug = wkv_kernel_forgot_decay(x64.w, x64.time_first, x64.k, x64.v)
    y_ref, _, _ = wkv.wkv_parallel_forward(x64.w, x64.time_first, x64.k, x64.v)
    print("    y (buggy)    :", y_bug.ravel())
    print("    y (reference):", y_ref.ravel())
    print("    differs at t =", np.nonzero(~np.isclose(y_bug.ravel(), y_ref.ravel(), rtol=1e-10, atol=0))[0])

# %% [markdown]
# ## 4. Fixed, and tested on the examples hypothesis found
#
# The fix for bug 2 is the one character; the fix for bug 1 is the max-subtraction, i.e. the kernel of section 1.
# The correct kernel passed the whole search in section 1; it also passes the two shrunk examples, which belong in
# the test suite as explicit `@example`s (decorators on the `@given` test), so that they run on every CI run
# whatever the search draws. minirwkv's tests do that with T = 1 and |k| of about 100 for every backend.

# %%
for name, x, dtype in [("bug 1's example (float32)", shrunk, np.float32), ("bug 2's example (float64)", shrunk2,
                                                                             np.float64)]:
    if x is None:
        continue
    xx = x.astype(dtype)
    y_fixed = wkv_kernel(xx.w, xx.time_first, xx.k, xx.v)
    y_ref, _, _ = wkv.wkv_parallel_forward(xx.w, xx.time_first, xx.k, xx.v)
    checks.close(f"fixed kernel on {name}", y_fixed, y_ref, dtype)

# %% [markdown]
# ## Summary
#
# * State the property for every input (here: agrees with an independent reference, in its dtype's tolerance),
#   and let a strategy that favours the edges draw the inputs: T = 1, extreme keys, decays at the ends of their
#   range.
# * Shrinking turns a failure into a diagnosis: "T = 1 and one extreme key" for a missing max-subtraction,
#   "T = 3, one channel, only y_2 wrong" for a state update that goes wrong one step after a key wins.
# * Make it deterministic in CI (`derandomize=True`, `database=None`, a fixed `max_examples`; the suite's
#   profiles are in tests/conftest.py), and pin what it found with `@example`.
#
# This is how minirwkv's kernel tests are written: tests/test_wkv.py and tests/test_wkv_kernels.py
# (one property, every backend).

# %%
checks.report()
