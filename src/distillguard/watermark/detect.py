"""Detection: an exact one-sided binomial test on the green (context, token) pairs of a text.

Each distinct (context, token) pair is scored once across *all* the texts (repeats of a pair
are not independent evidence: a repeated phrase would otherwise inflate the count), and pairs
that appear in the prompt are skipped (a model copying the prompt is not evidence). Under
the null hypothesis (the text does not depend on the key) each scored pair is green with
probability γ, so the green count is Binomial(T, γ) and the p-value is exact. Tails are
computed in log space (``scipy.stats.binom.logsf``) because they underflow at these sizes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.signal import oaconvolve
from scipy.special import expit, logsumexp
from scipy.stats import binom

from distillguard.errors import ConfigError
from distillguard.watermark.scheme import WatermarkKey, WatermarkParams, is_green


@dataclass(frozen=True)
class Detection:
    """Result of testing texts against one key."""

    key_id: str
    account: str | None
    scored: int  # distinct (context, token) pairs tested
    green: int
    gamma: float
    z: float
    p_value: float
    log10_p: float  # exact even when p_value underflows to 0.0
    # A weighted test's score Σw·g and its weights' Σw and Σw² (None: unweighted, every w = 1):
    # what :mod:`distillguard.watermark.power` needs to state the test's power.
    weighted_score: float | None = None
    weight_sum: float | None = None
    weight_sq_sum: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def binomial_test(green: int, scored: int, gamma: float) -> tuple[float, float, float]:
    """(z, p, log10 p) of seeing ``green`` or more successes in ``scored`` trials of rate γ."""
    if scored == 0:
        return 0.0, 1.0, 0.0
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    log_p = float(binom.logsf(green - 1, scored, gamma))  # P(X >= green)
    if not math.isfinite(
        log_p
    ):  # logsf itself underflows far in the tail: sum the pmf in log space
        log_p = float(logsumexp(binom.logpmf(np.arange(green, scored + 1), scored, gamma)))
    return z, math.exp(log_p), log_p / math.log(10)


def scored_pairs(
    token_seqs: Iterable[Sequence[int]], width: int, prompt_seqs: Iterable[Sequence[int]] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (context, token) pairs across all texts, minus the (width+1)-grams of the prompts.

    Returns contexts (N, width) and tokens (N,).
    """
    contexts, tokens, _ = weighted_pairs(token_seqs, width, prompt_seqs)
    return contexts, tokens


