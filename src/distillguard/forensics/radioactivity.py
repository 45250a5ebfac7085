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

import math
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import brentq

from distillguard.errors import ConfigError, DistillguardError
from distillguard.watermark import (
    WatermarkKey,
    binomial_test,
    holm,
    trace,
)

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


class SuspectAPIError(DistillguardError):
    """The suspect's API did not answer a prompt (unreachable, or an error response)."""


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEvidence:
    """One key's test. ``p_value``/``log10_p`` are the test's own; ``p_holm`` corrects for all keys."""

    account: str | None
    key_id: str
    p_value: float
    log10_p: float  # exact (or exactly bounded) even when p_value underflows to 0.0
    p_holm: float
    z: float
    green_fraction: float  # closed: green pairs / scored; open: green mass / scored mass
    extra: dict = field(default_factory=dict)  # open mode: empirical_p, top1_log10_p, ...


@dataclass(frozen=True)
class RadioactivityResult:
    mode: str  # "closed" | "open"
    test: str
    alpha: float
    texts: int
    scored: int  # closed: distinct (context, token) pairs; open: distinct contexts
    gamma: float
    keys: list[KeyEvidence]
    null: dict | None = None  # open mode: the wrong-key distribution of the green fraction

    @property
    def traced(self) -> list[str]:
        """Accounts (or key ids) whose Holm-adjusted p-value is below ``alpha``."""
        return [k.account or k.key_id for k in self.keys if k.p_holm < self.alpha]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["traced"] = self.traced
        return out


def _holm_from_log10(log10_ps: Sequence[float]) -> list[float]:
    # p-values below 1e-300 keep their order through the clip; Holm adjusts the clipped values.
    return holm([10 ** max(lp, -300) for lp in log10_ps])


# ---- generating from the suspect -----------------------------------------------------------------


