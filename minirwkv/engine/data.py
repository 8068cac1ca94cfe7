"""Training text: where it comes from, how it becomes token files, and how batches are drawn from them.

A corpus is named by ``--data``:

    stdlib        (default) the Python standard library's own source, which every Python installation carries:
                  the top-level ``*.py`` modules of ``sysconfig.get_paths()["stdlib"]`` in sorted order, each
                  preceded by a ``# file: name.py`` line, up to STDLIB_MAX_CHARS (about 2 MB). Nothing to download;
                  the exact text depends on the Python version (its sha256 is recorded with every run).
    shakespeare   tinyshakespeare (1.1 MB, Karpathy's char-rnn), downloaded only when asked, from a pinned URL,
                  checked against a pinned sha256 and cached in the user's cache folder.
    PATH          any UTF-8 text file, or a folder written by ``minirwkv prepare`` (memory-mapped token files).

``prepare`` tokenizes once, as nanoGPT's ``data/shakespeare_char/prepare.py`` does: ``train.npy`` and ``val.npy``
(uint16 ids when the vocabulary fits, else uint32; the last ``val_fraction`` of the tokens is the validation split)
and ``meta.json`` (the tokenizer's spec and the statistics).

Batches are a pure function of (seed, step): ``np.random.default_rng([seed, 0, step])`` picks the offsets, so a run
resumed at step k draws exactly the batches an uninterrupted run draws, with no random state to save.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import check_train_tokenizer
from ..io.atomic import atomic_write
from ..paths import output_folder
from ..tokenizers.core import get_tokenizer, tokenizer_from_spec

STDLIB_MAX_CHARS = 2_000_000
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # 1,115,394 bytes
NAMED = ("stdlib", "shakespeare")


# ---------------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------------

def stdlib_text(max_chars: int = STDLIB_MAX_CHARS) -> str:
    """The embedded default corpus: top-level stdlib modules in sorted order, whole files, until ``max_chars``."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    if not files:
        raise RuntimeError(f"no Python source files in the standard library folder {folder} (a Python installed "
                           f"without its .py sources?); pass --data path/to/any.txt instead")
    parts, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # none in CPython's stdlib; a patched one must not stop the default run
        part = f"# file: {path.name}\n{text}\n"
        if parts and total + len(part) > max_chars:
            break
        parts.append(part)
        total += len(part)
    return "".join(parts)


def cache_dir() -> Path:
    """The user's cache folder for minirwkv: $XDG_CACHE_HOME/minirwkv, ~/Library/Caches/minirwkv on macOS,
    %LOCALAPPDATA%/minirwkv on Windows, else ~/.cache/minirwkv. Read when called, never at import."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "minirwkv"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "minirwkv"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minirwkv"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(url: str, sha256: str, dest: Path, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` unless a file with the right sha256 is already there.

    The bytes are checked before they are written; the file appears atomically (temporary file, then rename), so
    an interrupted download never leaves a partial corpus behind.
    """
    if dest.exists() and _sha256(dest.read_bytes()) == sha256:
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Download the file "
                           f"by other means and pass its path: --data path/to/input.txt") from None
    got = _sha256(data)
    if got != sha256:
        raise RuntimeError(f"{url} has sha256 {got}, expected {sha256}: the file changed upstream or the download "
                           f"was altered; not using it. Pass a copy you trust with --data path/to/input.txt")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as f:
        f.write(data)
    return dest


def shakespeare_text() -> str:
    path = download(SHAKESPEARE_URL, SHAKESPEARE_SHA256, cache_dir() / "tinyshakespeare.txt")
    return path.read_text(encoding="utf-8")


