"""Does minirwkv use every core, and does it give way when it shares them? (docs/threads.md)

    python -m minirwkv.bench --only scaling            # 1 thread, all cores, then all of it again beside a busy process
    python -m minirwkv.bench --only scaling --quick    # small shapes: a smoke test
    python -m minirwkv.bench --only scaling --no-busy  # without the contention half

Every figure is measured at 1 thread and at all usable cores in the same run, with the library's own thread setting
(``make_engine(..., threads=n)``, ``RNNRunner(threads=n)``), each thread count in a fresh process: in one process
the later count inherited the earlier one's heap, pools and torch runtime (three such runs put the training step's
scaling at 1.07-1.49x; the same run without the torch comparison, 1.79x). Nothing else changes between the two. Then the same
figures are taken again while a busy process (one Python loop, started and stopped here) competes for one core.
Printed per figure: the 1-thread and all-core values, the scaling (all-core / 1-thread) and its efficiency
(scaling / cores), the busy values, busy / idle at all cores (one busy program on a 2-core machine leaves a fair
share of 0.5 of the idle all-core figure, docs/threads.md) and busy / 1-thread (idle, at 1 thread).

Before anything, the machine's load is sampled for a second (/proc/stat): if other programs keep more than 10% of
the CPUs busy, the figures are marked as not idle. Nothing here is a test: speed is reported, never asserted.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import numpy as np

from .common import copy_bandwidth, median_time

IDLE_BUSY_LIMIT = 0.10  # other programs' share of all CPUs above which the machine is reported as not idle


# ---------------------------------------------------------------------------------------------------------------
# The machine's state
# ---------------------------------------------------------------------------------------------------------------

def _cpu_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def machine_load(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over ``seconds`` while this process sleeps (so: other programs), or None where
    /proc/stat is missing (not Linux)."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(seconds)
        total1, idle1 = _cpu_times()
    except OSError:
        return None
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


@contextlib.contextmanager
def busy_process():
    """One other program keeping one core busy (a Python loop), for the contention figures; stopped on exit."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # it is running
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# The figures, each at a given thread count
# ---------------------------------------------------------------------------------------------------------------

def sgemm_flops(threads: int, n: int, repeats: int = 5) -> float:
    """FLOP/s of a float32 (n, n) @ (n, n) product through the engine's thread pool (BLAS on one thread per block),
    the yardstick of the training step's products."""
    from minirwkv.backends.engine import make_engine

    pool = make_engine("numba", "cpu", threads=threads).pool
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    return 2 * n ** 3 / median_time(lambda: pool.matmul(a, b, out), repeats)


def step_figures(threads: int, quick: bool) -> dict:
    """The training step of bench --only step (forward, backward, AdamW) on ``threads`` threads: tokens/s, the
    share of the step in matrix products and their GFLOP/s."""
    import dataclasses

    from minirwkv import optim
    from minirwkv.api import init_params, model_for
    from minirwkv.backends.engine import make_engine
    from minirwkv.config import ModelConfig

    from .training import STEP_BT, STEP_BT_QUICK, STEP_CONFIG, STEP_CONFIG_QUICK, _MatmulTimer, _train_step

    cfg = ModelConfig(**(STEP_CONFIG_QUICK if quick else STEP_CONFIG))
    B, T = STEP_BT_QUICK if quick else STEP_BT
    params = init_params(cfg, seed=0, dtype=np.float32)
    model = model_for(params, make_engine("numba", "cpu", threads=threads))
    state = {"params": params, "opt": optim.adamw_init(params)}
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1))

    def step(on=model):
        _, state["params"], state["opt"] = _train_step(on, state["params"], state["opt"], tokens[:, :-1],
                                                       tokens[:, 1:])

    repeats = 2 if quick else 5
    t_step = median_time(step, repeats, warmup=1)
    timer = _MatmulTimer(model.engine.ops)
    timed = dataclasses.replace(model, engine=dataclasses.replace(model.engine, ops=timer.namespace))
    t_instrumented = median_time(lambda: step(timed), repeats, warmup=0)
    matmul_s, flops = timer.seconds / repeats, timer.flops / repeats
    return {"tokens_per_s": B * T / t_step, "step_s": t_step, "matmul_share": matmul_s / t_instrumented,
            "matmul_flops_per_s": flops / matmul_s}


