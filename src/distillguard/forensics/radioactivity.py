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

**The training-data n-gram filter** (Sander et al. 2024; ``filters`` / ``filter_data``,
``--filter-data FILE``, :mod:`.training_filter`). A student shows the watermark only where it
learned it, at the (context, token) units of its training data; Sander et al. score only the
suspect's units whose watermark window (hash context) occurs in the suspected training data and
drop the rest, which is noise under both hypotheses. Closed mode here scores the suspect's pairs
whose context occurs in the data; open mode keeps only the contexts that occur in it.

    **Why the p-value stays valid, although the filter is made of watermarked text.** H0 is the
    one the unfiltered test has: the suspect (its weights, its answers, the prompts) does not
    depend on the key, and so neither on the data the key marked (a suspect that never saw the
    data, or one trained on other accounts' text). Let g be the key's green bits (independent
    Bernoulli(γ), the PRF assumption of every test here) and F the data. The sampler that wrote
    F reads the bits of a context c only at the steps whose context *is* c; before c first
    occurs it has read none of them. So whether c occurs in F is decided by the bits of other
    contexts and the sampling noise, and is independent of the bits at c: a pair (c, t) of the
    suspect, kept because c occurs in F, is green with probability exactly γ. F's own pairs at
    c are green-biased, but the pairs F passed over at c are red-biased by as much, and the
    suspect (independent of F) meets both as they come. What the argument does not give is
    independence *between* kept pairs (consecutive kept pairs of the suspect tend to be a phrase
    of F, whose link is green-biased): the binomial tail may then be a little light. Checked
    where the truth is known: 200 accounts, each with its own watermarked data as the filter,
    against suspects that never saw it (``bench/results/radioactivity_filter.json``, and
    ``tests/forensics/test_radioactivity_filter.py``).

    **What must not be done.** Scoring the data itself, or conditioning on it: a suspect read on
    F's own text predicts F's green-biased next tokens (hence ``exclude_text_pairs`` above). And
    the opposite repair is no repair: dropping the data's own pairs (``exclude_data_pairs=True``)
    makes the test valid under a wider null, "the suspect depends on the key only through F",
    but a student trained on F alone is in that null, so the test then has no power at all
    against a student of exactly the filter data; everything such a student learned of the key
    it learned from F's pairs. It still traces a student that saw more than the investigator
    holds (the bench's "half of it" rows). Kept as an option, off by default.

    Two limits. SynthID's units are table entries that many n-grams share, so a context's
    entries are read before the context occurs: the first-occurrence argument fails and the
    filter refuses SynthID keys. And the data is re-tokenised: a served answer whose sampled
    tokens were not its text's canonical encoding has contexts the filter does not see (byte
    tokenizers always round-trip; BPE nearly always), which costs power, not validity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distillguard.errors import ConfigError
from distillguard.forensics.evidence import (
    KeyEvidence,
    RadioactivityResult,
    SuspectAPIError,
    _tokenize,
)
from distillguard.forensics.open_test import chernoff_log_p, open_radioactivity, open_test
from distillguard.forensics.suspect import generate_answers, generate_via_api
from distillguard.forensics.training_filter import TrainingFilter, check_filterable, unit_weights
from distillguard.watermark import (
    WatermarkKey,
    holm,
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

# With the filter on, the units are the suspect's pairs in the data's contexts.
FILTERED_ADVICE = (
    "more prompts (--limit), near the filter data's topics: more of the suspect's pairs land "
    "in the data's contexts",
    "a larger share of the suspected training data as --filter-data (more contexts kept)",
    "longer answers (--max-tokens)",
)


def closed_test(
    keys: Sequence[WatermarkKey],
    texts: Sequence[str],
    tokenizer,
    *,
    prompts: Sequence[str] = (),
    alpha: float = 1e-3,
    filters: Mapping[str, TrainingFilter] | TrainingFilter | None = None,
    exclude_data_pairs: bool = False,
) -> RadioactivityResult:
    """The suspect's answers, tokenised with the teacher's tokenizer (the watermark's vocabulary),
    tested against every key: distinct pairs across all texts, prompt n-grams excluded, exact
    binomial tails, Holm over the keys.

    ``filters``: the training-data n-gram filter, one for every key or one per account (a key
    whose account has none is tested unfiltered): only pairs whose context occurs in the data
    (see the module docstring, also for ``exclude_data_pairs``)."""
    if not keys:
        raise ConfigError("no keys to test: give at least one account")
    seqs = _tokenize(tokenizer, texts)
    prompt_seqs = _tokenize(tokenizer, prompts)
    if filters is None:
        result = trace(
            list(keys), seqs, vocab_size=len(tokenizer), prompt_seqs=prompt_seqs, alpha=alpha
        )
        detections, adjusted, flt_record = result.results, result.adjusted_p, None
    else:
        detections, flt_record = _filtered_detections(
            keys, seqs, prompt_seqs, len(tokenizer), filters, exclude_data_pairs
        )
        adjusted = holm([max(d.p_value, 10 ** max(d.log10_p, -300)) for d in detections])
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
                "scored": d.scored,
                "power": detection_power(
                    d,
                    level,
                    unit="scored units",
                    effect="a green-fraction excess over gamma",
                    per_query=d.scored / max(1, len(texts)),
                    query="prompts",
                    advice=FILTERED_ADVICE if flt_record else CLOSED_ADVICE,
                    max_units=unit_cap(keys[0].params),
                ).to_dict(),
            },
        )
        for d, p in zip(detections, adjusted)
    ]
    return RadioactivityResult(
        mode="closed",
        test="binomial",
        alpha=alpha,
        texts=len(texts),
        scored=detections[0].scored,
        gamma=keys[0].params.gamma,
        keys=evidence,
        filter=flt_record,
    )