def read_text(path) -> str:
    """A UTF-8 text file, with a clear error for a missing, empty or undecodable one."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file; pass a UTF-8 text file, a folder from `minirwkv prepare`, "
                         f"or a named corpus ({', '.join(NAMED)})")
    if path.is_dir():
        raise ValueError(f"--data {path}: a folder without meta.json; prepare it with `minirwkv prepare "
                         f"--data FILE --out {path}` or pass a text file")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"--data {path}: the file is empty; a corpus needs text to learn from")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); convert "
                         f"it, e.g. iconv -f latin1 -t utf-8") from None


def corpus_text(data: str) -> str:
    """The text named by ``--data``: stdlib, shakespeare, or a path."""
    if data == "stdlib":
        return stdlib_text()
    if data == "shakespeare":
        return shakespeare_text()
    return read_text(data)


# ---------------------------------------------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------------------------------------------

class Dataset(NamedTuple):
    train: np.ndarray  # (N_train,) token ids (uint16 / uint32; memory-mapped when read from prepared files)
    val: np.ndarray  # (N_val,)
    tokenizer: object  # a minirwkv.tokenizer.Tokenizer
    fingerprint: str  # sha256 of the corpus text, recorded in checkpoints
    stats: dict


def tokenizer_options(name: str, bpe_vocab_size: int) -> dict:
    return {"vocab_size": bpe_vocab_size} if name == "bpe" else {}


def tokenize(text: str, tokenizer_name: str = "byte", val_fraction: float = 0.1, bpe_vocab_size: int = 1024,
             tokenizer=None) -> Dataset:
    """Tokenize ``text`` (with ``tokenizer``, or a new one built by name) and split off the last val_fraction."""
    if not text:
        raise ValueError("the corpus is empty; a corpus needs text to learn from")
    if tokenizer is None:
        tokenizer = get_tokenizer(tokenizer_name, text, **tokenizer_options(tokenizer_name, bpe_vocab_size))
    ids = np.asarray(tokenizer.encode(text))
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    ids = ids.astype(dtype)  # (N,)
    n_val = int(len(ids) * val_fraction)
    train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    stats = {"chars": len(text), "tokens": int(len(ids)), "vocab_size": int(tokenizer.vocab_size),
             "train_tokens": int(len(train)), "val_tokens": int(len(val)), "tokenizer": tokenizer.name}
    return Dataset(train, val, tokenizer, _sha256(text.encode("utf-8")), stats)


PREPARED_FILES = ("train.npy", "val.npy", "meta.json")


def prepare(data: str, out_dir, tokenizer_name: str = "byte", val_fraction: float = 0.1,
            bpe_vocab_size: int = 1024, overwrite: bool = False) -> Dataset:
    """Tokenize the corpus once into ``out_dir``/{train.npy, val.npy, meta.json}; returns the dataset.

    A folder that already holds a prepared dataset is kept unless ``overwrite``: the checks come before the corpus
    is read, so a refused call touches nothing."""
    check_train_tokenizer(tokenizer_name)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; prepare writes a folder ({', '.join(PREPARED_FILES)}): pass a "
                         f"folder path")
    output_folder(out, "--out", make=False)
    held = [name for name in PREPARED_FILES if (out / name).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out} already holds a prepared dataset ({', '.join(held)}); pass another --out, or "
                         f"--overwrite to replace it")
    dataset = tokenize(corpus_text(data), tokenizer_name, val_fraction, bpe_vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with atomic_write(out / f"{split}.npy") as f:
            np.save(f, getattr(dataset, split))
    meta = {"source": data, "sha256": dataset.fingerprint, "val_fraction": val_fraction, "stats": dataset.stats,
            "tokenizer": dataset.tokenizer.spec()}
    with atomic_write(out / "meta.json", "w") as f:
        f.write(json.dumps(meta, indent=1))
    return dataset


def load_prepared(folder) -> Dataset:
    """The token files written by ``prepare``, memory-mapped read-only."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train = np.load(folder / "train.npy", mmap_mode="r", allow_pickle=False)
        val = np.load(folder / "val.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {folder}: not a complete `minirwkv prepare` folder ({e}); prepare it again") \
            from None
    return Dataset(train, val, tokenizer_from_spec(meta["tokenizer"]), meta["sha256"], meta["stats"])


def load_dataset(data: str, tokenizer_name: str = "byte", val_fraction: float = 0.1, bpe_vocab_size: int = 1024,
                 tokenizer=None) -> Dataset:
    """``--data`` as a Dataset: a prepared folder is memory-mapped, anything else is read and tokenized now."""
    if data not in NAMED and (Path(data) / "meta.json").is_file():
        dataset = load_prepared(data)
        if tokenizer is not None and tokenizer.spec() != dataset.tokenizer.spec():
            raise ValueError(f"--data {data} was prepared with another tokenizer than the checkpoint's")
        return dataset
    return tokenize(corpus_text(data), tokenizer_name, val_fraction, bpe_vocab_size, tokenizer)


