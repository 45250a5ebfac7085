"""Canary exposure of a suspect reachable only through an OpenAI-compatible API.

The weights test (:mod:`distillguard.forensics.canaries`) scores each canary's true ending and
its decoys by the suspect's likelihood of the answer (the canary's opening and an ending) as
the assistant's turn after the canary's request, in the chat template. Behind an API, two ways:

- ``likelihood``, when the endpoint gives logprobs of a given text (``POST /v1/completions``
  with ``echo``, as vLLM, OpenAI's legacy API and ``distillguard serve --no-guard`` do): the
  same statistic as the weights test. The conversation is written in a chat template the
  investigator supplies, the TEACHER's by default (a student distilled from the teacher's
  answers was trained in it and keeps it; a suspect with another template is scored in a
  foreign format, which costs power, never validity: every candidate is written the same way).
- ``greedy-answer``, the fallback when the endpoint refuses (the chat API cannot score a given
  text: it cannot be made to continue an unfinished assistant turn): the suspect is sent the
  request each canary answered, its greedy answer is cut after the canary's opening where it
  repeats it, and that text is scored by token F1 against the true ending and the decoys. It
  needs the canary to be the suspect's answer, not only preferred to decoys, and so misses
  students the likelihood traces (docs/forensics.md, "Canaries behind an API").

Either way, under the null (the suspect never saw this canary) the true ending is exchangeable
with ``decoys`` endings drawn by the canary generator on request ids never served, so its rank
(ties broken at random) gives the exact ``p = rank / (decoys + 1)``; Fisher per account and
Holm over accounts, as the weights test does. Which scoring ran, and why, is in the result.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from distillguard.errors import ConfigError
from distillguard.forensics.canaries import (
    CanaryResult,
    ServedCanary,
    _messages,
    combine_ranks,
    rank_p_value,
)
from distillguard.forensics.respondent import PromptLogprobsRefused, Respondent
from distillguard.forensics.similarity import token_f1
from distillguard.guard.canary import canary

SCORINGS = ("auto", "likelihood", "greedy-answer")
TEXTS_PER_REQUEST = 25  # echo prompts per request (servers bound a list prompt; ours at 64)
PROBE = "The investigator asks whether this endpoint reports the logprobs of a given text."


def decoy_endings(secret: bytes, c: ServedCanary, decoys: int) -> list[str]:
    # the weights test's decoys: the same generator on request ids that were never served
    return [canary(secret, c.account, f"decoy:{c.request_id}:{j}")[1] for j in range(decoys)]


def after_opening(answer: str, opening: str) -> str:
    """The answer after the canary's opening where it repeats it, else the whole answer."""
    at = answer.find(opening)
    return answer[at + len(opening) :] if at >= 0 else answer


def chat_turn(template, messages: list[dict], answer: str) -> tuple[str, int, int]:
    """``messages`` then ``answer`` as the assistant's turn, in ``template``'s chat template
    (a tokenizer), cut after the turn's end-of-turn token; and the characters the weights test
    scores: the answer and that end (:func:`distillguard.distill.examples.sft_example`)."""
    prompt = template.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = template.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=False
    )
    start = full.find(answer, len(prompt)) if full.startswith(prompt) else -1
    if start < 0:
        raise ConfigError(
            f"the chat template of {getattr(template, 'name_or_path', template)!r} does not "
            "write the answer after the prompt it renders alone: give another template"
        )
    end = start + len(answer)
    eos = getattr(template, "eos_token", None)
    if eos and full.startswith(eos, end):
        end += len(eos)
    return full[:end], start, end


def probe_prompt_logprobs(suspect: Respondent) -> str | None:
    """None when the suspect's API answers prompt logprobs (one echo request), else why not."""
    try:
        (echoed,) = suspect.prompt_logprobs([[PROBE]])
    except PromptLogprobsRefused as exc:
        return str(exc)
    if not any(lp is not None for lp in echoed[0].token_logprobs):
        return "its /v1/completions echo gave no token a logprob"
    return None


