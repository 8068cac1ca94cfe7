"""The minirwkv checkpoint format: round trips, atomic writes, conversion from .pth, and refusing foreign files."""
import errno
import json
import os
import pathlib
import struct
import zipfile

import numpy as np
import pytest

import minirwkv

from minirwkv.io.checkpoint import Checkpoint, convert, load_checkpoint, load_params, main, save_checkpoint
from minirwkv.config import ModelConfig
from minirwkv.rwkv4.model import param_shapes
from minirwkv.io.pth import load_pth, save_pth

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
TINY = ModelConfig(vocab_size=11, n_embd=8, n_layer=2, dim_ffn=32)


def tiny_params(seed=0, dtype=np.float32, config=TINY):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(config).items()}


def assert_same_arrays(actual: dict, expected: dict, what):
    assert list(actual) == list(expected), f"{what}: keys differ"
    for k in expected:
        a, e = actual[k], expected[k]
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {k}: {a.dtype}{a.shape} != {e.dtype}{e.shape}"
        assert np.array_equal(a, e, equal_nan=a.dtype.kind == "f"), f"{what} {k}: values differ"


def folder_listing(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, compress):
    params = tiny_params()
    meta = {"step": 1200, "loss": 3.25, "tokenizer": {"kind": "tiktoken", "name": "gpt2"}, "backend": "numba",
            "train": {"lr": 6e-4, "betas": [0.9, 0.99], "note": "ünïcode ✓"}, "none": None}
    arrays = {"adam_m": {k: v * 0.5 for k, v in params.items()},
              "adam_v": {k: (v * v).astype(np.float64) for k, v in params.items()},
              "rng": {"state": np.arange(4, dtype=np.uint64), "flag": np.array(True), "empty": np.zeros((0, 3))}}
    save_checkpoint(tmp_path / "c.ckpt", params, meta=meta, arrays=arrays, compress=compress)
    ck = load_checkpoint(tmp_path / "c.ckpt")
    assert isinstance(ck, Checkpoint)
    assert_same_arrays(ck.params, params, "params")
    assert ck.meta == meta
    assert list(ck.arrays) == list(arrays)
    for group in arrays:
        assert_same_arrays(ck.arrays[group], arrays[group], group)
    with zipfile.ZipFile(tmp_path / "c.ckpt") as zf:
        header = json.loads(zf.read("meta.json"))
        kinds = {i.compress_type for i in zf.infolist() if i.filename.endswith(".npy")}
    assert header["format"] == "minirwkv-checkpoint" and header["version"] == 1
    assert header["config"] == {"vocab_size": 11, "n_embd": 8, "n_layer": 2, "dim_ffn": 32}
    assert kinds == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}


def test_entries_aligned_and_arrays_writable_without_touching_the_file(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, tiny_params(), arrays={"odd name lengths x": {"a": np.ones(3), "bb": np.ones((2, 2))}})
    before = path.read_bytes()
    ck = load_checkpoint(path)
    for group in [ck.params, *ck.arrays.values()]:
        for name, a in group.items():
            assert a.ctypes.data % 64 == 0, f"{name} is not aligned"
            assert a.flags.writeable
            a += 1  # copy on write
    assert path.read_bytes() == before


def test_load_params_refuses_non_finite_values(tmp_path):
    params = tiny_params()
    params["blocks.1.ffn.key.weight"][3, 4] = np.nan
    save_checkpoint(tmp_path / "c", params)  # saving a diverged run is allowed, to inspect it
    assert np.isnan(load_checkpoint(tmp_path / "c").params["blocks.1.ffn.key.weight"][3, 4])
    with pytest.raises(ValueError, match="non-finite values .*blocks.1.ffn.key.weight"):
        load_params(tmp_path / "c")


def test_load_params_casts_and_validates(tmp_path):
    params = tiny_params(dtype=np.float64)
    save_checkpoint(tmp_path / "c", params)
    got = load_params(tmp_path / "c")
    assert all(v.dtype == np.float32 for v in got.values())
    assert_same_arrays(got, {k: v.astype(np.float32) for k, v in params.items()}, "float32")
    assert_same_arrays(load_params(tmp_path / "c", dtype=np.float64), params, "float64")


def test_init_params_are_accepted(tmp_path):
    from minirwkv import init_params

    params = init_params(ModelConfig(vocab_size=13, n_embd=8, n_layer=3), seed=0)
    save_checkpoint(tmp_path / "c", params)
    assert_same_arrays(load_params(tmp_path / "c"), {k: np.asarray(v, np.float32) for k, v in params.items()},
                       "init_params")