def format_stats(stats: dict) -> str:
    """The lines ``prepare`` prints (nanoGPT prepare.py style)."""
    return (f"length of dataset in characters: {stats['chars']:,}\n"
            f"tokenizer: {stats['tokenizer']}, vocab size: {stats['vocab_size']:,}\n"
            f"tokens: {stats['tokens']:,} (train has {stats['train_tokens']:,} tokens, "
            f"val has {stats['val_tokens']:,} tokens)")


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------

def check_split(tokens: np.ndarray, block_size: int, split: str):
    """A split must hold at least one sequence of block_size + 1 tokens (inputs plus the shifted targets)."""
    if len(tokens) < block_size + 1:
        raise ValueError(f"the {split} split has {_tokens(len(tokens))}, fewer than block_size + 1 = "
                         f"{block_size + 1}: " + _advice(len(tokens), block_size, len(tokens)))


def check_splits(train: np.ndarray, val: np.ndarray, block_size: int, val_fraction: float | None = None):
    """Both splits hold a sequence of block_size + 1 tokens; else the advice is a block size that fits both (the
    shorter split decides) or, where none does, a corpus size that fits ``block_size``. ``val_fraction``: how the
    splits were made (default: read from their sizes)."""
    split, tokens = ("train", train) if len(train) <= len(val) else ("val", val)
    if len(tokens) < block_size + 1:
        total = len(train) + len(val)
        raise ValueError(f"the {split} split has {_tokens(len(tokens))}, fewer than block_size + 1 = "
                         f"{block_size + 1}: " + _advice(len(tokens), block_size, total,
                                                         val_fraction or len(val) / max(total, 1)))


def _tokens(n: int) -> str:
    return f"{n:,} token" + ("" if n == 1 else "s")


def _advice(shortest: int, block_size: int, total: int, val_fraction: float = 0.0) -> str:
    """What to do when the shortest split has ``shortest`` tokens: the largest block size that fits, or else (fewer
    than the 2 tokens of block size 1) the smallest corpus whose splits fit ``block_size``."""
    if shortest >= 2:
        return f"use --block_size={shortest - 1} or less, or a longer corpus"
    if not 0 < val_fraction < 1:
        return "the corpus is too small to train on; use a longer corpus or a larger --val_fraction"
    need = block_size + 1  # tokens in each split; the validation split is the last int(n val_fraction) of n

    def fits(n):
        return min(int(n * val_fraction), n - int(n * val_fraction)) >= need

    enough = next(n for n in itertools.count(max(total, math.floor(need / min(val_fraction, 1 - val_fraction))))
                  if fits(n))
    return (f"the corpus is too small to train on; --block_size={block_size} needs a corpus of at least {enough:,} "
            f"tokens (the validation split is its last {val_fraction:.3g})")


def get_batch(tokens: np.ndarray, block_size: int, batch_size: int, seed: int, step: int, stream: int = 0,
              rank: int = 0, world_size: int = 1):
    """Batch ``step`` of the run with this ``seed``: x, y (B, T) int64, y = x shifted by one token.

    Offsets come from ``np.random.default_rng([seed, stream, step])`` (stream 0: training, 1: validation), so the
    batch depends only on these numbers: resuming replays the uninterrupted run exactly.

    Data-parallel runs (minirwkv.distributed): ``batch_size`` is the global batch, and process ``rank`` of
    ``world_size`` gets its rows [rank B/N, (rank+1) B/N), (B/N, T). All ranks draw the same B offsets, so the
    union of their shares is the single-process batch, whatever N is.
    """
    check_split(tokens, block_size, "train" if stream == 0 else "val")
    share = shard_rows(batch_size, rank, world_size)
    rng = np.random.default_rng([seed, stream, step])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)  # (B,) the last start leaves one target
    rows = starts[share, None] + np.arange(block_size + 1)  # (B/N, T + 1)
    chunk = np.asarray(tokens[rows], dtype=np.int64)  # (B/N, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


def shard_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that process ``rank`` of ``world_size`` computes."""
    if batch_size % world_size:
        lower, upper = batch_size // world_size * world_size, (batch_size // world_size + 1) * world_size
        raise ValueError(f"--batch_size={batch_size} is the global batch, split evenly over {world_size} "
                         f"processes: use a multiple of {world_size} (e.g. {lower or upper} or {upper})")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)
