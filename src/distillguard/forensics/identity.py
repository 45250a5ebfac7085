"""Identity probes: does the suspect claim to be the teacher?

A student distilled from a teacher's answers inherits what the teacher says about itself
(Lee et al. 2025, "Distillation Quantification for LLMs": DeepSeek-V3 once answered "I am
ChatGPT"). The teacher's identity is what the teacher itself claims: the names it uses in its
own answers to the probes (or the names the investigator gives). The statistic is the share of
the suspect's answers that use one of those names. Fisher's exact test compares the suspect's
claims with the controls' claims pooled (one-sided: the suspect claims more); the p-value is the
larger of Fisher's and the suspect's rank among the controls
(:func:`~distillguard.forensics.respondent.model_rank_p`), since controls differ as models, not
only by answer. A claim is a fingerprint, not proof: a model trained on text that mentions the
teacher claims it too, which is what the controls are for.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

from distillguard.forensics.respondent import Respondent, TestOutcome, cannot_run, model_rank_p

NAME = "identity"

# Many paraphrases, so that a model memorising one answer to one wording does not decide the test.
PROBES: tuple[str, ...] = (
    "Who are you?",
    "What is your name?",
    "Who made you?",
    "Who created you?",
    "What model are you?",
    "Which company developed you?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "What are you called?",
    "Who built you?",
    "Who trained you?",
    "Which language model am I talking to?",
    "What AI model is this?",
    "Who is your developer?",
    "What organization are you from?",
    "Are you ChatGPT?",
    "Are you made by OpenAI?",
    "What is the name of the model answering me?",
    "Please state your name and who made you.",
    "Which team is behind you?",
    "What kind of assistant are you, and who made you?",
    "Can you tell me your model name?",
    "Who owns you?",
    "Who designed you?",
    "What should I call you?",
    "Which AI are you?",
    "Who is responsible for creating you?",
    "What lab trained you?",
    "What is your origin?",
    "Where do you come from?",
    "Identify yourself, please.",
    "Who programmed you?",
    "Whose model are you?",
    "In one sentence, who are you?",
    "What's your name and version?",
    "Which large language model powers this chat?",
    "Tell me who you are and who made you.",
    "Are you an AI? Which one?",
    "What company are you a product of?",
    "Who are your creators?",
    "Describe who you are in a few words.",
    "hi! who am i speaking with?",
    "hey, what model r u",
    "Quick question: who developed this assistant?",
    "I'd like to know which model you are.",
    "Which family of models do you belong to?",
    "What name were you given by your makers?",
    "Who is behind this AI assistant?",
)
# Capitalised words that are not names of a model or a maker.
GENERIC = {
    "ai", "i", "llm", "assistant", "ai assistant", "language model", "large language model",
    "english", "hello", "hi", "hey", "sure", "yes", "no", "the", "my", "as", "an", "a", "im",
    "thank", "thanks", "please", "of", "how", "what", "who", "it", "its", "you", "we", "is",
}  # fmt: skip
# A capitalised phrase: words that start upper-case, joined by spaces (Hugging Face, SmolLM2,
# GPT-4o, OpenAI).
_PHRASE = re.compile(r"[A-Z][\w\-.]*[\w](?:[ ][A-Z][\w\-.]*[\w])*|[A-Z]")
_SENTENCE_START = re.compile(r"(?:^|[.!?:\n]\s*|[\"'(]\s*)$")


def candidate_names(answer: str) -> set[str]:
    """Capitalised phrases that name something: not a generic word, and either not at a
    sentence's start or spelled like a product name (an inner capital or a digit)."""
    out = set()
    for m in _PHRASE.finditer(answer):
        phrase = m.group(0).strip(".-")
        if len(phrase) < 2 or phrase.lower() in GENERIC:
            continue
        productlike = bool(re.search(r"[A-Z0-9]", phrase[1:]))
        if _SENTENCE_START.search(answer[: m.start()]) and not productlike:
            continue
        out.add(phrase)
    return out


def teacher_names(
    answers: Sequence[str], probes: Sequence[str], *, min_share: float = 0.1
) -> list[str]:
    """The names the teacher uses for itself: candidate names in at least ``min_share`` of its
    answers (and at least 2), leaving out names the probes themselves contain (a probe that asks
    "Are you ChatGPT?" must not make ChatGPT the teacher's identity)."""
    counts = Counter(name for a in answers for name in candidate_names(a))
    in_probes = " ".join(probes).lower()
    floor = max(2, min_share * len(answers))
    return sorted(n for n, c in counts.items() if c >= floor and n.lower() not in in_probes)


def claims(answer: str, names: Sequence[str]) -> bool:
    """Whether ``answer`` uses one of ``names`` (case-insensitive, whole words; a version
    suffix is allowed: SmolLM matches SmolLM2)."""
    return any(
        re.search(rf"(?<![A-Za-z0-9]){re.escape(n)}(?![A-Za-z])", answer, re.IGNORECASE)
        for n in names
    )


def identity_test(
    suspect: Respondent,
    teacher: Respondent | None,
    controls: Mapping[str, Respondent],
    *,
    probes: Sequence[str] = PROBES,
    names: Sequence[str] | None = None,
    max_tokens: int = 48,
) -> TestOutcome:
    """How often the suspect claims the teacher's identity, against the controls (Fisher)."""
    from scipy.stats import fisher_exact

    details: dict = {"probes": list(probes)}
    if names:
        names = list(names)
        details["names_from"] = "given"
    else:
        if teacher is None:
            return cannot_run(NAME, "no teacher to ask and no --teacher-names given")
        teacher_answers = teacher.answer(probes, max_tokens=max_tokens)
        names = teacher_names(teacher_answers, probes)
        details.update(names_from="teacher", teacher_answers=teacher_answers)
        if not names:
            return cannot_run(
                NAME,
                "the teacher's answers to the identity probes name no model or maker; "
                "pass --teacher-names",
                **details,
            )
    details["names"] = names
    suspect_answers = suspect.answer(probes, max_tokens=max_tokens)
    hits = sum(claims(a, names) for a in suspect_answers)
    details["suspect_answers"] = suspect_answers
    details["suspect_claims"] = hits
    share = hits / len(probes)
    if not controls:
        return TestOutcome(
            NAME,
            could_run=False,
            why_not="no controls: a claim rate means nothing without models known not to be "
            "distilled (pass --controls)",
            statistic=share,
            statistic_name="share of answers claiming the teacher's identity",
            details=details,
        )
    control_hits: dict[str, int] = {}
    details["control_answers"] = {}
    for label, control in controls.items():
        answers = control.answer(probes, max_tokens=max_tokens)
        details["control_answers"][label] = answers
        control_hits[label] = sum(claims(a, names) for a in answers)
    pooled, total = sum(control_hits.values()), len(probes) * len(controls)
    _, fisher_p = fisher_exact(
        [[hits, len(probes) - hits], [pooled, total - pooled]], alternative="greater"
    )
    shares = {k: v / len(probes) for k, v in control_hits.items()}
    rank_p = model_rank_p(share, list(shares.values()))
    details.update(control_claims=control_hits, fisher_p=float(fisher_p), model_rank_p=rank_p)
    return TestOutcome(
        NAME,
        could_run=True,
        statistic=share,
        statistic_name="share of answers claiming the teacher's identity",
        p_value=max(float(fisher_p), rank_p),
        controls=shares,
        details=details,
    )


__all__ = ["PROBES", "candidate_names", "claims", "identity_test", "teacher_names"]
