"""Check and time the GPU WKV kernels (kernels/wkv4.cu through the cupy backend) on a machine with an NVIDIA GPU.

    python kernels/gpu_check.py             # or, installed: python -m minirwkv.kernels.gpu_check
    python kernels/gpu_check.py --no-train  # skip the model training step

Three parts, under 3 minutes on one recent GPU:
1. Correctness: fresh random inputs through the cupy backend against the float64 NumPy reference of minirwkv.wkv
   (float64 kernels: "same" tolerance; float32 kernels: "vs_f64"). Every device allocation is filled with NaN bytes
   first (a poisoning allocator), so an output element a kernel forgets to write shows up as a non-finite value.
2. Speed at (B, T, C) = (8, 4096, 1024) float32: median of CUDA-event timings, the bytes each kernel must move,
   the device's copy bandwidth (a large device-to-device copy), and the fraction of that roofline reached.
3. If minirwkv.loss_and_grads accepts CuPy arrays: one training step of a mid-sized model (V=50277, C=768, L=12,
   T=1024, B=8), timed. Skipped, with the reason printed, if it does not work yet.
Exit status: 0 if every check passed, 1 if one failed, 2 if there is no CuPy or no GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

TIMING_SHAPE = (8, 4096, 1024)  # (B, T, C)
MODEL = dict(vocab_size=50277, n_embd=768, n_layer=12)
TRAIN_SHAPE = (8, 1024)  # (B, T)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-train", action="store_true", help="skip the training step of part 3")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per kernel (the median is reported)")
    args = parser.parse_args(argv)
    try:
        import cupy
    except ImportError:
        print("gpu_check needs CuPy and an NVIDIA GPU: pip install minirwkv[gpu] (cupy-cuda12x). Without a GPU, "
              "the same kernel source is checked on the CPU by: pytest tests/test_wkv_kernels.py tests/test_nvcc.py")
        return 2
    from minirwkv.backends import get_wkv

    try:
        backend = get_wkv("4", "cupy")
    except RuntimeError as e:
        print(f"gpu_check: {e}")
        return 2
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {name}, CuPy {cupy.__version__}\n")

    start = time.perf_counter()
    failures = check_correctness(cupy, backend)
    print(f"(correctness: {time.perf_counter() - start:.1f} s)\n")
    time_kernels(cupy, backend, args.repeat)
    if not args.no_train:
        time_training_step(cupy, args.repeat)
    verdict = "FAILED: " + ", ".join(failures) if failures else "all checks passed"
    print(f"\ntotal {time.perf_counter() - start:.1f} s; {verdict}")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------------------------------

class PoisonedAllocations:
    """Inside ``with``, every CuPy allocation comes from the default pool filled with 0xFF bytes (a NaN in float32
    and float64), so memory a kernel should have written but did not is NaN instead of stale, plausible data."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.pool = cupy.get_default_memory_pool()

    def malloc(self, size):
        mem = self.pool.malloc(size)
        mem.memset_async(0xFF, size)
        return mem

    def __enter__(self):
        self.cupy.cuda.set_allocator(self.malloc)

    def __exit__(self, *exc):
        self.cupy.cuda.set_allocator(self.pool.malloc)


def check_correctness(cupy, backend) -> list[str]:
    """Each case through the float64 and the float32 kernels, each held to the NumPy reference run in its own dtype
    (tolerance "same": this is what finds kernel bugs). For the float32 kernels the table also shows the error
    against the float64 reference, next to the error of the float32 NumPy reference itself: float32 arithmetic
    cannot do better than that row, and the kernel should match it (minirwkv.testing explains the 1e-5 target:
    it holds on init-like inputs at T of a few hundred, not at |k| ~ 100 or T ~ 1000)."""
    from minirwkv.testing import init_like_wkv_inputs, make_wkv_inputs

    cases = [
        ("odd C=33, B=3, T=256", init_like_wkv_inputs(3, 256, 33, seed=1)),
        ("init-like 4x256x768", init_like_wkv_inputs(4, 256, 768, seed=3)),
        ("|k| to 100, T=64", make_wkv_inputs(2, 64, 40, seed=2, k_scale=100.0)),
        ("init-like 4x1024x768", init_like_wkv_inputs(4, 1024, 768, seed=5)),
        ("T=5000 (no T_MAX)", make_wkv_inputs(2, 5000, 64, seed=4, k_scale=1.0)),
    ]
    failures = []
    print(f"{'case':22} {'what':30} {'y':>9} {'state':>9} {'gw':>9} {'gu':>9} {'gk':>9} {'gv':>9}  ok")

    def row(label, what, errors, ok=None):
        state_err = max(errors[n] for n in errors if "." in n)
        print(f"{label:22} {what:30} {max(errors['y'], errors['y halves']):9.1e} {state_err:9.1e} "
              + " ".join(f"{errors[n]:9.1e}" for n in ("gw", "gu", "gk", "gv"))
              + ("  (shown)" if ok is None else "  yes" if ok else "  NO"))

    for label, x in cases:
        expected64 = run_reference(x)
        for dtype in (np.float64, np.float32):
            name = np.dtype(dtype).name
            xk = x.astype(dtype)  # what the kernel gets
            results = run_kernel_poisoned(cupy, backend, xk)
            expected = expected64 if dtype == np.float64 else run_reference(xk)
            errors, bad = compare(results, expected, xk, dtype, "same")
            failures += [f"{label} {name} {what}" for what in bad]
            row(label, f"{name} kernel vs {name} ref", errors, ok=not bad)
            if dtype == np.float32:
                exact = run_reference(xk.astype(np.float64))  # the same rounded numbers (w included) in float64
                row(label, "float32 kernel vs float64 ref", compare(results, exact, xk, dtype, None)[0])
                row(label, "float32 ref vs float64 ref", compare(expected, exact, xk, dtype, None)[0])
    print("(errors: max|result - reference| / max(|reference|, size of the summed terms); nan = unwritten output)")
    return failures


