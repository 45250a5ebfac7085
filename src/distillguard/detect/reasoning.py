"""Reasoning-trace harvesting: an account that asks for the chain of thought again and again.

A student trained on reasoning traces needs the teacher to show its work, so a harvester adds
"Let's think step by step.", "Show your reasoning.", ``<think>`` tags or a reasoning system
prompt to nearly every request (``features.COT_MARKERS``); people ask for it now and then.
Statistic: the share of the account's last ``window`` requests that elicit reasoning, shrunk for
short histories by k/(k+8), so that ~16 such requests already stand out.
"""

from __future__ import annotations

from collections import deque

from distillguard.detect.registry import Detector, register


@register
class ReasoningDetector(Detector):
    name = "cot"

    def __init__(self, context):
        super().__init__(context)
        self._recent: deque[bool] = deque(maxlen=self.config.window)
        self._hits = 0

    def observe(self, f, embedding) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._hits -= self._recent[0]
        self._recent.append(f.cot)
        self._hits += f.cot

    def score(self) -> float:
        k = len(self._recent)
        return k / (k + 8.0) * self._hits / k if k else 0.0

    def reasons(self) -> list[str]:
        if not self._hits:
            return []
        return [
            f"{self._hits} of its last {len(self._recent)} requests ask for the chain of thought "
            "(step by step, show your reasoning, <think>)"
        ]
