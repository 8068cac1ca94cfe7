"""Reading torch ``.pth`` files without torch: exact values, views, memory mapping, and refusing code in the pickle.

The fixtures in tests/fixtures were written by torch (tests/fixtures/make_pth_fixtures.py); expected.npz holds what
torch's ``.float()`` made of each tensor. Tests that run torch itself are importorskipped.
"""
import pathlib
import pickle
import shlex
import struct
import zipfile

import numpy as np
import pytest

from minirwkv.io.pth import ForbiddenGlobalError, PthTensor, Storage, load_pth, read_pth, save_pth

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "expected.npz") as npz:
        return {k: npz[k] for k in npz.files}


def assert_bits_equal(actual, expected, what):
    """Exact equality, down to -0.0 and NaN payloads."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bits = lambda a: np.ascontiguousarray(a).view(np.uint8)  # noqa: E731
    assert np.array_equal(bits(actual), bits(expected)), f"{what}: values differ"


def expected_for(expected, fixture):
    return {k.split(":", 1)[1]: v for k, v in expected.items() if k.startswith(fixture + ":")}


def rewrite_zip(src, dst, transform=lambda name, data: data, compress=False):
    """Copy a zip entry by entry, ``transform(name, bytes)`` applied, stored or deflated."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = transform(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


@pytest.mark.parametrize("tag", ["fp32", "fp16", "bf16"])
def test_rwkv4_fixture_equals_torch_float(tag, expected):
    fixture = f"rwkv4_tiny_{tag}"
    want = expected_for(expected, fixture)
    got = load_pth(FIXTURES / f"{fixture}.pth")
    assert list(got) == list(want)  # every key, in the file's order
    for k in want:
        assert_bits_equal(got[k], want[k], f"{fixture} {k}")


def test_views_offsets_strides_and_special_values(expected):
    """Transposed, offset into a shared storage, stride 0, 0-d, empty; bf16 inf/nan/-0/subnormal; fp16; fp64."""
    want = expected_for(expected, "strided")
    got = load_pth(FIXTURES / "strided.pth")
    assert set(got) == set(want)
    for k in want:
        assert_bits_equal(got[k], want[k], f"strided {k}")
        assert got[k].flags.c_contiguous, k


def test_shared_storage_is_read_once():
    state = read_pth(FIXTURES / "strided.pth")
    assert state["slice_a"].storage.data is state["slice_b"].storage.data
    assert (state["slice_a"].offset, state["slice_b"].offset) == (2, 5)


def test_bfloat16_widening_is_exact_for_every_payload():
    payload = np.arange(1 << 16, dtype=np.uint16)  # (65536,) every bf16 bit pattern
    tensor = PthTensor(Storage(payload, "BFloat16Storage"), 0, payload.shape, (1,))
    got = tensor.to_numpy(np.float32)
    # independently: the float32 whose big-endian bytes are the payload followed by two zero bytes
    want = np.frombuffer(b"".join(struct.pack(">H", int(p)) + b"\0\0" for p in payload), dtype=">f4")
    assert_bits_equal(got, want.astype(np.float32), "bf16 -> float32")


def test_bfloat16_widening_matches_torch():
    torch = pytest.importorskip("torch")
    payload = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(payload.view(np.int16)).view(torch.bfloat16).float().numpy()
    got = PthTensor(Storage(payload, "BFloat16Storage"), 0, payload.shape, (1,)).to_numpy()
    assert_bits_equal(got, want, "bf16 -> float32 vs torch")


def test_dtype_argument_and_integer_tensors(tmp_path, expected):
    got = load_pth(FIXTURES / "rwkv4_tiny_fp16.pth", dtype=np.float64)
    want = expected_for(expected, "rwkv4_tiny_fp16")
    for k in want:
        assert_bits_equal(got[k], want[k].astype(np.float64), k)
    save_pth(tmp_path / "ints.pth", {"idx": np.arange(5, dtype=np.int64), "note": "text", "n": 3})
    got = load_pth(tmp_path / "ints.pth")
    assert got["idx"].dtype == np.int64 and got["idx"].tolist() == [0, 1, 2, 3, 4]  # not cast to float
    assert (got["note"], got["n"]) == ("text", 3)


def test_tensors_are_memory_mapped_copy_on_write(tmp_path):
    path = tmp_path / "m.pth"
    path.write_bytes((FIXTURES / "rwkv4_tiny_fp32.pth").read_bytes())
    before = path.read_bytes()
    emb = load_pth(path)["emb.weight"]
    base = emb
    while getattr(base, "base", None) is not None:  # ndarray views, and as_strided's DummyArray
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps the buffer through a memoryview
        base = base.obj
    assert type(base).__name__ == "mmap", f"expected a view of the file's mmap, found {type(base).__name__}"
    assert emb.flags.writeable and emb.ctypes.data % 64 == 0
    emb += 1.0  # copy on write: the caller may update in place, the file stays as it was
    assert path.read_bytes() == before