def run_kernel_poisoned(cupy, backend, x):
    """y, state, (gw, gu, gk, gv), and y, state of two halves run one after the other, from fresh poisoned memory."""
    with PoisonedAllocations(cupy):
        w, u, k, v, gy = (cupy.asarray(a) for a in (x.w.astype(x.k.dtype), x.time_first, x.k, x.v, x.gy))
        y, state = backend.forward(w, u, k, v)
        grads = backend.backward(w, u, k, v, y, gy)
        h = x.k.shape[1] // 2
        y1, s1 = backend.forward(w, u, cupy.ascontiguousarray(k[:, :h]), cupy.ascontiguousarray(v[:, :h]))
        y2, s2 = backend.forward(w, u, cupy.ascontiguousarray(k[:, h:]), cupy.ascontiguousarray(v[:, h:]), s1)
        cupy.cuda.get_current_stream().synchronize()  # a fault inside a kernel is reported here
    to_np = cupy.asnumpy
    return (to_np(y), [to_np(a) for a in state], [to_np(g) for g in grads],
            to_np(cupy.concatenate([y1, y2], axis=1)), [to_np(a) for a in s2])


def run_reference(x):
    from minirwkv.rwkv4 import wkv

    w = x.w.astype(x.k.dtype)
    y, state = wkv.wkv_recurrent_forward(w, x.time_first, x.k, x.v)
    grads = wkv.wkv_recurrent_backward(w, x.time_first, x.k, x.v, y, x.gy)
    return y, list(state), list(grads), y, list(state)


def compare(results, expected, x, dtype, kind):
    """Normwise errors of every output; with ``kind``, also assert_close, returning the names that failed."""
    from minirwkv.testing import assert_close

    g_scale = x.grad_scale()
    aa_scale = float(np.abs(expected[1][1]).max() * np.abs(x.v).max())  # aa sums bb-sized weights times v
    scales = {"aa": aa_scale, "bb": None, "pp": None}
    checks = [("y", results[0], expected[0], None), ("y halves", results[3], expected[3], None)]
    for prefix, got, want in (("state", results[1], expected[1]), ("halves", results[4], expected[4])):
        checks += [(f"{prefix}.{n}", a, e, scales[n]) for n, a, e in zip(("aa", "bb", "pp"), got, want)]
    checks += [(n, a, e, g_scale) for n, a, e in zip(("gw", "gu", "gk", "gv"), results[2], expected[2])]
    errors, bad = {}, []
    for what, a, e, scale in checks:
        errors[what] = normwise_error(a.astype(np.float64), e.astype(np.float64), scale)
        if kind is not None:
            try:
                assert_close(a, e, dtype, kind, what, scale=scale)
            except AssertionError as err:
                bad.append(what)
                print(f"  FAIL {err}")
    return errors, bad


def normwise_error(a, e, scale=None):
    if not np.all(np.isfinite(a)):
        return float("nan")
    denom = max(float(np.abs(e).max(initial=0.0)), float(scale or 0.0)) or 1.0
    return float(np.abs(a - e).max(initial=0.0)) / denom


# ---------------------------------------------------------------------------------------------------------------
# 2. Speed against the memory roofline
# ---------------------------------------------------------------------------------------------------------------

