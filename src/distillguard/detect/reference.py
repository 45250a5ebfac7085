"""The benign reference the embedding detectors compare an account with.

Built from benign accounts only (a split disjoint from the accounts the thresholds are
calibrated on): a sample of prompt embeddings (MMD), k-means topic centres (coverage), the
distribution of PRADA inter-query distances of real users; and (``common_items``) the
templates and system prompts that several benign accounts share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

PRADA_LAG = 8  # a prompt's distance to the nearest of the account's previous 8 prompts


def nn_distances(emb: np.ndarray, lag: int = PRADA_LAG) -> np.ndarray:
    """PRADA distances of one account's prompt stream. emb: (T, D) unit rows -> (max(T-lag, 0),).

    d_t = min over the previous ``lag`` prompts of the cosine distance 1 - <e_t, e_s>
    (Juuti et al., PRADA, 2019, use the minimum distance to all previous queries; a fixed lag
    keeps the statistic stationary, so benign streams of any length share one reference).
    """
    if len(emb) <= lag:
        return np.empty(0)
    sims = emb @ emb.T  # (T, T)
    out = np.empty(len(emb) - lag)
    for t in range(lag, len(emb)):
        out[t - lag] = 1.0 - sims[t, t - lag : t].max()
    return out


def common_items(accounts: Iterable[list]) -> frozenset[str]:
    """Template signatures and system-prompt hashes that at least 2 benign accounts use: sharing
    them is what real users do, not evidence that two accounts are one actor."""
    users: Counter[str] = Counter()
    for feats in accounts:
        users.update({x for f in feats for x in (f.template, f.system_hash) if x})
    return frozenset(x for x, c in users.items() if c >= 2)


@dataclass
class Reference:
    embeddings: np.ndarray  # (R, D) benign prompt embeddings, unit rows
    centers: np.ndarray  # (K, D) k-means topic centres, unit rows
    distances: np.ndarray  # (M,) PRADA distances of benign accounts
    cache: dict = field(
        default_factory=dict, repr=False, compare=False
    )  # derived arrays (e.g. the MMD kernel)

    def topic(self, emb: np.ndarray) -> int:
        return int(np.argmax(self.centers @ emb))

    @classmethod
    def build(
        cls, streams: Iterable[tuple[list, np.ndarray]], *, size: int, topics: int, seed: int = 0
    ) -> Reference:
        """streams: per benign account, (features in time order, (T, D) embeddings)."""
        from sklearn.cluster import KMeans

        streams = list(streams)
        if not streams:
            raise ValueError("the benign reference needs at least one account")
        rng = np.random.default_rng(seed)
        allemb = np.concatenate([e for _, e in streams if len(e)])
        pick = rng.choice(len(allemb), size=min(size, len(allemb)), replace=False)
        # no more topics than distinct prompts (a small benign sample repeats "hi"): k-means would
        # warn and return duplicate centres
        k = min(topics, len(np.unique(allemb, axis=0)))
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(allemb)
        centers = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
        dists = [nn_distances(e) for _, e in streams]
        distances = np.concatenate(dists) if any(len(d) for d in dists) else np.empty(0)
        if len(distances) < 50:  # few long benign streams: fall back to prompts in random order
            distances = nn_distances(allemb[rng.permutation(len(allemb))[:2000]])
        return cls(
            embeddings=allemb[pick].astype(np.float32),
            centers=centers.astype(np.float32),
            distances=np.sort(distances),
        )
