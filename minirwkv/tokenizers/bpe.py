r"""Byte-pair encoding (BPE) training: a short pure-Python reference and the entry point to the Numba trainer.

The algorithm (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units", applied to
bytes as in GPT-2, Radford et al. 2019, section 2.2):

1. Split the text into chunks with a regular expression (words, numbers, punctuation runs, whitespace runs), so
   that no token ever spans a chunk boundary: " the" and "the." stay separate tokens.
2. Count how often each distinct chunk occurs. A chunk is a sequence of token ids, initially its UTF-8 bytes
   (ids 0..255). Identical chunks are processed once, weighted by their count.
3. Repeat until the vocabulary is full: count every adjacent pair (a, b) over all chunks, weighted; take the most
   frequent pair; give it the next id (256, 257, ...); replace its occurrences in every chunk, left to right
   without overlap ("aaa" becomes [aa, a]).

Tie-breaking (the whole result depends on it, so both trainers implement exactly this):
    the pair with the highest count wins; among equal counts the smallest (a, b) in the order of ids (compare a
    first, then b). Ids are ranks, so an older token wins over a newer one.
Training stops early, with fewer merges than asked for, when no pair is left (every chunk is a single token).

Counting adjacent pairs counts overlapping ones ("aaa" holds the pair (a, a) twice) while a merge replaces them
without overlap: that is how minbpe (karpathy/minbpe ``get_stats`` / ``merge``) and the HF trainer count too.

No two tokens get the same bytes (tiktoken needs that: it names a token by its bytes). Why: a span of a chunk that
ends up as one token never had a token crossing its edges, and merges are applied left to right, so its pieces
evolve exactly as if the span were a chunk on its own, the same in every chunk. If "abc" became (ab, c) in one
place, every "abc" that becomes a token is split (ab, c) at that step, and is merged there, never later as (a, bc).

Encoding with the trained vocabulary is tiktoken's job (minirwkv.tokenizer.BPETokenizer). ``encode_reference``
below is the same algorithm in Python (tiktoken ``_educational.py`` ``bpe_encode``), used by the tests to check
that tiktoken's regex engine splits text exactly as the ``regex`` package does here.
"""
from __future__ import annotations

from collections import Counter

# GPT-2's split pattern (openai/gpt-2 encoder.py): contractions, optional space + letters / digits / other, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k_base) in its plain form (as karpathy/minbpe writes it): numbers in groups of at most 3 digits,
# newlines split from other whitespace, case-insensitive contractions. The default: it suits code and verse.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
IMPLS = ("numba", "python")


def resolve_pattern(pattern: str) -> str:
    """A named pattern ("gpt2", "gpt4") or a regular expression, returned as the expression."""
    return PATTERNS.get(pattern, pattern)


def split_chunks(text: str, pattern: str = GPT4_PATTERN) -> tuple[list[bytes], list[int]]:
    """The distinct chunks of ``text`` (UTF-8 bytes, in order of first appearance) and how often each occurs.

    Uses the ``regex`` package (a dependency of tiktoken): Python's ``re`` has no ``\\p{L}`` classes.
    """
    import regex

    counts = Counter(regex.findall(resolve_pattern(pattern), text))
    return [chunk.encode("utf-8", "surrogatepass") for chunk in counts], list(counts.values())


def train_bpe(text: str, vocab_size: int, pattern: str = GPT4_PATTERN, impl: str = "numba") -> list[tuple[int, int]]:
    """Train BPE merges on ``text``: returns [(a, b), ...], where merge i creates token id 256 + i.

    ``vocab_size`` counts the 256 byte tokens, so ``vocab_size - 256`` merges are made (fewer if the text runs out
    of pairs). ``impl="numba"`` (backends/numba_bpe.py) is fast; ``impl="python"`` is the reference
    ``train_merges_reference``, minutes per megabyte: for tests and reading.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size!r}: a byte-level BPE vocabulary holds the 256 byte tokens plus "
                         f"the merges, so pass an int >= 256 (e.g. 1024)")
    if impl not in IMPLS:
        raise ValueError(f"unknown BPE training impl {impl!r}; choose one of: {', '.join(IMPLS)}")
    chunks, freqs = split_chunks(text, pattern)
    n_merges = vocab_size - 256
    if impl == "python":
        return train_merges_reference(chunks, freqs, n_merges)
    from .numba_bpe import train_merges

    return train_merges(chunks, freqs, n_merges)


def train_merges_reference(chunks: list[bytes], freqs: list[int], n_merges: int) -> list[tuple[int, int]]:
    """The BPE training loop, recounting every pair at every step (O(n_merges * total chunk length))."""
    words = [list(chunk) for chunk in chunks]
    merges = []
    while len(merges) < n_merges:
        counts = pair_counts(words, freqs)
        if not counts:
            break  # every chunk is a single token
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # highest count, then the smallest (a, b)
        words = [merge_pair(word, best, 256 + len(merges)) for word in words]
        merges.append(best)
    return merges


def pair_counts(words: list[list[int]], freqs: list[int]) -> dict[tuple[int, int], int]:
    """How often each adjacent pair occurs, each chunk weighted by its frequency (overlapping pairs all count)."""
    counts: dict[tuple[int, int], int] = {}
    for word, freq in zip(words, freqs):
        for pair in zip(word, word[1:]):
            counts[pair] = counts.get(pair, 0) + freq
    return counts


def merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of ``pair`` in ``word`` by ``new_id``, left to right, without overlap."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def token_bytes(merges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of every token: ids 0..255 are single bytes, id 256 + i is the concatenation of merge i."""
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    return vocab


def mergeable_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """tiktoken's vocabulary: token bytes -> rank (= id), the 256 single bytes first, then the merges in order."""
    ranks = {tok: rank for rank, tok in enumerate(token_bytes(merges))}
    if len(ranks) != 256 + len(merges):
        raise ValueError("these merges give two tokens the same bytes, and tiktoken needs every token's bytes to be "
                         "unique; merges trained by minirwkv.bpe.train_bpe never do (see the module docstring)")
    return ranks


def encode_reference(text: str, ranks: dict[bytes, int], pattern: str = GPT4_PATTERN) -> list[int]:
    """Encode as tiktoken does, in Python: split with ``pattern``; in each chunk, repeatedly join the adjacent
    parts whose concatenation has the lowest rank (the leftmost among equals) until no concatenation is a token.
    Mirrors tiktoken ``_educational.py`` ``bpe_encode``; slow, for tests."""
    import regex

    ids = []
    for chunk in regex.findall(resolve_pattern(pattern), text):
        parts = [bytes([b]) for b in chunk.encode("utf-8", "surrogatepass")]
        while len(parts) > 1:
            joined = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            found = [(rank, i) for i, rank in enumerate(joined) if rank is not None]
            if not found:
                break
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[part] for part in parts)
    return ids
