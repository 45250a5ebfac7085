"""Online scoring: ``AccountMonitor(calibration).observe(record) -> Verdict``.

One monitor follows every account of a gateway (or of a traffic file): it keeps each
account's detectors, embeds prompts in batches (``observe_batch``), links accounts, and pools
the streams of linked accounts so that a campaign spread over many keys is scored as one
actor. An account's score is the larger of its own and its cluster's.

Cost per request: features, a cached MiniLM embedding (batched), O(1) detector updates, and
every ``stride`` prompts an MMD permutation test on a 64 x 256 window (~ms). The gateway calls
it from a background task, off the request path.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from distillguard.detect.config import DetectConfig
from distillguard.detect.features import Features, extract
from distillguard.detect.linking import Linker, LinkingDetector
from distillguard.detect.reference import Reference
from distillguard.detect.registry import Context, Detector, select

LEVELS = ("ok", "watch", "flag")


@dataclass(frozen=True)
class Verdict:
    account: str
    level: str                  # "ok" | "watch" | "flag" (the policy ladder keys on it)
    score: float                # combined evidence (Fisher's -2 Σ ln p over detectors), larger = worse
    reasons: tuple[str, ...]
    cluster: str | None         # linked accounts scored as one actor, None when alone
    request: int                # 1-based index of this request within the account

    @property
    def flagged(self) -> bool:
        return self.level == "flag"


class _Stream:
    """The detectors of one account (or one cluster of accounts) and its recent history."""

    def __init__(self, classes: list[type[Detector]], context: Context, owner: str, history: int):
        self.detectors = [cls(context) for cls in classes]
        for d in self.detectors:
            if isinstance(d, LinkingDetector):
                d.bind(owner)
        self.history: deque[tuple[Features, np.ndarray | None]] = deque(maxlen=history)
        self.n = 0
        self.embedded = 0

    def observe(self, f: Features, emb: np.ndarray | None) -> None:
        self.n += 1
        self.embedded += emb is not None
        self.history.append((f, emb))
        for d in self.detectors:
            d.observe(f, emb)

    def raw(self) -> np.ndarray:
        return np.array([d.score() for d in self.detectors])


class AccountMonitor:
    """Incremental detection over a request stream of many accounts.

    With a :class:`~distillguard.detect.calibrate.Calibration` it returns verdicts; without one
    (``config`` and ``reference`` given) it only yields raw detector scores, which is how the
    calibration learns the benign distributions.
    """

    def __init__(self, calibration=None, *, config: DetectConfig | None = None, reference: Reference | None = None,
                 common: frozenset[str] = frozenset(), embedder=None):
        self.calibration = calibration
        self.config = calibration.config if calibration is not None else (config or DetectConfig())
        reference = calibration.reference if calibration is not None else reference
        self.classes = select(self.config.detectors)
        self.names = [c.name for c in self.classes]
        self.needs_embeddings = any(c.uses_embeddings for c in self.classes) and reference is not None
        if self.needs_embeddings and embedder is None:
            from distillguard.detect.embed import shared_embedder

            embedder = shared_embedder()
        if calibration is not None and embedder is not None and embedder.signature != calibration.embedder:
            from distillguard.errors import ConfigError

            raise ConfigError(f"the calibration was made with embedder {calibration.embedder}, not "
                              f"{embedder.signature}; recalibrate with this embedder")
        self.embedder = embedder
        if calibration is not None:
            common = calibration.common
        self.linker = Linker(min_evidence=self.config.link_min_evidence, common=frozenset(common),
                             on_merge=self._merged)
        self.context = Context(self.config, reference, self.linker)
        self.accounts: dict[str, _Stream] = {}
        self.clusters: dict[str, _Stream] = {}   # union-find root -> pooled stream
        if calibration is not None:
            self._tails = [calibration.tails[n] for n in self.names]

    # ---- cluster pooling ----
    def _merged(self, root: str, other: str) -> None:
        self.clusters.pop(other, None)
        self.clusters.pop(root, None)
        members = self.linker.members(root)
        merged = sorted((item for a in members if a in self.accounts for item in self.accounts[a].history),
                        key=lambda fe: fe[0].ts)
        pooled = _Stream(self.classes, self.context, root, self.config.history)
        for f, emb in merged[-self.config.history:]:
            pooled.observe(f, emb)
        self.clusters[root] = pooled

    # ---- observing ----
    def _wants_embedding(self, f: Features, seen: dict[str, int], taken: dict[str, int]) -> bool:
        """Which prompts to embed (MiniLM is most of the cost): not the follow-up turns of a
        conversation (unless configured), and after an account's first ``window`` embedded
        prompts only 1 request in ``embed_every``; the embedding tests run on that sample.
        ``seen``/``taken``: this batch's requests and embeddings so far, per account."""
        if not self.needs_embeddings or (f.continues and not self.config.embed_followups):
            return False
        stream = self.accounts.get(f.account)
        n = (stream.n if stream else 0) + seen.get(f.account, 0)
        done = (stream.embedded if stream else 0) + taken.get(f.account, 0)
        seen[f.account] = seen.get(f.account, 0) + 1
        take = done < self.config.window or n % self.config.embed_every == 0
        if take:
            taken[f.account] = taken.get(f.account, 0) + 1
        return take

    def step_batch(self, feats: Sequence[Features]) -> Iterator[tuple[_Stream, _Stream | None]]:
        """Observe features (time order), embedding their prompts in one batch; yields, right after
        each request is observed, the account's stream and its cluster's (None when alone).

        A generator on purpose: read each stream's scores before asking for the next request."""
        seen: dict[str, int] = {}
        taken: dict[str, int] = {}
        want = [self._wants_embedding(f, seen, taken) for f in feats]
        embs: list[np.ndarray | None] = [None] * len(feats)
        idx = [i for i, w in enumerate(want) if w]
        if idx:
            vecs = self.embedder.embed([feats[i].prompt for i in idx])
            for j, i in enumerate(idx):
                embs[i] = vecs[j]
        for f, emb in zip(feats, embs):
            stream = self.accounts.get(f.account)
            if stream is None:
                stream = self.accounts[f.account] = _Stream(self.classes, self.context, f.account, self.config.history)
            self.linker.observe(f)          # may merge clusters (and replay their histories)
            stream.observe(f, emb)
            root = self.linker.find(f.account)
            pooled = self.clusters.get(root) if self.linker.cluster_size(f.account) > 1 else None
            if pooled is not None and pooled.history and pooled.history[-1][0] is not f:
                pooled.observe(f, emb)
            yield stream, pooled

    def combined(self, raw: np.ndarray) -> tuple[float, list[float]]:
        """Fisher's combination -2 Σ ln p_d of the detectors' benign tail probabilities."""
        ps = [t.pvalue(s) for t, s in zip(self._tails, raw)]
        return -2.0 * sum(math.log(p) for p in ps), ps

    def _verdict(self, f: Features, stream: _Stream, pooled: _Stream | None) -> Verdict:
        cal = self.calibration
        score, ps = self.combined(stream.raw())
        source = stream
        if pooled is not None:
            pscore, pps = self.combined(pooled.raw())
            if pscore > score:
                score, ps, source = pscore, pps, pooled
        level = "flag" if score > cal.threshold else "watch" if score > cal.watch_threshold else "ok"
        reasons: tuple[str, ...] = ()
        if level != "ok":
            order = sorted(range(len(ps)), key=lambda i: ps[i])
            reasons = tuple(f"{self.names[i]}: {r} (benign p≈{ps[i]:.2g})" for i in order if ps[i] <= 0.05
                            for r in source.detectors[i].reasons())
        return Verdict(account=f.account, level=level, score=score, reasons=reasons,
                       cluster=self.linker.cluster_id(f.account) if pooled is not None else None, request=stream.n)

    def observe_batch(self, records: Sequence[dict]) -> list[Verdict]:
        """Verdicts for traffic records in time order; their prompts are embedded in one batch."""
        if self.calibration is None:
            raise ValueError("verdicts need a calibration; without one use step_batch for raw scores")
        feats = [extract(r) for r in records]
        return [self._verdict(f, s, p) for f, (s, p) in zip(feats, self.step_batch(feats))]

    def observe(self, record: dict) -> Verdict:
        return self.observe_batch([record])[0]
