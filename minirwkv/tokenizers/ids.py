"""What every tokenizer shares: checking token ids before decoding, and the digest a spec keeps of a vocabulary file.
Its own module, so that core.py (which builds the World and HF tokenizers) and world.py import it without a cycle."""
from __future__ import annotations

import hashlib

import numpy as np


def check_ids(ids, vocab_size: int) -> np.ndarray:
    """``ids`` as a 1-D int64 array, each in [0, vocab_size); a clear ValueError otherwise."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"decode takes a 1-D sequence of integer token ids, got an array of shape {arr.shape} "
                         f"and dtype {arr.dtype}; decode one sequence (row) at a time")
    arr = arr.astype(np.int64)
    bad = np.nonzero((arr < 0) | (arr >= vocab_size))[0]
    if bad.size:
        raise ValueError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is outside this tokenizer's "
                         f"vocabulary [0, {vocab_size}); was the model trained with another tokenizer? Rebuild the "
                         f"tokenizer from the checkpoint's spec with tokenizer_from_spec")
    return arr


def file_sha256(path) -> str:
    """The sha256 hex digest of a file: what a spec remembers of a vocabulary file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
