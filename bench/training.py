"""Benchmarks that print figures: the WKV kernels against the NumPy reference and a memory roofline.

    python -m minirwkv.bench                    # everything, full sizes
    python -m minirwkv.bench --only wkv         # the WKV section (and the environment)
    python -m minirwkv.bench --quick            # small sizes: a smoke test in seconds
    python -m minirwkv.bench --threads 1 --json out/bench.json
    python -m minirwkv.bench --only step        # the training step and the HF transformers comparison
    python -m minirwkv.bench --only step --hf-steps 0   # ... without the HF comparison

``--threads N`` sets the Numba threads and NumPy's BLAS threads (threadpoolctl); use one per idle core (docs/numba.md:
on a 2-core machine shared with another job, two threads made the training step 3-4x slower). The training step
section needs torch and transformers for its comparison and skips it, with a message, without them.

Times are medians of several repeats after a warm-up (which includes Numba's compilation). The roofline is the
time a kernel would take if it only moved its bytes at the copy bandwidth measured in the same run (see
``wkv_bytes`` for what is counted). Nothing here is a test: speed is reported, never asserted. docs/numba.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from minirwkv.backends import get_wkv
from minirwkv.engine.process import keep_freed_memory

from .common import copy_bandwidth, environment, median_time, print_environment, print_table

WKV_SHAPE = (8, 1024, 512)  # (B, T, C) of the figures in docs/numba.md
WKV_SHAPE_QUICK = (2, 128, 64)
COPY_BYTES = 256 * 2**20  # per array: large enough to leave the caches (except a huge shared L3, see docs)
COPY_BYTES_QUICK = 16 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# WKV
# ---------------------------------------------------------------------------------------------------------------

def wkv_bytes(B: int, T: int, C: int, itemsize: int) -> dict:
    """The bytes each WKV pass must move through memory (w, u and the (B, C) state are negligible):

    forward:  reads k, v; writes y                                              3 (B, T, C) arrays
    backward: reads k, v, y, gy; writes gk, gv; writes s, r in sweep 1 and reads them in sweep 2   10 arrays
    """
    n = B * T * C * itemsize
    return {"forward": 3 * n, "backward": 10 * n, "forward+backward": 13 * n}


def _wkv_inputs(B, T, C, dtype, seed=0):
    """Init-like inputs: theta, u in the official init ranges, k, v ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    w = -np.exp(rng.uniform(-5.0, 3.0, C)).astype(dtype)  # (C,)
    u = rng.uniform(-1.0, 1.0, C).astype(dtype)  # (C,)
    k, v, gy = (rng.standard_normal((B, T, C)).astype(dtype) for _ in range(3))  # (B, T, C) each
    return w, u, k, v, gy


def _time_backend(backend, inputs, repeats, warmup):
    w, u, k, v, gy = inputs
    y, _ = backend.forward(w, u, k, v)
    t_fwd = median_time(lambda: backend.forward(w, u, k, v), repeats, warmup)
    t_bwd = median_time(lambda: backend.backward(w, u, k, v, y, gy), repeats, warmup)
    return {"forward": t_fwd, "backward": t_bwd, "forward+backward": t_fwd + t_bwd}, y, backend.backward(
        w, u, k, v, y, gy)


