"""Sampling (minirwkv/sampling.py): every branch. Excluded tokens are never drawn, temperature 0 is greedy and
temperature != 1 draws from softmax(logits / T), a seed repeats, penalties lower repeated tokens, bad values fail."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minirwkv.engine.sampling import SamplingConfig, apply_penalties, distribution, filter_mask, make_rng, sample

LOGITS = arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40)),
                elements=st.floats(-30, 30, width=32) | st.sampled_from([0.0, 1.0, -1.0]))


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@given(logits=LOGITS, top_k=st.integers(1, 10), seed=st.integers(0, 2**16))
@example(logits=np.array([[0.0, 0.0, 5.0, 0.0]], np.float32), top_k=1, seed=0)
def test_top_k_never_emits_excluded_tokens(logits, top_k, seed):
    cfg = SamplingConfig(top_k=top_k)
    probs = distribution(logits, cfg)
    V = logits.shape[1]
    kth = np.sort(logits, axis=1)[:, ::-1][:, min(top_k, V) - 1]  # the k-th largest logit per row
    assert np.all(probs[logits < kth[:, None]] == 0)
    rng = make_rng(seed)
    for _ in range(20):
        tokens = sample(logits, cfg, rng)
        assert np.all(logits[np.arange(len(tokens)), tokens] >= kth)


@given(logits=LOGITS, top_p=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
@example(logits=np.array([[10.0, 0.0, 0.0, 0.0]], np.float32), top_p=0.5, seed=0)
def test_top_p_never_emits_excluded_tokens(logits, top_p, seed):
    """The kept set is the smallest prefix (most likely first) whose mass reaches top_p, plus ties."""
    cfg = SamplingConfig(top_p=top_p)
    p1 = softmax(logits.astype(np.float64))
    probs = distribution(logits, cfg)
    rng = make_rng(seed)
    tokens = np.stack([sample(logits, cfg, rng) for _ in range(20)], axis=1)  # (B, 20)
    for b in range(logits.shape[0]):
        kept = probs[b] > 0
        # every kept token is at least as likely as every excluded one
        if (~kept).any():
            assert p1[b][kept].min() >= p1[b][~kept].max()
            # and without its least likely kept tokens the mass would fall short of top_p
            cutoff = p1[b][kept].min()
            assert p1[b][p1[b] > cutoff].sum() < top_p * p1[b].sum() + 1e-12
        assert p1[b][kept].sum() >= top_p * p1[b].sum() - 1e-12
        assert np.all(kept[tokens[b]])


def test_top_p_one_and_top_k_zero_keep_everything():
    logits = np.array([[3.0, 2.0, 1.0, -50.0]])
    probs = distribution(logits, SamplingConfig(top_p=1.0, top_k=0))
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-12)
    assert filter_mask(softmax(logits), top_k=4, top_p=1.0).all()  # k >= V: off


def test_filters_combine():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert filter_mask(softmax(logits), top_k=3, top_p=0.7).tolist() == [[True, True, False, False]]
    assert filter_mask(softmax(logits), top_k=1, top_p=0.9).tolist() == [[True, False, False, False]]


@given(logits=LOGITS)
def test_temperature_zero_is_greedy(logits):
    tokens = sample(logits, SamplingConfig(temperature=0), rng=None)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))


def test_small_temperature_tends_to_greedy():
    logits = np.array([[1.0, 1.5, 1.4, -2.0]])
    rng = make_rng(0)
    draws = [int(sample(logits, SamplingConfig(temperature=0.01), rng)[0]) for _ in range(200)]
    assert draws == [1] * 200  # p(token 2) = e^-10 relative


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_from_softmax_of_scaled_logits(temperature):
    """Empirical frequencies of 20000 draws (fixed seed) against softmax(logits / T): Pearson's chi-square with 5
    degrees of freedom stays below 25 (p ~ 1e-4), and the expectation at T = 1 is rejected when T != 1."""
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0]])
    cfg = SamplingConfig(temperature=temperature)
    rng = make_rng(1234)
    n = 20000
    draws = np.concatenate([sample(np.repeat(logits, 100, axis=0), cfg, rng) for _ in range(n // 100)])
    observed = np.bincount(draws, minlength=6)

    def chi2(p):
        expected = n * p
        return float(((observed - expected) ** 2 / expected).sum())

    assert chi2(softmax(logits[0] / temperature)) < 25
    if temperature != 1.0:
        assert chi2(softmax(logits[0])) > 100  # the temperature really changed the distribution


def test_fixed_seed_repeats_and_different_seeds_differ():
    logits = np.random.default_rng(0).normal(0, 2, (2, 50))
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)

    def run(seed):
        rng = make_rng(seed)
        return np.stack([sample(logits, cfg, rng) for _ in range(30)])

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_penalties_as_chatrwkv():
    logits = np.zeros((1, 4))
    counts = np.array([[0, 1, 3, 0]])
    got = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(got, [[0.0, -0.75, -1.25, 0.0]])
    np.testing.assert_array_equal(apply_penalties(logits, None, 0.5, 0.25), logits)


def test_penalties_lower_repeated_tokens():
    logits = np.array([[2.0, 1.9, 0.0]])
    counts = np.array([[2, 0, 0]])
    cfg = SamplingConfig(presence_penalty=0.4, frequency_penalty=0.2)
    assert distribution(logits, cfg, counts)[0, 0] < distribution(logits, SamplingConfig(), counts)[0, 0]
    greedy = SamplingConfig(temperature=0, presence_penalty=0.4, frequency_penalty=0.2)
    assert int(sample(logits, greedy, None, counts)[0]) == 1  # token 0 was the argmax before the penalty
    assert int(sample(logits, SamplingConfig(temperature=0), None, counts)[0]) == 0


def test_excluded_tokens_have_exactly_zero_probability_even_at_tiny_temperature():
    logits = np.array([[0.0, -1e-3, -1e-3, -5.0]])
    probs = distribution(logits, SamplingConfig(temperature=1e-6, top_k=3))
    assert probs[0, 3] == 0 and np.isclose(probs.sum(), 1.0) and np.isfinite(probs).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"frequency_penalty": "a"}, "frequency_penalty"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_seed_and_shapes():
    with pytest.raises(ValueError, match="seed"):
        make_rng(-1)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample(np.zeros(4), SamplingConfig(), make_rng(0))
    with pytest.raises(ValueError, match="greedy"):
        distribution(np.zeros((1, 4)), SamplingConfig(temperature=0))
