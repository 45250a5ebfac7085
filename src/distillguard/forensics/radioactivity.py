"""Radioactivity: did a suspect model learn from our watermarked outputs? (Sander et al. 2024)

A student fine-tuned on watermarked teacher answers inherits a preference for the green
tokens of the keys that marked them. Two tests, one function each, both per key with Holm
correction over the keys tested (so a suspect traces back to the accounts that leaked):

``closed_test`` / ``closed_radioactivity`` — only an API to the suspect. It answers prompts;
    its text is scored like any text (:func:`distillguard.watermark.trace`): each distinct
    (context, token) pair once across *all* answers, the n-grams of the prompts excluded (a
    model copying a watermarked prompt is not radioactive), an exact binomial test per key.

``open_test`` / ``open_radioactivity`` — the suspect's weights. Sander et al. score the
    suspect's top-1 prediction at each context ("reading mode"); on a small student that test
    found nothing (issue 4: p = 0.41) while the student's probability *mass* on green tokens
    had moved (0.312 under the true key vs ~0.25 under wrong ones). So the statistic here is the
    green mass itself, a Rao-Blackwellised version of the closed test (the expected green
    indicator instead of one sampled draw of it):

        S(key) = Σ_c Σ_{v ∈ top-k(c)} p̄(v | c) · green_key(c, v)      over distinct contexts c

    where p̄(· | c) is the suspect's next-token distribution averaged over the positions whose
    hash context is c (each context counts once, as each pair does in the closed test; the
    average is a cleaner estimate of what the suspect learned about c than any one position).

    **Why this null is honest, and why a bound rather than a z-test.** Under H0 the suspect does
    not depend on the key (and neither does the text it is scored on, see below). For keyed-hash
    the green bits of distinct (context, token) pairs are then independent Bernoulli(γ) (the
    hash is a keyed PRF: the same assumption the binomial detector makes), and the weights
    p̄(v | c) are fixed, so S is a weighted sum of independent Bernoullis. Its exact tail has no
    closed form for real weights, and a normal approximation is not trustworthy at p = 1e-5
    with a few very heavy weights (peaked distributions); the Chernoff bound

        P(S >= s) <= min_{t>=0} exp(-t·s) · Π (1 - γ + γ·e^{t·w})

    is a valid p-value (P(p <= α) <= α) at any size, computed exactly in log space, with a
    resolution limited by nothing but floating point (Holm over 20 accounts needs p < 5e-5;
    an empirical null would need 20,000 wrong keys for that). It costs power by a factor of
    roughly z·√(2π) in p against the (invalid-in-the-tail) normal approximation: about 10x at
    z = 4. For lefthash-ref the green list of a context is an exact-size random subset; its
    indicators are negatively associated, for which the same product bound holds (Dubhashi &
    Ranjan 1998), and the marginal int(γ|V|)/|V| <= γ makes it conservative.

    A second, assumption-free check comes with it: ``null_keys`` random wrong keys give the
    empirical distribution of S; the true key's rank among them is an exact permutation
    p-value (the true key is one more draw of the same kind under H0), resolution 1/(K+1).
    Sander et al.'s top-1 binomial test is reported beside them for comparison.

    **SynthID** (the served scheme): the same statistic with the tournament's g-values in place
    of the green bits, summed over its layers, S(key) = Σ_c Σ_v p̄(v | c) Σ_l λ_l · g_l(c, v),
    the suspect's expected g mass (λ_l = exp(-0.055·(l-1)), the mean lift decay of later layers,
    ``synthid.MEAN_LAYER_DECAY``: key-independent weights). The g-values are entries of a keyed
    table, so the independent units are the distinct *table indices*, as in ``synthid_units``:
    S = Σ_i W_i·g_i with W_i the total weight on index i, g_i fair coins under H0, and the same
    Chernoff bound with γ = 1/2, the wrong-key empirical p, and the top-1 binomial test over the
    distinct indices the top-1 n-grams touch. Context = the previous ``ngram_len - 1`` tokens
    (the prompt's included, as served); n-grams of the prompts (and ``exclude``) are out.

    The text the suspect is scored on must not depend on the key under H0: its own
    generations (``open_radioactivity`` does this), unwatermarked text, or prompts. Watermarked
    text (the leaked answers themselves) makes every good language model look radioactive, since
    it predicts the text's own green-biased next tokens; ``exclude_text_pairs=True`` then drops
    every (context, token) pair that occurs in the texts, which keeps the test valid (the pairs
    left are unseen, and if anything biased red) at a large cost in power.
"""

