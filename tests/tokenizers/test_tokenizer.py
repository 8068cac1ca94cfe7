"""Tokenizers: round trips, specs that rebuild the same tokenizer, clear errors, and no network access ever."""
import inspect
import json
import os
import socket
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from minirwkv.tokenizers.bpe import encode_reference, mergeable_ranks
from minirwkv.tokenizers.core import (BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, bytes_to_unicode,
                                find_gpt2_files, get_tokenizer, gpt2_ranks, tokenizer_from_spec)
from minirwkv.tokenizers.world import HFTokenizer, WorldTokenizer

TRAIN_TEXT = inspect.getsource(textwrap)  # stdlib source: ships with Python
HELD_OUT = inspect.getsource(json.decoder)
MIXED = "Héllo, wörld! 😀 世界 – naïve café\n\tx = 1_000_000\n"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TRAIN_TEXT, 512)


def spec_round_trip(tokenizer, **kwargs):
    """Rebuild from the spec after a trip through JSON, as a checkpoint stores it."""
    return tokenizer_from_spec(json.loads(json.dumps(tokenizer.spec())), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------

@given(text=st.text())
@example(text=MIXED)
@example(text="")
def test_byte_round_trip(text):
    ids = ByteTokenizer().encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert ByteTokenizer().decode(ids) == text


@given(text=st.text())
@example(text=MIXED)
@example(text="😀😀😀 👩‍👩‍👧")
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and ((0 <= ids) & (ids < bpe.vocab_size)).all()
    assert bpe.decode(ids) == text


@given(data=st.data())
def test_char_round_trip(data):
    corpus = data.draw(st.text(min_size=1, max_size=30), label="corpus")
    tokenizer = CharTokenizer.from_text(corpus)
    text = data.draw(st.text(alphabet=st.sampled_from(sorted(set(corpus)))), label="text")
    ids = tokenizer.encode(text)
    assert [tokenizer.alphabet[i] for i in ids] == list(text)
    assert tokenizer.decode(ids) == text


def test_char_alphabet_is_sorted_as_nanogpt():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.alphabet == "".join(sorted(set("hello world"))) == " dehlorw"
    assert tokenizer.encode("hold").tolist() == [3, 5, 4, 1]


def test_bpe_compresses_python_source(bpe):
    for text in (TRAIN_TEXT, HELD_OUT):
        n_bytes = len(text.encode("utf-8"))
        assert len(bpe.encode(text)) < 0.6 * n_bytes


@given(text=st.text(max_size=200))
@example(text=HELD_OUT[:3000])
@example(text="  \n\n  x  \r\n 12345 it's IT'S   ")
def test_tiktoken_encodes_as_the_reference(bpe, text):
    # tiktoken's Rust regex and the regex package split text the same way, and tiktoken merges lowest rank first
    assert bpe.encode(text).tolist() == encode_reference(text, mergeable_ranks(bpe.merges), bpe.pattern)


# ---------------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [ByteTokenizer, lambda: CharTokenizer.from_text(TRAIN_TEXT),
                                  lambda: BPETokenizer.train(TRAIN_TEXT, 400, pattern="gpt2")])
def test_spec_round_trip(make):
    tokenizer = make()
    rebuilt = spec_round_trip(tokenizer)
    assert isinstance(tokenizer, Tokenizer) and isinstance(rebuilt, Tokenizer)
    assert (rebuilt.name, rebuilt.vocab_size, rebuilt.spec()) == (tokenizer.name, tokenizer.vocab_size,
                                                                  tokenizer.spec())
    assert np.array_equal(rebuilt.encode(TRAIN_TEXT), tokenizer.encode(TRAIN_TEXT))


def test_spec_with_wrong_vocab_size_raises():
    spec = CharTokenizer.from_text("abc").spec()
    spec["vocab_size"] = 4
    with pytest.raises(ValueError, match="spec says 4"):
        tokenizer_from_spec(spec)
    with pytest.raises(ValueError, match="not a tokenizer spec"):
        tokenizer_from_spec({"name": "sentencepiece"})


