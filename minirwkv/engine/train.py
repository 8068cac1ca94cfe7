"""The training loop, read top to bottom (docs/training.md).

    config -> data -> tokenizer -> params (init, or resume from last.ckpt) -> for each step:
        lr schedule -> batch (seed, step) -> loss_and_grads -> finite? -> clip -> AdamW
        every eval_interval: val loss on fixed batches, save last.ckpt (and best.ckpt when it improves)

A checkpoint holds the weights, the AdamW moments, the step, the model and train configs, the tokenizer's spec, the
WKV backend used and the sha256 of the corpus; it is written atomically (``minirwkv.checkpoint``). Because a batch
is a function of (seed, step) and the optimizer state is saved whole, ``resume`` continues bit-identically.
Ctrl-C saves last.ckpt and returns; a non-finite loss raises ``NonFiniteLoss`` and saves nothing, so the last good
checkpoint is left as it was.

Under ``mpiexec -n N`` the same loop runs data-parallel (``minirwkv.distributed``, docs/distributed.md): each rank
computes B/N rows of the global batch, one Allreduce averages the loss and the gradients, every rank applies the
same update, and rank 0 alone evaluates, logs and writes files. With one process none of that code runs.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from . import optim
from ..config import RESUME_SAFE_KEYS
from ..io.atomic import atomic_write, remove_orphan_temps
from ..paths import output_folder
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig
from .data import check_splits, get_batch, load_dataset, shard_rows
from .distributed import (SingleProcess, agree, average_gradients, broadcast_state, check_in_step, flat_layout,
                          init_world, on_root)
from ..api import config_from_params, init_params, model_for
from ..backends.engine import make_engine
from ..backends.threads import resolve_threads
from ..layers import cross_entropy_forward
from ..tokenizers.core import tokenizer_from_spec
from ..devices import module_for_device
from ..devices import to_numpy as _to_numpy

LAST, BEST = "last.ckpt", "best.ckpt"


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN/inf; nothing was saved after the last good checkpoint."""


class TrainState(NamedTuple):
    params: dict  # official key -> array (NumPy or CuPy)
    opt: optim.AdamWState  # opt.step is the number of updates taken: the step counter of the run


class TrainResult(NamedTuple):
    params: dict
    step: int
    val_loss: float | None  # at the end (None when interrupted)
    best_val: float
    tokenizer: object
    backend: str
    out_dir: Path
    elapsed: float  # seconds, summed over resumed segments
    interrupted: bool
    rank: int = 0  # this process's rank in a data-parallel run (0 alone prints and writes files)
    world_size: int = 1  # the number of processes


def threads_for(config: TrainConfig, world) -> int:
    """This process's CPU threads: ``config.threads`` if set (per process), else the default count
    (backends/threads.py) shared between the ranks on this machine (2 cores, 2 ranks: one each)."""
    if config.threads:
        return config.threads
    return max(1, resolve_threads() // max(1, world.local_size))


def to_numpy(params: dict) -> dict:
    return {k: _to_numpy(a) for k, a in params.items()}


class Logger:
    """Plain progress lines on stdout, a progress bar on stderr only when it is a terminal, records in log.jsonl."""

    def __init__(self, path: Path, max_iters: int, echo: Callable = print):
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.file = open(path, "a")
        if torn:  # the last line was cut by a full disk or a kill: readers skip it, and the next record starts afresh
            self.file.write("\n")
        self.max_iters = max_iters
        self.echo = echo
        self.bar = sys.stderr.isatty()

    def record(self, **fields):
        self.file.write(json.dumps(fields) + "\n")
        self.file.flush()

    def line(self, text: str):
        if self.bar:
            sys.stderr.write("\r\033[K")
        self.echo(text)

    def progress(self, step: int, loss: float):
        if self.bar:
            done = int(30 * step / max(self.max_iters, 1))
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.max_iters} loss {loss:.4f}")
            sys.stderr.flush()

    def close(self):
        if self.bar:
            sys.stderr.write("\r\033[K")
        self.file.close()


class NullLogger:
    """What ranks other than 0 log: nothing (rank 0 reports for the whole run)."""

    def record(self, **fields):
        pass

    def line(self, text: str):
        pass

    def progress(self, step: int, loss: float):
        pass

    def close(self):
        pass


