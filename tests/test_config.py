import dataclasses
import re

import pytest

from minirwkv.config import (RESUME_SAFE_KEYS, TRAIN_HELP, ModelConfig, TrainConfig, apply_overrides, field_types,
                             parse_overrides)


def test_overrides_are_typed():
    c = apply_overrides(ModelConfig(vocab_size=10, n_embd=4, n_layer=1), {"n_layer": "3", "dim-ffn": "none"})
    assert c.n_layer == 3 and c.dim_ffn == 16


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown configuration key 'n_head'.*valid keys: d_decay_lora, d_mix_lora, dim_ffn, head_size, ln_x_eps, n_embd, n_layer, version, vocab_size"):
        apply_overrides(ModelConfig(vocab_size=10, n_embd=4, n_layer=1), {"n_head": "4"})


def test_bad_value_type():
    with pytest.raises(ValueError, match="--n_layer expects an integer, got 'four'"):
        apply_overrides(ModelConfig(vocab_size=10, n_embd=4, n_layer=1), {"n_layer": "four"})
    with pytest.raises(ValueError, match="expects int"):
        apply_overrides(ModelConfig(vocab_size=10, n_embd=4, n_layer=1), {"n_layer": 2.5})


def test_frozen_and_parse():
    c = ModelConfig(vocab_size=10, n_embd=4, n_layer=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layer = 2
    assert parse_overrides(["train", "--n_layer=2", "--x"]) == ({"n_layer": "2"}, ["train", "--x"])


# --- TrainConfig: every value checked when the configuration is made --------------------------------------------


@pytest.mark.parametrize("key, value, allowed", [
    ("learning_rate", "nan", "a finite number > 0"), ("learning_rate", "inf", "a finite number > 0"),
    ("learning_rate", "0", "a finite number > 0"), ("lr_final", "-1e-4", "a finite number >= 0"),
    ("beta1", "1", r"a finite number in \[0, 1\)"), ("beta2", "-0.1", r"a finite number in \[0, 1\)"),
    ("eps", "0", "a finite number > 0"), ("weight_decay", "-0.01", "a finite number >= 0"),
    ("grad_clip", "nan", "a finite number >= 0"), ("max_seconds", "-inf", "a finite number >= 0"),
    ("max_seconds", "inf", "a finite number >= 0"), ("val_fraction", "1", r"a finite number in \(0, 1\)"),
    ("val_fraction", "nan", r"a finite number in \(0, 1\)"), ("n_layer", "0", "an integer >= 1"),
    ("dim_ffn", "0", "an integer >= 1"), ("seed", "-1", "an integer >= 0"), ("threads", "-2", "an integer >= 0"),
    ("bpe_vocab_size", "255", "an integer >= 256"), ("sample_tokens", "-1", "an integer >= 0"),
])
def test_out_of_range_values_fail_when_parsed(key, value, allowed):
    shown = str(float(value) if field_types(TrainConfig)[key] is float else int(value))  # as parsed
    with pytest.raises(ValueError, match=rf"^--{key} must be {allowed}.*, got {re.escape(shown)}$"):
        apply_overrides(TrainConfig(), {key: value})


@pytest.mark.parametrize("key, value", [("lr_final", 2e-3), ("beta1", 0.0), ("grad_clip", 0.0),
                                        ("max_seconds", 0.0), ("dim_ffn", None), ("seed", 0), ("eps", 1e-12)])
def test_the_edges_of_the_ranges_are_allowed(key, value):
    assert getattr(TrainConfig(**{key: value}), key) == value


def test_lr_final_above_the_learning_rate_names_both():
    with pytest.raises(ValueError, match=r"--lr_final=0.01 is above --learning_rate=0.001.*lower --lr_final"):
        TrainConfig(learning_rate=1e-3, lr_final=1e-2)
    assert TrainConfig(learning_rate=1e-3, lr_final=1e-2, lr_decay="constant").lr_decay == "constant"


def test_types_are_checked_when_made_directly():
    with pytest.raises(ValueError, match="--n_layer expects int, got str '4'"):
        TrainConfig(n_layer="4")
    with pytest.raises(ValueError, match="--plot expects bool"):
        TrainConfig(plot=1)
    c = TrainConfig(max_seconds=5)
    assert c.max_seconds == 5.0 and isinstance(c.max_seconds, float)  # an int for a float key becomes a float


@pytest.mark.parametrize("key, value", [("impl", "fast"), ("device", "tpu"), ("lr_decay", "step"),
                                        ("dtype", "float16"), ("distributed", "yes")])
def test_choices_list_what_is_allowed(key, value):
    with pytest.raises(ValueError, match=rf"--{key} must be one of .*, got '{value}'"):
        TrainConfig(**{key: value})


def test_train_tokenizers_are_the_ones_prepare_takes_and_the_others_say_why():
    from minirwkv.config import TRAIN_TOKENIZERS
    from minirwkv.tokenizers.core import NAMES

    assert set(TRAIN_TOKENIZERS) <= set(NAMES)
    for name in TRAIN_TOKENIZERS:
        assert TrainConfig(tokenizer=name).tokenizer == name
    for name in sorted(set(NAMES) - set(TRAIN_TOKENIZERS)):
        with pytest.raises(ValueError, match=rf"--tokenizer={name} is the vocabulary of the official RWKV models"):
            TrainConfig(tokenizer=name)
    with pytest.raises(ValueError, match="--tokenizer must be one of byte, char, bpe, gpt2, got 'words'"):
        TrainConfig(tokenizer="words")


def test_empty_paths_are_refused():
    with pytest.raises(ValueError, match=r"--out_dir is empty; folder of the run.*\(default out\)"):
        TrainConfig(out_dir=" ")


def test_every_train_key_has_a_help_line():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(TRAIN_HELP) == sorted(names)
    assert all(TRAIN_HELP[n].strip() and "\n" not in TRAIN_HELP[n] for n in names)
    assert RESUME_SAFE_KEYS <= set(names)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown configuration key 'learning-rat' for TrainConfig \(did you mean "
                                         r"learning_rate\?\); valid keys: "):
        apply_overrides(TrainConfig(), {"learning-rat": "1"})
