"""Behavioural similarity: does the suspect answer like the teacher, more than the controls do?

Lee et al. 2025 ("Distillation Quantification for LLMs") score response similarity to the
teacher without a p-value; here each probe's score is paired across the suspect and the
controls, and a permutation test over probes asks whether the suspect beats the controls by
more than probe noise (labels permuted within a probe; scipy's ``permutation_type="samples"``,
exact when the permutations are few). Models trained on different data differ by more than
probe noise, so the p-value is the larger of that and the suspect's rank among the controls as
models (:func:`~distillguard.forensics.respondent.model_rank_p`).

Two ways to score a probe, chosen by what is available:

- ``next-token`` (every model's weights, one vocabulary): every model reads the teacher's greedy
  answer (teacher-forced, the same token ids); the score is the share of answer positions where
  the model's most likely next token is the teacher's. The mean top-k overlap and KL(teacher ||
  model) of the next-token distributions are reported beside it.
- ``answer-overlap`` (an API, or different tokenizers): each model's own greedy answer against
  the teacher's, token-level F1 over words (SQuAD's answer overlap).

A suspect whose mean score is no higher than some control's is ``within_controls_range``, and
the report never calls that distilled.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from distillguard.forensics.respondent import Respondent, TestOutcome, cannot_run, model_rank_p

NAME = "similarity"


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1 over lower-cased words; 1.0 when both are empty."""
    a, b = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def _same_vocabulary(models: Sequence) -> bool:
    vocab = models[0].tokenizer.get_vocab()
    return all(m.tokenizer.get_vocab() == vocab for m in models[1:])


def next_token_scores(
    teacher_lm,
    models: Sequence,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    top_k: int = 5,
    max_length: int = 512,
) -> list[dict[str, np.ndarray]]:
    """Per model, per probe: greedy agreement with the teacher, top-k overlap and KL(t || m),
    each averaged over the teacher's answer positions (teacher-forced, the teacher's token ids)."""
    import torch

    from distillguard.distill.train import IGNORE, sft_example

    examples = [
        sft_example(teacher_lm, [{"role": "user", "content": p}], a, max_length)
        for p, a in zip(prompts, answers)
    ]
    out = [{k: np.zeros(len(prompts)) for k in ("agreement", "top_k", "kl")} for _ in models]
    with torch.no_grad():
        for i, ex in enumerate(examples):
            if ex is None:
                raise ValueError(f"probe {i} does not fit the teacher's context ({max_length})")
            ids = torch.tensor([ex["input_ids"]])
            answer = (
                torch.tensor(ex["labels"][1:]) != IGNORE
            )  # (T-1,): positions predicting the answer
            t_logp = _logprobs(teacher_lm, ids)[answer]  # (A, V)
            t_top = t_logp.topk(top_k, -1).indices
            for row, lm in zip(out, models):
                m_logp = _logprobs(lm, ids)[answer][:, : t_logp.shape[-1]]  # (A, V)
                row["agreement"][i] = (m_logp.argmax(-1) == t_logp.argmax(-1)).float().mean()
                m_top = m_logp.topk(top_k, -1).indices
                overlap = (t_top[:, :, None] == m_top[:, None, :]).any(-1).float().mean(-1)
                row["top_k"][i] = overlap.mean()
                kl = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
                row["kl"][i] = kl.mean()
    return out


def _logprobs(lm, ids):
    """(T-1, V) log-probabilities of the next token at each position of ``ids`` (1, T)."""
    return lm.model(input_ids=ids.to(lm.device)).logits[0, :-1].float().log_softmax(-1).cpu()


def permutation_p(
    suspect: np.ndarray, controls: Sequence[np.ndarray], *, n_resamples: int = 9999, seed: int = 0
) -> float:
    """One-sided p that the suspect's mean score exceeds the controls' mean, labels permuted
    within each probe (exact enumeration when (K+1)!^n <= n_resamples, else Monte Carlo)."""
    from scipy.stats import permutation_test

    def stat(s, *cs, axis):
        return s.mean(axis) - np.mean([c.mean(axis) for c in cs], axis=0)

    res = permutation_test(
        (suspect, *controls),
        stat,
        permutation_type="samples",
        alternative="greater",
        n_resamples=n_resamples,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(res.pvalue)


def similarity_test(
    suspect: Respondent,
    teacher: Respondent | None,
    controls: Mapping[str, Respondent],
    *,
    prompts: Sequence[str],
    max_tokens: int = 32,
    n_resamples: int = 9999,
    seed: int = 0,
) -> TestOutcome:
    """Agreement of the suspect with the teacher on ``prompts``, against the controls'."""
    if teacher is None:
        return cannot_run(NAME, "no teacher given (--teacher): similarity is agreement with it")
    if not controls:
        return cannot_run(
            NAME,
            "no controls: agreement with the teacher means nothing without models known not to "
            "be distilled (pass --controls)",
        )
    if not prompts:
        return cannot_run(NAME, "no probe prompts")
    labels = list(controls)
    everyone = [suspect, *controls.values()]
    teacher_answers = teacher.answer(prompts, max_tokens=max_tokens)
    details: dict = {"prompts": list(prompts), "teacher_answers": teacher_answers}
    lms = [r.lm for r in (teacher, *everyone)]
    if all(lm is not None for lm in lms) and _same_vocabulary(lms):
        mode, stat_name = "next-token", "greedy next-token agreement with the teacher"
        scored = next_token_scores(lms[0], lms[1:], prompts, teacher_answers)
        scores = [s["agreement"] for s in scored]
        details["top_k_overlap"] = dict(
            zip(["suspect", *labels], (float(s["top_k"].mean()) for s in scored))
        )
        details["kl_teacher_model"] = dict(
            zip(["suspect", *labels], (float(s["kl"].mean()) for s in scored))
        )
    else:
        mode, stat_name = "answer-overlap", "token F1 of greedy answers with the teacher's"
        scores = []
        for label, r in zip(["suspect", *labels], everyone):
            answers = r.answer(prompts, max_tokens=max_tokens)
            details.setdefault("answers", {})[label] = answers
            scores.append(np.array([token_f1(a, t) for a, t in zip(answers, teacher_answers)]))
    statistic = float(scores[0].mean())
    means = {k: float(s.mean()) for k, s in zip(labels, scores[1:])}
    probe_p = permutation_p(scores[0], scores[1:], n_resamples=n_resamples, seed=seed)
    rank_p = model_rank_p(statistic, list(means.values()))
    details.update(
        permutation_p=probe_p,
        model_rank_p=rank_p,
        mode=mode,
        per_probe={k: s.round(6).tolist() for k, s in zip(["suspect", *labels], scores)},
        n_resamples=n_resamples,
        seed=seed,
    )
    return TestOutcome(
        NAME,
        could_run=True,
        statistic=statistic,
        statistic_name=stat_name,
        p_value=max(probe_p, rank_p),
        controls=means,
        details=details,
    )


__all__ = ["next_token_scores", "permutation_p", "similarity_test", "token_f1"]