def generate_answers(
    lm,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    batch_size: int = 16,
    seed: int = 0,
    logits_processors: Sequence = (),
    after_temperature: Sequence = (),
    progress: bool = True,
) -> list[str]:
    """Answers of a local model to chat prompts: batched ``model.generate``, left-padded.

    ``logits_processors`` (e.g. a :class:`~distillguard.watermark.WatermarkLogitsProcessor`) act on the
    raw logits, before the temperature, as in the server; ``after_temperature`` ones (e.g.
    :class:`~distillguard.watermark.synthid.SynthIDTopK`, whose tournament acts on the distribution
    that is sampled) after it. Sorted by prompt length within the
    call so that batches waste little padding; returned in the prompts' order.
    """
    from rich.progress import Progress
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0")
    tok_ids = [lm.chat_ids([{"role": "user", "content": p}]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(tok_ids[i]))
    pad = (
        lm.tokenizer.pad_token_id
        if lm.tokenizer.pad_token_id is not None
        else min(lm.eos_token_ids)
    )
    eos = sorted(lm.eos_token_ids)
    processors = LogitsProcessorList(list(logits_processors))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
    processors.extend(after_temperature)
    out: list[str] = [""] * len(prompts)
    gen = torch.Generator().manual_seed(seed)
    model = lm.model.eval()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(prompts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(tok_ids[i]) for i in rows)
            ids = torch.tensor(
                [[pad] * (width - len(tok_ids[i])) + tok_ids[i] for i in rows], device=lm.device
            )
            mask = torch.tensor(
                [[0] * (width - len(tok_ids[i])) + [1] * len(tok_ids[i]) for i in rows],
                device=lm.device,
            )
            # generate() samples from the global RNG: seed it per batch, in a fork (the caller's state is kept)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                seqs = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=None,
                    top_k=None,
                    top_p=None,
                    logits_processor=processors,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            for row, seq in zip(rows, seqs[:, width:].tolist()):
                cut = next((j for j, t in enumerate(seq) if t in lm.eos_token_ids), len(seq))
                out[row] = lm.tokenizer.decode(seq[:cut], skip_special_tokens=True)
            bar.advance(task, len(rows))
    return out


def generate_via_api(
    url: str,
    prompts: Sequence[str],
    *,
    model: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 64,
    temperature: float = 0.7,
    seed: int = 0,
    concurrency: int = 8,
    timeout_s: float = 300.0,
) -> list[str]:
    """Answers of an OpenAI-compatible server (``url`` with or without ``/v1``), prompts sent in
    parallel (the server batches them). ``model`` defaults to the first of ``/v1/models``."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=timeout_s) as client:
        try:
            if model is None:
                r = client.get("/models")
                r.raise_for_status()
                listed = r.json().get("data") or []
                if not listed:
                    raise SuspectAPIError(
                        f"{base}/models lists no model; pass the suspect's model name"
                    )
                model = listed[0]["id"]

            def ask(i: int) -> str:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompts[i]}],
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "seed": seed + i,
                }
                resp = client.post("/chat/completions", json=body)
                if resp.status_code != 200:
                    raise SuspectAPIError(
                        f"the suspect answered {resp.status_code} to prompt {i}: {resp.text[:200]}"
                    )
                return resp.json()["choices"][0]["message"]["content"] or ""

            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                return list(pool.map(ask, range(len(prompts))))
        except httpx.HTTPError as exc:
            raise SuspectAPIError(f"cannot query the suspect at {base}: {exc}") from None


# ---- closed mode: the suspect's text -------------------------------------------------------------


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


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
    evidence = [
        KeyEvidence(
            account=d.account,
            key_id=d.key_id,
            p_value=d.p_value,
            log10_p=d.log10_p,
            p_holm=p,
            z=d.z,
            green_fraction=d.green / d.scored if d.scored else float("nan"),
            extra={"green": d.green},
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


# ---- open mode: the suspect's probabilities ------------------------------------------------------


def chernoff_log_p(score: float, weights: np.ndarray, gamma: float) -> float:
    """Natural log of a valid upper bound on P(Σ w_i·g_i >= score), g_i independent Bernoulli(γ),
    w_i >= 0: min over t >= 0 of -t·score + Σ log(1 - γ + γ·e^{t·w_i}) (Chernoff).

    0 when the score is at or below the mean; log Π_{w>0} γ at the maximum possible score.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    total = float(w.sum())
    if w.size == 0 or score <= gamma * total:
        return 0.0
    if score >= total * (1 - 1e-12):
        return float(w.size * math.log(gamma))  # all green: P = γ^n exactly

    def log_mgf(t: float) -> float:
        # log(1 - γ + γ e^{tw}) = tw + log(γ + (1-γ) e^{-tw}), stable for large t
        tw = t * w
        return float(np.sum(tw + np.log(gamma + (1 - gamma) * np.exp(-tw))))

    def slope(t: float) -> float:  # d/dt of the exponent: Σ w·π(t w) - score, increasing in t
        tw = t * w
        return float(np.sum(w * gamma / (gamma + (1 - gamma) * np.exp(-tw)))) - score

    hi = 1.0
    while slope(hi) < 0:
        hi *= 2
        if hi > 1e12:
            break
    t = brentq(slope, 0.0, hi, xtol=1e-12)
    return min(0.0, -t * score + log_mgf(t))


@dataclass
class _Contexts:
    contexts: torch.Tensor  # (N, h) hash contexts, distinct
    top_ids: torch.Tensor  # (N, k) the suspect's k most likely next tokens there
    weights: torch.Tensor  # (N, k) their probabilities, 0 where the pair is excluded


def _suspect_contexts(
    lm,
    answers: Sequence[str],
    prompts: Sequence[str] | None,
    width: int,
    top_k: int,
    excluded: set[tuple[int, ...]],
    batch_size: int,
    progress: bool,
) -> _Contexts:
    """Run the suspect on each (prompt, answer); for each distinct hash context among the answer's
    positions, its mean next-token distribution there (top-k), excluded pairs at weight 0."""
    from rich.progress import Progress

    tok = lm.tokenizer
    rows: list[tuple[list[int], int]] = []  # (input ids, index of the first answer token)
    for i, answer in enumerate(answers):
        head = lm.chat_ids([{"role": "user", "content": prompts[i]}]) if prompts is not None else []
        body = list(tok.encode(answer, add_special_tokens=False))
        rows.append((head + body, len(head)))
    # per distinct hash context: the sum of the suspect's top-k probabilities over its positions
    sums: dict[tuple[int, ...], dict[int, float]] = {}
    counts: dict[tuple[int, ...], int] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = lm.model.eval()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("scoring the suspect", total=len(rows))
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width_b = max(len(r[0]) for r in batch)
            ids = torch.tensor(
                [r[0] + [pad] * (width_b - len(r[0])) for r in batch], device=lm.device
            )
            mask = torch.tensor(
                [[1] * len(r[0]) + [0] * (width_b - len(r[0])) for r in batch], device=lm.device
            )
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
                top_p, top_v = logits.softmax(-1).topk(top_k, dim=-1)  # (B, T, k)
                del logits
            top_p, top_v = top_p.cpu().tolist(), top_v.cpu().tolist()
            for b, (seq, first) in enumerate(batch):
                # position j predicts token j+1; score the predictions of answer tokens j+1 >= first,
                # whose hash context is seq[j+1-width : j+1] (the embedder's view at that step)
                for j in range(max(first, width) - 1, len(seq) - 1):
                    ctx = tuple(seq[j + 1 - width : j + 1])
                    acc = sums.setdefault(ctx, {})
                    counts[ctx] = counts.get(ctx, 0) + 1
                    for p, v in zip(top_p[b][j], top_v[b][j]):
                        acc[v] = acc.get(v, 0.0) + p
            bar.advance(task, len(batch))
    if not sums:
        raise ConfigError("no answer tokens to score the suspect on (empty answers?)")
    # The mean distribution over a context's positions (its top-k of the summed top-k lists):
    # the weights depend on the suspect and the text only, never on the key.
    ctx_list, ids_list, w_list = [], [], []
    for ctx, acc in sums.items():
        best = sorted(acc.items(), key=lambda kv: -kv[1])[:top_k]
        ctx_list.append(ctx)
        ids_list.append([v for v, _ in best] + [0] * (top_k - len(best)))
        w_list.append(
            [p / counts[ctx] if ctx + (v,) not in excluded else 0.0 for v, p in best]
            + [0.0] * (top_k - len(best))
        )
    return _Contexts(
        torch.tensor(ctx_list, dtype=torch.long),
        torch.tensor(ids_list, dtype=torch.long),
        torch.tensor(w_list, dtype=torch.float64),
    )


def open_test(
    lm,
    keys: Sequence[WatermarkKey],
    answers: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    exclude_text_pairs: bool = False,
    top_k: int = 64,
    null_keys: int = 200,
    alpha: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> RadioactivityResult:
    """The suspect's green probability mass (SynthID: its expected g mass over the tournament's
    layers) on ``answers`` (each after its chat prompt ``prompts[i]``, or as raw text when
    ``prompts`` is None), per key; see the module docstring.

    ``exclude``: further texts whose (context, token) pairs get weight 0 (e.g. watermarked
    prompts). ``exclude_text_pairs``: also those of the answers (needed when the answers
    themselves may carry the watermark). ``null_keys`` random wrong keys give the empirical
    null; 0 skips it.
    """
    if not keys:
        raise ConfigError("no keys to test: give at least one account")
    if prompts is not None and len(prompts) != len(answers):
        raise ConfigError(
            f"{len(prompts)} prompts for {len(answers)} answers: give one prompt per answer (or none)"
        )
    params = keys[0].params
    if any(k.params != params for k in keys):
        raise ConfigError("open_test needs keys of one scheme (the same WatermarkParams)")
    scheme = params.impl  # green lists: green mass; SynthID: g mass over its layers
    width = params.context_width  # synthid: ngram_len - 1
    tok = lm.tokenizer
    excl_texts = list(exclude) + (list(answers) if exclude_text_pairs else [])
    excluded = {
        tuple(s[i - width : i + 1])
        for s in _tokenize(tok, excl_texts)
        for i in range(width, len(s))
    }
    ctx = _suspect_contexts(
        lm, answers, prompts, width, min(top_k, lm.vocab_size), excluded, batch_size, progress
    )
    rng = random.Random(seed)
    wrong = [
        rng.getrandbits(40) | 1 for _ in range(null_keys)
    ]  # drawn as account_key draws hash keys
    # per true key: (score, weights of the independent units, top-1 indicators at distinct units)
    total, stats = scheme.suspect_scores(
        params,
        [k.hash_key for k in keys],
        ctx.contexts,
        ctx.top_ids,
        ctx.weights,
        lm.vocab_size,
        units=True,
    )
    null_scores = np.zeros(0)
    for start in range(0, len(wrong), 64):  # in chunks: K x N x k doubles add up for 1,000 keys
        _, chunk = scheme.suspect_scores(
            params,
            wrong[start : start + 64],
            ctx.contexts,
            ctx.top_ids,
            ctx.weights,
            lm.vocab_size,
            units=False,
        )
        null_scores = np.concatenate([null_scores, np.array([c[0] for c in chunk])])
    log10_ps, evidence = [], []
    for key, (s, units, top1) in zip(keys, stats):
        log_p = chernoff_log_p(s, units, params.gamma)
        _, _, top1_log10 = binomial_test(int(top1.sum()), len(top1), params.gamma)
        extra = {
            "top1_log10_p": top1_log10,
            "top1_green_fraction": float(top1.float().mean()) if len(top1) else float("nan"),
            "top1_scored": len(top1),
        }
        if null_keys:
            extra["empirical_p"] = (1 + int((null_scores >= s).sum())) / (1 + null_keys)
        sd = math.sqrt(params.gamma * (1 - params.gamma) * float((units**2).sum())) or 1.0
        log10_ps.append(log_p / math.log(10))
        evidence.append((key, s, log_p, sd, extra))
    adjusted = _holm_from_log10(log10_ps)
    out = [
        KeyEvidence(
            account=key.account,
            key_id=key.key_id,
            p_value=math.exp(log_p),
            log10_p=log_p / math.log(10),
            p_holm=p_h,
            z=(s - params.gamma * total) / sd,
            green_fraction=s / total,
            extra=extra,
        )
        for (key, s, log_p, sd, extra), p_h in zip(evidence, adjusted)
    ]
    null = None
    if null_keys:
        frac = null_scores / total
        null = {
            "keys": null_keys,
            "green_fraction_mean": float(frac.mean()),
            "green_fraction_sd": float(frac.std()),
            "resolution": 1 / (1 + null_keys),
        }
    return RadioactivityResult(
        mode="open",
        test=scheme.suspect_test,
        alpha=alpha,
        texts=len(answers),
        scored=len(ctx.contexts),
        gamma=params.gamma,
        keys=out,
        null=null,
    )


def open_radioactivity(
    lm,
    keys: Sequence[WatermarkKey],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    seed: int = 0,
    exclude_prompt_pairs: bool = True,
    **kwargs,
) -> RadioactivityResult:
    """Open mode end to end: the suspect answers ``prompts`` itself (its own text does not depend
    on the key under H0), then :func:`open_test` scores its probabilities on those answers,
    the prompts' pairs excluded."""
    answers = generate_answers(
        lm,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        progress=kwargs.get("progress", True),
    )
    return open_test(
        lm,
        keys,
        answers,
        prompts=prompts,
        exclude=list(prompts) if exclude_prompt_pairs else (),
        seed=seed,
        **kwargs,
    )
