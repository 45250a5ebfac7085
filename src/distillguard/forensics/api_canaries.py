"""Canary exposure of a suspect reachable only through an OpenAI-compatible API.

The weights test (:mod:`distillguard.forensics.canaries`) scores each canary's true ending and
its decoys by the suspect's likelihood. Behind an API there are no likelihoods to ask for
(logprobs of a given text are not part of the chat API), but there are completions: the
suspect is sent the request each canary answered (a model that learned the canary answers that
request with it; the chat API cannot be made to continue an unfinished assistant turn, so the
opening is not sent alone), its greedy answer is cut after the canary's opening where it
repeats it, and that text is scored against the true ending and against ``decoys`` endings
drawn the same way as the weights test's (the canary generator on request ids never served).

Under the null (the suspect never saw this canary) its answer does not depend on the secret,
so the true ending is exchangeable with the decoys and its rank (ties broken at random) gives
the exact ``p = rank / (decoys + 1)``; Fisher per account and Holm over accounts, as the
weights test does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from distillguard.errors import ConfigError
from distillguard.forensics.canaries import (
    CanaryResult,
    ServedCanary,
    combine_ranks,
    rank_p_value,
)
from distillguard.forensics.respondent import Respondent
from distillguard.forensics.similarity import token_f1
from distillguard.guard.canary import canary


def decoy_endings(secret: bytes, c: ServedCanary, decoys: int) -> list[str]:
    # the weights test's decoys: the same generator on request ids that were never served
    return [canary(secret, c.account, f"decoy:{c.request_id}:{j}")[1] for j in range(decoys)]


def after_opening(answer: str, opening: str) -> str:
    """The answer after the canary's opening where it repeats it, else the whole answer."""
    at = answer.find(opening)
    return answer[at + len(opening) :] if at >= 0 else answer


def api_canary_test(
    suspect: Respondent,
    secret: bytes,
    served: Sequence[ServedCanary],
    *,
    decoys: int = 49,
    alpha: float = 1e-3,
    seed: int = 0,
    max_tokens: int = 64,
) -> CanaryResult:
    """Rank each served canary's true ending among ``decoys`` by how closely the suspect's
    answer to the canary's request matches it (token F1)."""
    if decoys < 1:
        raise ConfigError(
            f"decoys={decoys}: give at least 1 (the p-value resolution is 1/(decoys+1))"
        )
    if not served:
        raise ConfigError(
            "no canaries to test: the ledger has no answers served under the 'canary' action"
        )
    if not suspect.is_api:
        raise ConfigError(
            f"{suspect.spec} is not a URL: the API-only canary test asks an OpenAI-compatible "
            "endpoint (the weights test, forensics canaries, scores a model's weights)"
        )
    answers = suspect.chat([c.messages for c in served], max_tokens=max_tokens)
    rng = random.Random(seed)
    per_account: dict[str, list[tuple[int, float]]] = {}
    for c, answer in zip(served, answers):
        opening, ending = canary(secret, c.account, c.request_id)
        tail = after_opening(answer, opening)
        scores = [token_f1(tail, e) for e in [ending, *decoy_endings(secret, c, decoys)]]
        per_account.setdefault(c.account, []).append(rank_p_value(scores[0], scores[1:], rng))
    return combine_ranks(per_account, decoys=decoys, alpha=alpha)


__all__ = ["after_opening", "api_canary_test", "decoy_endings"]
