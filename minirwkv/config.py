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
    """Shape of an RWKV-4 model.

    vocab_size V, n_embd C, n_layer L, dim_ffn F (defaults to 4C, as in every official RWKV-4 model).
    dim_att equals n_embd in RWKV-4 and is not a separate field.
    """

    vocab_size: int
    n_embd: int
    n_layer: int
    dim_ffn: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_embd", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        elif not isinstance(self.dim_ffn, int) or isinstance(self.dim_ffn, bool) or self.dim_ffn < 1:
            raise ValueError(f"ModelConfig.dim_ffn must be a positive int or None, got {self.dim_ffn!r}")

    @property
    def dim_att(self) -> int:
        return self.n_embd

    def n_params(self) -> int:
        V, C, L, F = self.vocab_size, self.n_embd, self.n_layer, self.dim_ffn
        per_layer = 4 * C + 2 * C + 3 * C + 2 * C  # ln1, ln2 (w, b); time_decay, time_first; 3 att + 2 ffn mixes
        per_layer += 4 * C * C + C * C + 2 * C * F
        return 2 * V * C + 2 * C + L * per_layer + 2 * C  # emb, head, ln0, blocks, ln_out


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