@pytest.mark.parametrize("tag", ["fp32", "fp16", "bf16"])
def test_pth_fixture_loads_and_converts_exactly(tmp_path, tag):
    src = FIXTURES / f"rwkv4_tiny_{tag}.pth"
    direct = load_pth(src)
    assert_same_arrays(load_params(src), direct, "load_params(.pth)")
    config = convert(src, tmp_path / "out")
    assert config == TINY
    assert_same_arrays(load_params(tmp_path / "out"), direct, "converted")
    assert load_checkpoint(tmp_path / "out").meta == {"converted_from": src.name, "source_format": "torch"}


def test_detected_by_content_not_extension(tmp_path):
    (tmp_path / "model.npz").write_bytes((FIXTURES / "rwkv4_tiny_bf16.pth").read_bytes())
    save_checkpoint(tmp_path / "mine.pth", tiny_params())
    assert_same_arrays(load_params(tmp_path / "model.npz"), load_pth(FIXTURES / "rwkv4_tiny_bf16.pth"), "pth")
    assert_same_arrays(load_params(tmp_path / "mine.pth"), tiny_params(), "ours")
    with pytest.raises(ValueError, match="not a minirwkv checkpoint; it is torch"):
        load_checkpoint(tmp_path / "model.npz")


def test_main_converts_and_reports_errors(tmp_path, capsys):
    assert main([str(FIXTURES / "rwkv4_tiny_fp16.pth"), str(tmp_path / "o.ckpt")]) == 0
    assert "vocab_size=11, n_embd=8, n_layer=2, dim_ffn=32" in capsys.readouterr().out
    assert_same_arrays(load_params(tmp_path / "o.ckpt"), load_pth(FIXTURES / "rwkv4_tiny_fp16.pth"), "main")
    (tmp_path / "empty").write_bytes(b"")
    assert main([str(tmp_path / "empty"), str(tmp_path / "o2")]) == 1
    assert "the file is empty" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------ atomic writes


def fail_on_call(monkeypatch, n, exc):
    """Make np.lib.format.write_array raise ``exc`` on its n-th call: a write failing mid-file."""
    real = np.lib.format.write_array
    calls = []

    def write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    return calls


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch, exc):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, tiny_params(0), meta={"step": 1})
    before, listing = path.read_bytes(), folder_listing(tmp_path)
    calls = fail_on_call(monkeypatch, 5, exc)
    with pytest.raises(type(exc)):
        save_checkpoint(path, tiny_params(1), meta={"step": 2})
    assert len(calls) == 5  # it did fail mid-write, after four arrays
    assert path.read_bytes() == before
    assert folder_listing(tmp_path) == listing
    monkeypatch.undo()
    assert load_checkpoint(path).meta == {"step": 1}


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    fail_on_call(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path / "c.ckpt", tiny_params())
    assert folder_listing(tmp_path) == []


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", path.exists())), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", path.exists())), real_replace(a, b))[1])
    save_checkpoint(path, tiny_params())
    assert events[:2] == [("fsync", False), ("replace", False)]  # file data durable, then it appears at path
    assert folder_listing(tmp_path) == ["c.ckpt"]


