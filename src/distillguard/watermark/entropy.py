"""Entropy-aware detection: weight each position of a text by the evidence it can carry.

The watermark can only tilt a choice the teacher was unsure about: where the teacher puts 99%
on one token, that token is sampled whether it is green or not, and scoring it adds a trial
with no signal (Lee et al. 2023, "Who Wrote this Code?", SWEET). The provider owns the teacher,
so the detector can recompute the teacher's next-token distribution at every position of a
text (prompt + answer, one forward pass) and weight each position accordingly.

Weights must not depend on the key: then, under the null hypothesis (the text does not depend
on the key), every distinct scored pair is still green with probability γ independently of its
weight, and the test stays exact (``detect.weighted_binomial_test``).

Which weights. The embedder samples token x with probability p_x·α^[x green] / Z, α = exp(δ/T)
(δ is added before the temperature T, p is the tempered teacher distribution). Given that x
*was* chosen, Bayes gives the probability that it is green, over random green lists:

    P(green | x) = γα·E[1/Z | x green] / (γα·E[1/Z | x green] + (1-γ)·E[1/Z | x red])

with Z = p_x·α^[x green] + R, R = Σ_{j≠x} p_j·α^[j green] of mean μ = (1-p_x)·c, c = 1+(α-1)γ,
and variance (α-1)²γ(1-γ)(Σp_j² - p_x²); E[1/(a+R)] ≈ 1/(a+μ) + Var(R)/(a+μ)³ (second order:
within ~0.01 of a simulation). It is γ for a token the teacher was sure of (p_x → 1) and rises
to γα/(γα+1-γ) for a surprising one (p_x → 0): a green surprise is strong evidence. Given these
rates q_i, the most powerful test of "green w.p. q_i" against "green w.p. γ" (Neyman-Pearson for
independent Bernoulli trials) counts green positions with weights ``logit(q_i) - logit(γ)``
(between 0 and δ/T); :func:`llr_weights` rounds them to a few integer levels so that the null
distribution of the weighted count is computed exactly.

A scheme whose embedder skips low-entropy positions (``WatermarkParams.min_entropy``) gets weight
0 there: those positions carry no watermark at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distillguard.errors import ConfigError
from distillguard.watermark.detect import Detection, detect_tokens
from distillguard.watermark.scheme import WatermarkKey, WatermarkParams

# ---- per-position statistics of the teacher's distribution (pure functions) -----------------


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last axis. (..., V) -> (...)"""
    logp = logits.float().log_softmax(dim=-1)
    # an impossible token (-inf: vLLM's min_tokens, bad words, allowed ids) adds 0, not 0·-inf =
    # NaN, which made min_entropy skip the whole row; finite rows are unchanged bit for bit
    plogp = logp.exp() * logp
    return -torch.where(logp.isneginf(), 0.0, plogp).sum(dim=-1)


@dataclass(frozen=True)
class PositionStats:
    """The teacher's view of each token of an answer, given the prompt and the answer before it.
    All (L,); entropy and nll at temperature 1, token_prob and collision at the detector's T."""

    entropy: torch.Tensor  # nats of the next-token distribution (what min_entropy gates on)
    nll: torch.Tensor  # -log p(token), unwatermarked teacher
    token_prob: torch.Tensor  # tempered probability of the token that was chosen
    collision: torch.Tensor  # Σ_j p_j² of the tempered distribution

    @staticmethod
    def empty() -> PositionStats:
        z = torch.zeros(0)
        return PositionStats(entropy=z, nll=z, token_prob=z, collision=z)


