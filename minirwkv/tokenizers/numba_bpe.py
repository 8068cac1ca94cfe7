"""BPE training compiled with Numba: the algorithm of ``minirwkv.bpe.train_merges_reference``, same merges.

Two changes make it fast; neither changes a single merge:

* Pair counts are kept up to date instead of recounted. Merging (a, b) -> n at ``x a b y`` removes the pairs
  (x, a), (a, b), (b, y) and adds (x, n), (n, y), each weighted by the chunk's frequency. Applied left to right as
  each occurrence is replaced, these updates give exactly the counts of the merged chunk, overlaps included.
* The best pair comes from a heap of (-count, a, b): its minimum is the highest count, then the smallest (a, b),
  the reference's tie-breaking. Entries are not removed when a count changes; a fresh entry is pushed instead,
  and a popped entry whose count is no longer current is stale and dropped ("lazy deletion").

Chunks live back to back in one int32 array and shrink in place as pairs merge. Each merge scans every chunk
that still has two tokens or more: a linear pass, which Numba makes cheap enough for a few thousand merges.
Compiled on first call (``cache=True`` keeps the machine code on disk); importing this module compiles nothing.
"""
from __future__ import annotations

import heapq

import numpy as np
from numba import njit, types
from numba.typed import Dict

_LOW = (1 << 32) - 1


def train_merges(chunks: list[bytes], freqs: list[int], n_merges: int) -> list[tuple[int, int]]:
    """Same contract as ``minirwkv.bpe.train_merges_reference``: merges [(a, b), ...]; merge i makes id 256 + i."""
    if n_merges <= 0 or not chunks:
        return []
    lengths = np.array([len(chunk) for chunk in chunks], dtype=np.int64)  # (W,) tokens per distinct chunk
    starts = np.zeros(len(chunks), dtype=np.int64)  # (W,) where each chunk begins in ids
    np.cumsum(lengths[:-1], out=starts[1:])
    ids = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int32)  # (sum of lengths,)
    merges = _train(ids, starts, lengths, np.asarray(freqs, dtype=np.int64), n_merges)  # (M, 2)
    return [(int(a), int(b)) for a, b in merges]


@njit(cache=True)
def _key(a, b):
    return (np.int64(a) << 32) | np.int64(b)


@njit(cache=True)
def _add(counts, touched, a, b, delta):
    """counts[(a, b)] += delta, remembering the pair so its new count gets a heap entry."""
    key = _key(a, b)
    counts[key] = counts.get(key, 0) + delta
    touched[key] = True


@njit(cache=True)
def _train(ids, starts, lengths, freqs, n_merges):
    # -- the initial pair counts, and a heap entry per pair
    counts = Dict.empty(key_type=types.int64, value_type=types.int64)
    for w in range(starts.shape[0]):
        for i in range(starts[w], starts[w] + lengths[w] - 1):
            key = _key(ids[i], ids[i + 1])
            counts[key] = counts.get(key, 0) + freqs[w]
    heap = [(np.int64(0), np.int64(0), np.int64(0))]
    heap.pop()  # typed by the first item; start empty
    for key, count in counts.items():
        heap.append((-count, key >> 32, key & _LOW))
    heapq.heapify(heap)

    active = np.nonzero(lengths >= 2)[0]  # chunks that may still hold a pair
    merges = np.zeros((n_merges, 2), dtype=np.int64)
    n = 0
    while n < n_merges and len(heap) > 0:
        neg_count, a, b = heapq.heappop(heap)
        count = counts.get(_key(a, b), 0)
        if count == 0 or count != -neg_count:
            continue  # stale entry: the pair's count changed since it was pushed
        new = 256 + n
        merges[n, 0], merges[n, 1] = a, b
        n += 1

        # replace (a, b) by new in every chunk, in place, left to right; j is where the next output token goes
        touched = Dict.empty(key_type=types.int64, value_type=types.boolean)
        n_active = 0
        for w in active:
            s, end, f = starts[w], starts[w] + lengths[w], freqs[w]
            i, j = s, s
            while i < end:
                if i + 1 < end and ids[i] == a and ids[i + 1] == b:
                    if j > s:  # left neighbour x, possibly a token made earlier in this same pass
                        _add(counts, touched, ids[j - 1], a, -f)
                        _add(counts, touched, ids[j - 1], new, f)
                    _add(counts, touched, a, b, -f)
                    if i + 2 < end:  # right neighbour y
                        _add(counts, touched, b, ids[i + 2], -f)
                        _add(counts, touched, new, ids[i + 2], f)
                    ids[j] = new
                    i += 2
                else:
                    ids[j] = ids[i]
                    i += 1
                j += 1
            lengths[w] = j - s
            if lengths[w] >= 2:
                active[n_active] = w
                n_active += 1
        active = active[:n_active]

        for key in touched:
            count = counts[key]
            if count == 0:
                del counts[key]  # keep the table small
            else:
                heapq.heappush(heap, (-count, key >> 32, key & _LOW))
    return merges[:n]