def quiet(*args):
    pass


def evaluate(model, params: dict, val: np.ndarray, config: TrainConfig, xp) -> float:
    """Mean loss over eval_iters fixed validation batches (stream 1 of the seed), the same at every evaluation.
    ``model``: the minirwkv.api.Model the run checked once at setup."""
    losses = []
    for i in range(config.eval_iters):
        x, y = get_batch(val, config.block_size, config.batch_size, config.seed, i, stream=1)
        logits, _, _ = model.forward(params, xp.asarray(x))  # (B, T, V)
        losses.append(cross_entropy_forward(logits, xp.asarray(y))[0])
    return float(np.mean(losses))


def save(path: Path, state: TrainState, meta: dict):
    """Write a checkpoint atomically; a failed write (a full disk) leaves the previous file as it was."""
    try:
        save_checkpoint(path, to_numpy(state.params), meta={**meta, "step": state.opt.step},
                        arrays=optim.state_to_arrays(state.opt))
    except OSError as e:
        raise RuntimeError(f"could not save {path} at step {state.opt.step} ({e.strerror or e}); the previous "
                           f"{path.name}, if any, is untouched. Free some space, then continue with --resume=true") \
            from None


def resume_state(path: Path, config: TrainConfig, xp):
    """(TrainState, checkpoint meta) from ``path``, after checking it is a run of the same model."""
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"cannot resume from {path}: {e}") from None
    saved = config_from_params(ckpt.params)
    wanted = config.model_config(saved.vocab_size)
    fields = ("version", "n_layer", "n_embd", "dim_ffn") + (("head_size",) if saved.version != "4" else ())
    if any(getattr(saved, f) != getattr(wanted, f) for f in fields):
        have = ", ".join(f"{f}={getattr(saved, f)}" for f in fields)
        asked = ", ".join(f"{f}={getattr(wanted, f)}" for f in fields)
        raise ValueError(f"cannot resume from {path}: it holds a model with {have}; the config asks for {asked}. "
                         f"Use the same shape, or a new out_dir")
    dtype = np.dtype(config.dtype)
    params = {k: xp.asarray(np.array(a, dtype=dtype)) for k, a in ckpt.params.items()}
    opt = optim.state_from_arrays(ckpt.arrays, ckpt.meta.get("step", 0), params)
    return TrainState(params, opt), ckpt.meta


def non_default_keys(config: TrainConfig) -> set:
    """The keys of ``config`` that differ from TrainConfig's defaults: what a caller set, when it does not say."""
    defaults = TrainConfig()
    return {k for k, v in config.to_dict().items() if v != getattr(defaults, k)}


def resume_config(given: TrainConfig, saved: dict, explicit: set) -> tuple[TrainConfig, list[str]]:
    """The configuration a resumed run continues with, and the notes to print about it.

    Every key comes from the run's checkpoint (``saved``, its meta["train"]), except the keys of RESUME_SAFE_KEYS
    that were given (``explicit``). A given key outside that set that differs from the saved value would change the
    model, the data or the optimizer: refused, naming every such key with both values.
    """
    fields = set(given.to_dict())
    differing = sorted(k for k in explicit if k in saved and k in fields and k not in RESUME_SAFE_KEYS
                       and saved[k] != getattr(given, k))
    if differing:
        pairs = ", ".join(f"{k} (saved {saved[k]!r}, given {getattr(given, k)!r})" for k in differing)
        raise ValueError(f"--resume continues the saved run, but these settings differ from it: {pairs}; drop them, "
                         f"or start a new run with another --out_dir")
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({k: getattr(given, k) for k in RESUME_SAFE_KEYS & fields if k in explicit})
    values.update(out_dir=given.out_dir, resume=True, overwrite=False)
    config = TrainConfig(**values)
    notes = []
    if config.max_iters != saved.get("max_iters", config.max_iters):
        notes.append(f"max_iters changed from {saved['max_iters']} to {config.max_iters}: the learning-rate schedule "
                     f"follows max_iters, so from here the run is no longer bit-identical to one that never stopped")
    return config, notes