def position_stats(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> PositionStats:
    """Statistics of the distributions ``logits`` (L, V) at which ``tokens`` (L,) were chosen."""
    t = temperature if temperature > 0 else 1.0  # greedy: weights as at temperature 1
    logits = logits.float()
    logp = logits.log_softmax(dim=-1)
    tempered = (logits / t).softmax(dim=-1)
    idx = tokens.to(logits.device).long()[:, None]
    return PositionStats(
        entropy=-(logp.exp() * logp).sum(dim=-1).cpu(),
        nll=-logp.gather(1, idx)[:, 0].cpu(),
        token_prob=tempered.gather(1, idx)[:, 0].cpu(),
        collision=(tempered * tempered).sum(dim=-1).cpu(),
    )


def green_posterior(
    token_prob: torch.Tensor,
    collision: torch.Tensor,
    *,
    gamma: float,
    delta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """P(the chosen token is green | it was chosen under the watermark), over random green
    lists (see the module docstring). (L,) -> (L,) float64, between γ and γα/(γα+1-γ)."""
    t = temperature if temperature > 0 else 1.0
    a = delta / t  # log α
    p = token_prob.double()
    rest_var = (
        math.expm1(a) ** 2 * gamma * (1 - gamma) * (collision.double() - p * p).clamp(min=0)
    )  # Var(R)
    mu = (1 - p) * (1 + math.expm1(a) * gamma)  # E[R]
    # Green: E[1/(pα + R)]·α, computed as E[1/(p + R/α)] to stay finite for large δ/T.
    g_den = p + mu * math.exp(-a)
    green = 1 / g_den + rest_var * math.exp(-2 * a) / g_den**3
    r_den = p + mu
    red = 1 / r_den + rest_var / r_den**3
    post = gamma * green / (gamma * green + (1 - gamma) * red)
    top = gamma * math.exp(a) / (gamma * math.exp(a) + 1 - gamma)
    return post.clamp(min=gamma, max=top)


def max_llr_weight(gamma: float, delta: float, temperature: float = 1.0) -> float:
    """The largest weight logit(q) - logit(γ), reached by a surprising token: log α = δ/T."""
    return delta / (temperature if temperature > 0 else 1.0)


def llr_weights(
    posterior: torch.Tensor, gamma: float, *, levels: int = 8, max_weight: float
) -> torch.Tensor:
    """Integer weights ``round(levels · w / max_weight)`` of the log-likelihood-ratio weights
    ``w = logit(q) - logit(γ)``; positions with no expected lift get 0 (not scored). (...) -> int64"""
    if levels < 1:
        raise ConfigError(f"levels={levels} must be >= 1")
    if max_weight <= 0:
        return torch.zeros_like(posterior, dtype=torch.int64)
    q = posterior.double().clamp(min=gamma, max=1 - 1e-12)
    w = torch.logit(q) - math.log(gamma / (1 - gamma))
    return (w / max_weight * levels).round().clamp(0, levels).to(torch.int64)


def teacher_weights(
    params: WatermarkParams, stats: PositionStats, *, temperature: float = 1.0, levels: int = 8
) -> list[int]:
    """Integer weight of each answer token for :func:`detect_tokens`, by the key's scheme: for
    the green lists the quantised LLR weight of its green posterior, 0 where the embedder left
    the position alone (``greenlist.py``); SynthID: one weight per tournament layer, its
    expected g-lift (``synthid.layer_weights``, 16 levels)."""
    return params.impl.teacher_weights(params, stats, temperature, levels)


# ---- the teacher's statistics for texts, and detection with them ----------------------------------


@torch.inference_mode()
def teacher_stats(
    model,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    pad_id: int = 0,
    batch_size: int = 8,
) -> list[PositionStats]:
    """Run the teacher over prompt + answer (left-padded batches) and return, for each answer
    token, the statistics of the distribution it was drawn from. ``model`` is a causal LM
    (``LoadedModel.model``); the prompts are token ids as the model saw them (chat template)."""
    if len(prompt_ids) != len(answer_ids):
        raise ConfigError(
            f"{len(prompt_ids)} prompts for {len(answer_ids)} answers: give one prompt per answer"
        )
    if any(len(p) == 0 for p in prompt_ids):
        raise ConfigError(
            "an empty prompt: the first answer token needs at least one token before it "
            "(pass the chat-template ids the model was given)"
        )
    device = next(model.parameters()).device
    out: list[PositionStats] = []
    for start in range(0, len(answer_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        answers = answer_ids[start : start + batch_size]
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
        ).logits  # (B, width, V)
        for b, a in enumerate(answers):
            n = len(a)
            if n == 0:
                out.append(PositionStats.empty())
                continue
            # The logits at position t predict token t + 1: answer token j is predicted at
            # position width - n - 1 + j.
            out.append(
                position_stats(
                    logits[b, width - n - 1 : width - 1], torch.tensor(list(a)), temperature
                )
            )
    return out


def detect_with_teacher(
    key: WatermarkKey,
    model,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    temperature: float = 1.0,
    levels: int = 8,
    pad_id: int = 0,
    batch_size: int = 8,
) -> Detection:
    """Entropy-aware test of answers (each with the prompt it answered) against one key: the
    teacher recomputes every position's distribution, :func:`teacher_weights` weights the pairs,
    and the test is exact. ``temperature`` is the one the answers were sampled at, when known."""
    stats = teacher_stats(
        model, prompt_ids, answer_ids, temperature=temperature, pad_id=pad_id, batch_size=batch_size
    )
    weights = [
        teacher_weights(key.params, s, temperature=temperature, levels=levels) for s in stats
    ]
    return detect_tokens(
        key, answer_ids, prompt_seqs=prompt_ids, vocab_size=vocab_size, weights=weights
    )


__all__ = [
    "PositionStats",
    "detect_with_teacher",
    "entropy",
    "green_posterior",
    "llr_weights",
    "max_llr_weight",
    "position_stats",
    "teacher_stats",
    "teacher_weights",
]
