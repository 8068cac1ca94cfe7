import dataclasses

import pytest

from minirwkv.config import ModelConfig, apply_overrides, parse_overrides


def test_overrides_are_typed():
    c = apply_overrides(ModelConfig(vocab_size=10, n_embd=4, n_layer=1), {"n_layer": "3", "dim-ffn": "none"})
    assert c.n_layer == 3 and c.dim_ffn == 16


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown configuration key 'n_head'.*valid keys: dim_ffn, head_size, n_embd, n_layer, version, vocab_size"):
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