def likelihood_scores(
    suspect: Respondent, template, secret: bytes, served: Sequence[ServedCanary], decoys: int
) -> list[list[float]]:
    """Per canary: log p(answer | request) of the true answer, then of each decoy's, from the
    API's prompt logprobs of the conversation written in ``template``."""
    texts, spans = [], []
    for c in served:
        opening, ending = canary(secret, c.account, c.request_id)
        for e in [ending, *decoy_endings(secret, c, decoys)]:
            text, start, end = chat_turn(template, _messages(c.messages), opening + e)
            texts.append(text)
            spans.append((start, end))
    groups = [texts[i : i + TEXTS_PER_REQUEST] for i in range(0, len(texts), TEXTS_PER_REQUEST)]
    echoed = [e for group in suspect.prompt_logprobs(groups) for e in group]
    scores = [e.span_logprob(start, end) for e, (start, end) in zip(echoed, spans)]
    k = decoys + 1
    return [scores[i : i + k] for i in range(0, len(scores), k)]


def greedy_scores(
    suspect: Respondent,
    secret: bytes,
    served: Sequence[ServedCanary],
    decoys: int,
    max_tokens: int,
) -> list[list[float]]:
    """Per canary: token F1 of the suspect's greedy answer (after the opening) with the true
    ending, then with each decoy's."""
    answers = suspect.chat([c.messages for c in served], max_tokens=max_tokens)
    out = []
    for c, answer in zip(served, answers):
        opening, ending = canary(secret, c.account, c.request_id)
        tail = after_opening(answer, opening)
        out.append([token_f1(tail, e) for e in [ending, *decoy_endings(secret, c, decoys)]])
    return out


def api_canary_test(
    suspect: Respondent,
    secret: bytes,
    served: Sequence[ServedCanary],
    *,
    decoys: int = 49,
    alpha: float = 1e-3,
    seed: int = 0,
    max_tokens: int = 64,
    scoring: str = "auto",
    template=None,
) -> CanaryResult:
    """Rank each served canary's true ending among ``decoys`` by the suspect's likelihood of it
    (``scoring="likelihood"``) or by how closely its greedy answer matches it
    (``"greedy-answer"``); ``"auto"``: the likelihood when one echo request shows the endpoint
    gives prompt logprobs and a chat template is at hand (``template``, a tokenizer or a model
    spec, else the suspect's own :attr:`Respondent.template`), the greedy answer otherwise."""
    if decoys < 1:
        raise ConfigError(
            f"decoys={decoys}: give at least 1 (the p-value resolution is 1/(decoys+1))"
        )
    if scoring not in SCORINGS:
        raise ConfigError(f"scoring={scoring!r}: use one of {', '.join(SCORINGS)}")
    if not served:
        raise ConfigError(
            "no canaries to test: the ledger has no answers served under the 'canary' action"
        )
    if not suspect.is_api:
        raise ConfigError(
            f"{suspect.spec} is not a URL: the API-only canary test asks an OpenAI-compatible "
            "endpoint (the weights test, forensics canaries, scores a model's weights)"
        )
    if isinstance(template, str):
        from distillguard.models import load_tokenizer

        template = load_tokenizer(template)
    template = template if template is not None else suspect.template
    why = None
    if scoring != "greedy-answer":
        if template is None:
            why = (
                "no chat template to write the canary's turn in: give the teacher's "
                "(template=, or a Respondent carrying one)"
            )
        else:
            why = probe_prompt_logprobs(suspect)
        if why is not None and scoring == "likelihood":
            raise ConfigError(f"the likelihood scoring cannot run on {suspect.spec}: {why}")
    if scoring == "greedy-answer" or why is not None:
        scores = greedy_scores(suspect, secret, served, decoys, max_tokens)
        used = "greedy-answer"
        why = why or "asked for (scoring='greedy-answer')"
    else:
        scores = likelihood_scores(suspect, template, secret, served, decoys)
        used = "likelihood"
        name = getattr(template, "name_or_path", "") or type(template).__name__
        why = (
            "the endpoint gives prompt logprobs (POST /v1/completions, echo): each answer "
            f"scored as the assistant's turn in the chat template of {name!r}"
        )
    rng = random.Random(seed)
    per_account: dict[str, list[tuple[int, float]]] = {}
    for c, s in zip(served, scores):
        per_account.setdefault(c.account, []).append(rank_p_value(s[0], s[1:], rng))
    result = combine_ranks(per_account, decoys=decoys, alpha=alpha)
    result.scoring, result.scoring_why = used, why
    return result


__all__ = [
    "after_opening",
    "api_canary_test",
    "chat_turn",
    "decoy_endings",
    "likelihood_scores",
    "probe_prompt_logprobs",
]
