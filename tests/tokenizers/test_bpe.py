"""BPE training: the Numba trainer makes exactly the reference's merges; the rules of the module docstring hold."""
import inspect
import textwrap

import pytest
from hypothesis import example, given, strategies as st

from minirwkv.tokenizers.bpe import merge_pair, mergeable_ranks, split_chunks, token_bytes, train_bpe, train_merges_reference

from minirwkv.tokenizers.numba_bpe import train_merges  # noqa: E402

# Text that ships with Python: the source of a stdlib module (the tests never need a data file).
STDLIB_SOURCE = inspect.getsource(textwrap)

# Few distinct characters make many repeated pairs and many ties in the counts; include multi-byte characters.
small_texts = st.text(alphabet=st.sampled_from("ab  \n'sé世😀1"), max_size=120)


@given(text=small_texts, n_merges=st.integers(0, 60))
@example(text="", n_merges=5)
@example(text="aaaa aaa aa a", n_merges=10)  # overlapping pairs
@example(text="ab ba ab ba", n_merges=10)  # ties
def test_numba_merges_equal_reference(text, n_merges):
    chunks, freqs = split_chunks(text)
    assert train_merges(chunks, freqs, n_merges) == train_merges_reference(chunks, freqs, n_merges)


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_numba_merges_equal_reference_on_python_source(pattern):
    text = STDLIB_SOURCE[:6000]
    python = train_bpe(text, 256 + 200, pattern=pattern, impl="python")
    assert len(python) == 200
    assert train_bpe(text, 256 + 200, pattern=pattern, impl="numba") == python


def test_merge_is_left_to_right_without_overlap():
    assert merge_pair([97, 97, 97], (97, 97), 256) == [256, 97]
    assert merge_pair([97, 97, 97, 97], (97, 97), 256) == [256, 256]
    assert merge_pair([98, 97, 98], (97, 98), 256) == [98, 256]


@pytest.mark.parametrize("trainer", [train_merges_reference, train_merges])
def test_overlapping_pairs_count_and_merge(trainer):
    # "aaaa": (a, a) counted 3 times, merged twice -> [aa, aa]; then (aa, aa) is the only pair left
    assert trainer([b"aaaa"], [1], 5) == [(97, 97), (256, 256)]
    # "aaa" x 2 and "ab" x 3: (a, a) counts 4 > (a, b) 3; after it, "aaa" = [aa, a] and (aa, a) = 2 < (a, b) = 3
    assert trainer([b"aaa", b"ab"], [2, 3], 3) == [(97, 97), (97, 98), (256, 97)]


@pytest.mark.parametrize("trainer", [train_merges_reference, train_merges])
def test_tie_breaking_smallest_pair(trainer):
    # all pairs occur once: smallest a first, then smallest b; the new token 256 is larger than every byte
    assert trainer([b"cd", b"ab", b"ac"], [1, 1, 1], 3) == [(97, 98), (97, 99), (99, 100)]
    # the higher count beats the smaller pair
    assert trainer([b"ab", b"zz"], [1, 2], 2) == [(122, 122), (97, 98)]


def test_stops_when_no_pair_is_left():
    assert train_bpe("abab", 1000, impl="python") == [(97, 98), (256, 256)]
    assert train_bpe("abab", 1000, impl="numba") == [(97, 98), (256, 256)]


def test_token_bytes_and_ranks():
    merges = [(97, 98), (256, 99)]
    assert token_bytes(merges)[256:] == [b"ab", b"abc"]
    ranks = mergeable_ranks(merges)
    assert ranks[b"a"] == 97 and ranks[b"abc"] == 257 and len(ranks) == 258
    with pytest.raises(ValueError, match="same bytes"):
        mergeable_ranks([(97, 98), (256, 99), (98, 99), (97, 258)])  # "abc" made twice


def test_trained_tokens_have_unique_bytes():
    merges = train_bpe(STDLIB_SOURCE, 256 + 400)
    assert len(set(token_bytes(merges))) == 256 + 400


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe("abc", 100)
    with pytest.raises(ValueError, match="impl"):
        train_bpe("abc", 300, impl="rust")