def rnn_figures(params: dict, threads: int, quick: bool, batched: bool = True) -> dict:
    """RNN mode on ``threads`` threads: batch-1 tokens/s, batch-8 tokens/s, prefill tokens/s of one prompt."""
    from minirwkv.engine.infer import RNNRunner

    vocab = params["emb.weight"].shape[0]
    runner = RNNRunner(params, batch_size=1, threads=threads)
    steps = 5 if quick else 20
    t1 = median_time(lambda: runner.step(np.array([1])), steps, warmup=2)
    out = {"rnn_tok_s": 1 / t1}
    if batched:
        many = RNNRunner(params, batch_size=8, threads=threads)
        t8 = median_time(lambda: many.step(np.arange(8) % vocab), max(3, steps // 2), warmup=1)
        out["batch8_tok_s"] = 8 / t8
        T = 128 if quick else 1024
        prompt = np.random.default_rng(0).integers(0, vocab, (1, T))

        def run_prefill():
            runner.reset()
            runner.prefill(prompt)

        out["prefill_tok_s"] = T / median_time(run_prefill, 1 if quick else 2, warmup=1)
    return out


def official_tok_s(params: dict, threads: int, steps: int) -> float | None:
    """The official ``rwkv`` package (torch, 'cpu fp32') on the same weights and ``threads`` torch threads, one token
    per call; None without torch or rwkv."""
    from .infer import official

    class Args:
        pass

    args = Args()
    args.threads = threads
    result = official(params, args, steps, runner=None)
    return result.get("official_tok_s")


def _mpiexec() -> str | None:
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's (the dist extra), matching mpi4py's MPI
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def data_parallel_figures(cores: int, quick: bool) -> dict:
    """Tokens/s of ``minirwkv train`` (the default model, a short run) as 1 process x ``cores`` threads and as
    ``cores`` processes x 1 thread (mpiexec; the same global batch), from each run's log.jsonl: the median of its
    logged windows after the first (which includes compilation). Skipped without mpiexec and mpi4py."""
    import json
    import tempfile

    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return {"skipped": "mpi4py is not installed (pip install -e '.[dist]')"}
    mpiexec = _mpiexec()
    if mpiexec is None:
        return {"skipped": "no mpiexec (pip install -e '.[dist]')"}
    iters = 12 if quick else 60
    args = ["-m", "minirwkv", "train", f"--max_iters={iters}", "--eval_interval=100000", "--log_interval=4",
            "--sample_tokens=0", "--plot=false", f"--batch_size={2 * cores * (1 if quick else 3)}"]
    runs = {f"1 process x {cores} threads": (None, cores), f"{cores} processes x 1 thread": (cores, 1)}
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (ranks, threads) in runs.items():
            run_dir = os.path.join(folder, f"run{len(out)}")
            cmd = [sys.executable, *args, f"--out_dir={run_dir}", f"--threads={threads}"]
            if ranks:
                cmd = [mpiexec, "-n", str(ranks), *cmd]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                out[name] = None
                print(f"data-parallel run {name!r} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            with open(os.path.join(run_dir, "log.jsonl")) as f:
                rates = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r][1:]
            out[name] = float(np.median(rates)) if rates else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------

def measure_here(threads: int, quick: bool, with_official: bool) -> dict:
    """Every figure at ``threads`` threads, in this process."""
    from .infer import COPY_BYTES, COPY_BYTES_QUICK, MODELS, bytes_per_token, random_params

    rnn_params = random_params(MODELS["tiny" if quick else "169M"])  # seeded: the same weights in every process
    row = {"sgemm_GFLOPs": sgemm_flops(threads, 512 if quick else 2048) / 1e9}
    step = step_figures(threads, quick)
    row.update(step_tok_s=step["tokens_per_s"], step_matmul_GFLOPs=step["matmul_flops_per_s"] / 1e9,
               step_matmul_share=step["matmul_share"])
    row.update(rnn_figures(rnn_params, threads, quick))
    bandwidth = copy_bandwidth(COPY_BYTES_QUICK if quick else COPY_BYTES)["roofline"]  # on these threads
    row["copy_GBs"] = bandwidth / 1e9
    row["rnn_roofline_pct"] = 100 * row["rnn_tok_s"] * bytes_per_token(rnn_params) / bandwidth
    if with_official and not quick:
        row["official_tok_s"] = official_tok_s(rnn_params, threads, 10)
    return row


def measure(threads: int, args) -> dict:
    """``measure_here`` in a fresh process (python -m minirwkv.bench.scaling --worker): each thread count starts from
    the same state, with no pool, heap or torch runtime left behind by the other's run."""
    import json

    cmd = [sys.executable, "-m", "minirwkv.bench.scaling", "--worker", str(threads)]
    cmd += ["--quick"] * bool(args.quick) + ["--no-official"] * bool(args.no_official)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the scaling worker at {threads} threads failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_main(argv=None) -> None:
    import argparse
    import json

    from minirwkv.backends.engine import make_engine
    from minirwkv.engine.process import tune_for_training

    p = argparse.ArgumentParser(prog="python -m minirwkv.bench.scaling")
    p.add_argument("--worker", type=int, required=True, metavar="THREADS")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-official", action="store_true")
    args = p.parse_args(argv)
    tune_for_training()  # as the minirwkv command does
    make_engine("numba", "cpu", threads=args.worker)
    print(json.dumps(measure_here(args.worker, args.quick, not args.no_official)))


FIGURES = [("sgemm_GFLOPs", "float32 square product, GFLOP/s"), ("step_tok_s", "training step, tokens/s"),
           ("step_matmul_GFLOPs", "  its products, GFLOP/s"), ("rnn_tok_s", "RNN batch 1, tokens/s"),
           ("rnn_roofline_pct", "  % of the memory roofline"), ("copy_GBs", "  copy bandwidth, GB/s"),
           ("batch8_tok_s", "RNN batch 8, tokens/s"), ("prefill_tok_s", "prefill, tokens/s"),
           ("official_tok_s", "official rwkv batch 1, tok/s")]


def bench_scaling(args) -> dict:
    from minirwkv.backends.engine import make_engine
    from minirwkv.backends.threads import observed, usable_cores

    cores = usable_cores()
    load = machine_load()
    idle = load is None or load <= IDLE_BUSY_LIMIT
    model = "tiny" if args.quick else "169M"
    print(f"\n== threads: 1 against all {cores} usable cores (training step, RNN mode on the {model} model) ==")
    print("machine load before the run: " + ("unknown (no /proc/stat)" if load is None else
          f"{100 * load:.0f}% of the CPUs busy with other programs" +
          ("" if idle else f": NOT IDLE, the figures below are not an idle machine's (limit "
                           f"{100 * IDLE_BUSY_LIMIT:.0f}%)")))
    result = {"cores": cores, "load_before": load, "idle": idle, "model": model}
    result["one"] = measure(1, args)
    result["all"] = measure(cores, args)
    make_engine("numba", "cpu", threads=cores)
    result["pools"] = observed()  # as an engine of `cores` threads leaves them: BLAS 1 per call, Numba `cores`
    if not args.no_busy:
        with busy_process():
            result["busy_all"] = measure(cores, args)
            result["busy_one"] = measure(1, args)
    if cores > 1 and not args.no_mpi:
        result["data_parallel"] = data_parallel_figures(cores, args.quick)
    _print(result)
    return result


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _print(r: dict):
    cores, one, every = r["cores"], r["one"], r["all"]
    busy_all, busy_one = r.get("busy_all", {}), r.get("busy_one", {})
    head = ["figure", "1 thread", f"{cores} threads", "scaling", "efficiency", "busy: 1 thr", f"busy: {cores} thr",
            "busy/idle", "busy/1-thread"]
    lines = []
    for key, label in FIGURES:
        if key not in every:
            continue
        scaling = _ratio(every[key], one[key])
        lines.append([label, one[key], every[key], scaling, None if scaling is None else scaling / cores,
                      busy_one.get(key), busy_all.get(key), _ratio(busy_all.get(key), every[key]),
                      _ratio(busy_all.get(key), one[key])])
    fmt = ["{}", "{:,.1f}", "{:,.1f}", "{:.2f}x", "{:.2f}", "{:,.1f}", "{:,.1f}", "{:.2f}", "{:.2f}"]
    cells = [[("-" if v is None else f.format(v)) for v, f in zip(line, fmt)] for line in lines]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for c in cells:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    print(f"products of the step at {cores} threads: {100 * _ratio(every['step_matmul_GFLOPs'], every['sgemm_GFLOPs']):.0f}% "
          f"of the {cores}-thread square product's rate; {100 * every['step_matmul_share']:.0f}% of the step is products")
    sgemm_scaling = _ratio(every["sgemm_GFLOPs"], one["sgemm_GFLOPs"])
    print(f"the step's scaling against the square product's in this run (what the machine's cores gave at that "
          f"moment): {_ratio(_ratio(every['step_tok_s'], one['step_tok_s']), sgemm_scaling):.2f}")
    print(f"batch 8 / batch 1 ({cores} threads): {_ratio(every['batch8_tok_s'], every['rnn_tok_s']):.1f}x; prefill / RNN "
          f"batch 1: {_ratio(every['prefill_tok_s'], every['rnn_tok_s']):.1f}x")
    if every.get("official_tok_s"):
        print(f"ours / official rwkv at batch 1: {_ratio(every['rnn_tok_s'], every['official_tok_s']):.2f}x at {cores} "
              f"threads, {_ratio(one['rnn_tok_s'], one.get('official_tok_s')) or float('nan'):.2f}x at 1")
    for name, value in r.get("data_parallel", {}).items():
        print(f"minirwkv train, {name}: " + (value if isinstance(value, str) else
                                             "failed" if value is None else f"{value:,.0f} tokens/s"))
    print(f"pools after the run: {r['pools']}")
    if not r["idle"]:
        print("NOTE: the machine was not idle when this run started; compare only ratios taken in this run")


if __name__ == "__main__":
    worker_main()