def bench_wkv(args) -> dict:
    B, T, C = WKV_SHAPE_QUICK if args.quick else WKV_SHAPE
    dtype = np.float32
    inputs = _wkv_inputs(B, T, C, dtype)
    print(f"\n== WKV forward/backward, (B, T, C) = ({B}, {T}, {C}) {np.dtype(dtype).name} ==")

    t0 = time.perf_counter()
    numba_times, y_nb, g_nb = _time_backend(get_wkv("4", "numba"), inputs, repeats=3 if args.quick else 9, warmup=1)
    print(f"numba: warm-up and timing took {time.perf_counter() - t0:.1f} s (the first call compiles or loads the "
          f"cache)")
    numpy_times, y_np, g_np = _time_backend(get_wkv("4", "numpy"), inputs, repeats=1 if args.quick else 3, warmup=0)

    bw = copy_bandwidth(COPY_BYTES_QUICK if args.quick else COPY_BYTES)
    nbytes = wkv_bytes(B, T, C, np.dtype(dtype).itemsize)
    rows = []
    for op in ("forward", "backward", "forward+backward"):
        roofline_s = nbytes[op] / bw["roofline"]
        rows.append({"op": op, "numba_ms": 1e3 * numba_times[op], "numpy_ms": 1e3 * numpy_times[op],
                     "speedup": numpy_times[op] / numba_times[op], "bytes_MB": nbytes[op] / 1e6,
                     "roofline_ms": 1e3 * roofline_s, "roofline_pct": 100 * roofline_s / numba_times[op]})

    print(f"copy bandwidth ({bw['array_bytes'] // 2**20} MiB arrays, read + write): "
          f"np.copyto {bw['numpy_copyto'] / 1e9:.1f} GB/s, numba prange {bw['numba_prange_copy'] / 1e9:.1f} GB/s; "
          f"roofline uses {bw['roofline'] / 1e9:.1f} GB/s")
    print_table(rows, [("op", "op", "{}"), ("numba ms", "numba_ms", "{:.2f}"), ("numpy ms", "numpy_ms", "{:.1f}"),
                        ("numpy/numba", "speedup", "{:.1f}x"), ("MB moved", "bytes_MB", "{:.3g}"),
                        ("roofline ms", "roofline_ms", "{:.3g}"), ("% roofline", "roofline_pct", "{:.1f}%")])
    maxdiff = {name: float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
               for name, a, b in zip(("y", "gw", "gu", "gk", "gv"), (y_nb, *g_nb), (y_np, *g_np))}
    print("numba vs numpy, max |diff| / max |numpy|: " + ", ".join(f"{k} {v:.1e}" for k, v in maxdiff.items()))
    return {"shape": [B, T, C], "dtype": np.dtype(dtype).name, "copy_bandwidth_Bps": bw, "bytes": nbytes,
            "rows": rows, "maxdiff_relative": maxdiff}


# ---------------------------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------------------------

STEP_CONFIG = dict(vocab_size=256, n_embd=256, n_layer=6)  # dim_ffn = 4 C = 1024
STEP_BT = (8, 256)  # (B, T)
STEP_CONFIG_QUICK = dict(vocab_size=64, n_embd=32, n_layer=2)
STEP_BT_QUICK = (2, 16)
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)


