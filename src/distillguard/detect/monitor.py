"""Online scoring: ``AccountMonitor(calibration).observe(record) -> Verdict``.

One monitor follows every account of a gateway (or of a traffic file): it keeps each
account's detectors, embeds prompts in batches (``observe_batch``), links accounts, and pools
the streams of linked accounts so that a campaign spread over many keys is scored as one
actor. An account's score is its own, raised towards its cluster's only in proportion to its
own link evidence (``Linker.share``; linking.py).

Cost per request: features, a cached MiniLM embedding (batched), O(1) detector updates, and
every ``stride`` prompts an MMD permutation test on a 64 x 256 window (~ms). The gateway calls
it from a background task, off the request path.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special
from threadpoolctl import ThreadpoolController

from distillguard.detect.config import DetectConfig
from distillguard.detect.features import Features, extract
from distillguard.detect.linking import Linker, LinkingDetector
from distillguard.detect.reference import Reference
from distillguard.detect.registry import Context, Detector, select

LEVELS = ("ok", "watch", "flag")
_blas: ThreadpoolController | None = None


def _one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. The detectors' products are small
    ((64, 384) x (384, 256) for MMD): on the shared 2-core machine OpenBLAS's second thread made
    each MMD window cost 47 ms of CPU instead of 0.8 ms (spin-waiting for a busy core), about as
    much as MiniLM. ThreadpoolController.limit costs ~8 us, so it wraps every request."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


class _TailPvalue:
    """``EmpiricalTail.pvalue`` for one scalar, as a monitor calls it per detector per request.

    The same arithmetic with two cheaper calls: ``bisect`` on a list for numpy's scalar
    ``searchsorted``, and the generalised Pareto survival function as scipy's ``genpareto._sf``
    computes it (``special.inv_boxcox(-x, -ξ)`` on the support 0 < x < b) without the frozen
    distribution's argument machinery, which cost ~0.3 ms a call and was a third of offline
    scoring when many scores lie beyond the benign data. tests/detect/test_tail_pvalue.py checks
    equality with ``EmpiricalTail.pvalue``."""

    __slots__ = ("tail", "sorted", "n", "gpd", "floor", "max_extrapolation")

    def __init__(self, tail):
        self.tail = tail
        self.sorted = tail.sorted.tolist()
        self.n = len(self.sorted)
        self.gpd = tail.gpd
        self.floor = tail.floor
        self.max_extrapolation = tail.max_extrapolation

    def __call__(self, s: float) -> float:
        if s != s:  # NaN: bisect and searchsorted order it differently
            return self.tail.pvalue(s)
        n = self.n
        greater_eq = n - bisect.bisect_left(self.sorted, s)
        p = (1.0 + greater_eq) / (1.0 + n)
        if greater_eq == 0 and self.gpd is not None:
            u, xi, sigma, k = self.gpd
            x = (s - u) / sigma
            if x <= 0:
                sf = 1.0
            elif xi < 0 and x >= -1.0 / xi:
                sf = 0.0
            else:
                sf = float(special.inv_boxcox(-x, -xi))
            p = max(min(p, k / (n + 1.0) * sf), p / self.max_extrapolation)
        return max(p, self.floor)


@dataclass(frozen=True)
class Verdict:
    account: str
    level: str  # "ok" | "watch" | "flag" (the policy ladder keys on it)
    score: float  # combined evidence (Fisher's -2 Σ ln p over detectors), larger = worse
    reasons: tuple[str, ...]
    cluster: (
        str | None
    )  # the community whose pooled score counted for this account (share > 0), else None
    request: int  # 1-based index of this request within the account
    # the account's community (the linker's own set, not a copy) when its own link evidence is
    # beyond chance (share > 0): set with ``cluster``, and on a flag even where the account's own
    # score beat the pooled one (a hydra key flagged on its own is still one actor with the
    # others). OnlineDetection counts the flag for it (an id names a community only while it lasts)
    members: frozenset[str] | None = None

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
        self.embedding_detectors = [d for d in self.detectors if d.uses_embeddings]
        # history entries are [features, embedding] lists: a deferred prompt's embedding is
        # filled in when the account's backlog is embedded (replayed if accounts are linked)
        self.history: deque[list] = deque(maxlen=history)
        self.n = 0
        self.embeddable = 0  # prompts the embedding policy would embed (first turns by default)
        self.embedded = 0
        self.deferred: list[
            list
        ] = []  # history entries waiting for the account to reach `embed_after`
        self.active = False  # the backlog has been embedded: embed as prompts come
        self.flagged = False  # flagged once: embed only 1 in `embed_every_flagged` from then on

    def observe(
        self,
        f: Features,
        emb: np.ndarray | None,
        *,
        embeddable: bool = False,
        deferred: bool = False,
    ) -> None:
        self.n += 1
        self.embeddable += embeddable
        self.embedded += emb is not None
        entry = [f, emb]
        self.history.append(entry)
        if deferred:
            self.deferred.append(entry)
        for d in self.detectors:
            d.observe(f, emb)

    def catch_up(self, entries: list[list]) -> None:
        """Feed embeddings that arrived late (a deferred backlog) to the embedding detectors only:
        the others saw these requests already, and the embedding detectors ignore prompts without
        an embedding, so the end state is the one eager embedding would have reached."""
        for f, emb in entries:
            self.embedded += 1
            for d in self.embedding_detectors:
                d.observe(f, emb)

    def raw(self) -> np.ndarray:
        return np.array([d.score() for d in self.detectors])


class AccountMonitor:
    """Incremental detection over a request stream of many accounts.

    With a :class:`~distillguard.detect.calibrate.Calibration` it returns verdicts; without one
    (``config`` and ``reference`` given) it only yields raw detector scores, which is how the
    calibration learns the benign distributions.
    """

    def __init__(
        self,
        calibration=None,
        *,
        config: DetectConfig | None = None,
        reference: Reference | None = None,
        common: frozenset[str] = frozenset(),
        embedder=None,
    ):
        self.calibration = calibration
        self.config = calibration.config if calibration is not None else (config or DetectConfig())
        reference = calibration.reference if calibration is not None else reference
        self.classes = select(self.config.detectors)
        self.names = [c.name for c in self.classes]
        self.needs_embeddings = (
            any(c.uses_embeddings for c in self.classes) and reference is not None
        )
        if self.needs_embeddings and embedder is None:
            from distillguard.detect.embed import shared_embedder

            embedder = shared_embedder()
        if (
            calibration is not None
            and embedder is not None
            and embedder.signature != calibration.embedder
        ):
            from distillguard.errors import ConfigError

            raise ConfigError(
                f"the calibration was made with embedder {calibration.embedder}, not "
                f"{embedder.signature}; recalibrate with this embedder"
            )
        self.embedder = embedder
        if calibration is not None:
            common = calibration.common
        self.linker = Linker(min_evidence=self.config.link_min_evidence, common=frozenset(common))
        self.context = Context(self.config, reference, self.linker)
        self.accounts: dict[str, _Stream] = {}
        self.clusters: dict[frozenset[str], _Stream] = {}  # community -> pooled stream
        self._cluster_of: dict[str, frozenset[str]] = {}  # account -> its entry in clusters
        if calibration is not None:
            self._tails = [_TailPvalue(calibration.tails[n]) for n in self.names]

    # ---- cluster pooling ----
    def _pooled(self, account: str) -> _Stream | None:
        """The pooled stream of the account's community (None when alone), rebuilt from its
        members' histories when the community changed."""
        members = self.linker.community(account)
        if members is None:
            return None
        pooled = self.clusters.get(members)
        if pooled is not None:
            return pooled
        # communities these accounts left (live ones are disjoint: each account indexes its own;
        # scanning every cluster here grew with the population)
        for old in {self._cluster_of.get(a) for a in members}:
            if old is not None and old in self.clusters:
                del self.clusters[old]
        merged = sorted(
            (item for a in members if a in self.accounts for item in self.accounts[a].history),
            key=lambda fe: fe[0].ts,
        )
        for a in members:  # linked accounts are suspects: no more deferring their embeddings
            if a in self.accounts:
                self.accounts[a].active = True
        pooled = _Stream(self.classes, self.context, min(members), self.config.history)
        for f, emb in merged[-self.config.history :]:
            pooled.observe(f, emb)
        self.clusters[members] = pooled
        for a in members:
            self._cluster_of[a] = members
        return pooled

    # ---- observing ----
    SKIP, DEFER, EMBED, ACTIVATE = range(4)

    def _plan(self, feats: Sequence[Features]) -> list[int]:
        """What to do with each request's prompt (MiniLM is most of the cost). The embedding
        budget (DetectConfig):

        - follow-up turns are not embedded (unless ``embed_followups``): a conversation stays on
          its first turn's topic;
        - an account's first ``embed_after - 1`` embeddable prompts are deferred (DEFER): the
          embedding detectors are silent below ``min_prompts`` anyway, and most accounts never send
          that many; the backlog is embedded when the account reaches ``embed_after`` (ACTIVATE) or
          is linked to another account, so no score changes, only the cost of light users goes;
        - after the first ``window`` embedded prompts, 1 request in ``embed_every``; once the account
          is flagged, 1 in ``embed_every_flagged`` (the evidence is in; the reasons stay fresh).
        """
        cfg = self.config
        plan: list[int] = []
        state: dict[
            str, list
        ] = {}  # account -> [requests, embeddable, embedded, active], as of this request
        for f in feats:
            st = state.get(f.account)
            if st is None:
                s = self.accounts.get(f.account)
                st = state[f.account] = (
                    [s.n, s.embeddable, s.embedded, s.active] if s else [0, 0, 0, False]
                )
            st[0] += 1
            if (
                not self.needs_embeddings
                or not f.has_text
                or (f.continues and not cfg.embed_followups)
            ):
                plan.append(self.SKIP)
                continue
            st[1] += 1
            if not st[3] and self.linker.cluster_size(f.account) == 1 and st[1] < cfg.embed_after:
                plan.append(self.DEFER)
            elif not st[3]:
                st[2], st[3] = st[1], True  # the backlog and this prompt
                plan.append(self.ACTIVATE)
            else:
                s = self.accounts.get(f.account)
                every = cfg.embed_every_flagged if s is not None and s.flagged else cfg.embed_every
                take = st[2] < cfg.window or st[0] % every == 0
                st[2] += take
                plan.append(self.EMBED if take else self.SKIP)
        return plan

    def step_batch(self, feats: Sequence[Features]) -> Iterator[tuple[_Stream, _Stream | None]]:
        """Observe features (time order), embedding their prompts in one batch; yields, right after
        each request is observed, the account's stream and its cluster's (None when alone).

        A generator on purpose: read each stream's scores before asking for the next request."""
        plan = self._plan(feats)
        activated = {f.account for f, a in zip(feats, plan) if a == self.ACTIVATE}
        texts = [
            f.prompt
            for f, a in zip(feats, plan)
            if a in (self.EMBED, self.ACTIVATE) or (a == self.DEFER and f.account in activated)
        ]
        texts += [
            e[0].prompt for a in activated if a in self.accounts for e in self.accounts[a].deferred
        ]
        lookup = (
            dict(zip(texts, self.embedder.embed(texts))) if texts else {}
        )  # one batch; the cache dedups
        # without embeddings no detector calls BLAS, and the limit's ~50 us a request was a tenth of
        # that scorer's CPU
        blas = _one_blas_thread if self.needs_embeddings else contextlib.nullcontext
        for f, action in zip(feats, plan):
            stream = self.accounts.get(f.account)
            if stream is None:
                stream = self.accounts[f.account] = _Stream(
                    self.classes, self.context, f.account, self.config.history
                )
            with blas():
                self.linker.observe(f)
                pooled = self._pooled(
                    f.account
                )  # may rebuild a community's stream from its members
                if action == self.ACTIVATE or (stream.active and stream.deferred):
                    self._flush(stream, pooled, lookup)
                if (
                    action == self.DEFER and stream.active
                ):  # linked within this batch: embed it after all
                    action = self.EMBED
                emb = None
                if action in (self.EMBED, self.ACTIVATE):
                    emb = lookup.get(f.prompt)
                    if emb is None:
                        emb = lookup[f.prompt] = self.embedder.embed([f.prompt])[0]
                stream.observe(
                    f, emb, embeddable=action != self.SKIP, deferred=action == self.DEFER
                )
                if pooled is not None and pooled.history and pooled.history[-1][0] is not f:
                    pooled.observe(f, emb)
            yield stream, pooled

    def _flush(self, stream: _Stream, pooled: _Stream | None, lookup: dict) -> None:
        """Embed an account's deferred backlog; its (and its cluster's) embedding detectors see it."""
        entries, stream.deferred, stream.active = stream.deferred, [], True
        missing = [e[0].prompt for e in entries if e[0].prompt not in lookup]
        if missing:
            lookup.update(zip(missing, self.embedder.embed(missing)))
        for e in entries:
            e[1] = lookup[e[0].prompt]
        stream.catch_up(entries)
        if pooled is not None:
            pooled.catch_up(entries)

    def combined(self, raw: np.ndarray) -> tuple[float, list[float]]:
        """Fisher's combination -2 Σ ln p_d of the detectors' benign tail probabilities."""
        ps = [t(s) for t, s in zip(self._tails, raw)]
        return -2.0 * sum(math.log(p) for p in ps), ps

    def _verdict(
        self, f: Features, stream: _Stream, pooled: _Stream | None, *, explain: bool = True
    ) -> Verdict:
        """The account's verdict after request ``f``; ``explain=False`` leaves the reasons out
        (building them is a third of a flagged request's cost; the offline report keeps only the
        reasons of an account's highest score)."""
        cal = self.calibration
        score, ps = self.combined(stream.raw())
        own, source, share = score, stream, 0.0
        if pooled is not None:
            # the cluster's behaviour counts for this account only as far as its own links prove
            # it one actor with the others (linking.py, "Attribution")
            pscore, pps = self.combined(pooled.raw())
            share = self.linker.share(f.account) if pscore > score else 0.0
            if share > 0:
                score = score + share * (pscore - score)
                if share >= 1:  # wholly its own: the cluster's detectors explain it
                    ps, source = pps, pooled
        level = (
            "flag" if score > cal.threshold else "watch" if score > cal.watch_threshold else "ok"
        )
        stream.flagged = (
            stream.flagged or level == "flag"
        )  # sticky: thins its embeddings from now on
        reasons: tuple[str, ...] = ()
        cluster = self.linker.cluster_id(f.account) if share > 0 else None
        if level != "ok" and explain:
            order = sorted(range(len(ps)), key=lambda i: ps[i])
            # the linking detector speaks for the account itself: its own links, with their weights
            reasons = tuple(
                f"{self.names[i]}: {r} (benign p≈{ps[i]:.2g})"
                for i in order
                if ps[i] <= 0.05
                for r in (stream if self.names[i] == "linking" else source).detectors[i].reasons()
            )
            if cluster is not None:
                reasons += (
                    f"cluster {cluster} of {self.linker.cluster_size(f.account)} accounts: its pooled "
                    f"score {pscore:.1f} counts {share:.0%} for this account (own score {own:.1f})",
                )
        return Verdict(
            account=f.account,
            level=level,
            score=score,
            reasons=reasons,
            cluster=cluster,
            request=stream.n,
            members=self.linker.community(f.account)
            if cluster is not None
            or (level == "flag" and pooled is not None and self.linker.share(f.account) > 0)
            else None,
        )

    def observe_batch(self, records: Sequence[dict]) -> list[Verdict]:
        """Verdicts for traffic records in time order; their prompts are embedded in one batch."""
        if self.calibration is None:
            raise ValueError(
                "verdicts need a calibration; without one use step_batch for raw scores"
            )
        feats = [extract(r) for r in records]
        return [self._verdict(f, s, p) for f, (s, p) in zip(feats, self.step_batch(feats))]

    def observe(self, record: dict) -> Verdict:
        return self.observe_batch([record])[0]