def weighted_pairs(
    token_seqs: Iterable[Sequence[int]],
    width: int,
    prompt_seqs: Iterable[Sequence[int]] = (),
    weights: Iterable[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`scored_pairs` with a weight per pair: ``weights`` has one integer per token of each
    text (the weight of the pair that ends at that token; all 1 when None). A pair seen more
    than once keeps its largest weight; pairs of weight 0 are dropped.

    Returns contexts (N, width), tokens (N,) and weights (N,) int64.
    """
    excluded = {tuple(p[i - width : i + 1]) for p in prompt_seqs for i in range(width, len(p))}
    seen: dict[tuple[int, ...], int] = {}
    if weights is None:
        weight_seqs = itertools.repeat(None)
    else:
        token_seqs, weight_seqs = list(token_seqs), list(weights)
        if len(weight_seqs) != len(token_seqs):
            raise ConfigError(
                f"weights for {len(weight_seqs)} texts, but {len(token_seqs)} texts: give one list per text"
            )
    for seq, ws in zip(token_seqs, weight_seqs):
        if ws is not None and len(ws) != len(seq):
            raise ConfigError(
                f"{len(ws)} weights for a text of {len(seq)} tokens: give one weight per token"
            )
        for i in range(width, len(seq)):
            w = 1 if ws is None else int(ws[i])
            if w < 0:
                raise ConfigError(f"weight {w} at token {i}: weights must be non-negative integers")
            gram = tuple(seq[i - width : i + 1])
            if w and gram not in excluded and w > seen.get(gram, 0):
                seen[gram] = w
    if not seen:
        return (
            torch.zeros((0, width), dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        )
    grams = torch.tensor(list(seen), dtype=torch.long)  # (N, width + 1)
    return grams[:, :width], grams[:, width], torch.tensor(list(seen.values()), dtype=torch.long)


def weighted_binomial_test(
    score: int, weights: Sequence[int], gamma: float
) -> tuple[float, float, float]:
    """(z, p, log10 p) of a weighted green count ``S = Σ w_i·g_i >= score`` when each g_i is an
    independent Bernoulli(γ) and the w_i are positive integers. With equal weights it is
    :func:`binomial_test`.

    The tail is computed from the exact distribution of S (no normal approximation), in
    floating point. Far in the tail the probabilities underflow and a plain convolution loses
    them to rounding, so the distribution is exponentially tilted first (the saddlepoint trick,
    used here for an exact sum, not an approximation): under weights ∝ e^{θs}, with θ chosen so
    that the tilted mean is ``score``, the terms that make up the tail are the largest ones;
    the weight classes ``w·Binomial(n_w, q_w(θ))`` are convolved by FFT (scipy), and

        P(S >= score) = exp(K(θ) - θ·score) · Σ_{s >= score} P_θ(S = s)·e^{-θ(s - score)},

    K the cumulant generating function of S. Cost O(Σw log Σw): a ledger's worth of pairs
    takes milliseconds. Hand-written: scipy has the binomial tail but not this weighted sum's.
    """
    ws = np.asarray(weights, dtype=np.int64)
    if ws.size == 0:
        return 0.0, 1.0, 0.0
    if ws.min() < 1:
        raise ConfigError(
            "weighted_binomial_test takes positive integer weights (drop the zero ones)"
        )
    total = int(ws.sum())
    mean = gamma * float(total)
    z = (score - mean) / math.sqrt(gamma * (1 - gamma) * float((ws.astype(np.float64) ** 2).sum()))
    if score <= 0:
        return z, 1.0, 0.0
    if score > total:
        return z, 0.0, -math.inf
    values, counts = np.unique(ws, return_counts=True)
    if score == total:  # every pair green
        log_p = float(ws.size) * math.log(gamma)
        return z, math.exp(log_p), log_p / math.log(10)
    logit_gamma = math.log(gamma / (1 - gamma))

    def tilted_mean(theta: float) -> float:  # K'(θ) = Σ n_w·w·q_w(θ)
        return float((counts * values * expit(theta * values + logit_gamma)).sum())

    theta = 0.0
    if score > mean:
        hi = 1.0
        while tilted_mean(hi) < score:
            hi *= 2
        theta = brentq(lambda t: tilted_mean(t) - score, 0.0, hi, xtol=1e-12)
    # K(θ) = Σ n_w·log(1 - γ + γ·e^{θw}), in a form that does not overflow
    cgf = float(
        (counts * (np.logaddexp(math.log1p(-gamma), math.log(gamma) + theta * values))).sum()
    )
    dist = np.ones(1)  # P_θ(S = s), s = 0..
    for w, n in zip(values.tolist(), counts.tolist()):
        q = float(expit(theta * w + logit_gamma))
        cls = np.zeros(w * n + 1)
        cls[::w] = binom.pmf(np.arange(n + 1), n, q)
        dist = np.clip(
            oaconvolve(dist, cls) if min(len(dist), len(cls)) > 64 else np.convolve(dist, cls),
            0,
            None,
        )
    tail = dist[score:] * np.exp(-theta * np.arange(len(dist) - score))
    log_p = min(cgf - theta * score + math.log(tail.sum()), 0.0)
    return z, math.exp(log_p), log_p / math.log(10)


def detect_tokens(
    key: WatermarkKey,
    token_seqs: Sequence[Sequence[int]],
    *,
    prompt_seqs: Sequence[Sequence[int]] = (),
    vocab_size: int,
    weights: Sequence[Sequence[int]] | None = None,
) -> Detection:
    """Test token sequences (the text's tokens, prompt excluded) against one key, by the key's
    scheme (``WatermarkParams.impl``).

    ``weights`` (optional, one non-negative integer per token, e.g. from
    :mod:`distillguard.watermark.entropy`) must not depend on the key: then the test stays
    exact. A ``synthid`` key is tested by ``synthid.detect_synthid`` (its weights may give one
    integer per tournament layer for each token; pass one prompt per text to give each answer
    its context). 0/1 weights select the pairs scored by the plain binomial test; larger ones count a
    green pair that many times, tested exactly by :func:`weighted_binomial_test`.
    """
    return key.params.impl.detect(key, token_seqs, prompt_seqs, vocab_size, weights)


def pair_test(
    key: WatermarkKey,
    contexts: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    vocab_size: int,
) -> Detection:
    """The green-list test of distinct (context, token) pairs with their weights (from
    :func:`weighted_pairs`) against one key."""
    green = (
        is_green(key.params, key.hash_key, contexts, tokens, vocab_size)
        if len(tokens)
        else torch.zeros(0, dtype=torch.bool)
    )
    n_green = int(green.sum())
    moments = {}
    if len(weights) and int(weights.max()) > 1:
        score = int(weights[green].sum())
        z, p, log10_p = weighted_binomial_test(score, weights.tolist(), key.params.gamma)
        moments = weight_moments(score, weights)
    else:  # all weights 1: the plain binomial test
        z, p, log10_p = binomial_test(n_green, len(tokens), key.params.gamma)
    return Detection(
        key_id=key.key_id,
        account=key.account,
        scored=len(tokens),
        green=n_green,
        gamma=key.params.gamma,
        z=z,
        p_value=p,
        log10_p=log10_p,
        **moments,
    )


def weight_moments(score: float, weights: torch.Tensor) -> dict:
    """A weighted Detection's extra fields: its score and its weights' Σw and Σw²."""
    w = weights.double()
    return {
        "weighted_score": float(score),
        "weight_sum": float(w.sum()),
        "weight_sq_sum": float((w**2).sum()),
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over all keys tested).

    Hand-written: scipy offers Benjamini-Hochberg (``false_discovery_control``) but not Holm,
    and naming the leaking accounts needs family-wise control, not a false-discovery rate.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Trace:
    """Every key tested on the same texts, Holm-corrected; ``accounts`` are those it traces to."""

    alpha: float
    results: list[Detection]
    adjusted_p: list[float]

    @property
    def accounts(self) -> list[str]:
        return [
            r.account or r.key_id for r, p in zip(self.results, self.adjusted_p) if p < self.alpha
        ]

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "traced": self.accounts,
            "keys": [{**r.to_dict(), "p_holm": p} for r, p in zip(self.results, self.adjusted_p)],
        }


def trace(
    keys: Sequence[WatermarkKey],
    token_seqs: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    prompt_seqs: Sequence[Sequence[int]] = (),
    alpha: float = 1e-3,
    weights: Sequence[Sequence[int]] | None = None,
) -> Trace:
    """Test texts against every key; name the accounts whose keys are significant after Holm.
    ``weights`` (as in :func:`detect_tokens`, key-independent) apply to every key."""
    cache: dict = {}  # key-independent work (a scheme's scored pairs) shared across the keys
    results = [
        key.params.impl.detect(key, token_seqs, prompt_seqs, vocab_size, weights, cache)
        for key in keys
    ]
    # Holm on the exact p-values; when they underflow, order by log10 p to keep the ranking.
    pvals = [max(r.p_value, 10 ** max(r.log10_p, -300)) for r in results]
    return Trace(alpha=alpha, results=results, adjusted_p=holm(pvals))


def tokenize(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


__all__ = [
    "Detection",
    "Trace",
    "WatermarkParams",
    "binomial_test",
    "detect_tokens",
    "holm",
    "scored_pairs",
    "tokenize",
    "trace",
    "weight_moments",
    "weighted_binomial_test",
    "weighted_pairs",
]
