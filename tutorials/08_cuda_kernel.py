# %% [markdown]
# # Tutorial 8: the CUDA kernel, read, run on the CPU through a shim, and on a GPU
#
# Training runs the WKV over (B, T, C) arrays, and the NumPy reference of tutorial 2 is a Python loop over T.
# On a GPU, minirwkv runs the same recurrence as a CUDA kernel, `kernels/wkv4.cu`. This tutorial:
#
# 1. reads the kernel: how threads are laid out, and why its loop is the recurrence of `wkv.wkv_step` with the
#    same variable names;
# 2. runs that very source on the CPU: a small header (`kernels/cuda_shim.h`) makes it ordinary C++, and the
#    `cuda-shim` backend compiles it with g++ and calls it from Python; we check it against the NumPy reference
#    (outputs, the carried state, the gradients);
# 3. shows what such a shim cannot catch, with a race you can watch in plain Python;
# 4. runs it on a GPU through CuPy, if this machine has one (otherwise it says so and skips that part).
#
# The kernels ship inside the package (the `kernels/` folder is the package `minirwkv.kernels`), so we read them
# with `importlib.resources`, as the backends do. Design notes: docs/kernels.md; the version ladder:
# kernels/README.md.

# %%
import inspect
import os
import re
from importlib.resources import files

import numpy as np

from minirwkv.rwkv4 import wkv
from minirwkv.backends import get_wkv
from minirwkv.testing import init_like_wkv_inputs, make_wkv_inputs
from _common import Checks

QUICK = os.environ.get("MINIRWKV_QUICK") == "1"  # CI runs every tutorial at a reduced size
checks = Checks("Tutorial 8: the CUDA kernel")
np.set_printoptions(precision=4, suppress=True, linewidth=120)

KERNELS = files("minirwkv.kernels")
source = KERNELS.joinpath("wkv4.cu").read_text()
print(f"kernels/wkv4.cu: {len(source.splitlines())} lines; kernels: "
      f"{[line.split('(')[0].split()[-1] for line in source.splitlines() if line.startswith('__global__')]}")


def show(text, first, last, title):
    """Print the lines of ``text`` from the first one containing ``first`` to the next one containing ``last``."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if first in line)
    j = next(n for n in range(i, len(lines)) if last in lines[n])
    print(f"--- {title} (lines {i + 1}-{j + 1}) ---")
    for n in range(i, j + 1):
        print(f"{n + 1:4d}  {lines[n]}")


# %% [markdown]
# ## 1. Reading the kernel
#
# ### One thread per (batch, channel)
#
# The WKV is sequential in time but independent across the B batch elements and the C channels. So the kernel
# launches B*C threads, and each walks t = 0..T-1 for its own (b, c), keeping aa, bb, pp in registers. A thread
# finds its (b, c) from its position in the grid: `blockIdx.x` (which block), `blockDim.x` (threads per block, 32
# here) and `threadIdx.x` (which thread in the block). The grid is rounded up to whole blocks, so the last block
# may stick out past B*C: those threads must return at once, before they read or write anything.
#
# Element (b, t, c) of a C-contiguous (B, T, C) array sits at b*T*C + t*C + c. Neighbouring threads have
# neighbouring c, so at each t the 32 threads of a block (one warp) read 32 consecutive floats: one coalesced
# memory access instead of 32.

# %%
show(source, "__global__ void wkv_forward", "const long long offset", "wkv_forward: which (b, c) am I?")

# %% [markdown]
# ### The loop is wkv_step
#
# Inside, the loop over t is the stable recurrence of tutorial 2, line for line: the output with the bonus u, then
# the state update in which the past decays once. Every exp argument is <= 0 (q is the larger of the two
# exponents), so nothing overflows, in float32 or float64. Compare with `minirwkv.wkv.wkv_step`, the function
# that the NumPy reference and RNN mode call: the same names `ww, q, e1, e2, aa, bb, pp`, in the same order
# (`wkv_step` returns q as the new pp where the kernel writes `pp = q`). The kernel is a template over the float
# type F, so one text serves float and double; `exp` resolves to the float or double overload.

# %%
show(source, "for (int t = 0; t < T; t++) {", "state_pp[idx] = pp;", "wkv_forward: the loop over time")
print()
step_source = inspect.getsource(wkv.wkv_step)
print("--- minirwkv/wkv.py: wkv_step, the same recurrence on (B, C) arrays ---")
print(step_source.split('"""')[-1].strip("\n"))
forward_text = source[source.index("__global__ void wkv_forward"):source.index("__global__ void wkv_backward")]
names = ["ww", "q", "e1", "e2", "aa", "bb", "pp"]
in_both = [n for n in names if re.search(rf"\b{n}\b", forward_text) and re.search(rf"\b{n}\b", step_source)]
checks.true("kernel loop and wkv_step share the names", in_both == names, " ".join(in_both))

