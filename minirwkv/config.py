"""Configuration as frozen dataclasses, with typed ``--key=value`` overrides.

Like nanoGPT's ``GPTConfig`` and its ``configurator.py``, but without ``exec`` or globals: an override is parsed
into the field's declared type, and an unknown key fails with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an RWKV model of any generation.

    vocab_size V, n_embd C, n_layer L, dim_ffn F (None: 4C; the official v5.2/v6 training scripts use
    floor(3.5 C / 32) * 32, which checkpoints carry in their shapes).
    version: the generation, "4" (the default), "5" (v5.2), "6", later "7" (minirwkv/generation.py).
    head_size N: channels per head of the matrix-valued state (RWKV-5 and later; RWKV-4 has no heads and ignores
    it); n_embd must be a multiple of it. dim_att equals n_embd and is not a separate field.
    ln_x_eps: the eps of the per-head GroupNorm ``ln_x`` (RWKV-5 and later), on the undivided WKV output; the
    official value is 1e-5 * head_size_divisor**2 = 64e-5 (docs/rwkv5.md §5). A checkpoint's shapes cannot tell it:
    pass ``config=`` to forward / loss_and_grads / prefill to use another.
    d_mix_lora, d_decay_lora: RWKV-6's LoRA ranks of the token-shift ddlerp and of the decay (None: the official
    32 and 64 for version "6"; unused by the other generations); read from the shapes of a checkpoint.
    """

    vocab_size: int
    n_embd: int
    n_layer: int
    dim_ffn: int | None = None
    version: str = "4"
    head_size: int = 64
    ln_x_eps: float = 64e-5
    d_mix_lora: int | None = None
    d_decay_lora: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_embd", "n_layer", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        from .generation import REGISTRY  # a table of names: importing it loads no generation

        if self.version not in REGISTRY:
            raise ValueError(f"ModelConfig.version must be one of {', '.join(REGISTRY)} (a string), got "
                             f"{self.version!r}")
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        elif not isinstance(self.dim_ffn, int) or isinstance(self.dim_ffn, bool) or self.dim_ffn < 1:
            raise ValueError(f"ModelConfig.dim_ffn must be a positive int or None, got {self.dim_ffn!r}")
        if self.version != "4" and self.n_embd % self.head_size:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of head_size={self.head_size}: RWKV-"
                             f"{self.version} splits the channels into heads of head_size; choose head_size among "
                             f"the divisors of n_embd (e.g. {_divisor_near(self.n_embd, self.head_size)}) or change "
                             f"n_embd")
        if not isinstance(self.ln_x_eps, (int, float)) or isinstance(self.ln_x_eps, bool) or \
                not (math.isfinite(self.ln_x_eps) and self.ln_x_eps > 0):
            raise ValueError(f"ModelConfig.ln_x_eps must be a finite number > 0, got {self.ln_x_eps!r}")
        object.__setattr__(self, "ln_x_eps", float(self.ln_x_eps))
        for name, default in (("d_mix_lora", 32), ("d_decay_lora", 64)):
            value = getattr(self, name)
            if value is None:
                if self.version == "6":  # the official ranks; other generations leave them None
                    object.__setattr__(self, name, default)
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int or None, got {value!r}")

    @property
    def dim_att(self) -> int:
        return self.n_embd

    @property
    def n_head(self) -> int:
        """H = n_embd / head_size heads of the matrix-valued state (RWKV-5 and later)."""
        return self.n_embd // self.head_size

    def n_params(self) -> int:
        """The number of parameters: the sum of the generation's shapes."""
        from .generation import get_generation

        return sum(math.prod(s) for s in get_generation(self.version).param_shapes(self).values())


def _divisor_near(n: int, target: int) -> int:
    """The divisor of n closest to target (ties: the larger), for error messages."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), -d))


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _parse_value(text: str, annotation, key: str):
    """Parse ``text`` into the type ``annotation`` (int, float, str, bool, or Optional of these)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(text, inner[0], key)
    if annotation is bool:
        low = text.lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
        raise ValueError(f"--{key} expects a boolean (true/false), got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{key} expects an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{key} expects a number, got {text!r}") from None
    if annotation is str:
        return text
    raise ValueError(f"--{key}: cannot parse values of type {annotation!r}")


