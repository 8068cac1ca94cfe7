"""Configuration as frozen dataclasses, with typed ``--key=value`` overrides.

Like nanoGPT's ``GPTConfig`` and its ``configurator.py``, but without ``exec`` or globals: an override is parsed
into the field's declared type, and an unknown key fails with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an RWKV model of any generation.

    vocab_size V, n_embd C, n_layer L, dim_ffn F (None: the generation's default; 4C for RWKV-4).
    version: the generation, "4" (the default), later "5" (v5.2), "6", "7" (minirwkv/generation.py).
    head_size N: channels per head of the matrix-valued state (RWKV-5 and later; RWKV-4 has no heads and ignores
    it). dim_att equals n_embd and is not a separate field.
    """

    vocab_size: int
    n_embd: int
    n_layer: int
    dim_ffn: int | None = None
    version: str = "4"
    head_size: int = 64

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

    @property
    def dim_att(self) -> int:
        return self.n_embd

    def n_params(self) -> int:
        """The number of parameters: the sum of the generation's shapes."""
        import math

        from .generation import get_generation

        return sum(math.prod(s) for s in get_generation(self.version).param_shapes(self).values())


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
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
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
            valid = ", ".join(sorted(types))
            raise ValueError(f"unknown configuration key {key!r} for {type(config).__name__}; valid keys: {valid}")
        if isinstance(value, str):
            value = _parse_value(value, types[norm], norm)
        changes[norm] = _check_type(value, types[norm], norm)
    return dataclasses.replace(config, **changes)


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


# The keys a resumed run may take from the command line; every other key comes from the checkpoint and a different
# value is refused (minirwkv/train.py). Changing max_iters moves the learning-rate schedule: the run goes on, but it
# is no longer bit-identical to one that never stopped, and train says so.
RESUME_SAFE_KEYS = frozenset({
    "max_iters", "max_seconds", "eval_interval", "log_interval", "out_dir", "resume", "overwrite", "plot",
    "sample_tokens", "impl", "device", "blas_threads", "distributed", "data",
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
    blas_threads: int = 1  # BLAS threads during training (0: leave as is); small matrices run fastest on one
    distributed: str = "auto"  # auto: data-parallel over MPI when launched by mpiexec -n N > 1; off; mpi (always)

    def __post_init__(self):
        positive = ("n_layer", "n_embd", "block_size", "batch_size", "eval_iters", "log_interval", "eval_interval",
                    "bpe_vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        choices = {"lr_decay": ("cosine", "exponential", "linear", "constant"), "warmup": ("rwkv", "linear"),
                   "tokenizer": ("byte", "char", "bpe", "gpt2"),
                   "distributed": ("auto", "off", "mpi")}  # the names of minirwkv.optim / tokenizer
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.learning_rate <= 0 or self.lr_final < 0:
            raise ValueError(f"--learning_rate must be > 0 and --lr_final >= 0, got {self.learning_rate}, "
                             f"{self.lr_final}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, n_embd=self.n_embd, n_layer=self.n_layer, dim_ffn=self.dim_ffn)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
