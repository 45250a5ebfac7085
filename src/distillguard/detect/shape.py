"""Request shape: what a harvester asks for that a chat user rarely does.

Traits, each as the fraction of the account's requests that show it: logprob harvesting
(``logprobs``/``top_logprobs``), large ``max_tokens``, ``n > 1``, no conversation
continuation (every request a fresh single turn). (Template reuse and chain-of-thought
elicitation are detectors of their own: ``template.py``, ``reasoning.py``.) The score adds the fractions, shrunk towards 0 for
short histories (k/(k+8)): one trait alone (a researcher who always asks for logprobs) gives
at most 1; a harvester shows several at once.
"""

from __future__ import annotations

from distillguard.detect.features import LARGE_MAX_TOKENS
from distillguard.detect.registry import Detector, register

TRAITS = ("logprobs", "large max_tokens", "n>1", "no continuation")


@register
class ShapeDetector(Detector):
    name = "shape"

    def __init__(self, context):
        super().__init__(context)
        self._k = 0
        self._counts = dict.fromkeys(TRAITS, 0)

    def observe(self, f, embedding) -> None:
        self._k += 1
        c = self._counts
        c["logprobs"] += f.logprobs
        c["large max_tokens"] += (f.max_tokens or 0) >= LARGE_MAX_TOKENS
        c["n>1"] += f.n > 1
        c["no continuation"] += not f.continues

    def fractions(self) -> dict[str, float]:
        k = max(self._k, 1)
        return {t: self._counts[t] / k for t in TRAITS}

    def score(self) -> float:
        return self._k / (self._k + 8.0) * sum(self.fractions().values())

    def reasons(self) -> list[str]:
        shown = [f"{t} {v:.0%}" for t, v in self.fractions().items() if v >= 0.5]
        return [f"request shape over {self._k} requests: " + ", ".join(shown)] if shown else []
