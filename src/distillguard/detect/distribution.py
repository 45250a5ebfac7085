"""Distribution tests on prompt embeddings over a sliding window of the account's prompts.

- ``mmd``: kernel two-sample statistic of the window against the benign reference sample
  (cf. arXiv 2606.05725); score m·MMD²_u (m the window size: under the null the scaled
  unbiased statistic has an m-free limit, Gretton et al. 2012 Thm. 12). No permutation test
  per window: calibration gives the benign distribution of the score (it was 90% of the
  detector's cost).
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
from distillguard.detect.stats import _sq_dists, ks_greater, median_bandwidth, mmd2_to_reference


class _WindowDetector(Detector):
    uses_embeddings = True

    def __init__(self, context):
        super().__init__(context)
        self._window: deque[np.ndarray] = deque(maxlen=self.config.window)
        self._since = 0
        self._last: float | None = None  # the last test: a p-value (prada) or a statistic (mmd)

    def observe(self, f, embedding) -> None:
        if embedding is None or self.context.reference is None:
            return
        self._push(embedding)
        self._since += 1
        if len(self._window) >= self.config.min_prompts and (
            self._since >= self.config.stride or self._last is None
        ):
            self._since = 0
            self._last = self._test()

    def _push(self, embedding: np.ndarray) -> None:
        self._window.append(embedding)

    def _test(self) -> float | None: ...

    def score(self) -> float:
        return 0.0 if self._last is None else -math.log10(self._last)


@register
class MMDDetector(_WindowDetector):
    name = "mmd"

    def _test(self) -> float:
        ref = self.context.reference.embeddings[: self.config.reference_size]
        cache = self.context.reference.cache
        if "mmd" not in cache or cache["mmd"][0] != len(
            ref
        ):  # the reference's kernel, once per reference
            bw = median_bandwidth(ref)
            Kyy = np.exp(-_sq_dists(ref.astype(np.float64)) / bw)
            n = len(ref)
            cache["mmd"] = (n, bw, float((Kyy.sum() - np.trace(Kyy)) / (n * (n - 1))))
        _, bw, kyy_mean = cache["mmd"]
        m = len(self._window)
        self._mmd2 = mmd2_to_reference(np.stack(self._window), ref, bw, kyy_mean)
        return m * self._mmd2

    def score(self) -> float:
        return 0.0 if self._last is None else max(self._last, 0.0)

    def reasons(self) -> list[str]:
        if self._last is None:
            return []
        return [
            f"last {len(self._window)} prompts differ from benign traffic: MMD² {self._mmd2:.4f} "
            f"(m·MMD² {self._last:.2f})"
        ]


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
        return ks_greater(
            np.fromiter(self._dists, dtype=np.float64), self.context.reference.distances
        )

    def reasons(self) -> list[str]:
        if self._last is None:
            return []
        return [
            f"prompts spread out like a sweep: median distance to the nearest of the previous {PRADA_LAG} "
            f"{np.median(self._dists):.2f} vs {np.median(self.context.reference.distances):.2f} for real users "
            f"(KS p={self._last:.3g})"
        ]
