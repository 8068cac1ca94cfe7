"""Bad input gets a ValueError that names the problem."""
import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig

CONFIG = ModelConfig(vocab_size=10, n_embd=4, n_layer=2)


@pytest.fixture
def params():
    return minirwkv.init_params(CONFIG, dtype=np.float64)


def test_token_ids_out_of_range(params):
    with pytest.raises(ValueError, match=r"outside \[0, 10\).*max 10"):
        minirwkv.forward(params, np.array([[1, 10]]), impl="numpy")
    with pytest.raises(ValueError, match="min -1"):
        minirwkv.forward(params, np.array([[-1, 2]]), impl="numpy")
    with pytest.raises(ValueError, match="tokens has token ids outside"):
        minirwkv.rnn_step(params, np.array([12]), minirwkv.init_state(params, 1))


def test_wrong_shapes_and_dtypes_of_tokens(params):
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        minirwkv.forward(params, np.array([1, 2, 3]), impl="numpy")
    with pytest.raises(ValueError, match="integer array"):
        minirwkv.forward(params, np.array([[1.0, 2.0]]), impl="numpy")
    with pytest.raises(ValueError, match="empty"):
        minirwkv.forward(params, np.zeros((1, 0), dtype=int), impl="numpy")
    with pytest.raises(ValueError, match="targets must have the shape"):
        minirwkv.loss_and_grads(params, np.array([[1, 2]]), np.array([[1, 2, 3]]), impl="numpy")
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        minirwkv.rnn_step(params, np.array([[1]]), minirwkv.init_state(params, 1))


def test_missing_extra_and_misshaped_keys(params):
    broken = dict(params)
    del broken["blocks.1.att.key.weight"]
    broken["blocks.1.att.bogus"] = np.zeros(4)
    broken["head.weight"] = np.zeros((10, 5))
    with pytest.raises(ValueError) as e:
        minirwkv.forward(broken, np.array([[1]]), impl="numpy")
    msg = str(e.value)
    assert "missing keys: blocks.1.att.key.weight" in msg
    assert "unexpected keys: blocks.1.att.bogus" in msg
    assert "head.weight: (10, 5) (expected (10, 4))" in msg


def test_not_a_parameter_dict():
    with pytest.raises(ValueError, match="dict"):
        minirwkv.forward([1, 2], np.array([[1]]))
    with pytest.raises(ValueError, match="emb.weight"):
        minirwkv.forward({"x": np.zeros(3)}, np.array([[1]]))


def test_mixed_or_unsupported_dtypes(params):
    mixed = dict(params)
    mixed["head.weight"] = mixed["head.weight"].astype(np.float32)
    with pytest.raises(ValueError, match="all be float32 or all float64"):
        minirwkv.forward(mixed, np.array([[1]]), impl="numpy")
    half = {k: v.astype(np.float16) for k, v in params.items()}
    with pytest.raises(ValueError, match="float32 or all float64"):
        minirwkv.forward(half, np.array([[1]]), impl="numpy")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_parameters(params, bad):
    params["blocks.1.att.time_first"][2] = bad
    with pytest.raises(ValueError, match="non-finite.*blocks.1.att.time_first"):
        minirwkv.loss_and_grads(params, np.array([[1, 2]]), np.array([[2, 3]]), impl="numpy")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        minirwkv.rnn_step(params, np.array([1]), minirwkv.init_state(params, 1))


def test_bad_state(params):
    state = minirwkv.init_state(params, 2)
    with pytest.raises(ValueError, match="shape"):
        minirwkv.rnn_step(params, np.array([1]), state)  # batch 1 against a state of batch 2
    with pytest.raises(ValueError, match="minirwkv.State"):
        minirwkv.rnn_step(params, np.array([1]), [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        minirwkv.init_state(params, 0)


def test_unknown_backend(params):
    with pytest.raises(ValueError, match=r"unknown engine \(impl\) 'fast'.*numpy"):
        minirwkv.forward(params, np.array([[1]]), impl="fast")


def test_bad_config():
    with pytest.raises(ValueError, match="n_embd must be a positive int"):
        ModelConfig(vocab_size=10, n_embd=0, n_layer=1)
    with pytest.raises(ValueError, match="needs a ModelConfig"):
        minirwkv.init_params({"vocab_size": 3})


def test_paths_name_the_option_the_path_and_the_fix(tmp_path):
    from minirwkv.paths import existing_file, output_file, output_folder

    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert existing_file(a_file, "--in", "a text file", "a.txt") == a_file
    with pytest.raises(ValueError, match=rf"^--in {tmp_path}: is a folder; pass a text file such as {tmp_path}/a.txt$"):
        existing_file(tmp_path, "--in", "a text file", "a.txt")
    with pytest.raises(ValueError, match=r"^--in .*nope.txt: no such file; pass a text file; write one first$"):
        existing_file(tmp_path / "nope.txt", "--in", "a text file", "a.txt", hint="write one first")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path}: is a folder; pass a file path such as "
                                         rf"{tmp_path}/o.bin$"):
        output_file(tmp_path, "--out", "o.bin")
    with pytest.raises(ValueError, match=rf"^--out {a_file}/x/o.bin: {a_file} is a file, not a folder"):
        output_file(a_file / "x" / "o.bin", "--out", "o.bin")
    planned = output_file(tmp_path / "a" / "b" / "o.bin", "--out", "o.bin", make=False)
    assert not planned.parent.exists()  # a check before long work makes nothing
    assert output_file(planned, "--out", "o.bin").parent.is_dir()
    with pytest.raises(ValueError, match="is a file, not a folder"):
        output_folder(a_file, "--out_dir")
    assert output_folder(tmp_path / "c" / "d", "--out_dir").is_dir()