@pytest.mark.parametrize("compress", [False, True])
def test_other_folder_name_compressed_entries_and_big_endian(tmp_path, expected, compress):
    want = expected_for(expected, "rwkv4_tiny_fp16")
    src = tmp_path / "src.pth"
    save_pth(src, {k: v.astype(np.float16) for k, v in want.items()}, archive_name="some other name")

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, "<f2").astype(">f2").tobytes()
        return data

    dst = tmp_path / "big.pth"
    rewrite_zip(src, dst, to_big_endian, compress=compress)
    got = load_pth(dst)
    for k in want:
        assert_bits_equal(got[k], want[k], k)


def test_legacy_format_is_refused():
    with pytest.raises(ValueError, match="legacy .*non-zip"):
        load_pth(FIXTURES / "legacy.pth")


def test_truncated_and_out_of_bounds_are_refused(tmp_path):
    data = (FIXTURES / "rwkv4_tiny_fp32.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pth(tmp_path / "cut.pth")
    # a tensor whose size/stride reach past its storage must not read foreign memory
    bad = PthTensor(Storage(np.zeros(6, np.float32), "FloatStorage"), 2, (2, 3), (3, 1))
    with pytest.raises(ValueError, match="reaches element 7 of a storage of 6"):
        bad.to_numpy()


# ------------------------------------------------------------------------------------------------ malicious pickles


def pth_with_pickle(path, pkl: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")


def payloads(command: str):
    """The same call, os.system(command), spelled with each opcode that looks a global up."""
    cmd = command.encode()
    binunicode = lambda s: b"X" + struct.pack("<I", len(s)) + s  # noqa: E731
    return {
        "GLOBAL os": b"\x80\x02cos\nsystem\n" + binunicode(cmd) + b"\x85R.",
        "GLOBAL posix": b"\x80\x02cposix\nsystem\n" + binunicode(cmd) + b"\x85R.",
        "STACK_GLOBAL": b"\x80\x04" + binunicode(b"os") + binunicode(b"system") + b"\x93" + binunicode(cmd) + b"\x85R.",
        "INST": b"(" + binunicode(cmd) + b"ios\nsystem\n.",
        "eval in a state dict": b"\x80\x02}(X\x01\x00\x00\x00acbuiltins\neval\n"
                                + binunicode(f"__import__('os').system({command!r})".encode()) + b"\x85Ru.",
    }


def test_the_malicious_payload_is_live(tmp_path):
    """Plain pickle runs the payload: so the refusal below is what keeps the marker from appearing."""
    marker = tmp_path / "pwned"
    pickle.loads(payloads(f"touch {shlex.quote(str(marker))}")["GLOBAL os"])
    assert marker.exists()


@pytest.mark.parametrize("variant", list(payloads("true")))
def test_forbidden_globals_are_refused_without_running(tmp_path, variant):
    marker = tmp_path / "pwned"
    pkl = payloads(f"touch {shlex.quote(str(marker))}")[variant]
    pth_with_pickle(tmp_path / "evil.pth", pkl)
    with pytest.raises(ForbiddenGlobalError, match=r"refusing to unpickle global '(os|posix|builtins)\.(system|eval)'"):
        load_pth(tmp_path / "evil.pth")
    assert not marker.exists()


def test_storage_type_must_come_from_the_allowlist(tmp_path):
    # a persistent id whose "storage type" is a plain string instead of torch.FloatStorage
    pkl = b"\x80\x02}(X\x01\x00\x00\x00a(X\x07\x00\x00\x00storageX\x03\x00\x00\x00os0X\x01\x00\x00\x000K\x01tQu."
    pth_with_pickle(tmp_path / "odd.pth", pkl)
    with pytest.raises(ValueError, match="unexpected persistent id"):
        load_pth(tmp_path / "odd.pth")


# ------------------------------------------------------------------------------------------------ against torch


def test_torch_save_then_load_pth(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 7, generator=g)
    state = {"f32": base, "t": base.t(), "off": base[1:3, 2:], "f16": base.half(), "bf16": base.bfloat16().t(),
             "f64": base.double()[::2], "mix": torch.rand(1, 1, 7, generator=g)}
    torch.save(state, tmp_path / "t.pth")
    got = load_pth(tmp_path / "t.pth")
    for k, v in state.items():
        assert_bits_equal(got[k], v.float().numpy(), k)


def test_save_pth_is_read_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    state = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float16),
             "t": rng.standard_normal((4, 2)).T, "s": np.array(1.5, np.float32), "e": np.zeros((0, 2), np.float32),
             "i": np.arange(4, dtype=np.int64), "note": "hello"}
    save_pth(tmp_path / "s.pth", state)
    got = torch.load(tmp_path / "s.pth", weights_only=True)
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            assert_bits_equal(got[k].numpy(), v, k)
        else:
            assert got[k] == v


def test_failed_save_pth_keeps_the_previous_file(tmp_path, monkeypatch):
    """save_pth writes atomically: a disk that fills up mid-write leaves the old file and no temporary."""
    import minirwkv.io.pth as pth

    path = tmp_path / "s.pth"
    save_pth(path, {"a": np.arange(3, dtype=np.float32)})
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pth, "write_aligned_entry", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_pth(path, {"a": np.arange(5, dtype=np.float32)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.pth"]
