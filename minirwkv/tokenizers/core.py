"""Tokenizers: text <-> token ids, and the spec that ties a checkpoint to its vocabulary.

Every tokenizer follows one small protocol (``Tokenizer``):

    name          "byte", "char", "bpe", "gpt2", "world" or "hf"
    vocab_size    ids lie in [0, vocab_size); the model's embedding has at least this many rows
    encode(text)  -> np.ndarray of int32 ids, shape (T,)
    decode(ids)   -> str; bytes that are not valid UTF-8 (a token cut mid-character) become U+FFFD, never an error
    spec()        -> a JSON-able dict from which ``tokenizer_from_spec`` rebuilds the same tokenizer

A checkpoint stores ``spec()`` next to the weights, so a model is never sampled with a vocabulary it was not trained
on: the spec holds the whole vocabulary (char, bpe) or a sha256 of the vocabulary file (world, hf, gpt2).

    ByteTokenizer   UTF-8 bytes, vocab 256; the default: no training, no unknown characters, nothing to download
    CharTokenizer   the sorted characters of the corpus, as nanoGPT data/shakespeare_char/prepare.py
    BPETokenizer    byte-level BPE trained here (minirwkv/bpe.py), encoded by tiktoken
    GPT2Tokenizer   GPT-2's 50257-token BPE, read from files already on this machine (never downloaded)
    WorldTokenizer, HFTokenizer   the official RWKV models' vocabularies: minirwkv/tokenizer_world.py
Docs: docs/tokenizers.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from .ids import check_ids, file_sha256  # noqa: F401  (part of this module's interface)

import numpy as np

NAMES = ("byte", "char", "bpe", "gpt2", "world", "hf")


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...  # (T,) int32

    def decode(self, ids) -> str: ...

    def spec(self) -> dict: ...


# ---------------------------------------------------------------------------------------------------------------
# Byte and char
# ---------------------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as ids (vocab 256). Any text encodes; a model sampling bytes may cut a character in half, and
    decode then shows U+FFFD for it."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)  # (T,)

    def decode(self, ids) -> str:
        return check_ids(ids, 256).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"name": "byte", "vocab_size": 256}


class CharTokenizer:
    """One id per distinct character of the corpus, in sorted (code point) order: nanoGPT's shakespeare_char.

    Small vocabularies train fast, but text with a character the corpus lacked cannot be encoded (ValueError).
    """

    name = "char"

    def __init__(self, alphabet: str):
        chars = sorted(set(alphabet))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet; build it with CharTokenizer.from_text(corpus)")
        self.alphabet = "".join(chars)
        self.vocab_size = len(chars)
        # code points, sorted: encode looks characters up with one searchsorted instead of a dict per character
        self._codes = np.frombuffer(self.alphabet.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # (V,)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # (T,) one per character
        ids = np.minimum(np.searchsorted(self._codes, codes), self.vocab_size - 1)  # (T,)
        unseen = np.nonzero(self._codes[ids] != codes)[0]
        if unseen.size:
            shown = ", ".join(f"{text[i]!r} (U+{ord(text[i]):04X}) at position {i}" for i in unseen[:5])
            more = f" and {unseen.size - 5} more" if unseen.size > 5 else ""
            raise ValueError(f"cannot encode with this CharTokenizer: character(s) not in its alphabet of "
                             f"{self.vocab_size} (taken from the training corpus): {shown}{more}. Remove or replace "
                             f"them, or use the 'byte' or 'bpe' tokenizer, which encode any text")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] for i in check_ids(ids, self.vocab_size))

    def spec(self) -> dict:
        return {"name": "char", "vocab_size": self.vocab_size, "alphabet": self.alphabet}


# ---------------------------------------------------------------------------------------------------------------
# BPE trained by minirwkv, encoded by tiktoken
# ---------------------------------------------------------------------------------------------------------------

class BPETokenizer:
    """Byte-level BPE: merges from ``minirwkv.bpe.train_bpe``; tiktoken does the encoding.

    tiktoken wants ``mergeable_ranks``: token bytes -> rank, the 256 single bytes first (ranks 0..255), then the
    token made by merge i at rank 256 + i. Its encoder splits text with ``pattern`` and, in each chunk, joins the
    adjacent parts of lowest rank first: the training order. Ids are ranks.
    """

    name = "bpe"

    def __init__(self, merges, pattern: str = "gpt4"):
        import tiktoken

        from .bpe import mergeable_ranks, resolve_pattern

        self.merges = [(int(a), int(b)) for a, b in merges]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} = ({a}, {b}) uses a token that does not exist yet (ids must be "
                                 f"< {256 + i}); these are not merges from minirwkv.bpe.train_bpe")
        self.pattern = resolve_pattern(pattern)
        self.vocab_size = 256 + len(self.merges)
        self._encoding = tiktoken.Encoding(name=f"minirwkv-bpe-{self.vocab_size}", pat_str=self.pattern,
                                           mergeable_ranks=mergeable_ranks(self.merges), special_tokens={})

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = "gpt4", impl: str = "numba") -> "BPETokenizer":
        from .bpe import train_bpe

        return cls(train_bpe(text, vocab_size, pattern=pattern, impl=impl), pattern)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)  # (T,)

    def decode(self, ids) -> str:
        return self._encoding.decode_bytes(check_ids(ids, self.vocab_size).tolist()).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"name": "bpe", "vocab_size": self.vocab_size, "pattern": self.pattern,
                "merges": [[a, b] for a, b in self.merges]}


# ---------------------------------------------------------------------------------------------------------------
# GPT-2, from local files only
# ---------------------------------------------------------------------------------------------------------------

# Where tiktoken's ``gpt2`` encoding comes from (tiktoken_ext/openai_public.py) and the sha256 it checks them against.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def tiktoken_cache_dir(environ=None) -> str:
    """The folder tiktoken reads cached files from: $TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else
    <tmp>/data-gym-cache (tiktoken/load.py ``read_file_cached``). Read when called, never at import."""
    environ = os.environ if environ is None else environ
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in environ:
            return environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def find_gpt2_files(path=None) -> dict[str, Path]:
    """The local copies of GPT-2's vocab.bpe and encoder.json, checked against their sha256; nothing downloaded.

    Looks in ``path`` (a folder holding ``vocab.bpe`` and ``encoder.json``, or tiktoken cache files named by the
    sha1 of their URL), then in tiktoken's cache folder. Raises FileNotFoundError naming the remedies.
    """
    folders = [Path(path)] if path is not None else []
    cache = tiktoken_cache_dir()
    if cache:  # "" turns tiktoken's cache off
        folders.append(Path(cache))
    found = {}
    for name, (url, sha256) in GPT2_FILES.items():
        for folder in folders:
            for candidate in (folder / name, folder / hashlib.sha1(url.encode()).hexdigest()):
                if candidate.is_file():
                    if file_sha256(candidate) != sha256:
                        raise ValueError(f"{candidate} is not GPT-2's {name} (its sha256 differs from {sha256}); "
                                         f"replace it with the file from {url}")
                    found[name] = candidate
                    break
            if name in found:
                break
    missing = [name for name in GPT2_FILES if name not in found]
    if missing:
        where = ", ".join(str(f) for f in folders)
        urls = "; ".join(f"{GPT2_FILES[name][0]} (as {name})" for name in missing)
        raise FileNotFoundError(
            f"the GPT-2 tokenizer needs {' and '.join(missing)}, not found in: {where}. minirwkv never downloads. "
            f"Remedies: on a machine with internet, fetch {urls} and copy them into a folder passed as path= "
            f"(--tokenizer_path), or into tiktoken's cache folder ($TIKTOKEN_CACHE_DIR) where tiktoken.get_encoding"
            f"('gpt2') has cached them; or use a tokenizer that needs no files: 'byte', 'char' or 'bpe'")
    return found


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in vocab.bpe / encoder.json (openai/gpt-2 src/encoder.py): printable
    Latin-1 bytes stand for themselves; the 68 others (controls, space, ...) map to chr(256), chr(257), ..."""
    kept = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def gpt2_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's mergeable_ranks from GPT-2's two files (tiktoken/load.py ``data_gym_to_mergeable_bpe_ranks``).

    vocab.bpe lists the merges in order after a version line; the byte tokens take ranks 0..255 in the order of
    ``bytes_to_unicode`` (printable bytes first). encoder.json (token -> id) must agree with those ranks.
    """
    to_byte = {char: b for b, char in bytes_to_unicode().items()}
    order = list(bytes_to_unicode())  # rank -> byte
    ranks = {bytes([b]): rank for rank, b in enumerate(order)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:]:
        if line.strip():
            first, second = line.split()
            ranks[bytes(to_byte[c] for c in first + second)] = len(ranks)
    encoder = {bytes(to_byte[c] for c in token): i for token, i in json.loads(encoder_json).items()
               if token not in ("<|endoftext|>", "<|startoftext|>")}
    if encoder != ranks:
        raise ValueError("GPT-2's encoder.json does not match vocab.bpe: the files come from different vocabularies")
    return ranks


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 tokens, id 50256 = <|endoftext|>) through tiktoken, from files on disk.

    Builds the same ``tiktoken.Encoding`` as ``tiktoken.get_encoding("gpt2")`` (pattern, ranks, special token), but
    reads the two files itself after ``find_gpt2_files`` located and checked them: tiktoken would download a missing
    or corrupt file, and minirwkv never touches the network.
    """

    name = "gpt2"
    vocab_size = 50257

    def __init__(self, path=None):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str

        files = find_gpt2_files(path)
        ranks = gpt2_ranks(files["vocab.bpe"].read_bytes(), files["encoder.json"].read_bytes())
        self._encoding = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int32)  # (T,)

    def decode(self, ids) -> str:
        return self._encoding.decode_bytes(check_ids(ids, self.vocab_size).tolist()).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"name": "gpt2", "vocab_size": 50257,
                "sha256": {name: sha256 for name, (_, sha256) in GPT2_FILES.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Factory and spec
# ---------------------------------------------------------------------------------------------------------------

_OPTIONS = {"byte": (), "char": (), "bpe": ("vocab_size", "pattern", "impl"), "gpt2": ("path",),
            "world": ("path",), "hf": ("path",)}


def get_tokenizer(name: str, corpus_text: str | None = None, **options) -> Tokenizer:
    """The tokenizer called ``name``, trained on ``corpus_text`` where it needs training (char, bpe).

    Options: bpe: vocab_size (default 1024), pattern ("gpt4", "gpt2" or a regex; default "gpt4"), impl
    ("numba" or "python"); gpt2: path (a folder with vocab.bpe and encoder.json); world, hf: path (the vocabulary
    file: rwkv_vocab_v20230424.txt, or the GPT-NeoX 20B tokenizer.json).
    """
    if name not in _OPTIONS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(NAMES)}")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise ValueError(f"tokenizer {name!r} takes no option(s) {', '.join(unknown)}; it accepts: "
                         f"{', '.join(_OPTIONS[name]) or 'none'}")
    if name in ("char", "bpe") and not corpus_text:
        raise ValueError(f"the {name!r} tokenizer is built from the training text: pass corpus_text (or use 'byte', "
                         f"which needs none)")
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer.from_text(corpus_text)
    if name == "bpe":
        return BPETokenizer.train(corpus_text, options.get("vocab_size", 1024), pattern=options.get("pattern", "gpt4"),
                                  impl=options.get("impl", "numba"))
    if name == "gpt2":
        return GPT2Tokenizer(path=options.get("path"))
    if options.get("path") is None:
        raise ValueError(f"the {name!r} tokenizer reads the official vocabulary file: pass path= (--tokenizer_path)")
    from .world import HFTokenizer, WorldTokenizer

    return (WorldTokenizer if name == "world" else HFTokenizer)(options["path"])


