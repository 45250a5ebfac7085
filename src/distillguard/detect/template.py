"""Template sweeps: one account filling a few prompt skeletons with ever new content.

Self-Instruct and templated sweeps ("Write a {genre} about {subject}.", Evol-Instruct's rewriting
prompt around a seed) send a dozen skeletons over and over, each time with new words in the
slots; people rarely send two prompts with one skeleton and different words, and when they do
(a "translate this: ..." habit) it is one or two skeletons. The skeleton is
``features.template_signature`` (the first word and the function words, other words as slots,
digits folded): the variable slots are masked, so "Write a poem about the ocean." and "Write a
haiku about the moon." match.

Statistic over the account's first-turn prompts (k of them): the share that reuse a skeleton the
account already sent with other words, times 1 + ln(1 + the number of skeletons reused), shrunk
for short histories by k/(k+16). It accumulates over the account's life (a slow sweep piles up
evidence day after day); its benign distribution comes from calibration like every detector's.
"""

from __future__ import annotations

import math

from distillguard.detect.registry import Detector, register


@register
class TemplateDetector(Detector):
    name = "template"

    def __init__(self, context):
        super().__init__(context)
        self._k = 0  # first-turn prompts
        self._reused = 0  # ... that reuse a skeleton with other words
        self._fills: dict[str, str] = {}  # skeleton -> the first prompt hash sent with it
        self._skeletons_reused: set[str] = set()

    def observe(self, f, embedding) -> None:
        if f.continues:
            return
        self._k += 1
        sig = f.template
        if sig is None:
            return
        first = self._fills.setdefault(sig, f.prompt_hash)
        if first != f.prompt_hash:
            self._reused += 1
            self._skeletons_reused.add(sig)

    def score(self) -> float:
        if not self._k:
            return 0.0
        return (
            self._k
            / (self._k + 16.0)
            * self._reused
            / self._k
            * (1.0 + math.log1p(len(self._skeletons_reused)))
        )

    def reasons(self) -> list[str]:
        if not self._reused:
            return []
        return [
            f"{self._reused} of {self._k} fresh prompts refill a skeleton it already sent "
            f"({len(self._skeletons_reused)} skeletons reused): a templated sweep"
        ]