# %% [markdown]
# ### The backward and the batch sum
#
# The backward is the two-sweep algorithm of tutorial 3: sweep 1 runs forward in time, recomputes the state and
# accumulates the gradients of w and u; sweep 2 runs backward in time for those of k and v. It is longer but has
# the same shape. Its one subtlety for a GPU is at the end: w and u are shared by the whole batch, so their
# gradients are sums over b, i.e. B threads contribute to one number. `out[c] += partial` from B threads at once
# would be a race (section 3 shows one). Instead each thread *assigns* its partial to its own element of a (B, C)
# buffer, and a second, tiny kernel with one thread per channel adds the B partials in a fixed order. Every
# output has exactly one writer: no race, no atomics, the same bits on every run.

# %%
show(source, "__global__ void wkv_sum_batch", "out[c] = total;", "wkv_sum_batch: one writer per output")

# %% [markdown]
# ## 2. The same source on the CPU: the shim
#
# A kernel is, after all, a C++ function that reads its position from a few globals. `kernels/cuda_shim.h`
# supplies what nvcc would: it defines `__global__`, `__device__` away, declares `threadIdx`, `blockIdx`,
# `blockDim`, `gridDim`, and a launcher that plays the role of `kernel<<<grid, block>>>(...)`: it sets the globals
# and calls the function once per (block, thread), one after another.

# %%
shim_header = KERNELS.joinpath("cuda_shim.h").read_text()
show(shim_header, "#define __global__", "#define __forceinline__", "kernels/cuda_shim.h: CUDA words made C++")
show(shim_header, "template <typename Kernel", "            kernel(args...);", "kernels/cuda_shim.h: the launcher")
print()
shim_cpp = KERNELS.joinpath("cuda_shim.cpp").read_text()
show(shim_cpp, '#include "cuda_shim.h"', '#include "wkv4.cu"', "kernels/cuda_shim.cpp: the SAME wkv4.cu, included")

# %% [markdown]
# `cuda_shim.cpp` instantiates the templates for float and double and exports them as C functions. The `cuda-shim`
# backend (minirwkv/backends/shim_wkv.py) compiles it at first use with the host C++ compiler (cached under
# ~/.cache/minirwkv/shim, keyed by a hash of the sources), loads it with ctypes, and offers the backend contract
# every WKV backend follows: `forward(w, u, k, v, state) -> (y, state)` and `backward(w, u, k, v, y, gy) ->
# (gw, gu, gk, gv)`. It launches the same grid as the GPU backend: blocks of 32 threads.
#
# If this machine has no C++ compiler, `get_backend` raises a RuntimeError that says so, and we skip this part.

# %%
try:
    shim = get_wkv("4", "cuda-shim")
    print("cuda-shim backend ready:", shim.name)
except RuntimeError as e:
    shim = None
    print(f"SKIPPED the shim part (no C++ compiler or the build failed): {e}")

# %% [markdown]
# Now the comparisons. The reference is the recurrent NumPy form of `minirwkv.wkv`. For the shim and the reference
# in the same dtype the "same" tolerance applies (two programs doing the same arithmetic: a few ulp). We pick
# odd sizes on purpose: B = 3, C = 11 gives 33 threads, two blocks of 32, and 31 threads in the second block that
# must do nothing. Gradients are sums whose terms can cancel, so they are compared relative to the size of their
# terms (`grad_scale`), as the test suite does. Then:
#
# * the carried state: the first half of the sequence, then the second half from the returned state, equals the
#   whole (what RNN-mode prefill in chunks relies on);
# * extreme keys, |k| = 100, where a naive exp overflows float32;
# * float32 kernel vs float64 reference on init-like inputs: the normwise 1e-5 target.

# %%
B, T, C = (3, 16, 11) if QUICK else (3, 64, 11)