def field_types(cls) -> dict:
    """{field name: its type} of the dataclass ``cls`` (a copy: the table itself is computed once per class)."""
    return dict(_field_types(cls))


@functools.cache
def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def apply_overrides(config, overrides: dict):
    """Return a copy of the frozen dataclass ``config`` with ``overrides`` (key -> str or value) applied.

    String values are parsed into the field's type; other values are checked against it. An unknown key raises
    ValueError listing the valid keys.
    """
    types = field_types(type(config))
    changes = {}
    for key, value in overrides.items():
        norm = key.replace("-", "_")
        if norm not in types:
            raise unknown_key(key, type(config))
        if isinstance(value, str):
            value = _parse_value(value, types[norm], norm)
        changes[norm] = _check_type(value, types[norm], norm)
    return dataclasses.replace(config, **changes)


def unknown_key(key: str, cls) -> ValueError:
    """The error for a key that ``cls`` has no field for: the closest key, if one is close, and all valid keys."""
    import difflib

    types = field_types(cls)
    close = difflib.get_close_matches(key.replace("-", "_"), types, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ValueError(f"unknown configuration key {key!r} for {cls.__name__}{hint}; valid keys: "
                      f"{', '.join(sorted(types))}")


def _check_type(value, annotation, key):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        annotation = [a for a in args if a is not type(None)][0]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if annotation is int and isinstance(value, bool):
            raise ValueError(f"--{key} expects int, got bool {value!r}")
        if not isinstance(value, annotation):
            raise ValueError(f"--{key} expects {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_overrides(argv: list[str]) -> tuple[dict, list[str]]:
    """Split ``--key=value`` arguments from the rest. Returns (overrides, remaining)."""
    overrides, rest = {}, []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = value
        else:
            rest.append(arg)
    return overrides, rest


# What each key of TrainConfig allows, beyond its type: (test, the words for it). Floats must also be finite.
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_ABOVE_0 = (lambda v: v > 0, "> 0")
_BETA = (lambda v: 0 <= v < 1, "in [0, 1)")
_TRAIN_RANGES = {
    **dict.fromkeys(("head_size", "n_layer", "n_embd", "dim_ffn", "block_size", "batch_size", "eval_interval", "eval_iters",
                     "log_interval"), _AT_LEAST_1),
    **dict.fromkeys(("max_iters", "warmup_iters", "sample_tokens", "seed", "threads", "lr_final",
                     "weight_decay", "grad_clip", "max_seconds"), _AT_LEAST_0),
    "bpe_vocab_size": (lambda v: v >= 256, ">= 256 (the 256 byte tokens plus the merges)"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "learning_rate": _ABOVE_0, "eps": _ABOVE_0, "beta1": _BETA, "beta2": _BETA,
}

# The tokenizers a model can be trained with (train and prepare build them from the corpus or local files); world
# and hf are the official models' vocabularies, for sampling those models (minirwkv.tokenizers.core.NAMES).
TRAIN_TOKENIZERS = ("byte", "char", "bpe", "gpt2")


def check_train_tokenizer(name: str) -> None:
    """A tokenizer ``train`` and ``prepare`` can use, or a one-line error saying why not."""
    if name in ("world", "hf"):
        raise ValueError(f"--tokenizer={name} is the vocabulary of the official RWKV models, for sampling them "
                         f"(minirwkv sample --tokenizer={name}); train and prepare use one of "
                         f"{', '.join(TRAIN_TOKENIZERS)}")
    if name not in TRAIN_TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {', '.join(TRAIN_TOKENIZERS)}, got {name!r}")


# The keys a resumed run may take from the command line; every other key comes from the checkpoint and a different
# value is refused (minirwkv/train.py). Changing max_iters moves the learning-rate schedule: the run goes on, but it
# is no longer bit-identical to one that never stopped, and train says so.
RESUME_SAFE_KEYS = frozenset({
    "max_iters", "max_seconds", "eval_interval", "log_interval", "out_dir", "resume", "overwrite", "plot",
    "sample_tokens", "impl", "device", "threads", "distributed", "data",
})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; ``minirwkv train --key=value`` overrides any field (types checked).

    The defaults train the default run of the README: a byte-level model of the Python standard library's source
    (``data = "stdlib"``, embedded: nothing to download) in a few minutes on 2 CPU cores. docs/training.md.
    """

    # data and tokenizer
    data: str = "stdlib"  # a text file, a folder written by `minirwkv prepare`, or a named corpus: stdlib, shakespeare
    tokenizer: str = "byte"  # byte, char, bpe, gpt2 (minirwkv.tokenizer)
    bpe_vocab_size: int = 1024  # only for tokenizer = "bpe"
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split
    # model (vocab_size comes from the tokenizer)
    version: str = "4"  # the generation: 4, 5 (v5.2), 6 (minirwkv/generation.py)
    head_size: int = 64  # channels per head of RWKV-5/6's matrix state; n_embd must be a multiple of it
    n_layer: int = 4
    n_embd: int = 128
    dim_ffn: int | None = None  # None: 4 n_embd
    dtype: str = "float32"  # float32 or float64
    # batches
    block_size: int = 128  # T: tokens per sequence
    batch_size: int = 12  # B: sequences per step
    # optimizer (minirwkv.optim)
    learning_rate: float = 2e-3
    lr_final: float = 1e-4
    lr_decay: str = "cosine"  # cosine, exponential (v4neo), linear, constant
    warmup_iters: int = 50
    warmup: str = "rwkv"  # rwkv: lr (0.2 + 0.8 step / warmup_iters); linear: lr (step + 1) / (warmup_iters + 1)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.01  # decoupled, matrices only
    grad_clip: float = 1.0  # global norm; 0 disables
    l2wrap: bool = True  # RWKV-LM's L2Wrap logits regulariser (docs/rwkv4.md §2.7)
    # length of the run
    max_iters: int = 1000
    max_seconds: float = 0.0  # wall-clock budget (> 0): stop, evaluate and save at the deadline
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_iters: int = 8  # fixed validation batches, the same at every evaluation
    log_interval: int = 10
    out_dir: str = "out"
    resume: bool = False  # continue the run saved in out_dir/last.ckpt, with the configuration saved there
    overwrite: bool = False  # start a new run in an out_dir that already holds one, replacing it
    plot: bool = True  # write loss.png at the end (needs matplotlib, the `plot` extra)
    sample_tokens: int = 300  # text printed by `minirwkv train` when it ends (0: none)
    # reproducibility and hardware
    seed: int = 1337
    impl: str = "auto"  # WKV backend: auto, numba, numpy, parallel, cupy, cuda-shim
    device: str = "cpu"  # cpu (NumPy) or cuda (CuPy)
    threads: int = 0  # CPU threads per process (0: MINIRWKV_NUM_THREADS / OMP_NUM_THREADS, else every usable core,
    #                   shared between the ranks of an MPI run on one machine); docs/threads.md
    distributed: str = "auto"  # auto: data-parallel over MPI when launched by mpiexec -n N > 1; off; mpi (always)

    def __post_init__(self):
        """Every value is checked here, when the configuration is made: a bad one fails before any data or model is
        touched, with its key, its value and what is allowed (one line)."""
        for name, annotation in field_types(TrainConfig).items():  # TrainConfig(n_layer="4") fails here, not mid-run
            object.__setattr__(self, name, _check_type(getattr(self, name), annotation, name))  # 5 -> 5.0 for floats
        for name, (ok, allowed) in _TRAIN_RANGES.items():
            value = getattr(self, name)
            if value is None and name == "dim_ffn":
                continue
            if isinstance(value, float) and not math.isfinite(value) or not ok(value):
                kind = "a finite number" if isinstance(value, float) else "an integer"
                raise ValueError(f"--{name} must be {kind} {allowed}, got {value}")
        if self.lr_decay != "constant" and self.lr_final > self.learning_rate:
            raise ValueError(f"--lr_final={self.lr_final} is above --learning_rate={self.learning_rate}: the schedule "
                             f"decays from learning_rate to lr_final; lower --lr_final (or use --lr_decay=constant)")
        check_train_tokenizer(self.tokenizer)
        from .backends import NAMES as ENGINES  # a table of names: importing it compiles nothing

        choices = {"dtype": ("float32", "float64"), "device": ("cpu", "cuda"),
                   "lr_decay": ("cosine", "exponential", "linear", "constant"), "warmup": ("rwkv", "linear"),
                   "distributed": ("auto", "off", "mpi"), "impl": ("auto", *ENGINES)}  # minirwkv.engine.optim, ...
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        from .generation import REGISTRY

        if self.version not in REGISTRY:
            raise ValueError(f"--version must be one of {', '.join(sorted(REGISTRY))} (5 is RWKV-5.2), got "
                             f"{self.version!r}")
        if self.version != "4" and self.n_embd % self.head_size:
            raise ValueError(f"--n_embd={self.n_embd} is not a multiple of --head_size={self.head_size}: RWKV-"
                             f"{self.version} splits the channels into heads; e.g. --head_size="
                             f"{_divisor_near(self.n_embd, self.head_size)}")
        for name in ("data", "out_dir"):
            if not getattr(self, name).strip():
                raise ValueError(f"--{name} is empty; {TRAIN_HELP[name]} (default {_default(name)})")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, n_embd=self.n_embd, n_layer=self.n_layer, dim_ffn=self.dim_ffn,
                           version=self.version, head_size=self.head_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# One line per key for `minirwkv train --help` (and `prepare --help` for the keys it shares); a test checks that
# every field of TrainConfig has one.
TRAIN_HELP = {
    "data": "the corpus: a UTF-8 text file, a folder from `minirwkv prepare`, or a named corpus (stdlib, shakespeare)",
    "tokenizer": "text to ids: byte, char, bpe (trained on the corpus) or gpt2 (local files)",
    "bpe_vocab_size": "vocabulary of the bpe tokenizer: 256 bytes plus the merges",
    "val_fraction": "the last fraction of the tokens that is the validation split",
    "version": "the RWKV generation: 4, 5 (v5.2) or 6",
    "head_size": "channels per head of the matrix state (RWKV-5/6; n_embd must be a multiple)",
    "n_layer": "number of RWKV blocks",
    "n_embd": "width of the model (channels)",
    "dim_ffn": "hidden width of the channel mix (none: 4 n_embd)",
    "dtype": "dtype of the weights and the arithmetic: float32 or float64",
    "block_size": "tokens per training sequence",
    "batch_size": "sequences per step (the global batch of a data-parallel run)",
    "learning_rate": "peak learning rate, reached after the warmup",
    "lr_final": "learning rate at max_iters, where the decay ends",
    "lr_decay": "schedule after the warmup: cosine, exponential, linear or constant",
    "warmup_iters": "steps of warmup",
    "warmup": "warmup shape: rwkv (starts at 0.2 lr) or linear",
    "beta1": "AdamW's first-moment decay",
    "beta2": "AdamW's second-moment decay",
    "eps": "AdamW's epsilon",
    "weight_decay": "decoupled weight decay, on the matrices only",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "l2wrap": "RWKV-LM's L2Wrap regulariser on the logits",
    "max_iters": "steps of training; the schedule ends here",
    "max_seconds": "wall-clock budget in seconds: stop, evaluate and save at the deadline (0: none)",
    "eval_interval": "steps between evaluations (and checkpoints)",
    "eval_iters": "validation batches per evaluation (the same batches every time)",
    "log_interval": "steps between lines of the training log",
    "out_dir": "folder of the run: checkpoints, log.jsonl, loss.png, run_config.json",
    "resume": "continue the run saved in out_dir/last.ckpt, with the configuration saved there",
    "overwrite": "start a new run in an out_dir that already holds one, replacing it",
    "plot": "write loss.png at the end (needs matplotlib, the plot extra)",
    "sample_tokens": "tokens of text printed when training ends (0: none)",
    "seed": "seed of the initial weights and of the batches",
    "impl": "WKV engine: auto, numba, numpy, parallel, cupy or cuda-shim",
    "device": "cpu (NumPy) or cuda (CuPy)",
    "threads": "CPU threads per process for the products and the Numba kernels (0: the environment, else every "
               "usable core, shared between MPI ranks on one machine)",
    "distributed": "data-parallel over MPI: auto (when mpiexec starts more than one process), off or mpi",
}


def _default(name: str):
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