def median_ms(cupy, fn, repeat, warmup=2) -> float:
    """Median wall time of fn on the GPU, between two CUDA events (the launch is asynchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        begin, end = cupy.cuda.Event(), cupy.cuda.Event()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(begin, end))
    return statistics.median(times)


def copy_bandwidth(cupy, repeat, nbytes=2**30) -> float:
    """Device copy bandwidth in bytes/s: a 1 GiB device-to-device copy reads and writes nbytes each."""
    src = cupy.ones(nbytes // 4, np.float32)
    dst = cupy.empty_like(src)
    ms = median_ms(cupy, lambda: dst.data.copy_from_device_async(src.data, nbytes), repeat)
    return 2 * nbytes / (ms * 1e-3)


def time_kernels(cupy, backend, repeat):
    B, T, C = TIMING_SHAPE
    rng = cupy.random.default_rng(0)
    f32 = np.float32
    theta = -5 + 8 * (cupy.arange(C, dtype=f32) / (C - 1)) ** 0.7  # the init ramp of time_decay
    w = (-cupy.exp(theta)).astype(f32)
    u = cupy.full(C, np.log(0.3), f32)
    k = (3.0 * rng.standard_normal((B, T, C), dtype=f32))  # (B, T, C)
    v = rng.standard_normal((B, T, C), dtype=f32)
    gy = rng.standard_normal((B, T, C), dtype=f32)
    y, _ = backend.forward(w, u, k, v)

    bandwidth = copy_bandwidth(cupy, repeat)
    fwd_ms = median_ms(cupy, lambda: backend.forward(w, u, k, v), repeat)
    bwd_ms = median_ms(cupy, lambda: backend.backward(w, u, k, v, y, gy), repeat)

    n = B * T * C * np.dtype(f32).itemsize  # bytes of one (B, T, C) array
    rows = [  # what, time, bytes v1 moves, bytes any kernel must move
        ("forward", fwd_ms, 3 * n, 3 * n),  # reads k, v; writes y
        # sweep 1 reads k, v, y, gy, writes s, r; sweep 2 reads k, v, y, s, r, writes gk, gv. The least any
        # backward can move is reading k, v, y, gy and writing gk, gv (s, r kept on chip).
        ("backward", bwd_ms, 13 * n, 6 * n),
    ]
    print(f"speed at (B, T, C) = {TIMING_SHAPE} float32, median of {repeat}; "
          f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s; threads = B*C = {B * C}")
    print(f"{'kernel':10} {'ms':>8} {'GB moved':>9} {'GB/s':>7} {'% roofline':>11} {'GB needed':>10} {'% of that':>10} "
          f"{'tokens/s':>10}")
    for what, ms, moved, needed in rows:
        achieved = moved / (ms * 1e-3)
        print(f"{what:10} {ms:8.2f} {moved / 1e9:9.2f} {achieved / 1e9:7.0f} {100 * achieved / bandwidth:10.1f}% "
              f"{needed / 1e9:10.2f} {100 * needed / (ms * 1e-3) / bandwidth:9.1f}% {B * T / (ms * 1e-3):10.3g}")
    print(f"backward / forward time: {bwd_ms / fwd_ms:.2f}")


# ---------------------------------------------------------------------------------------------------------------
# 3. A training step of a mid-sized model, if the model runs on CuPy arrays
# ---------------------------------------------------------------------------------------------------------------

def time_training_step(cupy, repeat):
    B, T = TRAIN_SHAPE
    try:
        import minirwkv

        config = minirwkv.ModelConfig(**MODEL)
        params = {key: cupy.asarray(p) for key, p in minirwkv.init_params(config, seed=0, dtype=np.float32).items()}
        rng = np.random.default_rng(0)
        tokens = cupy.asarray(rng.integers(0, MODEL["vocab_size"], (B, T + 1)))
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl="cupy")
        loss = float(loss)
        ms = median_ms(cupy, lambda: minirwkv.loss_and_grads(params, idx, targets, impl="cupy"),
                       repeat=min(repeat, 3), warmup=1)
    except Exception as e:  # the model may not run on CuPy yet: say why, do not fail the kernel checks
        print(f"\ntraining step skipped: {type(e).__name__}: {e}")
        return
    n_params = sum(int(p.size) for p in params.values())
    print(f"\ntraining step (loss_and_grads, impl='cupy'), V={MODEL['vocab_size']} C={MODEL['n_embd']} "
          f"L={MODEL['n_layer']} ({n_params / 1e6:.0f}M parameters), B={B} T={T} float32: {ms:.0f} ms, "
          f"{B * T / (ms * 1e-3):.3g} tokens/s, initial loss {loss:.3f} (ln V = {np.log(MODEL['vocab_size']):.3f})")


if __name__ == "__main__":
    sys.exit(main())
