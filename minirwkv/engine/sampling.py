r"""Choosing the next token from the logits: penalties, temperature, top-k, top-p, a seeded generator.

The order of ChatRWKV (``rwkv.utils.PIPELINE.generate`` and ``sample_logits``, rwkv 0.8.32):

    1. penalties on tokens already generated:   logits[t] -= presence + count[t] * frequency   (count[t] > 0)
    2. temperature 0: the argmax (greedy), nothing random.
    3. p = softmax(logits)                        the filters look at the untempered distribution, as ChatRWKV
    4. top-p: keep the smallest set of most likely tokens whose probability sums to >= top_p (all tokens as
       likely as the least likely kept one are kept too);  top-k: keep the tokens whose probability is >= the
       k-th largest (ties at the boundary are all kept)
    5. temperature T: p_kept ** (1/T), renormalised, which equals softmax(logits / T) over the kept tokens;
       computed in log space so that a small T cannot underflow every probability to 0
    6. one draw from a numpy.random.Generator (inverse CDF): a seed repeats the whole sequence.

ChatRWKV's ``sample_logits`` on NumPy raises to ``1.0 / temperature`` correctly; the ``RWKV_in_150_lines.py`` demo
calls ``.pow`` on a NumPy array and fails for temperature != 1 (docs/rwkv4.md §8), which is why tests check the
distribution at T != 1 against softmax(logits / T). Exclusion is exact: a token removed by top-k or top-p gets
probability exactly 0, and the inverse-CDF draw never lands on a zero-probability token.

Shapes: logits (B, V) for B sequences, counts (B, V) of how often each token was generated in each sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. Defaults: plain sampling from softmax(logits) (temperature 1, no filters, no penalties).

    temperature        >= 0; 0 is greedy (argmax), < 1 sharpens, > 1 flattens
    top_k              >= 0; 0 = off, else keep the k most likely tokens
    top_p              in (0, 1]; 1 = off, else nucleus sampling
    presence_penalty   subtracted once from every token already generated (ChatRWKV alpha_presence)
    frequency_penalty  subtracted per occurrence (ChatRWKV alpha_frequency)
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits, counts, presence: float, frequency: float):
    """logits - presence * (counts > 0) - frequency * counts, as ChatRWKV. logits, counts (B, V) -> (B, V) float64."""
    out = np.array(logits, dtype=np.float64)  # a copy: the caller's logits stay as they are
    if counts is not None and (presence or frequency):
        out -= presence * (counts > 0) + frequency * counts
    return out


def filter_mask(probs, top_k: int = 0, top_p: float = 1.0, logits=None):
    """Which tokens top-k and top-p keep: probs (B, V) -> bool mask (B, V). At least one token per row is kept.

    top-k ranks by ``logits`` (B, V) when given (default: probs): two logits that differ can round to the same
    probability (e.g. 1e-39 and 0), and top-k must still keep only the larger one.
    """
    B, V = probs.shape
    keep = np.ones((B, V), dtype=bool)
    if top_p < 1:
        for b in range(B):
            desc = np.sort(probs[b])[::-1]  # (V,) most likely first
            cum = np.cumsum(desc)
            # the first position where the mass reaches top_p of the total (the total, not 1: rounding of a sum)
            n = min(int(np.searchsorted(cum, top_p * cum[-1])), V - 1)
            keep[b] &= probs[b] >= desc[n]
    if 0 < top_k < V:
        score = probs if logits is None else logits
        kth = np.partition(score, V - top_k, axis=1)[:, V - top_k]  # (B,) the k-th largest score
        keep &= score >= kth[:, None]
    return keep


def distribution(logits, config: SamplingConfig, counts=None):
    """The probabilities (B, V) float64 the next token is drawn from (temperature > 0), after steps 1-5."""
    if config.greedy:
        raise ValueError("temperature 0 is greedy: there is no distribution to draw from; use sample()")
    scores = apply_penalties(logits, counts, config.presence_penalty, config.frequency_penalty)  # (B, V)
    z = scores - scores.max(axis=1, keepdims=True)  # softmax shifted by the max: exp never overflows
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)  # (B, V) at temperature 1
    keep = filter_mask(probs, config.top_k, config.top_p, logits=scores)  # top-k ranks the unshifted scores
    z = np.where(keep, z / config.temperature, -np.inf)  # log of p ** (1/T), up to a constant
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)  # exactly 0 where excluded (exp(-inf))
    return probs / probs.sum(axis=1, keepdims=True)


def sample(logits, config: SamplingConfig, rng: np.random.Generator, counts=None) -> np.ndarray:
    """Next tokens (B,) int64 for logits (B, V), drawing from ``rng``; ``counts`` (B, V) for the penalties."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {logits.shape}")
    if config.greedy:
        z = apply_penalties(logits, counts, config.presence_penalty, config.frequency_penalty)
        return z.argmax(axis=1)
    probs = distribution(logits, config, counts)  # (B, V)
    cdf = np.cumsum(probs, axis=1)  # (B, V)
    u = rng.random(probs.shape[0]) * cdf[:, -1]  # (B,) in [0, total)
    tokens = np.array([np.searchsorted(cdf[b], u[b], side="right") for b in range(len(u))])
    # u * total can round up to total; the last token with a nonzero probability is then the right answer
    last = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)  # (B,)
    return np.minimum(tokens, last).astype(np.int64)


def make_rng(seed=None) -> np.random.Generator:
    """np.random.default_rng(seed): None draws fresh entropy, an int repeats."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return np.random.default_rng(seed)
