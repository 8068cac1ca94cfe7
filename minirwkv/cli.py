"""The ``minirwkv`` command (console script and ``python -m minirwkv``).

    minirwkv train [--config recipes/x.toml] [--key=value ...]     train; ends by printing a sample
    minirwkv sample --checkpoint out/best.ckpt --prompt "def "      prefill in parallel mode, then RNN mode
    minirwkv prepare --data shakespeare --tokenizer char --out data/shakespeare_char
    minirwkv plot out                                                loss.png from out/log.jsonl
    minirwkv convert MODEL.pth OUT.ckpt                              official .pth -> minirwkv checkpoint
    minirwkv bench [...]                                             kernel benchmarks

One convention for every command: options are ``--key=value`` or ``--key value``, words joined by underscores
(``--max_new_tokens``; the hyphen spelling ``--max-new-tokens`` is the same option), a bare ``--flag`` sets a
boolean to true, and every ``--help`` names the defaults. A mistake in the options is one line,
"minirwkv CMD: error: ...", and the exit status 1.

Training configuration: the defaults of ``minirwkv.config.TrainConfig``, then a TOML file's keys, then the
command line's keys (typed; an unknown key fails with the list of valid ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import tomllib

from .config import (FALSE_WORDS, RESUME_SAFE_KEYS, TRAIN_HELP, TRUE_WORDS, TrainConfig, apply_overrides,
                     field_types, unknown_key)
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
    except OSError as e:  # a path the checks could not foresee (permissions, a full disk): still one line
        if launched_rank() == 0:
            where = f"{e.filename}: " if e.filename else ""
            print(f"minirwkv {command}: error: {where}{e.strerror or e}; check the path and its permissions",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop (which saves and returns): nothing to save
        print(f"\nminirwkv {command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------

def train_config(argv: list[str]) -> TrainConfig:
    """Defaults <- ``--config FILE.toml`` <- the command line: ``--key=value`` or ``--key value``, hyphens read as
    underscores; a bare ``--flag`` sets a boolean key to true (``--flag false`` sets it to false)."""
    return train_config_and_keys(argv)[0]


def train_config_and_keys(argv: list[str]) -> tuple[TrainConfig, set]:
    """``train_config``, and the keys the user gave (in the TOML file or on the command line): a resumed run takes
    only those of them that may change (config.RESUME_SAFE_KEYS), and refuses the others if they differ."""
    types = field_types(TrainConfig)
    overrides, config_path = {}, None
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: write options as --key=value or --key value "
                             f"(e.g. --n_layer=4); `minirwkv train --help` lists the keys")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key != "config" and key not in types:
            raise unknown_key(key, TrainConfig)
        following = argv[i] if i < len(argv) else None
        if eq:
            pass
        elif types.get(key) is bool:
            value = "true"
            if following is not None and following.lower() in TRUE_WORDS + FALSE_WORDS:
                value, i = following, i + 1
        elif following is None or following.startswith("--"):
            raise ValueError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE"
                             + (" (e.g. --config recipes/shakespeare_char.toml)" if key == "config" else ""))
        else:
            value, i = following, i + 1
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
    config, table = TrainConfig(), {}
    if config_path is not None:
        try:
            with open(config_path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--config {config_path}: cannot read it ({e.strerror}); pass a TOML file such as "
                             f"recipes/shakespeare_char.toml") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {config_path}: not valid TOML ({e})") from None
        config = apply_overrides(config, table)
    explicit = {k.replace("-", "_") for k in (*table, *overrides)}
    return apply_overrides(config, overrides), explicit


def show(value) -> str:
    """A default as the command line writes it: none, true, false, 2e-3."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def train_help() -> str:
    """Every key with its default and a line on what it does (config.TRAIN_HELP), and the keys a resume may change."""
    keys = [("--config=FILE.toml", "a TOML file of key = value lines; the command line wins over it")]
    keys += [(f"--{f.name}={show(f.default)}", TRAIN_HELP[f.name]) for f in dataclasses.fields(TrainConfig)]
    width = max(len(k) for k, _ in keys) + 2
    return "\n".join([
        "usage: minirwkv train [--config FILE.toml] [--key=value ...]", "",
        "Train an RWKV model on a corpus, or continue a saved run (--resume). Write keys as --key=value or --key "
        "value",
        "(--block-size is --block_size); a bare --flag sets a boolean key to true.", "",
        "keys (=default):", *(f"  {k:<{width}}{h}" for k, h in keys), "",
        "With --resume the configuration comes from out_dir/last.ckpt; only these keys may be given another value:",
        textwrap.fill(", ".join(sorted(RESUME_SAFE_KEYS)), 116, initial_indent="  ", subsequent_indent="  ")])


