"""Distribution tests on prompt embeddings over a sliding window of the account's prompts.

- ``mmd``: kernel two-sample test of the window against the benign reference sample
  (cf. arXiv 2606.05725); score -log10 p.
- ``prada``: PRADA-style test on inter-query distances (Juuti et al. 2019): the window's
  nearest-previous-prompt distances against those of real users, one-sided KS (extraction
  sweeps spread out; people return to their topic); score -log10 p.

Both re-run every ``stride`` embedded prompts once ``min_prompts`` are in the window.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from distillguard.detect.reference import PRADA_LAG
from distillguard.detect.registry import Detector, register
from distillguard.detect.stats import _sq_dists, ks_greater, median_bandwidth, mmd_test


class _WindowDetector(Detector):
    uses_embeddings = True

    def __init__(self, context):
        super().__init__(context)
        self._window: deque[np.ndarray] = deque(maxlen=self.config.window)
        self._since = 0
        self._p: float | None = None

    def observe(self, f, embedding) -> None:
        if embedding is None or self.context.reference is None:
            return
        self._push(embedding)
        self._since += 1
        if len(self._window) >= self.config.min_prompts and (self._since >= self.config.stride or self._p is None):
            self._since = 0
            self._p = self._test()

    def _push(self, embedding: np.ndarray) -> None:
        self._window.append(embedding)

    def _test(self) -> float | None: ...

    def score(self) -> float:
        return 0.0 if self._p is None else -math.log10(self._p)


@register
class MMDDetector(_WindowDetector):
    name = "mmd"

    def _test(self) -> float:
        ref = self.context.reference.embeddings[: self.config.reference_size]
        cache = self.context.reference.cache
        if "mmd" not in cache or cache["mmd"][0] != len(ref):  # the reference's kernel, once per reference
            bw = median_bandwidth(ref)
            yy = _sq_dists(ref.astype(np.float64))
            cache["mmd"] = (len(ref), bw, np.exp(-yy / bw))
        _, bw, Kyy = cache["mmd"]
        X = np.stack(self._window)
        self._mmd2, p = mmd_test(X, ref, permutations=self.config.permutations, bandwidth=bw, Kyy=Kyy,
                                 rng=np.random.default_rng(len(self._window)))
        return p

    def reasons(self) -> list[str]:
        if self._p is None:
            return []
        return [f"last {len(self._window)} prompts differ from benign traffic: MMD² {self._mmd2:.4f}, p={self._p:.3g}"]


@register
class PradaDetector(_WindowDetector):
    name = "prada"

    def __init__(self, context):
        super().__init__(context)
        self._recent: deque[np.ndarray] = deque(maxlen=PRADA_LAG)
        self._dists: deque[float] = deque(maxlen=self.config.window)

    def _push(self, embedding: np.ndarray) -> None:
        if len(self._recent) == PRADA_LAG:
            self._dists.append(1.0 - float(np.max(np.stack(self._recent) @ embedding)))
        self._recent.append(embedding)
        self._window.append(embedding)

    def _test(self) -> float | None:
        if len(self._dists) < 8:
            return None
        return ks_greater(np.fromiter(self._dists, dtype=np.float64), self.context.reference.distances)

    def reasons(self) -> list[str]:
        if self._p is None:
            return []
        return [f"prompts spread out like a sweep: median distance to the nearest of the previous {PRADA_LAG} "
                f"{np.median(self._dists):.2f} vs {np.median(self.context.reference.distances):.2f} for real users "
                f"(KS p={self._p:.3g})"]
