"""Canary exposure: did the suspect learn the canary answers served to suspected extractors?

The gateway's ``canary`` countermeasure answers some requests of a suspected account with a
fabricated statement keyed by the master secret, the account and the request id
(:mod:`distillguard.guard.canary`), and records them in the ledger. A model trained on those
answers prefers each canary's true ending over endings it was never shown.

The test, per served canary (Carlini et al. 2019, "The Secret Sharer", exposure by rank): the
suspect scores the answer (log-likelihood of the assistant turn, in its chat template, after the
request's own messages) with the true ending and with ``decoys`` endings drawn the same way
from request ids that were never served. Under the null (the suspect never saw this canary)
the true ending is exchangeable with the decoys (i.i.d. draws of one generator), so its rank,
with ties broken at random, is uniform on 1..decoys+1 and ``p = rank / (decoys + 1)`` is an
exact p-value. Each account's canaries are independent draws: their p-values are combined by
Fisher's method (conservative for these discrete, super-uniform p-values), and Holm's
correction over accounts names the accounts the suspect traces to.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from scipy.stats import chi2

from distillguard.errors import ConfigError
from distillguard.forensics.canary_power import canary_power
from distillguard.guard.canary import canary
from distillguard.watermark.detect import holm


@dataclass(frozen=True)
class ServedCanary:
    account: str
    request_id: str
    messages: list[dict]  # the request's messages: the canary was the answer to them


@dataclass
class AccountExposure:
    account: str
    canaries: int
    top1: int  # canaries whose true ending the suspect ranked first
    mean_rank: float  # 1 = always preferred the true ending; (decoys + 2) / 2 under the null
    p_value: float  # Fisher's combination of the per-canary rank p-values
    log10_p: float
    p_holm: float = 1.0
    # the test's power at this many canaries (:func:`canary_power`), at the level Holm's first
    # step asks of one account: alpha / accounts
    power: dict | None = None


@dataclass
class CanaryResult:
    decoys: int
    alpha: float
    accounts: list[AccountExposure] = field(default_factory=list)
    # how each ending was scored: "likelihood" (the weights, or an API's prompt logprobs) or
    # "greedy-answer" (an API's answer, by token F1); and why, where the API test chose
    scoring: str = "likelihood"
    scoring_why: str | None = None
    skipped_too_long: int = 0  # canaries whose prompt does not fit the suspect's context

    @property
    def traced(self) -> list[str]:
        return [a.account for a in self.accounts if a.p_holm < self.alpha]

    @property
    def closest_untraced(self) -> AccountExposure | None:
        """The untraced account nearest to being traced: whose power a "not traced" is about."""
        left = [a for a in self.accounts if a.p_holm >= self.alpha]
        return min(left, key=lambda a: a.log10_p) if left else None

    def to_dict(self) -> dict:
        near = self.closest_untraced
        return {
            **asdict(self),
            "traced": self.traced,
            "power": {"account": near.account, **near.power} if near and near.power else None,
        }


def served_canaries(engine, *, accounts: Sequence[str] | None = None) -> list[ServedCanary]:
    """The canaries the gateway served and recorded (``policy_action`` names ``canary``)."""
    from sqlalchemy import select

    from distillguard.guard.schema import LedgerRow

    query = (
        select(LedgerRow.account_id, LedgerRow.request_id, LedgerRow.request_body)
        .where(LedgerRow.policy_action.like("%canary%"), LedgerRow.status == 200)
        .order_by(LedgerRow.id)
    )
    if accounts:
        query = query.where(LedgerRow.account_id.in_(list(accounts)))
    with engine.connect() as conn:
        return [
            ServedCanary(
                r.account_id, r.request_id, list((r.request_body or {}).get("messages") or [])
            )
            for r in conn.execute(query)
        ]


def _messages(messages: list[dict]) -> list[dict]:
    """Chat messages as plain role/content strings (content parts joined, developer -> system)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": content or ""})
    return out


class PromptTooLong(ConfigError):
    """The prompt leaves no room for an answer in the suspect's context."""


# Logits held at once while scoring (floats): batch x tokens x vocabulary stays under this, so a
# prompt of the gateway's longest (thousands of tokens) does not take gigabytes per batch.
LOGITS_BUDGET = 2**28