# ---------------------------------------------------------------------------------------------------------------
# Errors and broken UTF-8
# ---------------------------------------------------------------------------------------------------------------

def test_char_unseen_character_error():
    tokenizer = CharTokenizer.from_text("hello")
    with pytest.raises(ValueError) as info:
        tokenizer.encode("hellö hé")
    message = str(info.value)
    assert "'ö' (U+00F6) at position 4" in message and "'é' (U+00E9) at position 7" in message
    assert "'byte' or 'bpe'" in message


def test_decode_replaces_broken_utf8(bpe):
    world = "世"  # 3 bytes: e4 b8 96
    assert ByteTokenizer().decode([0xE4, 0xB8]) == "\ufffd"
    assert ByteTokenizer().decode([0xE4, 0xB8, 0x96, 0xFF, 0x41]) == "世\ufffdA"
    ids = bpe.encode(world)
    assert len(ids) == 3  # the training text is ASCII: no merge joins these bytes
    assert bpe.decode(ids[:2]) == "\ufffd" and bpe.decode(ids[1:]) == "\ufffd\ufffd"


@pytest.mark.parametrize("make", [ByteTokenizer, lambda: CharTokenizer.from_text("abc")])
def test_decode_rejects_ids_outside_the_vocabulary(make):
    tokenizer = make()
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(np.zeros((2, 2), dtype=np.int64))


def test_get_tokenizer_names_and_errors():
    assert get_tokenizer("byte").vocab_size == 256
    assert get_tokenizer("char", "abcab").vocab_size == 3
    assert get_tokenizer("bpe", TRAIN_TEXT, vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="unknown tokenizer 'sp'"):
        get_tokenizer("sp")
    with pytest.raises(ValueError, match="accepts: vocab_size"):
        get_tokenizer("bpe", TRAIN_TEXT, vocab=300)
    with pytest.raises(ValueError, match="corpus_text"):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="path="):
        get_tokenizer("world")