from __future__ import annotations

from collections.abc import Sequence

from distillguard.errors import ConfigError
from distillguard.forensics.evidence import (
    KeyEvidence,
    RadioactivityResult,
    SuspectAPIError,
    _tokenize,
)
from distillguard.forensics.open_test import chernoff_log_p, open_radioactivity, open_test
from distillguard.forensics.suspect import generate_answers, generate_via_api
from distillguard.watermark import (
    WatermarkKey,
    trace,
)
from distillguard.watermark.power import detection_power, unit_cap

__all__ = [
    "KeyEvidence",
    "RadioactivityResult",
    "SuspectAPIError",
    "chernoff_log_p",
    "closed_radioactivity",
    "closed_test",
    "generate_answers",
    "generate_via_api",
    "open_radioactivity",
    "open_test",
]


# ---- closed mode: the suspect's text -------------------------------------------------------------

# What raises the closed test's power. Distinct pairs grow more slowly than the answers do
# (repeated phrases count once), so the sizes the power statement gives are a lower bound.
CLOSED_ADVICE = (
    "more prompts (--limit)",
    "prompts near the suspect's training data (--prompts with the suspected account's ledger export, "
    "or its topics)",
    "longer answers (--max-tokens), at a temperature that lets the suspect's preference show "
    "(0.7-1.0)",
)


def closed_test(
    keys: Sequence[WatermarkKey],
    texts: Sequence[str],
    tokenizer,
    *,
    prompts: Sequence[str] = (),
    alpha: float = 1e-3,
) -> RadioactivityResult:
    """The suspect's answers, tokenised with the teacher's tokenizer (the watermark's vocabulary),
    tested against every key: distinct pairs across all texts, prompt n-grams excluded, exact
    binomial tails, Holm over the keys."""
    if not keys:
        raise ConfigError("no keys to test: give at least one account")
    result = trace(
        list(keys),
        _tokenize(tokenizer, texts),
        vocab_size=len(tokenizer),
        prompt_seqs=_tokenize(tokenizer, prompts),
        alpha=alpha,
    )
    level = alpha / len(keys)  # what one key must reach to pass Holm's first step
    evidence = [
        KeyEvidence(
            account=d.account,
            key_id=d.key_id,
            p_value=d.p_value,
            log10_p=d.log10_p,
            p_holm=p,
            z=d.z,
            green_fraction=d.green / d.scored if d.scored else float("nan"),
            extra={
                "green": d.green,
                "power": detection_power(
                    d,
                    level,
                    unit="scored units",
                    effect="a green-fraction excess over gamma",
                    per_query=d.scored / max(1, len(texts)),
                    query="prompts",
                    advice=CLOSED_ADVICE,
                    max_units=unit_cap(keys[0].params),
                ).to_dict(),
            },
        )
        for d, p in zip(result.results, result.adjusted_p)
    ]
    return RadioactivityResult(
        mode="closed",
        test="binomial",
        alpha=alpha,
        texts=len(texts),
        scored=result.results[0].scored,
        gamma=keys[0].params.gamma,
        keys=evidence,
    )


def closed_radioactivity(
    url: str,
    keys: Sequence[WatermarkKey],
    prompts: Sequence[str],
    tokenizer,
    *,
    model: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 64,
    temperature: float = 0.7,
    seed: int = 0,
    alpha: float = 1e-3,
    concurrency: int = 8,
) -> RadioactivityResult:
    """Closed mode end to end: the suspect's API answers ``prompts``; :func:`closed_test` scores them."""
    texts = generate_via_api(
        url,
        prompts,
        model=model,
        api_key=api_key,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        concurrency=concurrency,
    )
    return closed_test(keys, texts, tokenizer, prompts=prompts, alpha=alpha)