@torch.no_grad()
def answer_logprobs(
    lm,
    messages: list[dict],
    answers: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 16,
) -> list[float]:
    """log p(answer | messages) under ``lm`` (the assistant turn in its chat template), per answer.

    ``max_length``: the tokens scored per answer, prompt included; default the model's own
    context. An answer longer than what is left is scored on the part that fits (alike for every
    answer, so a rank among them stays exchangeable); a prompt that leaves no room raises
    ``PromptTooLong``."""
    from distillguard.distill.train import IGNORE, collate, sft_example

    max_length = max_length or lm.context_length
    examples = [sft_example(lm, messages, a, max_length) for a in answers]
    if any(e is None for e in examples):
        raise PromptTooLong(
            f"a canary prompt does not fit the suspect's context ({max_length} tokens)"
        )
    out: list[float] = []
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    longest = max(len(e["input_ids"]) for e in examples)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    step = max(1, min(batch_size, LOGITS_BUDGET // max(1, longest * vocab)))
    start = min(e["prompt_len"] for e in examples) - 1  # the first position that predicts answers
    for i in range(0, len(examples), step):
        batch = collate(examples[i : i + step], pad)
        batch = {k: v.to(lm.device) for k, v in batch.items()}
        logits = lm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, start:-1]
        labels = batch["labels"][:, start + 1 :]  # token t+1 predicted at t
        mask = labels != IGNORE
        lp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        out += (lp * mask).sum(-1).tolist()
    return out


def rank_p_value(
    true_score: float, decoy_scores: Sequence[float], rng: random.Random
) -> tuple[int, float]:
    """(rank, p): the true ending's rank among the decoys (1 = best; ties broken uniformly at
    random) and p = rank / (decoys + 1), exact under exchangeability."""
    above = sum(s > true_score for s in decoy_scores)
    ties = sum(s == true_score for s in decoy_scores)
    rank = 1 + above + rng.randint(0, ties)
    return rank, rank / (len(decoy_scores) + 1)


def canary_test(
    lm,
    secret: bytes,
    served: Sequence[ServedCanary],
    *,
    decoys: int = 49,
    alpha: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> CanaryResult:
    """Rank each served canary's true ending among ``decoys`` never-served ones under ``lm``."""
    if decoys < 1:
        raise ConfigError(
            f"decoys={decoys}: give at least 1 (the p-value resolution is 1/(decoys+1))"
        )
    if not served:
        raise ConfigError(
            "no canaries to test: the ledger has no answers served under the 'canary' action"
        )
    rng = random.Random(seed)
    per_account: dict[str, list[tuple[int, float]]] = {}
    too_long = 0
    for i, c in enumerate(served):
        opening, ending = canary(secret, c.account, c.request_id)
        fakes = [canary(secret, c.account, f"decoy:{c.request_id}:{j}")[1] for j in range(decoys)]
        try:
            scores = answer_logprobs(
                lm, _messages(c.messages), [opening + e for e in [ending, *fakes]]
            )
        except PromptTooLong:
            # the suspect cannot read this prompt at all: no evidence either way, so the canary
            # is left out (and counted), not scored on a cut prompt it was never asked
            too_long += 1
        else:
            per_account.setdefault(c.account, []).append(rank_p_value(scores[0], scores[1:], rng))
        if progress is not None:
            progress(i + 1, len(served))
    if not per_account:
        raise ConfigError(
            f"none of the {len(served)} canary prompts fits the suspect's context "
            f"({lm.context_length} tokens)"
        )
    result = combine_ranks(per_account, decoys=decoys, alpha=alpha)
    result.skipped_too_long = too_long
    return result


def combine_ranks(
    per_account: dict[str, list[tuple[int, float]]], *, decoys: int, alpha: float
) -> CanaryResult:
    """Each account's canaries, (rank, p) against the decoys, combined by Fisher's method, Holm
    over the accounts, with the test's power at that size: the weights test's and the API test's
    last step."""
    result = CanaryResult(decoys=decoys, alpha=alpha)
    for account, ranks in per_account.items():
        stat = -2.0 * sum(math.log(p) for _, p in ranks)
        log_p = float(chi2.logsf(stat, 2 * len(ranks)))
        result.accounts.append(
            AccountExposure(
                account=account,
                canaries=len(ranks),
                top1=sum(r == 1 for r, _ in ranks),
                mean_rank=sum(r for r, _ in ranks) / len(ranks),
                p_value=math.exp(log_p),
                log10_p=log_p / math.log(10),
            )
        )
    if not result.accounts:
        return result
    level = alpha / len(result.accounts)
    for a, p in zip(result.accounts, holm([a.p_value for a in result.accounts])):
        a.p_holm = p
        a.power = canary_power(a.canaries, a.top1, decoys, level).to_dict()
    result.accounts.sort(key=lambda a: a.log10_p)
    return result


__all__ = [
    "AccountExposure",
    "CanaryResult",
    "PromptTooLong",
    "ServedCanary",
    "answer_logprobs",
    "canary_test",
    "combine_ranks",
    "rank_p_value",
    "served_canaries",
]
