"""The open radioactivity test: the suspect's probability mass on green tokens (or g-values),
bounded by Chernoff, checked against wrong keys. Why this statistic and this null: see
:mod:`distillguard.forensics.radioactivity`."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from distillguard.errors import ConfigError
from distillguard.forensics.evidence import (
    KeyEvidence,
    RadioactivityResult,
    _holm_from_log10,
    _tokenize,
)
from distillguard.forensics.suspect import generate_answers
from distillguard.forensics.training_filter import TrainingFilter
from distillguard.watermark import (
    WatermarkKey,
    binomial_test,
)
from distillguard.watermark.power import Power, unit_cap, weighted_power_report

# What raises the open test's power, in the order it usually pays.
OPEN_ADVICE = (
    "more prompts (--limit): each adds its answer's scored units",
    "prompts near the suspect's training data (--prompts with the suspected account's ledger export, "
    "or its topics): a student shows the watermark where it learned it",
    "longer answers (--max-tokens)",
)


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


def chernoff_critical_score(weights: np.ndarray, gamma: float, level: float) -> float:
    """The smallest score S whose Chernoff bound (:func:`chernoff_log_p`) is <= ``level``:
    min over t > 0 of (K(t) - log level) / t, K the log-MGF of Σ w·g (the bound's Legendre
    dual, one minimisation instead of a root-find over calls of the bound). Above Σw: no score
    reaches the level."""
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    if w.size == 0 or w.size * math.log(gamma) > math.log(level):
        return math.inf
    lift = -math.log(level)

    def per_t(log_t: float) -> float:
        tw = math.exp(log_t) * w
        k = float(np.sum(tw + np.log(gamma + (1 - gamma) * np.exp(-tw))))
        return (k + lift) / math.exp(log_t)

    best = minimize_scalar(per_t, bounds=(-30.0, 30.0), method="bounded", options={"xatol": 1e-6})
    return min(float(best.fun), float(w.sum()))


def chernoff_critical_z(units: np.ndarray, gamma: float, level: float) -> float:
    """:func:`chernoff_critical_score` standardised under H0 (inf: the level is out of reach)."""
    w = np.asarray(units, dtype=np.float64)
    w = w[w > 0]
    crit = chernoff_critical_score(w, gamma, level)
    sd0 = math.sqrt(gamma * (1 - gamma) * float((w**2).sum())) or 1.0
    return (crit - gamma * float(w.sum())) / sd0


def open_power(
    units: np.ndarray,
    score: float,
    gamma: float,
    level: float,
    critical_z: float | None = None,
    **kw,
) -> Power:
    """The open test's power (:mod:`distillguard.watermark.power`) against its own rejection
    point: the Chernoff bound's critical score as a z, so the statement carries the bound's cost
    in power (about a factor z·√(2π) in p against a normal test). ``critical_z``: computed from
    ``units`` unless given (keys of one run share their weight profile, and so nearly their z)."""
    if critical_z is None:
        critical_z = chernoff_critical_z(units, gamma, level)
    return weighted_power_report(
        units, score, gamma, level, test="chernoff", critical_z=critical_z, **kw
    )


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
    excluded: set[tuple[int, ...]] | frozenset[tuple[int, ...]],
    batch_size: int,
    progress: bool,
    keep_contexts: frozenset[tuple[int, ...]] | None = None,
) -> _Contexts:
    """Run the suspect on each (prompt, answer); for each distinct hash context among the answer's
    positions, its mean next-token distribution there (top-k), excluded pairs at weight 0.
    ``keep_contexts``: only these contexts (the training-data filter)."""
    from distillguard.progress import make_progress

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
    with make_progress(disable=not progress, transient=True) as bar:
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
                    if keep_contexts is not None and ctx not in keep_contexts:
                        continue
                    acc = sums.setdefault(ctx, {})
                    counts[ctx] = counts.get(ctx, 0) + 1
                    for p, v in zip(top_p[b][j], top_v[b][j]):
                        acc[v] = acc.get(v, 0.0) + p
            bar.advance(task, len(batch))
    if not sums:
        raise ConfigError(
            "no answer tokens to score the suspect on (empty answers?)"
            if keep_contexts is None
            else "none of the suspect's contexts occurs in the filter data: give prompts near "
            "the suspected training data, or run without --filter-data"
        )
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
    filter_data: TrainingFilter | None = None,
    exclude_data_pairs: bool = False,
) -> RadioactivityResult:
    """The suspect's green probability mass (SynthID: its expected g mass over the tournament's
    layers) on ``answers`` (each after its chat prompt ``prompts[i]``, or as raw text when
    ``prompts`` is None), per key; see the module docstring.

    ``exclude``: further texts whose (context, token) pairs get weight 0 (e.g. watermarked
    prompts). ``exclude_text_pairs``: also those of the answers (needed when the answers
    themselves may carry the watermark). ``null_keys`` random wrong keys give the empirical
    null; 0 skips it. ``filter_data``: the training-data n-gram filter, one for every key: only
    contexts that occur in the data (see :mod:`distillguard.forensics.radioactivity`, also for
    ``exclude_data_pairs``: the data's own pairs at weight 0).
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
    flt_record = None
    if filter_data is not None:
        from distillguard.forensics.training_filter import check_filterable

        check_filterable(params)
        if filter_data.width != width:
            raise ConfigError(
                f"the filter was built for context width {filter_data.width}, the keys use {width}"
            )
        if exclude_data_pairs:
            excluded |= filter_data.pairs
        flt_record = {
            "ran": True,
            "exclude_data_pairs": exclude_data_pairs,
            **filter_data.describe(),
        }
    ctx = _suspect_contexts(
        lm,
        answers,
        prompts,
        width,
        min(top_k, lm.vocab_size),
        excluded,
        batch_size,
        progress,
        keep_contexts=filter_data.contexts if filter_data is not None else None,
    )
    if flt_record is not None:
        flt_record["kept_units"] = len(ctx.contexts)
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
    level = alpha / len(keys)  # what one key must reach to pass Holm's first step
    critical_z = None
    for key, (s, units, top1) in zip(keys, stats):
        if critical_z is None:  # one weight profile per run: the bound's z, computed once
            critical_z = chernoff_critical_z(units, params.gamma, level)
        log_p = chernoff_log_p(s, units, params.gamma)
        _, _, top1_log10 = binomial_test(int(top1.sum()), len(top1), params.gamma)
        extra = {
            "top1_log10_p": top1_log10,
            "top1_green_fraction": float(top1.float().mean()) if len(top1) else float("nan"),
            "top1_scored": len(top1),
        }
        if null_keys:
            extra["empirical_p"] = (1 + int((null_scores >= s).sum())) / (1 + null_keys)
        extra["power"] = open_power(
            units,
            s,
            params.gamma,
            level,
            critical_z,
            effect=f"a {scheme.suspect_test.removesuffix('-chernoff')} excess over gamma",
            unit="scored units",
            per_query=int((np.asarray(units) > 0).sum()) / max(1, len(answers)),
            query="prompts",
            advice=OPEN_ADVICE,
            max_units=unit_cap(params),
        ).to_dict()
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
        filter=flt_record,
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