def train(config: TrainConfig, on_step: Callable | None = None, echo: Callable = print, world=None,
          explicit: set | None = None) -> TrainResult:
    """Train as ``config`` says; ``on_step(step, loss)`` is called after every update (tests raise from it).

    With ``config.resume`` the run saved in out_dir continues with its own configuration (``resume_config``);
    ``explicit`` names the keys the user gave (the command line passes them; default: those that differ from
    TrainConfig's defaults). ``world``: the processes training together; by default ``init_world(config.distributed)``
    decides (one process unless launched by mpiexec). Tests pass a fake.
    """
    notes = []
    if config.resume:
        last = Path(config.out_dir) / LAST
        if not last.exists():
            raise ValueError(f"--resume: no {last} to resume from; train once without --resume first")
        try:
            saved = load_checkpoint(last).meta.get("train")
        except ValueError as e:
            raise ValueError(f"cannot resume from {last}: {e}") from None
        if not isinstance(saved, dict):
            raise ValueError(f"cannot resume from {last}: it was not written by minirwkv train (no train settings "
                             f"in its metadata); start a new run in another out_dir")
        config, notes = resume_config(config, saved, non_default_keys(config) if explicit is None else set(explicit))
    world = init_world(config.distributed, config.device) if world is None else world
    for note in notes if world.rank == 0 else ():
        echo(f"note: {note}")
    return _train(config, on_step, echo if world.rank == 0 else quiet, world)