def _filtered_detections(keys, seqs, prompt_seqs, vocab_size, filters, exclude_data_pairs):
    """Each key's detection on the units its filter keeps (keys sharing a filter share the work),
    and what evidence.json records of the filter."""
    check_filterable(keys[0].params)
    per_key = [
        filters if isinstance(filters, TrainingFilter) else filters.get(k.account or k.key_id)
        for k in keys
    ]
    width = keys[0].params.context_width
    for flt in per_key:
        if flt is not None and flt.width != width:
            raise ConfigError(
                f"the filter was built for context width {flt.width}, the keys use {width}"
            )
    unfiltered = trace(list(keys[:1]), seqs, vocab_size=vocab_size, prompt_seqs=prompt_seqs)
    groups: dict[int, list[int]] = {}
    for i, flt in enumerate(per_key):
        groups.setdefault(id(flt), []).append(i)
    detections: list = [None] * len(keys)
    for members in groups.values():
        flt = per_key[members[0]]
        weights = (
            None if flt is None else unit_weights(seqs, flt, exclude_data_pairs=exclude_data_pairs)
        )
        part = trace(
            [keys[i] for i in members],
            seqs,
            vocab_size=vocab_size,
            prompt_seqs=prompt_seqs,
            weights=weights,
        )
        for i, d in zip(members, part.results):
            detections[i] = d
    record = {
        "ran": any(f is not None for f in per_key),
        "exclude_data_pairs": exclude_data_pairs,
        "units_unfiltered": unfiltered.results[0].scored,
        "accounts": {
            k.account or k.key_id: (
                {**flt.describe(), "kept_units": d.scored} if flt is not None else None
            )
            for k, flt, d in zip(keys, per_key, detections)
        },
    }
    shas = {f.sha256 for f in per_key if f is not None}
    record["sha256"] = shas.pop() if len(shas) == 1 else sorted(shas)
    return detections, record


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
    filters: Mapping[str, TrainingFilter] | TrainingFilter | None = None,
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
    return closed_test(keys, texts, tokenizer, prompts=prompts, alpha=alpha, filters=filters)