def tokenizer_from_spec(spec: dict, path=None) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint was trained with from its ``spec()``.

    ``path`` replaces the vocabulary file location stored in a world / hf spec (or the gpt2 folder) when the file
    lives elsewhere on this machine; its sha256 must still match the spec's.
    """
    if not isinstance(spec, dict) or spec.get("name") not in NAMES:
        raise ValueError(f"not a tokenizer spec: {spec!r}; expected a dict with 'name' in {NAMES}, as written by "
                         f"Tokenizer.spec()")
    name = spec["name"]
    if name == "byte":
        tokenizer = ByteTokenizer()
    elif name == "char":
        tokenizer = CharTokenizer(spec["alphabet"])
    elif name == "bpe":
        tokenizer = BPETokenizer(spec["merges"], spec["pattern"])
    elif name == "gpt2":
        tokenizer = GPT2Tokenizer(path=path)
    else:
        from .world import HFTokenizer, WorldTokenizer

        cls = WorldTokenizer if name == "world" else HFTokenizer
        tokenizer = cls(path if path is not None else spec["path"], expected_sha256=spec["sha256"])
    if tokenizer.vocab_size != spec["vocab_size"]:
        raise ValueError(f"the rebuilt {name!r} tokenizer has {tokenizer.vocab_size} tokens but the spec says "
                         f"{spec['vocab_size']}: the spec is corrupt or was edited by hand")
    return tokenizer