def _train(config: TrainConfig, on_step: Callable | None, echo: Callable, world=SingleProcess()) -> TrainResult:
    t_start = time.perf_counter()
    out = Path(config.out_dir)
    root = world.rank == 0  # rank 0 evaluates, logs and writes files; in a single process, the only rank
    # every rank sets up, and all stop together when one cannot (a file only one of them misses)
    with agree(world):
        shard_rows(config.batch_size, world.rank, world.size)  # the global batch must split evenly
        state, meta, data, tokenizer, model, model_config = _setup(config, out, root, threads_for(config, world))
    backend = model.engine.name
    xp = module_for_device(config.device)
    if world.size > 1:  # every rank starts from rank 0's parameters and moments, whatever each loaded
        params, m, v = broadcast_state(world, state.params, state.opt.m, state.opt.v, xp)
        state = TrainState(params, optim.AdamWState(world.bcast(state.opt.step), m, v))
    run_meta = {"model": {"version": model_config.version, "vocab_size": model_config.vocab_size,
                          "n_embd": model_config.n_embd, "n_layer": model_config.n_layer,
                          "dim_ffn": model_config.dim_ffn, "head_size": model_config.head_size},
                "train": config.to_dict(), "tokenizer": tokenizer.spec(), "backend": backend,
                "data_sha256": data.fingerprint}
    if world.size > 1:
        run_meta["world_size"] = world.size
    if root:
        with atomic_write(out / "run_config.json", "w") as f:
            f.write(json.dumps({**run_meta, "data_stats": data.stats}, indent=1))
    best_val = float(meta.get("best_val", math.inf))
    elapsed_before = float(meta.get("elapsed", 0.0))
    n_params = sum(int(a.size) for a in state.params.values())
    parallel = (f", data-parallel over {world.size} processes ({world.backend}): {config.batch_size // world.size} "
                f"of the {config.batch_size} rows each" if world.size > 1 else "")
    echo(f"{'resuming at step ' + str(state.opt.step) if config.resume else 'training'}: {n_params:,} parameters "
         f"(RWKV-{'5.2' if config.version == '5' else config.version}, n_layer={config.n_layer}, "
         f"n_embd={config.n_embd}, vocab {tokenizer.vocab_size}, {tokenizer.name} "
         f"tokens), WKV backend {backend}, device {config.device}, {data.stats['train_tokens']:,} train tokens"
         f"{parallel}")

    # --- the loop ---------------------------------------------------------------------------------------------------
    log = Logger(out / "log.jsonl", config.max_iters, echo) if root else NullLogger()
    if config.resume:  # readers replace what an earlier segment logged after this step (tools/plot.read_log)
        log.record(kind="resume", step=state.opt.step, elapsed=round(elapsed_before, 3))
    tokens_per_step = config.batch_size * config.block_size  # the global batch, over all ranks
    layout = flat_layout(state.params) if world.size > 1 else None  # the gradients' places in the flat buffer
    budget = config.max_seconds if config.max_seconds > 0 else math.inf
    eval_seconds = step_seconds = 0.0  # the last evaluation's and step's durations: the deadline keeps room

    def elapsed():
        return time.perf_counter() - t_start

    def evaluate_and_save():  # rank 0 only
        val_loss = evaluate(model, state.params, data.val, config, xp)
        log.record(kind="eval", step=state.opt.step, elapsed=round(elapsed_before + elapsed(), 3), val_loss=val_loss)
        log.line(f"step {state.opt.step}: val loss {val_loss:.4f} ({elapsed_before + elapsed():.0f} s)")
        improved = val_loss < best_val
        new_best = min(best_val, val_loss)
        save_meta = {**run_meta, "val_loss": val_loss, "best_val": new_best, "elapsed": elapsed_before + elapsed()}
        save(out / LAST, state, save_meta)
        if improved:
            save(out / BEST, state, save_meta)
        return val_loss, new_best

    def do_eval():
        nonlocal best_val, eval_seconds
        t0 = time.perf_counter()
        val_loss, best_val = on_root(world, evaluate_and_save)  # the other ranks wait for rank 0's verdict
        if world.size > 1:
            check_in_step(world, state.params, state.opt.step)
        eval_seconds = time.perf_counter() - t0
        return val_loss

    interrupted, val_loss = False, None
    window_loss, window_steps, t_window = 0.0, 0, time.perf_counter()
    try:
        while state.opt.step < config.max_iters:
            step = state.opt.step
            if step % config.eval_interval == 0 and not (config.resume and step == meta.get("step")
                                                         and "val_loss" in meta):
                do_eval()
            spent = elapsed_before + elapsed()  # the budget covers the whole run, over all its resumed segments
            stop = spent + 1.5 * eval_seconds + step_seconds >= budget  # room for one more step and the eval
            progress = None if budget == math.inf else min(spent / budget, 1.0)
            if world.size > 1 and budget != math.inf:  # rank 0's clock decides, so every rank stops together
                stop, progress = world.bcast((stop, progress))
            if stop:
                log.line(f"wall-clock budget of {budget:.0f} s reached at step {step}")
                break
            lr = optim.learning_rate(step, config.learning_rate, config.lr_final, config.warmup_iters,
                                     config.max_iters, config.lr_decay, config.warmup, progress)
            t_step = time.perf_counter()
            x, y = get_batch(data.train, config.block_size, config.batch_size, config.seed, step,
                             rank=world.rank, world_size=world.size)  # (B/N, T) this rank's share
            try:
                loss, grads = model.loss_and_grads(state.params, xp.asarray(x), xp.asarray(y), l2wrap=config.l2wrap)
            except FloatingPointError as e:
                if world.size == 1:
                    raise _non_finite(step, str(e), out) from None
                loss, grads = math.nan, None  # NaN to the others: every rank stops at this step
            if world.size > 1:  # mean over the ranks' shares = the gradient of the global batch
                loss, grads = average_gradients(world, layout, grads, loss, xp, np.dtype(config.dtype))
            grads, norm = optim.clip_grad_norm(grads, config.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise _non_finite(step, f"loss {loss}, gradient norm {norm}", out)
            params, opt = optim.adamw_step(state.params, grads, state.opt, lr, (config.beta1, config.beta2),
                                           config.eps, config.weight_decay, fused=model.engine.adamw_update is not None)
            state = TrainState(params, opt)  # one assignment: Ctrl-C sees the old pair or the new one
            step_seconds = time.perf_counter() - t_step
            window_loss, window_steps = window_loss + loss, window_steps + 1
            if state.opt.step % config.log_interval == 0 or state.opt.step == config.max_iters:
                dt = (time.perf_counter() - t_window) / window_steps
                log.record(kind="train", step=state.opt.step, elapsed=round(elapsed_before + elapsed(), 3),
                           loss=window_loss / window_steps, lr=lr, grad_norm=norm, ms_per_step=1000 * dt,
                           tokens_per_s=tokens_per_step / dt)
                log.line(f"step {state.opt.step}: loss {window_loss / window_steps:.4f}, lr {lr:.2e}, "
                         f"{1000 * dt:.0f} ms/step, {tokens_per_step / dt:,.0f} tokens/s")
                window_loss, window_steps, t_window = 0.0, 0, time.perf_counter()
            log.progress(state.opt.step, loss)
            if on_step is not None:
                on_step(state.opt.step, loss)
        val_loss = do_eval()
    except KeyboardInterrupt:  # under mpiexec every rank gets the signal; rank 0 saves, without a collective
        interrupted = True
        if root:
            save(out / LAST, state, {**run_meta, "best_val": best_val, "elapsed": elapsed_before + elapsed()})
        log.line(f"interrupted at step {state.opt.step}: saved {out / LAST}; continue with --resume=true")
    finally:
        log.close()

    if config.plot and not interrupted and root:
        from ..tools.plot import PlotUnavailable, plot_log

        try:
            echo(f"loss curve: {plot_log(out / 'log.jsonl')}")
        except PlotUnavailable as e:
            echo(f"no loss curve: {e}")
    return TrainResult(state.params, state.opt.step, val_loss, best_val, tokenizer, backend, out,
                       elapsed_before + elapsed(), interrupted, world.rank, world.size)


def _setup(config: TrainConfig, out: Path, root: bool, threads: int = 1):
    """(TrainState, checkpoint meta, Dataset, tokenizer, WKV backend name, ModelConfig) of a new or resumed run."""
    output_folder(out, "--out_dir", make=False)  # a file in the way: one line, before anything is touched
    held = [name for name in (LAST, BEST) if (out / name).exists()]
    if held and not config.resume and not config.overwrite:
        raise ValueError(f"--out_dir {out} already holds a run ({', '.join(held)}); continue it with --resume=true, "
                         f"start a new one with another --out_dir, or replace it with --overwrite=true")
    if root:
        out.mkdir(parents=True, exist_ok=True)
        remove_orphan_temps(out)  # what a killed checkpoint write left behind
    xp = module_for_device(config.device)

    # --- resume: the checkpoint fixes the tokenizer, the weights and the optimizer state -----------------------
    meta, tokenizer = {}, None
    if config.resume:
        if not (out / LAST).exists():
            raise ValueError(f"--resume: no {out / LAST} to resume from; train once without --resume first")
        state, meta = resume_state(out / LAST, config, xp)
        if "tokenizer" not in meta or "step" not in meta:
            raise ValueError(f"cannot resume from {out / LAST}: it was not written by minirwkv train (no step or "
                             f"tokenizer in its metadata); start a new run in another out_dir")
        tokenizer = tokenizer_from_spec(meta["tokenizer"])

    # --- data and tokenizer ---------------------------------------------------------------------------------------
    data = load_dataset(config.data, config.tokenizer, config.val_fraction, config.bpe_vocab_size, tokenizer)
    tokenizer = data.tokenizer
    check_splits(data.train, data.val, config.block_size)  # advice that fits both splits
    if config.resume and meta.get("data_sha256") != data.fingerprint:
        raise ValueError(f"--resume: {out / LAST} was trained on other text (sha256 {meta.get('data_sha256')}) "
                         f"than --data {config.data} (sha256 {data.fingerprint}); pass the same corpus")

    # --- parameters -----------------------------------------------------------------------------------------------
    model_config = config.model_config(tokenizer.vocab_size)
    if not config.resume:
        params = {k: xp.asarray(a) for k, a in init_params(model_config, config.seed, np.dtype(config.dtype)).items()}
        state = TrainState(params, optim.adamw_init(params))
    elif state.params["emb.weight"].shape[0] != tokenizer.vocab_size:
        raise ValueError(f"--resume: the checkpoint's vocabulary ({state.params['emb.weight'].shape[0]}) differs "
                         f"from its tokenizer's ({tokenizer.vocab_size}): a corrupt checkpoint")
    engine = make_engine(config.impl, config.device, threads if config.device == "cpu" else None)
    model = model_for(state.params, engine)  # validated once; the loop calls the unchecked Model
    if config.overwrite and root:  # the old run's files go now, so the new log and checkpoints are all this run's
        for name in (LAST, BEST, "log.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)
    return state, meta, data, tokenizer, model, model_config


def _non_finite(step: int, what: str, out: Path) -> NonFiniteLoss:
    kept = f"the last good checkpoint {out / LAST} is untouched" if (out / LAST).exists() else "nothing was saved"
    return NonFiniteLoss(f"non-finite loss at step {step} ({what}): training stopped; {kept}. Resume from it with a "
                         f"lower --learning_rate or --grad_clip (--resume=true)")
