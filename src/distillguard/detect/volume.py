"""Volume and velocity: requests and tokens in the last 24 h, peak requests in 10 minutes."""

from __future__ import annotations

import math
from collections import deque

from distillguard.detect.registry import Detector, register

DAY, BURST = 86_400.0, 600.0


@register
class VolumeDetector(Detector):
    name = "volume"

    def __init__(self, context):
        super().__init__(context)
        self._day: deque[tuple[float, int]] = deque()  # (ts, tokens) within the last 24 h
        self._burst: deque[float] = deque()  # ts within the last 10 min
        self._day_tokens = 0
        self._peak_burst = 0

    def observe(self, f, embedding) -> None:
        t = f.ts
        self._day.append((t, f.tokens))
        self._day_tokens += f.tokens
        while self._day and self._day[0][0] <= t - DAY:
            self._day_tokens -= self._day.popleft()[1]
        self._burst.append(t)
        while self._burst and self._burst[0] <= t - BURST:
            self._burst.popleft()
        self._peak_burst = max(self._peak_burst, len(self._burst))

    def score(self) -> float:
        # log scale: 10x more requests is one step; tokens per ~300-token exchange count alike
        return max(
            math.log1p(len(self._day)),
            math.log1p(self._day_tokens / 300.0),
            math.log1p(4 * self._peak_burst),
        )

    def reasons(self) -> list[str]:
        return [
            f"{len(self._day)} requests and {self._day_tokens:,} tokens in 24 h, "
            f"peak {self._peak_burst} requests in 10 min"
        ]
