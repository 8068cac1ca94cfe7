"""Benchmark of RNN-mode inference (minirwkv/infer.py): tokens/s against the memory roofline, prefill, and the
official ``rwkv`` package on the same weights. Prints one table; nothing here is a test.

    python -m minirwkv.bench.infer                 # tiny and 169M-shaped models, and the official package if present
    python -m minirwkv.bench.infer --quick         # the tiny model and a short prompt: a smoke test in seconds
    python -m minirwkv.bench.infer --threads 1     # the runner's (and torch's) threads; default: the library's

The roofline of one RNN step at batch 1: every matrix is read once per token (a matrix-vector product cannot reuse
a weight), so the step cannot take less than (bytes of all matrices + head + one embedding row) / bandwidth. The
bandwidth is measured in the same run (bench.copy_bandwidth): the larger of np.copyto and a parallel Numba copy of a
256 MiB float32 array, counted as read + write (2 x 256 MiB per copy, the STREAM convention). "% roofline" = roofline time / measured time; above
100% means the weights were partly served from a cache larger than a copy's working set would suggest, or reading
alone streams faster than copying. docs/inference.md has the figures measured on the development machine.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile

import numpy as np

from minirwkv.backends.threads import configure, resolve_threads
from minirwkv.config import ModelConfig
from minirwkv.generation import get_generation
from minirwkv.engine.infer import RNNRunner
from minirwkv.engine.process import tune_for_training

from .common import copy_bandwidth, median_time

MODELS = {"tiny": ModelConfig(vocab_size=256, n_embd=64, n_layer=2),
          "169M": ModelConfig(vocab_size=50277, n_embd=768, n_layer=12)}  # RWKV-4-Pile-169M's shapes
COPY_BYTES, COPY_BYTES_QUICK = 256 * 2**20, 32 * 2**20


def random_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random weights with the official names and shapes: matrices N(0, 1/in) (activations stay O(1) through
    the layers), time_decay in the init range [-5, 3], time_first in [-1, 1], mixes in [0, 1], LayerNorms 1 and 0.
    Fast for large shapes (no orthogonalisation, unlike init_params)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in get_generation(config.version).param_shapes(config).items():
        leaf = name.split(".")[-1]
        if len(shape) == 2:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / math.sqrt(shape[1]))
        elif leaf == "time_decay":
            value = rng.uniform(-5.0, 3.0, shape)
        elif leaf == "time_first":
            value = rng.uniform(-1.0, 1.0, shape)
        elif leaf.startswith("time_mix"):
            value = rng.uniform(0.0, 1.0, shape)
        else:  # LayerNorm
            value = np.ones(shape) if leaf == "weight" else np.zeros(shape)
        params[name] = np.ascontiguousarray(value, dtype=dtype)
    return params


def bytes_per_token(params: dict) -> int:
    """Weight bytes one RNN step reads: every matrix (all layers and the head) and one embedding row."""
    matrices = sum(a.nbytes for k, a in params.items() if a.ndim == 2 and k != "emb.weight")
    return matrices + params["emb.weight"][0].nbytes


def bench_model(name: str, config: ModelConfig, args, bandwidth: float) -> dict:
    params = random_params(config)
    runner = RNNRunner(params, batch_size=1, threads=args.threads)
    rng = np.random.default_rng(0)
    steps = 5 if args.quick else (20 if name == "169M" else 200)
    token = np.array([1])
    t_step = median_time(lambda: runner.step(token), steps, warmup=2)  # warm-up includes Numba's compile/load
    nbytes = bytes_per_token(params)
    row = {"model": name, "params_MB": sum(a.nbytes for a in params.values()) / 1e6,
           "rnn_tok_s": 1 / t_step, "ms_per_token": 1e3 * t_step, "bytes_per_token": nbytes,
           "roofline_pct": 100 * (nbytes / bandwidth) / t_step}

    B = 8
    batched = RNNRunner(params, batch_size=B, threads=args.threads)
    tokens = np.arange(B) % config.vocab_size
    t_batch = median_time(lambda: batched.step(tokens), max(3, steps // 4), warmup=1)
    row["batch8_tok_s"] = B / t_batch

    T = 128 if args.quick else 1024
    prompt = rng.integers(0, config.vocab_size, (1, T))

    def run_prefill():
        runner.reset()
        runner.prefill(prompt)

    t_prefill = median_time(run_prefill, 1 if (args.quick or name == "169M") else 3, warmup=1)
    row.update(prefill_T=T, prefill_tok_s=T / t_prefill, prefill_ratio=(T / t_prefill) * t_step)
    if not args.quick and not args.no_official:
        row.update(official(params, args, steps, runner))
    return row


def official(params: dict, args, steps: int, runner: RNNRunner | None) -> dict:
    """The official ``rwkv`` package (pip install rwkv; needs torch) on the same weights, strategy 'cpu fp32',
    one token per forward call. Also reports its largest logit difference from ours on a few tokens."""
    try:
        import torch
    except ImportError:
        return {"official": "torch not installed"}
    os.environ.setdefault("RWKV_JIT_ON", "1")  # the package reads these when imported; its defaults on CPU
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        from rwkv.model import RWKV
    except ImportError:
        return {"official": "rwkv not installed (pip install rwkv)"}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pth")
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}, path)
        model = RWKV(path, strategy="cpu fp32", verbose=False)
    state = [None]
    tokens = [1, 7, 42, 3]
    diff = None
    with torch.no_grad():
        if runner is not None:  # the same tokens through both, from the zero state
            runner.reset()
            diff = 0.0
            for t in tokens:
                out, state[0] = model.forward([t], state[0])
                diff = max(diff, float(np.abs(out.numpy() - runner.step(np.array([t]))[0]).max()))

        def step():
            out, state[0] = model.forward([1], state[0])

        t_official = median_time(step, steps, warmup=2)
    return {"official_tok_s": 1 / t_official, "max_logit_diff": diff}


def print_table(rows: list, bandwidth: float):
    columns = [("model", "model", "{}"), ("RNN tok/s", "rnn_tok_s", "{:.1f}"), ("ms/token", "ms_per_token", "{:.2f}"),
               ("MB read/token", "bytes_per_token", "{:.1f}", 1e-6), ("% roofline", "roofline_pct", "{:.0f}%"),
               ("B=8 tok/s", "batch8_tok_s", "{:.1f}"), ("prefill T", "prefill_T", "{}"),
               ("prefill tok/s", "prefill_tok_s", "{:.0f}"), ("prefill/RNN", "prefill_ratio", "{:.1f}x"),
               ("official tok/s", "official_tok_s", "{:.1f}"), ("ours/official", "speedup", "{:.2f}x"),
               ("max |dlogit|", "max_logit_diff", "{:.1e}")]
    for r in rows:
        if "official_tok_s" in r:
            r["speedup"] = r["rnn_tok_s"] / r["official_tok_s"]
    cells = []
    for r in rows:
        line = []
        for col in columns:
            value = r.get(col[1])
            if value is None:
                line.append("-")
            else:
                line.append(col[2].format(value * col[3] if len(col) > 3 else value))
        cells.append(line)
    widths = [max(len(c[0]), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print("  ".join(c[0].rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))
    print(f"copy bandwidth (read + write, the larger of np.copyto and a parallel Numba copy): "
          f"{bandwidth / 1e9:.1f} GB/s")
    for r in rows:
        if isinstance(r.get("official"), str):
            print(f"official package ({r['model']}): skipped, {r['official']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minirwkv.bench.infer", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, a 128-token prompt, few repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="RNNRunner's threads and torch's (default: the library's, docs/threads.md)")
    p.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--no-official", action="store_true", help="skip the official rwkv package")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    names = args.models.split(",") if args.models else (["tiny"] if args.quick else list(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    args.names = names
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    tune_for_training()  # workqueue threads and glibc keeping freed blocks, as the minirwkv command does
    threads = resolve_threads(args.threads)
    configure(threads)
    copy = copy_bandwidth(COPY_BYTES_QUICK if args.quick else COPY_BYTES)
    bandwidth = copy["roofline"]  # the larger of np.copyto and a parallel copy on all threads (bench.py)
    print(f"RNN-mode inference, float32, batch 1 unless noted; {os.cpu_count()} CPUs, {threads} threads "
          f"(docs/threads.md)")
    rows = [bench_model(name, MODELS[name], args, bandwidth) for name in args.names]
    print_table(rows, bandwidth)
    return rows


if __name__ == "__main__":
    main()