def test_bad_input_is_refused_before_writing(tmp_path):
    params = tiny_params()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "c", params, meta={"loss": np.float32(1.0)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", params, arrays={"params": {}})
    with pytest.raises(ValueError, match="cannot be a file name"):
        save_checkpoint(tmp_path / "c", params, arrays={"adam_m": {"a/b": np.ones(1)}})
    with pytest.raises(ValueError, match="object arrays"):
        save_checkpoint(tmp_path / "c", params, arrays={"x": {"o": np.array([None])}})
    assert folder_listing(tmp_path) == []


def test_validation_lists_missing_extra_and_misshaped_keys(tmp_path):
    params = tiny_params()
    del params["blocks.1.att.time_first"]
    params["blocks.0.att.ln_q.weight"] = np.ones(8, np.float32)
    params["blocks.0.att.time_mix_k"] = np.ones(8, np.float32)  # squeezed: not the official (1, 1, C)
    with pytest.raises(ValueError) as info:
        save_checkpoint(tmp_path / "c", params)
    message = str(info.value)
    assert "missing keys: blocks.1.att.time_first" in message
    assert "unexpected keys: blocks.0.att.ln_q.weight" in message
    assert "blocks.0.att.time_mix_k: (8,) (expected (1, 1, 8))" in message


# ------------------------------------------------------------------------------------------------ refused files


def write_pth(path, state):
    save_pth(path, state)


def make_rwkv_package(path):
    state = tiny_params()
    del state["blocks.0.ln0.weight"], state["blocks.0.ln0.bias"]
    write_pth(path, {**state, "_strategy": "cpu fp32", "_version": "0.7", "_rescale_layer": 0})


def make_rwkv5(path):
    write_pth(path, {**tiny_params(), "blocks.0.att.ln_x.weight": np.ones(8, np.float32),
                     "blocks.0.att.time_faaaa": np.ones((1, 8), np.float32)})


def make_rwkv51(path):
    params = minirwkv.init_params(minirwkv.ModelConfig(vocab_size=11, n_embd=8, n_layer=1, version="5", head_size=4))
    params["blocks.0.att.time_decay"] = np.zeros(2, np.float32)  # one decay per head: the 5.1 preview
    write_pth(path, params)


def make_rwkv7(path):
    write_pth(path, {**tiny_params(), "blocks.0.att.r_k": np.ones((1, 8), np.float32)})


def make_state_tuned(path):
    params = minirwkv.init_params(minirwkv.ModelConfig(vocab_size=11, n_embd=8, n_layer=1, version="6", head_size=4))
    write_pth(path, {**params, "blocks.0.att.time_state": np.zeros((2, 4, 4), np.float32)})


def make_rwkv6(path):
    write_pth(path, {**tiny_params(), "blocks.0.att.time_maa_x": np.ones((1, 1, 8), np.float32)})


def make_hf(path):
    renamed = {("" if k == "head.weight" else "rwkv.") + k.replace("emb.", "embeddings.").replace("att.", "attention.")
               .replace("ffn.", "feed_forward."): v for k, v in tiny_params().items()}
    write_pth(path, renamed)


def make_quantised(path):
    write_pth(path, {**tiny_params(), "head.weight": np.zeros((11, 8), np.uint8)})


def make_not_rwkv4(path):
    params = tiny_params()
    del params["ln_out.bias"]
    write_pth(path, params)


def make_ggmf(path):
    path.write_bytes(struct.pack("<6i", 0x67676D66, 101, 11, 8, 2, 0) + b"\0" * 64)


def make_truncated_ckpt(path):
    save_checkpoint(path, tiny_params())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def make_truncated_pth(path):
    data = (FIXTURES / "rwkv4_tiny_fp32.pth").read_bytes()
    path.write_bytes(data[:3000])


def make_random(path):
    path.write_bytes(b"\x13\x37" + np.random.default_rng(0).bytes(998))


def make_safetensors(path):
    header = json.dumps({"emb.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def make_npz(path):
    with open(path, "wb") as f:
        np.savez(f, a=np.ones(2))


def make_newer_version(path):
    save_checkpoint(path, tiny_params())
    rewritten = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(rewritten, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "meta.json":
                data = json.dumps({**json.loads(data), "version": 2}).encode()
            zout.writestr(info.filename, data)
    os.replace(rewritten, path)


REFUSED = {
    "rwkv package": (make_rwkv_package, r"converted by the `rwkv` pip package .*'_strategy'"),
    "rwkv5.0": (make_rwkv5, r"an RWKV-5.0 preview checkpoint .*time_decay \(8,\).*no gate.*RWKV-5.2 only"),
    "rwkv5.1": (make_rwkv51, r"an RWKV-5.1 preview checkpoint .*time_decay \(2,\).*RWKV-5.2 only"),
    "rwkv6 part": (make_rwkv6, r"not an RWKV-6.0 parameter dict"),
    "rwkv7": (make_rwkv7, r"an RWKV-7 checkpoint .*att.r_k"),
    "state-tuned": (make_state_tuned, r"a state-tuned checkpoint \(blocks.0.att.time_state.*remove the time_state"),
    "huggingface": (make_hf, r"Hugging Face transformers RWKV checkpoint"),
    "quantised": (make_quantised, r"integer tensors \['head.weight'\]"),
    "not rwkv4": (make_not_rwkv4, r"model.pth: not a valid RWKV-4 parameter dict .*missing keys: ln_out.bias"),
    "rwkv.cpp": (make_ggmf, r"rwkv.cpp .bin file \(magic 'ggmf'\)"),
    "empty": (lambda p: p.write_bytes(b""), r"the file is empty"),
    "truncated ours": (make_truncated_ckpt, r"damaged zip archive .*truncated or corrupt"),
    "truncated pth": (make_truncated_pth, r"damaged zip archive .*truncated or corrupt"),
    "random bytes": (make_random, r"not a checkpoint this library knows"),
    "legacy torch": (lambda p: p.write_bytes((FIXTURES / "legacy.pth").read_bytes()), r"legacy \(pre-1.6, non-zip\)"),
    "safetensors": (make_safetensors, r"a safetensors file"),
    "other zip": (make_npz, r"neither a minirwkv checkpoint .* nor a torch .pth"),
    "newer version": (make_newer_version, r"version 2; this minirwkv reads version 1 only"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_refused_files_say_what_they_are(tmp_path, kind):
    make, message = REFUSED[kind]
    path = tmp_path / "model.pth"
    make(path)
    with pytest.raises(ValueError, match=message):
        load_params(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_params(tmp_path / "nope.pth")


def test_missing_file_or_folder_through_the_cli(tmp_path, capsys):
    from minirwkv.cli import main as cli

    assert cli(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "o.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "minirwkv convert: error:" in err and "nope.pth" in err and "check the path" in err
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "best.ckpt", tiny_params())
    assert cli(["convert", str(run), str(tmp_path / "o.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err and str(run / "best.ckpt") in err
    assert folder_listing(tmp_path) == ["run"]


# ------------------------------------------------------------------------------------------------ convert


def test_convert_creates_missing_parent_folders(tmp_path, capsys):
    from minirwkv.cli import main as cli

    out = tmp_path / "a" / "b" / "o.ckpt"
    assert cli(["convert", str(FIXTURES / "rwkv4_tiny_fp32.pth"), str(out)]) == 0
    assert_same_arrays(load_params(out), load_pth(FIXTURES / "rwkv4_tiny_fp32.pth"), "converted")


def test_convert_onto_a_folder_is_refused(tmp_path, capsys):
    from minirwkv.cli import main as cli

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "keep.txt").write_text("mine")
    assert cli(["convert", str(FIXTURES / "rwkv4_tiny_fp32.pth"), str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err and str(tmp_path / "models" / "rwkv4_tiny_fp32.ckpt") in err
    assert folder_listing(tmp_path / "models") == ["keep.txt"]
    (tmp_path / "afile").write_text("mine")
    assert cli(["convert", str(FIXTURES / "rwkv4_tiny_fp32.pth"), str(tmp_path / "afile" / "o.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_convert_keeps_the_tokenizer_spec(tmp_path):
    """A minirwkv checkpoint's tokenizer spec survives convert, so sample decodes as the model was trained."""
    spec = {"kind": "char", "chars": "abc"}
    save_checkpoint(tmp_path / "src.ckpt", tiny_params(dtype=np.float64), meta={"tokenizer": spec, "step": 7})
    convert(tmp_path / "src.ckpt", tmp_path / "dst.ckpt")
    meta = load_checkpoint(tmp_path / "dst.ckpt").meta
    assert meta == {"converted_from": "src.ckpt", "source_format": "minirwkv", "tokenizer": spec}
    assert_same_arrays(load_params(tmp_path / "dst.ckpt"), load_params(tmp_path / "src.ckpt"), "params")


def test_convert_removes_orphan_temps_of_its_folder(tmp_path):
    import subprocess
    import sys

    from minirwkv.io.atomic import temp_name

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    orphan = tmp_path / temp_name("o.ckpt", pid=child.pid)
    orphan.write_bytes(b"half a checkpoint")
    convert(FIXTURES / "rwkv4_tiny_fp32.pth", tmp_path / "o.ckpt")
    assert folder_listing(tmp_path) == ["o.ckpt"]


def test_fortran_ordered_arrays_keep_their_values(tmp_path):
    """A Fortran-ordered (or transposed) array is stored with fortran_order in its .npy header: read back, it must
    have the same values, not its memory reinterpreted in C order."""
    params = tiny_params()
    fortran = {k: np.asfortranarray(v) if v.ndim == 2 else v for k, v in params.items()}
    assert any(not v.flags.c_contiguous for v in fortran.values())
    extra = {"g": {"f": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                   "t": np.arange(24.0).reshape(2, 3, 4).transpose(2, 0, 1)}}
    for compress in (False, True):
        save_checkpoint(tmp_path / "f.ckpt", fortran, arrays=extra, compress=compress)
        ck = load_checkpoint(tmp_path / "f.ckpt")
        assert_same_arrays(ck.params, params, f"params (compress={compress})")
        assert_same_arrays(ck.arrays["g"], extra["g"], f"arrays (compress={compress})")
