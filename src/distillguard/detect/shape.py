"""Request shape: what a harvester asks for that a chat user rarely does.

Traits, each as the fraction of the account's requests that show it: logprob harvesting
(``logprobs``/``top_logprobs``), large ``max_tokens``, ``n > 1``, no conversation
continuation (every request a fresh single turn), template reuse (requests whose template
signature the account already used: a templated sweep repeats a dozen skeletons, people rarely
repeat one), chain-of-thought elicitation. The score adds the fractions, shrunk towards 0 for
short histories (k/(k+8)): one trait alone (a researcher who always asks for logprobs) gives
at most 1; a harvester shows several at once.
"""

from __future__ import annotations

from collections import Counter

from distillguard.detect.features import LARGE_MAX_TOKENS
from distillguard.detect.registry import Detector, register

TRAITS = ("logprobs", "large max_tokens", "n>1", "no continuation", "template reuse", "chain-of-thought")


@register
class ShapeDetector(Detector):
    name = "shape"

    def __init__(self, context):
        super().__init__(context)
        self._k = 0
        self._counts = dict.fromkeys(TRAITS, 0)
        self._templates: Counter[str] = Counter()

    def observe(self, f, embedding) -> None:
        self._k += 1
        c = self._counts
        c["logprobs"] += f.logprobs
        c["large max_tokens"] += (f.max_tokens or 0) >= LARGE_MAX_TOKENS
        c["n>1"] += f.n > 1
        c["no continuation"] += not f.continues
        c["chain-of-thought"] += f.cot
        if f.template is not None:
            c["template reuse"] += self._templates[f.template] > 0
            self._templates[f.template] += 1

    def fractions(self) -> dict[str, float]:
        k = max(self._k, 1)
        return {t: self._counts[t] / k for t in TRAITS}

    def score(self) -> float:
        return self._k / (self._k + 8.0) * sum(self.fractions().values())

    def reasons(self) -> list[str]:
        shown = [f"{t} {v:.0%}" for t, v in self.fractions().items() if v >= 0.5]
        return [f"request shape over {self._k} requests: " + ", ".join(shown)] if shown else []
