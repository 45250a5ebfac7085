"""Topic coverage: how evenly an account sweeps the topic space.

Each prompt goes to its nearest k-means topic of the benign reference; the score is the
Shannon entropy (nats) of the topics of the account's last ``window`` prompts. Real users
dwell on a few topics (low entropy); a sweep for training data spreads over all of them.
"""

from __future__ import annotations

import math
from collections import Counter, deque

from distillguard.detect.registry import Detector, register


@register
class CoverageDetector(Detector):
    name = "coverage"
    uses_embeddings = True

    def __init__(self, context):
        super().__init__(context)
        self._topics: deque[int] = deque(maxlen=self.config.window)
        self._counts: Counter[int] = Counter()

    def observe(self, f, embedding) -> None:
        if embedding is None or self.context.reference is None:
            return
        if len(self._topics) == self._topics.maxlen:
            old = self._topics[0]
            self._counts[old] -= 1
        t = self.context.reference.topic(embedding)
        self._topics.append(t)
        self._counts[t] += 1

    def entropy(self) -> float:
        n = len(self._topics)
        return -sum(c / n * math.log(c / n) for c in self._counts.values() if c > 0) if n else 0.0

    def score(self) -> float:
        return self.entropy() if len(self._topics) >= self.config.min_prompts else 0.0

    def reasons(self) -> list[str]:
        if len(self._topics) < self.config.min_prompts:
            return []
        hit = sum(1 for c in self._counts.values() if c > 0)
        return [
            f"covers {hit} of {len(self.context.reference.centers)} topics over its last {len(self._topics)} "
            f"prompts (entropy {self.entropy():.2f} nats); real users dwell on a few"
        ]
