"""Detection: an exact one-sided binomial test on the green (context, token) pairs of a text.

Each distinct (context, token) pair is scored once across *all* the texts (repeats of a pair
are not independent evidence: a repeated phrase would otherwise inflate the count), and pairs
that appear in the prompt are skipped (a model copying the prompt is not evidence). Under
the null hypothesis (the text does not depend on the key) each scored pair is green with
probability γ, so the green count is Binomial(T, γ) and the p-value is exact. Tails are
computed in log space (``scipy.stats.binom.logsf``) because they underflow at these sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import binom

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

    def to_dict(self) -> dict:
        return asdict(self)


def binomial_test(green: int, scored: int, gamma: float) -> tuple[float, float, float]:
    """(z, p, log10 p) of seeing ``green`` or more successes in ``scored`` trials of rate γ."""
    if scored == 0:
        return 0.0, 1.0, 0.0
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    log_p = float(binom.logsf(green - 1, scored, gamma))  # P(X >= green)
    if not math.isfinite(log_p):  # logsf itself underflows far in the tail: sum the pmf in log space
        log_p = float(logsumexp(binom.logpmf(np.arange(green, scored + 1), scored, gamma)))
    return z, math.exp(log_p), log_p / math.log(10)


def scored_pairs(token_seqs: Iterable[Sequence[int]], width: int,
                 prompt_seqs: Iterable[Sequence[int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (context, token) pairs across all texts, minus the (width+1)-grams of the prompts.

    Returns contexts (N, width) and tokens (N,).
    """
    excluded = {tuple(p[i - width:i + 1]) for p in prompt_seqs for i in range(width, len(p))}
    seen: dict[tuple[int, ...], None] = {}
    for seq in token_seqs:
        for i in range(width, len(seq)):
            gram = tuple(seq[i - width:i + 1])
            if gram not in excluded:
                seen.setdefault(gram, None)
    if not seen:
        return torch.zeros((0, width), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    grams = torch.tensor(list(seen), dtype=torch.long)  # (N, width + 1)
    return grams[:, :width], grams[:, width]


def detect_tokens(key: WatermarkKey, token_seqs: Sequence[Sequence[int]], *,
                  prompt_seqs: Sequence[Sequence[int]] = (), vocab_size: int) -> Detection:
    """Test token sequences (the text's tokens, prompt excluded) against one key."""
    contexts, tokens = scored_pairs(token_seqs, key.params.context_width, prompt_seqs)
    return _test(key, contexts, tokens, vocab_size)


def _test(key: WatermarkKey, contexts: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> Detection:
    green = int(is_green(key.params, key.hash_key, contexts, tokens, vocab_size).sum()) if len(tokens) else 0
    z, p, log10_p = binomial_test(green, len(tokens), key.params.gamma)
    return Detection(key_id=key.key_id, account=key.account, scored=len(tokens), green=green,
                     gamma=key.params.gamma, z=z, p_value=p, log10_p=log10_p)


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
        return [r.account or r.key_id for r, p in zip(self.results, self.adjusted_p) if p < self.alpha]

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "traced": self.accounts,
                "keys": [{**r.to_dict(), "p_holm": p} for r, p in zip(self.results, self.adjusted_p)]}


def trace(keys: Sequence[WatermarkKey], token_seqs: Sequence[Sequence[int]], *, vocab_size: int,
          prompt_seqs: Sequence[Sequence[int]] = (), alpha: float = 1e-3) -> Trace:
    """Test texts against every key; name the accounts whose keys are significant after Holm."""
    by_width: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    results = []
    for key in keys:
        width = key.params.context_width
        if width not in by_width:
            by_width[width] = scored_pairs(token_seqs, width, prompt_seqs)
        results.append(_test(key, *by_width[width], vocab_size))
    # Holm on the exact p-values; when they underflow, order by log10 p to keep the ranking.
    pvals = [max(r.p_value, 10 ** max(r.log10_p, -300)) for r in results]
    return Trace(alpha=alpha, results=results, adjusted_p=holm(pvals))


def tokenize(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


__all__ = ["Detection", "Trace", "WatermarkParams", "binomial_test", "detect_tokens", "holm", "scored_pairs",
           "tokenize", "trace"]
