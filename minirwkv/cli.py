"""The ``minirwkv`` command (console script and ``python -m minirwkv``).

    minirwkv train [--config recipes/x.toml] [--key=value ...]     train; ends by printing a sample
    minirwkv sample --checkpoint out/best.ckpt --prompt "def "      prefill in parallel mode, then RNN mode
    minirwkv prepare --data shakespeare --tokenizer char --out data/shakespeare_char
    minirwkv plot out                                                loss.png from out/log.jsonl
    minirwkv convert MODEL.pth OUT.ckpt                              official .pth -> minirwkv checkpoint
    minirwkv bench [...]                                             kernel benchmarks

Training configuration: the defaults of ``minirwkv.config.TrainConfig``, then a TOML file's keys, then the
command line's ``--key=value`` overrides (typed; an unknown key fails with the list of valid ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib

from .config import TrainConfig, apply_overrides, field_types, parse_overrides
from .engine.distributed import launched_rank
from .engine.process import tune_for_training

COMMANDS = ("train", "sample", "prepare", "plot", "convert", "bench")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n")[1])
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nminirwkv: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    tune_for_training()  # process-wide settings (minirwkv/process.py); the library never applies them
    try:
        return {"train": cmd_train, "sample": cmd_sample, "prepare": cmd_prepare, "plot": cmd_plot,
                "convert": cmd_convert, "bench": cmd_bench}[command](rest)
    except (ValueError, RuntimeError) as e:  # bad input: the message names the problem and the fix
        if launched_rank() == 0:  # under mpiexec every rank raises the same error; rank 0 reports it
            print(f"minirwkv {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop (which saves and returns): nothing to save
        print(f"\nminirwkv {command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------

def train_config(argv: list[str]) -> TrainConfig:
    """Defaults <- ``--config FILE.toml`` <- ``--key=value``. A bare ``--flag`` sets a boolean field to true."""
    overrides, rest = parse_overrides(argv)
    config_path = overrides.pop("config", None)
    types = field_types(TrainConfig)
    leftover = []
    it = iter(rest)
    for arg in it:
        if arg == "--config":
            config_path = next(it, None)
            if config_path is None:
                raise ValueError("--config needs a TOML file: --config recipes/shakespeare_char.toml")
        elif arg.startswith("--") and types.get(arg[2:].replace("-", "_")) is bool:
            overrides[arg[2:]] = "true"
        else:
            leftover.append(arg)
    if leftover:
        raise ValueError(f"unexpected argument(s) {' '.join(leftover)}: write options as --key=value "
                         f"(e.g. --n_layer=4); `minirwkv train --help` lists the keys")
    config = TrainConfig()
    if config_path is not None:
        try:
            with open(config_path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--config {config_path}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {config_path}: not valid TOML ({e})") from None
        config = apply_overrides(config, table)
    return apply_overrides(config, overrides)


def train_help() -> str:
    lines = ["usage: minirwkv train [--config FILE.toml] [--key=value ...]", "", "keys (default):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default}")
    return "\n".join(lines)


def cmd_train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(train_help())
        return 0
    from .engine.train import NonFiniteLoss, train

    config = train_config(argv)
    try:
        result = train(config)
    except NonFiniteLoss as e:
        if launched_rank() == 0:  # under mpiexec every rank stops at the same step; rank 0 reports it
            print(f"minirwkv train: {e}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 130  # the shell's convention for "stopped by Ctrl-C"; last.ckpt is saved
    if result.rank != 0:  # a data-parallel run: rank 0 prints the summary and the sample
        return 0
    print(f"done: step {result.step}, val loss {result.val_loss:.4f} (best {result.best_val:.4f}), "
          f"{result.elapsed:.0f} s; checkpoints in {result.out_dir}")
    if config.sample_tokens > 0:
        print(f"--- sample ({config.sample_tokens} tokens, temperature 0.8) ---")
        from .engine.generate import generate
        from .engine.train import to_numpy

        for piece in generate(to_numpy(result.params), result.tokenizer, "", config.sample_tokens, temperature=0.8,
                              seed=config.seed):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        print()
    return 0


# ---------------------------------------------------------------------------------------------------------------
# sample (minirwkv/generate.py: prefill in parallel mode, then RNN mode, streaming the text)
# ---------------------------------------------------------------------------------------------------------------

def cmd_sample(argv: list[str]) -> int:
    from .engine.generate import add_sample_arguments, run_sample

    parser = argparse.ArgumentParser(prog="minirwkv sample", description="Continue a prompt with a trained model.")
    add_sample_arguments(parser)
    return run_sample(parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------------------------
# prepare, plot, convert, bench
# ---------------------------------------------------------------------------------------------------------------

def cmd_prepare(argv: list[str]) -> int:
    from .engine.data import format_stats, prepare

    parser = argparse.ArgumentParser(prog="minirwkv prepare",
                                     description="Tokenize a corpus once into memory-mapped train/val token files.")
    parser.add_argument("--data", default="stdlib", help="stdlib, shakespeare, or a UTF-8 text file")
    parser.add_argument("--tokenizer", default="byte", help="byte, char, bpe, gpt2")
    parser.add_argument("--out", required=True, help="folder for train.npy, val.npy, meta.json")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--bpe-vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    dataset = prepare(args.data, args.out, args.tokenizer, args.val_fraction, args.bpe_vocab_size)
    print(format_stats(dataset.stats))
    print(f"wrote {args.out}/train.npy, val.npy, meta.json; train with --data={args.out}")
    return 0


def cmd_plot(argv: list[str]) -> int:
    from pathlib import Path

    from .tools.plot import plot_log

    parser = argparse.ArgumentParser(prog="minirwkv plot", description="Draw loss.png from a run's log.jsonl.")
    parser.add_argument("run", nargs="?", default="out", help="a run folder or its log.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: loss.png next to the log)")
    args = parser.parse_args(argv)
    log = Path(args.run)
    log = log / "log.jsonl" if log.is_dir() else log
    if not log.exists():
        raise ValueError(f"{log}: no such log; pass a run folder (the out_dir of minirwkv train)")
    print(plot_log(log, args.out))
    return 0


def cmd_convert(argv: list[str]) -> int:
    from .io.checkpoint import main as convert_main

    return convert_main(argv)


def cmd_bench(argv: list[str]) -> int:
    try:
        from .bench import main as bench_main
    except ImportError:
        raise RuntimeError("this minirwkv has no benchmarks (the bench/ folder of a checkout)") from None
    bench_main(argv)
    return 0