# ---------------------------------------------------------------------------------------------------------------
# GPT-2: local files only
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_gpt2_missing_files_clear_error_without_network(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        get_tokenizer("gpt2")
    message = str(info.value)
    for remedy in ("vocab.bpe", "encoder.json", "never downloads", "path=", "TIKTOKEN_CACHE_DIR", "'byte'", "'bpe'"):
        assert remedy in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mine")):
        get_tokenizer("gpt2", path=tmp_path / "mine")


def test_gpt2_corrupt_file_is_refused(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="sha256"):
        find_gpt2_files(tmp_path)


def test_gpt2_ranks_match_tiktoken_loader(tmp_path, monkeypatch):
    # a tiny vocabulary in GPT-2's file format: 256 byte tokens, then merges "ĠĠ" (two spaces) and "ab", "abc"
    import tiktoken.load

    char = bytes_to_unicode()
    merges = [(char[32], char[32]), ("a", "b"), ("ab", "c")]
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    encoder = {c: rank for rank, c in enumerate(char.values())}
    encoder.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    encoder["<|endoftext|>"] = 259
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    ours = gpt2_ranks((tmp_path / "vocab.bpe").read_bytes(), (tmp_path / "encoder.json").read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken reads local paths directly and caches nothing
    theirs = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert ours == theirs and ours[b"  "] == 256 and ours[b"abc"] == 258


def test_gpt2_when_its_files_are_here(no_network):
    try:
        tokenizer = get_tokenizer("gpt2")
    except FileNotFoundError:
        pytest.skip("GPT-2's vocab.bpe / encoder.json are not in tiktoken's cache on this machine")
    assert tokenizer.encode("Hello world").tolist() == [15496, 995]
    assert spec_round_trip(tokenizer).decode(tokenizer.encode(MIXED)) == MIXED


# ---------------------------------------------------------------------------------------------------------------
# RWKV World vocabulary (a synthetic file in the official format)
# ---------------------------------------------------------------------------------------------------------------

def write_world_vocab(path, extra=()):
    """ids 1..256: the single bytes (str literal if ASCII printable, else bytes, as in the official file)."""
    lines = []
    for b in range(256):
        token = chr(b) if 32 <= b < 127 else bytes([b])
        lines.append(f"{b + 1} {token!r} 1")
    tokens = ["ab", "abc", "世界", b"\xe4\xb8", " the", "it's", "a b", "\n\n"]
    for i, token in enumerate(list(tokens) + list(extra)):
        size = len(token.encode("utf-8")) if isinstance(token, str) else len(token)
        lines.append(f"{257 + i} {token!r} {size}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def world(tmp_path):
    return WorldTokenizer(write_world_vocab(tmp_path / "rwkv_vocab_v20230424.txt"))


def test_world_greedy_longest_match(world):
    assert world.vocab_size == 265
    # "abc" beats "ab"; "a b" is one token; 世界 (6 bytes) is one token; "ab" + "d" where "abd" is no token
    assert world.encode("abca babd the\n\n世界").tolist() == [258, 263, 257, ord("d") + 1, 261, 264, 259]
    assert world.encode("世").tolist() == [260, 0x96 + 1]  # the 2-byte prefix token, then the last byte


@given(text=st.text(max_size=60))
@example(text=MIXED)
def test_world_round_trip(tmp_path_factory, text):
    tokenizer = WorldTokenizer(write_world_vocab(tmp_path_factory.mktemp("world") / "vocab.txt"))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_world_decode_replaces_broken_utf8_and_id_0_is_end_of_text(world):
    assert world.decode([260]) == "\ufffd"
    assert world.decode([0, 258, 0]) == "abc"


def test_world_spec_round_trip_and_hash_check(tmp_path, world):
    rebuilt = spec_round_trip(world)
    assert rebuilt.spec() == world.spec() and rebuilt.encode(MIXED).tolist() == world.encode(MIXED).tolist()
    moved = tmp_path / "elsewhere.txt"
    moved.write_bytes(world.path.read_bytes())
    assert spec_round_trip(world, path=moved).vocab_size == world.vocab_size
    write_world_vocab(moved, extra=["xyz"])  # same name, another vocabulary
    with pytest.raises(ValueError, match="sha256"):
        spec_round_trip(world, path=moved)


def test_world_file_errors(tmp_path, capfd):
    with pytest.raises(FileNotFoundError, match="pass its location"):
        WorldTokenizer(tmp_path / "absent.txt")
    evil = tmp_path / "evil.txt"
    evil.write_text("1 __import__('os').system('echo pwned') 1\n")
    with pytest.raises(ValueError, match="line 1"):
        WorldTokenizer(evil)
    assert "pwned" not in capfd.readouterr().out  # literal_eval, never eval
    bad_length = tmp_path / "bad.txt"
    bad_length.write_text("1 'ab' 3\n")
    with pytest.raises(ValueError, match="of 3 bytes"):
        WorldTokenizer(bad_length)
    partial = tmp_path / "partial.txt"
    partial.write_text("1 'a' 1\n")
    with pytest.raises(ValueError, match="byte 0x62 at byte offset 1"):
        WorldTokenizer(partial).encode("ab")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (optional extra `hf`)
# ---------------------------------------------------------------------------------------------------------------

def test_hf_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install minirwkv\[hf\]"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    # a byte-level BPE like GPT-NeoX 20B's, trained on stdlib source and saved as tokenizer.json
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TRAIN_TEXT], trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    tokenizer = get_tokenizer("hf", path=path)
    assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == hf.get_vocab_size()
    ids = tokenizer.encode(MIXED)
    assert ids.tolist() == hf.encode(MIXED).ids and tokenizer.decode(ids) == MIXED
    assert spec_round_trip(tokenizer).encode(HELD_OUT).tolist() == tokenizer.encode(HELD_OUT).tolist()
    os.remove(path)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([HELD_OUT], trainer)
    hf.save(str(path))
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_from_spec(tokenizer.spec())