def compare(label, backend, x, dtype, as_device=np.asarray):
    """Forward (y, final state) and backward (gw, gu, gk, gv) of ``backend`` vs the NumPy reference, in ``dtype``."""
    x = x.astype(dtype)
    w = x.w.astype(dtype)
    dev = [as_device(a) for a in (w, x.time_first, x.k, x.v, x.gy)]
    y, state = backend.forward(*dev[:4])
    grads = backend.backward(*dev[:4], y, dev[4])
    y_ref, state_ref = wkv.wkv_recurrent_forward(w, x.time_first, x.k, x.v)
    grads_ref = wkv.wkv_recurrent_backward(w, x.time_first, x.k, x.v, y_ref, x.gy)
    checks.close(f"{label}: y", get(y), y_ref, dtype)
    checks.close(f"{label}: state (aa/bb, pp)", np.stack([get(state.aa) / get(state.bb), get(state.pp)]),
                 np.stack([state_ref.aa / state_ref.bb, state_ref.pp]), dtype)
    checks.close(f"{label}: gw, gu, gk, gv", np.concatenate([get(g).ravel() for g in grads]),
                 np.concatenate([g.ravel() for g in grads_ref]), dtype, scale=x.grad_scale())


def get(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


if shim is not None:
    x = make_wkv_inputs(B, T, C, seed=1)
    compare(f"shim f64 vs numpy (B,T,C)={B, T, C}", shim, x, np.float64)
    compare("shim f32 vs numpy f32", shim, x, np.float32)

    big = make_wkv_inputs(2, 6, 3, seed=7, k_scale=100.0)
    big.k[0, 0, :] = [100.0, -100.0, 88.75]  # e^100 = inf in float32; e^-100 is a denormal
    compare("shim f32, |k| = 100", shim, big, np.float32)

    h = T // 2  # the carried state: two halves
    x64 = x.astype(np.float64)
    w = x64.w
    y1, s1 = shim.forward(w, x64.time_first, np.ascontiguousarray(x64.k[:, :h]), np.ascontiguousarray(x64.v[:, :h]))
    y2, s2 = shim.forward(w, x64.time_first, np.ascontiguousarray(x64.k[:, h:]), np.ascontiguousarray(x64.v[:, h:]),
                          s1)
    y_whole, s_whole = shim.forward(w, x64.time_first, x64.k, x64.v)
    checks.close(f"shim: halves {h}+{T - h} with state vs whole", np.concatenate([y1, y2], axis=1), y_whole)
    checks.close("shim: final state after the halves vs whole", np.stack(s2), np.stack(s_whole))

    x32 = init_like_wkv_inputs(B, T, C, seed=2).astype(np.float32)
    y32, _ = shim.forward(x32.w, x32.time_first, x32.k, x32.v)
    x64 = x32.astype(np.float64)  # the same (float32-rounded) inputs, in float64
    y64, _ = wkv.wkv_recurrent_forward(x32.w.astype(np.float64), x64.time_first, x64.k, x64.v)
    checks.close("shim f32 vs numpy f64 (init-like inputs)", y32, y64, np.float32, kind="vs_f64")
    print(f"float32 kernel vs float64 reference: max |diff| = {np.abs(y32 - y64).max():.2e} (target 1e-5 normwise)")

# %% [markdown]
# ## 3. What the shim cannot catch
#
# The shim runs every thread's arithmetic and indexing exactly, and it runs the bounds check (threads past B*C
# exist in its grid too). What it cannot run is *concurrency*: its threads go one after another, and each
# finishes before the next starts. On a GPU, the 32 threads of a warp execute each instruction together, and
# thousands of threads are in flight at once. A bug that needs two threads to overlap is invisible to the shim:
#
# * a race: two threads writing one element (`out[c] += x` from B threads), or one reading what another writes;
# * `__shared__` memory and `__syncthreads()`: a missing barrier does no harm when threads never overlap;
# * warp-level code (shuffles, votes) and divergence inside a warp;
# * the GPU's own arithmetic: nvcc fuses a*b + c into one rounding (FMA) and its expf rounds differently from
#   glibc's, so GPU results differ from the shim by a few ulp (the "same" tolerance covers that);
# * NVRTC compile options, launch limits, memory faults, speed.
#
# Here is the first bug in miniature, in Python. A "kernel" is a generator: each `yield` marks a point where the
# hardware may switch to another thread. One launcher runs the threads one after another (the shim's order);
# the other runs them in lockstep, one instruction for every thread, then the next (a warp's order).

# %%
def launch_one_after_another(kernel, n_threads, *args):
    """The shim's order: every thread runs to its end before the next starts."""
    for idx in range(n_threads):
        for _ in kernel(idx, *args):
            pass


def launch_in_lockstep(kernel, n_threads, *args):
    """A warp's order: every thread runs up to its next yield, then every thread again, until all are done."""
    running = [kernel(idx, *args) for idx in range(n_threads)]
    while running:
        still = []
        for thread in running:
            try:
                next(thread)
                still.append(thread)
            except StopIteration:
                pass
        running = still


def racy_batch_sum(idx, x, out):
    """out[0] += x[idx] from every thread: on a GPU, a load and a store, with other threads in between."""
    loaded = out[0]  # load
    yield  # ... other threads run here ...
    out[0] = loaded + x[idx]  # store: overwrites what they stored meanwhile


def assign_partial(idx, x, partials):
    """wkv4.cu's way, launch 1: each thread assigns its own slot, which no other thread touches."""
    value = x[idx]  # load
    yield
    partials[idx] = value  # store


def sum_partials(c, partials, out, n):
    """Launch 2 (like wkv_sum_batch): one thread per output adds the partials in a fixed order. Launches on one
    stream run one after the other, so every partial is written before this starts."""
    total = 0.0
    for b in range(n):
        total += partials[b]
        yield
    out[c] = total


n = 4
x = np.array([1.0, 2.0, 3.0, 4.0])
results = {}
launchers = {"one after another (shim)": launch_one_after_another, "lockstep (GPU warp)": launch_in_lockstep}
for name, launch in launchers.items():
    out_racy = np.zeros(1)
    launch(racy_batch_sum, n, x, out_racy)
    partials, out = np.zeros(n), np.zeros(1)
    launch(assign_partial, n, x, partials)  # n threads
    launch(sum_partials, 1, partials, out, n)  # one thread per output (here a single output)
    results[name] = (out_racy[0], out[0])
    print(f"{name:25s}: racy += gives {out_racy[0]:4.1f}, one writer per output gives {out[0]:4.1f}  "
          f"(true sum {x.sum()})")
checks.true("racy +=: right in the shim's order", results["one after another (shim)"][0] == x.sum(), "10.0: hidden")
checks.true("racy +=: updates lost in lockstep", results["lockstep (GPU warp)"][0] != x.sum(),
            f"{results['lockstep (GPU warp)'][0]} != 10.0")
checks.exact("one writer per output: same in both orders",
             np.array([r[1] for r in results.values()]), np.full(2, x.sum()))

# %% [markdown]
# In the shim's order the racy sum is right, so a shim test would pass; in lockstep every thread loads 0 and the
# last store wins. That is why wkv4.cu has no `+=` into shared outputs, and why docs/kernels.md lists what only a
# GPU run can check (the cupy cases of tests/test_wkv_kernels.py and kernels/gpu_check.py, which also fills every buffer with NaN so that
# an element no thread wrote shows up). A later kernel version that uses shared memory or warp shuffles needs
# those GPU tests; v1 uses neither, which is what makes the shim a faithful stand-in for it.
#
# ## 4. On a GPU: CuPy
#
# `get_wkv("4", "cupy")` compiles wkv4.cu at first use with NVRTC (through `cupy.RawModule`, the templates
# instantiated by name) and launches it on CuPy arrays. If CuPy or a GPU is missing it raises a RuntimeError that
# says which; then this part is skipped. With a GPU we run the same comparisons as for the shim, plus the GPU
# against the shim on the same float32 inputs.

# %%
try:
    gpu = get_wkv("4", "cupy")
except RuntimeError as e:
    gpu = None
    print(f"SKIPPED the GPU part: {e}")

if gpu is not None:
    import cupy

    x = make_wkv_inputs(B, T, C, seed=1)
    compare("cupy f64 vs numpy", gpu, x, np.float64, as_device=cupy.asarray)
    compare("cupy f32 vs numpy f32", gpu, x, np.float32, as_device=cupy.asarray)
    if shim is not None:
        x32 = x.astype(np.float32)
        y_gpu, _ = gpu.forward(*(cupy.asarray(a) for a in (x32.w, x32.time_first, x32.k, x32.v)))
        y_cpu, _ = shim.forward(x32.w, x32.time_first, x32.k, x32.v)
        checks.close("cupy f32 vs shim f32 (same source)", y_gpu.get(), y_cpu, np.float32)
        print(f"GPU vs shim, float32: max |diff| = {np.abs(y_gpu.get() - y_cpu).max():.2e} (FMA and expf rounding)")

# %% [markdown]
# ## Summary
#
# * wkv4.cu runs one thread per (b, c); each walks through time with the recurrence of `wkv_step`, same names,
#   same order. Threads past B*C return at once; w and u gradients are summed by a second kernel with one writer
#   per output.
# * The shim header turns the CUDA words into C++, so g++ compiles the SAME file and the `cuda-shim` backend
#   checks the kernel's arithmetic and indexing against NumPy on any machine: outputs, carried state, gradients.
# * What needs threads to overlap (races, shared memory, warps) only a GPU can test.
#
# Next: tutorial 9, letting hypothesis hunt for the inputs where a kernel goes wrong.

# %%
checks.report()
