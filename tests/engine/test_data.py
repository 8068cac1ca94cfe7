"""Corpora, token files and batches (minirwkv/data.py): clear errors, exact splits, deterministic batches."""
import hashlib
import io
import urllib.error

import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minirwkv import data


def test_missing_empty_and_undecodable_corpora(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        data.corpus_text(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="the file is empty"):
        data.corpus_text(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 3 is b'\\xe9'\)"):
        data.corpus_text(str(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="a folder without meta.json"):
        data.corpus_text(str(tmp_path))


def test_corpus_too_short_for_one_batch():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"train split has 10 tokens, fewer than block_size \+ 1 = 17.*"
                                         r"--block_size=9 or less"):
        data.get_batch(tokens, 16, 2, seed=0, step=0)
    x, y = data.get_batch(tokens, 9, 3, seed=0, step=0)  # exactly block_size + 1 tokens: one possible window
    np.testing.assert_array_equal(x, np.tile(np.arange(9), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 10), (3, 1)))


def _follow(advice: str, n_tokens: int, val_fraction: float, block_size: int):
    """The (corpus size, block size) a check_splits message advises."""
    if m := re.search(r"--block_size=(\d+) or less", advice):
        return n_tokens, int(m.group(1))
    if m := re.search(r"needs a corpus of at least ([\d,]+) tokens", advice):
        return int(m.group(1).replace(",", "")), block_size
    assert "a larger --val_fraction" in advice  # an empty validation split: no size can be computed from it
    return None


@given(n_tokens=st.integers(1, 3000), val_fraction=st.floats(0.01, 0.99), block_size=st.integers(1, 300))
@example(n_tokens=10, val_fraction=0.1, block_size=128)  # the 10-byte corpus: told "below 8", then "below 1"
@example(n_tokens=10, val_fraction=0.1, block_size=7)
@example(n_tokens=30, val_fraction=0.1, block_size=128)
def test_block_size_advice_for_a_short_corpus_works_when_followed(n_tokens, val_fraction, block_size):
    ds = data.tokenize("x" * n_tokens, "byte", val_fraction)
    try:
        data.check_splits(ds.train, ds.val, block_size)
        return
    except ValueError as e:
        advice = str(e)
    assert "\n" not in advice
    followed = _follow(advice, n_tokens, val_fraction, block_size)
    if followed is None:
        assert len(ds.val) == 0
        return
    n, b = followed
    ds = data.tokenize("x" * n, "byte", val_fraction)
    data.check_splits(ds.train, ds.val, b)  # following the advice works
    data.get_batch(ds.train, b, 2, seed=0, step=0)
    data.get_batch(ds.val, b, 2, seed=0, step=0, stream=1)
    if n == n_tokens:
        with pytest.raises(ValueError):  # ... and it is the largest block size that does
            data.check_splits(ds.train, ds.val, b + 1)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = data.get_batch(tokens, 16, 4, seed=7, step=3)
    x2, y2 = data.get_batch(tokens, 16, 4, seed=7, step=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, x1 + 1)  # targets are the inputs shifted by one token
    assert x1.shape == (4, 16) and x1.dtype == np.int64
    assert not np.array_equal(x1, data.get_batch(tokens, 16, 4, seed=7, step=4)[0])
    assert not np.array_equal(x1, data.get_batch(tokens, 16, 4, seed=8, step=3)[0])
    assert not np.array_equal(x1, data.get_batch(tokens, 16, 4, seed=7, step=3, stream=1)[0])


def test_tokenize_splits_off_the_last_tenth():
    text = "abcdefghij" * 10
    ds = data.tokenize(text, "byte", val_fraction=0.1)
    assert ds.stats == {"chars": 100, "tokens": 100, "vocab_size": 256, "train_tokens": 90, "val_tokens": 10,
                        "tokenizer": "byte"}
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), np.frombuffer(text.encode(), np.uint8))
    assert ds.train.dtype == np.uint16
    assert ds.fingerprint == hashlib.sha256(text.encode()).hexdigest()


def test_prepare_writes_memory_mapped_token_files(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n" * 50)
    made = data.prepare(str(corpus), tmp_path / "prep", "char", val_fraction=0.2)
    loaded = data.load_dataset(str(tmp_path / "prep"))
    assert isinstance(loaded.train, np.memmap)
    np.testing.assert_array_equal(loaded.train, made.train)
    np.testing.assert_array_equal(loaded.val, made.val)
    assert loaded.tokenizer.spec() == made.tokenizer.spec() and loaded.fingerprint == made.fingerprint
    assert "val has 190 tokens" in data.format_stats(loaded.stats)


def test_stdlib_corpus_is_deterministic_and_bounded():
    a = data.stdlib_text(max_chars=200_000)
    assert a == data.stdlib_text(max_chars=200_000)
    assert a.startswith("# file: ") and len(a) <= 200_000 and "def " in a


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_checks_the_hash_and_caches_atomically(tmp_path, monkeypatch):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return _Response(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "cache" / "t.txt"
    with pytest.raises(RuntimeError, match="has sha256 .* expected 00"):
        data.download("https://example/x", "00" * 32, dest)
    assert not dest.exists() and not (dest.parent.exists() and list(dest.parent.iterdir()))  # nothing written
    good = hashlib.sha256(payload).hexdigest()
    assert data.download("https://example/x", good, dest).read_bytes() == payload
    data.download("https://example/x", good, dest)  # cached: no second request
    assert len(calls) == 2 and [p.name for p in dest.parent.iterdir()] == ["t.txt"]


def test_download_offline_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path)
    with pytest.raises(RuntimeError, match="Offline.*--data path/to/input.txt"):
        data.corpus_text("shakespeare")


def test_prepare_keeps_what_is_there(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n" * 50)
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match=r"--out .*file: is a file; prepare writes a folder"):
        data.prepare(str(corpus), a_file)
    with pytest.raises(ValueError, match=r"file is a file, not a folder; choose another path"):
        data.prepare(str(corpus), a_file / "sub")
    assert a_file.read_text() == "mine"
    first = data.prepare(str(corpus), tmp_path / "prep", "char")
    before = {p.name: p.read_bytes() for p in (tmp_path / "prep").iterdir()}
    with pytest.raises(ValueError, match=r"already holds a prepared dataset .*another --out, or --overwrite"):
        data.prepare(str(corpus), tmp_path / "prep", "byte")
    assert {p.name: p.read_bytes() for p in (tmp_path / "prep").iterdir()} == before  # untouched
    again = data.prepare(str(corpus), tmp_path / "prep", "byte", overwrite=True)
    assert again.tokenizer.name == "byte" != first.tokenizer.name
    assert data.load_dataset(str(tmp_path / "prep")).tokenizer.name == "byte"


@pytest.mark.parametrize("name", ["world", "hf"])
def test_prepare_refuses_the_official_vocabularies_and_says_why(tmp_path, name):
    with pytest.raises(ValueError, match=rf"--tokenizer={name} is the vocabulary of the official RWKV models.*"
                                         r"train and prepare use one of byte, char, bpe, gpt2"):
        data.prepare("stdlib", tmp_path / "p", name)
    assert not (tmp_path / "p").exists()