class _MatmulTimer:
    """An ops namespace whose linear_forward / linear_backward are timed and their FLOPs counted (2 N in out per
    product; the backward does two products). Everything else is the namespace it wraps."""

    def __init__(self, ops):
        self.ops, self.seconds, self.flops = ops, 0.0, 0.0
        self.namespace = type(ops)(**vars(ops))
        self.namespace.linear_forward = self._timed(ops.linear_forward, 1)
        self.namespace.linear_backward = self._timed(ops.linear_backward, 2)

    def _timed(self, fn, n_products):
        def timed(a, cache_or_weight):
            weight = cache_or_weight if isinstance(cache_or_weight, np.ndarray) else cache_or_weight.weight
            t0 = time.perf_counter()
            out = fn(a, cache_or_weight)
            self.seconds += time.perf_counter() - t0
            self.flops += n_products * 2 * (a.size // a.shape[-1]) * weight.shape[0] * weight.shape[1]
            return out

        return timed


def _train_step(model, params, opt, idx, targets):
    """One training step as the trainer takes it: forward, backward (``model.loss_and_grads``), the library's AdamW
    with the engine's update (minirwkv.optim). -> (loss, params, opt)."""
    from minirwkv import optim

    h = ADAMW
    loss, grads = model.loss_and_grads(params, idx, targets)
    params, opt = optim.adamw_step(params, grads, opt, h["lr"], (h["beta1"], h["beta2"]), h["eps"],
                                   h["weight_decay"], fused=model.engine.adamw_update is not None)
    return loss, params, opt


def matmul_flops(n: int, pool, repeats: int = 3) -> float:
    """FLOP/s of a float32 (n, n) @ (n, n) product on the engine's pool (its threads, BLAS on one per block): the
    reference for the step's products."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    return 2 * n ** 3 / median_time(lambda: pool.matmul(a, b), repeats)


def bench_step(args) -> dict:
    import dataclasses

    from minirwkv import optim
    from minirwkv.api import init_params, model_for
    from minirwkv.backends.engine import make_engine
    from minirwkv.config import ModelConfig

    config_kwargs = STEP_CONFIG_QUICK if args.quick else STEP_CONFIG
    cfg = ModelConfig(**config_kwargs)
    B, T = STEP_BT_QUICK if args.quick else STEP_BT
    impl = "numba"
    print(f"\n== training step: V={cfg.vocab_size} C={cfg.n_embd} L={cfg.n_layer} F={cfg.dim_ffn}, B={B} T={T} "
          f"float32, impl={impl}, AdamW (fused Numba update) ==")
    params = init_params(cfg, seed=0, dtype=np.float32)
    model = model_for(params, make_engine(impl, "cpu", threads=args.threads))  # validated once, as the trainer does
    state = {"params": params, "opt": optim.adamw_init(params)}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 1))
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    def step(on=model):
        loss, state["params"], state["opt"] = _train_step(on, state["params"], state["opt"], idx, targets)
        return loss

    repeats = 2 if args.quick else 5
    t0 = time.perf_counter()
    step()  # compiles (or loads) every kernel
    print(f"first step (compiles or loads the Numba cache): {time.perf_counter() - t0:.1f} s")
    t_step = median_time(step, repeats, warmup=1)
    timer = _MatmulTimer(model.engine.ops)
    timed = dataclasses.replace(model, engine=dataclasses.replace(model.engine, ops=timer.namespace))
    t_instrumented = median_time(lambda: step(timed), repeats, warmup=0)
    matmul_s, flops = timer.seconds / repeats, timer.flops / repeats
    peak_n = 512 if args.quick else 2048
    peak = matmul_flops(peak_n, model.engine.pool)
    tokens_per_s = B * T / t_step
    result = {"config": {**config_kwargs, "dim_ffn": cfg.dim_ffn, "B": B, "T": T}, "impl": impl,
              "step_s": t_step, "tokens_per_s": tokens_per_s, "instrumented_step_s": t_instrumented,
              "matmul_s": matmul_s, "matmul_share": matmul_s / t_instrumented, "matmul_flops_per_step": flops,
              "matmul_flops_per_s": flops / matmul_s, "step_flops_per_s": flops / t_step,
              "reference_matmul": {"n": peak_n, "flops_per_s": peak}}
    print(f"step: {1e3 * t_step:.0f} ms (median of {repeats}), {tokens_per_s:,.0f} tokens/s")
    print(f"matrix products: {1e3 * matmul_s:.0f} ms of a {1e3 * t_instrumented:.0f} ms instrumented step = "
          f"{100 * result['matmul_share']:.0f}% of the step ({flops / 1e9:.1f} GFLOP per step)")
    print(f"achieved: {flops / matmul_s / 1e9:.1f} GFLOP/s inside the products, {flops / t_step / 1e9:.1f} GFLOP/s "
          f"over the whole step; a float32 ({peak_n})^2 @ ({peak_n})^2 product here: {peak / 1e9:.1f} GFLOP/s "
          f"(products at {100 * flops / matmul_s / peak:.0f}% of it, the step at {100 * flops / t_step / peak:.0f}%)")
    if args.hf_steps == 0:
        print("HF transformers comparison skipped (--hf-steps 0)")
        return result
    result["hf"] = bench_hf(cfg, B, T, repeats=args.hf_steps)
    if result["hf"].get("tokens_per_s"):
        result["ratio_vs_hf"] = tokens_per_s / result["hf"]["tokens_per_s"]
        print(f"minirwkv tokens/s / HF transformers tokens/s = {result['ratio_vs_hf']:.1f}x")
    return result


def bench_hf(cfg, B: int, T: int, repeats: int = 2) -> dict:
    """The same training step with PyTorch autograd: Hugging Face transformers ``RwkvForCausalLM`` (whose CPU WKV is
    a Python loop over T), torch.optim.AdamW, on torch's CPU threads = the Numba thread count. Skipped (with a
    message) when torch or transformers is missing. No warm-up step: one HF step takes close to a minute here, and
    torch compiles nothing, so the first step is representative."""
    try:
        import torch
        from transformers import RwkvConfig, RwkvForCausalLM
    except ImportError as e:
        print(f"HF transformers comparison skipped: {e} (pip install torch transformers)")
        return {"skipped": str(e)}
    import numba

    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                        attention_hidden_size=cfg.n_embd, intermediate_size=cfg.dim_ffn, context_length=T,
                        rescale_every=0, use_cache=False)
    net = RwkvForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    ids = torch.randint(0, cfg.vocab_size, (B, T))

    def step():
        out = net(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_step = median_time(step, repeats, warmup=0)
    tokens_per_s = B * T / t_step
    print(f"HF transformers {__import__('transformers').__version__} RwkvForCausalLM, torch {torch.__version__} on "
          f"{threads} threads: {1e3 * t_step:.0f} ms per step (median of {repeats}), {tokens_per_s:,.0f} tokens/s")
    return {"step_s": t_step, "tokens_per_s": tokens_per_s, "torch_threads": threads,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}


# ---------------------------------------------------------------------------------------------------------------
# float32 accuracy of the WKV (docs/numerics.md): not a speed, but a figure the docs quote
# ---------------------------------------------------------------------------------------------------------------

def bench_precision(args) -> dict:
    """Worst normwise error of the float32 recurrent WKV against float64, over init-like draws, for several T.

    Error per output: max|f32 - f64| / max(max|f64|, the size of the summed terms |g| (1 + |v|)), as the tests'
    ``vs_f64`` tolerance measures it.
    """
    from minirwkv.rwkv4 import wkv
    from minirwkv.testing import init_like_wkv_inputs

    def run(x):
        w = x.w.astype(x.k.dtype)
        y, _ = wkv.wkv_recurrent_forward(w, x.time_first, x.k, x.v)
        return (y, *wkv.wkv_recurrent_backward(w, x.time_first, x.k, x.v, y, x.gy))

    names = ("y", "gw", "gu", "gk", "gv")
    lengths = (16, 32) if args.quick else (64, 128, 256)
    draws = [(seed, C) for seed in range(2 if args.quick else 8) for C in (33, 64)]
    print(f"\n== float32 WKV vs float64, worst of {len(draws)} init-like draws (B = 3, C in {{33, 64}}) ==")
    rows = []
    for T in lengths:
        worst = dict.fromkeys(names, 0.0)
        for seed, C in draws:
            x = init_like_wkv_inputs(3, T, C, seed=seed)
            exact, approx = run(x), run(x.astype(np.float32))
            for name, e, a in zip(names, exact, approx):
                floor = 0.0 if name == "y" else x.grad_scale()
                err = float(np.abs(a - e).max()) / max(float(np.abs(e).max()), floor)
                worst[name] = max(worst[name], err)
        rows.append({"T": T, **worst})
    print_table(rows, [("T", "T", "{}")] + [(n, n, "{:.1e}") for n in names])
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# Table and CLI
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minirwkv.bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None,
                   help="the engine's CPU threads (make_engine(threads=N): the products' pool and the Numba kernels; "
                        "default: MINIRWKV_NUM_THREADS / OMP_NUM_THREADS, else every usable core); torch in the HF "
                        "comparison uses the same number. The scaling section measures 1 and all cores itself")
    p.add_argument("--threading-layer", choices=("workqueue", "omp", "tbb", "default"), default="workqueue",
                   help="Numba's threading layer (default workqueue: idle threads sleep; OpenMP's spin-waiting threads "
                        "starve the BLAS threads on a small, shared machine, docs/threads.md)")
    p.add_argument("--no-busy", action="store_true", help="scaling: skip the figures beside a busy process")
    p.add_argument("--no-official", action="store_true", help="scaling: skip the official rwkv package")
    p.add_argument("--no-mpi", action="store_true", help="scaling: skip the data-parallel (mpiexec) comparison")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test")
    p.add_argument("--hf-steps", type=int, default=2, metavar="N",
                   help="timed steps of the HF transformers comparison (about a minute each at full size); 0 skips it")
    p.add_argument("--only", choices=("wkv", "step", "scaling", "precision", "all"), default="all",
                   help="which section to run (precision: the float32 error table of docs/numerics.md)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:

    import numba

    args = parse_args(argv)
    if args.threading_layer != "default":
        numba.config.THREADING_LAYER = args.threading_layer  # read when the first parallel kernel launches
    keep_freed_memory()  # as the minirwkv command does (minirwkv/process.py)
    from minirwkv.backends.engine import make_engine

    make_engine("numba", "cpu", threads=args.threads)  # the thread settings every section starts from
    results = {"args": vars(args)}
    if args.only in ("wkv", "all"):
        results["wkv"] = bench_wkv(args)
    if args.only in ("step", "all"):
        results["step"] = bench_step(args)
    if args.only in ("precision", "all"):
        results["precision"] = bench_precision(args)
    if args.only in ("scaling", "all"):
        from .scaling import bench_scaling

        results["scaling"] = bench_scaling(args)
        make_engine("numba", "cpu", threads=args.threads)  # back to the run's setting for the environment report
    results["environment"] = environment()
    print_environment(results["environment"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