def cmd_train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(train_help())
        return 0
    from .engine.train import NonFiniteLoss, train

    config, explicit = train_config_and_keys(argv)
    try:
        result = train(config, explicit=explicit)
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
                              seed=config.seed, threads=config.threads or None):  # --threads holds here too
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        print()
    return 0


# ---------------------------------------------------------------------------------------------------------------
# sample (minirwkv/generate.py: prefill in parallel mode, then RNN mode, streaming the text)
# ---------------------------------------------------------------------------------------------------------------

def sample_parser() -> argparse.ArgumentParser:
    from .engine.generate import add_sample_arguments

    parser = Parser(prog="minirwkv sample", description="Continue a prompt with a trained model.")
    add_sample_arguments(parser)
    return parser


def cmd_sample(argv: list[str]) -> int:
    from .engine.generate import run_sample

    return run_sample(sample_parser().parse_args(spell(argv)))


# ---------------------------------------------------------------------------------------------------------------
# prepare, plot, convert, bench
# ---------------------------------------------------------------------------------------------------------------

PREPARE_KEYS = ("data", "tokenizer", "val_fraction", "bpe_vocab_size")  # TrainConfig's keys, checked as train does


def prepare_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minirwkv prepare",
                    description="Tokenize a corpus once into memory-mapped train/val token files.")
    for key in PREPARE_KEYS:
        parser.add_argument(f"--{key}", default=show(getattr(TrainConfig(), key)), help=TRAIN_HELP[key])
    parser.add_argument("--out", required=True, help="the folder to write: train.npy, val.npy, meta.json")
    parser.add_argument("--overwrite", nargs="?", const="true", default="false",
                        help="replace a dataset already prepared in --out")
    return parser


def cmd_prepare(argv: list[str]) -> int:
    from .engine.data import format_stats, prepare

    args = prepare_parser().parse_args(spell(argv))
    config = apply_overrides(TrainConfig(), {key: getattr(args, key) for key in (*PREPARE_KEYS, "overwrite")})
    dataset = prepare(config.data, args.out, config.tokenizer, config.val_fraction, config.bpe_vocab_size,
                      overwrite=config.overwrite)  # typed and range-checked as train checks them
    print(format_stats(dataset.stats))
    print(f"wrote {args.out}/train.npy, val.npy, meta.json; train with --data={args.out}")
    return 0


def plot_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minirwkv plot", description="Draw loss.png from a run's log.jsonl.")
    parser.add_argument("run", nargs="?", default="out", help="a run folder (the out_dir of minirwkv train) or its "
                                                              "log.jsonl")
    parser.add_argument("--out", default=None, help="the PNG to write (default: loss.png next to the log)")
    return parser


def cmd_plot(argv: list[str]) -> int:
    from pathlib import Path

    from .paths import output_file
    from .tools.plot import plot_log

    args = plot_parser().parse_args(spell(argv))
    log = Path(args.run)
    log = log / "log.jsonl" if log.is_dir() else log
    if not log.is_file():
        raise ValueError(f"{log}: no such log; pass a run folder (the out_dir of minirwkv train) or its log.jsonl")
    out = None if args.out is None else str(output_file(args.out, "--out", "loss.png"))
    print(plot_log(log, out))
    return 0


def cmd_convert(argv: list[str]) -> int:
    from .io.checkpoint import main as convert_main

    return convert_main(argv)


def cmd_bench(argv: list[str]) -> int:
    try:
        from .bench import main as bench_main
    except ImportError:
        raise RuntimeError("this minirwkv has no benchmarks (the bench/ folder of a checkout)") from None
    bench_main(spell(argv, "-"))  # the benchmarks' own options are spelled with hyphens
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The convention of the argparse commands
# ---------------------------------------------------------------------------------------------------------------

def spell(argv: list[str], sep: str = "_") -> list[str]:
    """``argv`` with the words of every option name joined by ``sep`` (--max-new-tokens=5 -> --max_new_tokens=5):
    both spellings name one option. Values, and everything after a bare ``--``, stay as they are."""
    other = "-" if sep == "_" else "_"
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            arg = "--" + key.replace(other, sep) + eq + value
        out.append(arg)
    return out


class DefaultsHelp(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default does."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or "default" in text or \
                (not action.option_strings and action.nargs is None):
            return text
        return f"{text} (default: {show(action.default)})"


class Parser(argparse.ArgumentParser):
    """argparse with the house conventions: a usage mistake is a ValueError (main prints one line and returns 1),
    no abbreviated options, and defaults in --help."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=DefaultsHelp, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise ValueError(f"{message}; `{self.prog} --help` lists the options")
