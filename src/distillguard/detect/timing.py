"""Timing regularity: scripts send at steady intervals, people in bursts with long pauses.

Statistic: the coefficient of variation (std/mean) of the last 64 inter-request gaps. Human
gaps are heavy-tailed (CV well above 1: think time, then a break); a client on a timer or a
pool of workers gives CV near or below 1. Score: -log(CV).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from distillguard.detect.registry import Detector, register

MIN_GAPS = 8
WINDOW = 64


@register
class TimingDetector(Detector):
    name = "timing"

    def __init__(self, context):
        super().__init__(context)
        self._gaps: deque[float] = deque()
        self._last: float | None = None
        self._cv: float | None = None
        self._sum = self._sumsq = 0.0  # running sums over the window: O(1) per request

    def observe(self, f, embedding) -> None:
        if self._last is not None:
            g = max(0.0, f.ts - self._last)
            self._gaps.append(g)
            self._sum += g
            self._sumsq += g * g
            if len(self._gaps) > WINDOW:
                old = self._gaps.popleft()
                self._sum -= old
                self._sumsq -= old * old
        self._last = f.ts if self._last is None else max(self._last, f.ts)
        k = len(self._gaps)
        if k >= MIN_GAPS:
            mean = self._sum / k
            var = max(self._sumsq / k - mean * mean, 0.0)
            self._cv = math.sqrt(var) / mean if mean > 0 else 0.0

    def score(self) -> float:
        return 0.0 if self._cv is None else -math.log(self._cv + 1e-3)

    def reasons(self) -> list[str]:
        if self._cv is None:
            return []
        g = np.fromiter(self._gaps, dtype=np.float64)
        return [
            f"regular timing: gap CV {self._cv:.2f} over {len(g)} gaps (median {np.median(g):.1f} s); "
            "people pause and burst (CV > 1)"
        ]
