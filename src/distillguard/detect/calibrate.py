"""Calibration on benign traffic only: one combined score, one threshold, a stated FPR.

Combination. Each detector's raw score becomes a benign tail probability p_d = P(a benign
account-day reaches a score this high), from the empirical distribution of benign
account-day maxima with the conformal +1 (never below 1/(n+1)). The account score is
Fisher's -2 Σ_d ln p_d. Why this and not the max of the p_d or a learnt model: the max lets
one detector flag alone, and a benign user who resembles an attacker in one respect (a heavy
user, a researcher who always asks for logprobs) sits in the extreme tail of that one
detector; Fisher needs several independent kinds of evidence at once, and with the floored
p_d no single detector can carry it. A classifier would need attack data, and we calibrate on
benign traffic only (an isolation forest could, but gives no p-values to explain a flag).

Threshold. The combined score of each benign calibration account-day is its maximum over the
day's requests (a flag on any request flags the day). The threshold is the larger of the
empirical (1 - target FPR) quantile of those maxima and chi²_{2D} at the target level (the
Fisher null under independence), so a small calibration set cannot give a threshold below what
the target allows. The held-out benign accounts, disjoint from the reference and calibration
accounts, give the empirical FPR that the report states.

Splits, by account: reference (embedding sample, topics, PRADA distances), calibration
(detector tails, threshold), held-out (empirical FPR).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from distillguard.detect.config import DetectConfig
from distillguard.detect.features import Features, extract
from distillguard.detect.monitor import AccountMonitor
from distillguard.detect.reference import Reference, common_items
from distillguard.detect.registry import select
from distillguard.detect.stats import EmpiricalTail
from distillguard.errors import ConfigError

DAY = 86_400.0
FORMAT = "distillguard-detect-calibration/2"  # 2: mmd scores m·MMD², not -log10 p


@dataclass
class Calibration:
    config: DetectConfig
    reference: Reference | None
    tails: dict[str, EmpiricalTail]
    threshold: float
    watch_threshold: float
    embedder: str | None
    common: frozenset[str] = frozenset()       # reference.common_items: shared by benign users, no link
    stats: dict = field(default_factory=dict)  # account-day counts, held-out FPR, ...

    @property
    def target_fpr(self) -> float:
        return self.config.target_fpr

    # ---- file format: one .npz (arrays + a JSON header), no pickle ----
    def save(self, path: str | Path) -> None:
        meta = {"format": FORMAT, "config": self.config.to_dict(), "threshold": self.threshold,
                "watch_threshold": self.watch_threshold, "embedder": self.embedder, "stats": self.stats,
                "detectors": list(self.tails), "common": sorted(self.common)}
        arrays = {f"tail.{k}": t.sorted for k, t in self.tails.items()}
        if self.reference is not None:
            arrays |= {"ref.embeddings": self.reference.embeddings, "ref.centers": self.reference.centers,
                       "ref.distances": self.reference.distances}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
        except FileNotFoundError:
            raise ConfigError(f"no such calibration file: {path}") from None
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"{path} is not a distillguard calibration file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path}: calibration format {meta.get('format')!r}, expected {FORMAT!r}")
        reference = None
        if "ref.embeddings" in z:
            reference = Reference(embeddings=z["ref.embeddings"], centers=z["ref.centers"],
                                  distances=z["ref.distances"])
        config = DetectConfig.from_dict(meta["config"])
        tails = {k: EmpiricalTail(z[f"tail.{k}"], config.tail_extrapolation) for k in meta["detectors"]}
        return cls(config=config, reference=reference, tails=tails,
                   threshold=meta["threshold"], watch_threshold=meta["watch_threshold"],
                   embedder=meta["embedder"], common=frozenset(meta["common"]), stats=meta["stats"])


def group_by_account(feats: Iterable[Features]) -> dict[str, list[Features]]:
    out: dict[str, list[Features]] = defaultdict(list)
    for f in feats:
        out[f.account].append(f)
    return out


def _in_time_order(accounts: dict[str, list[Features]], names: Iterable[str]) -> list[Features]:
    return sorted((f for a in names for f in accounts[a]), key=lambda f: f.ts)


def _run(monitor: AccountMonitor, feats: list[Features], batch: int = 256, progress=None):
    """Yield (features, account stream, pooled stream) per request, embedding in batches."""
    for i in range(0, len(feats), batch):
        chunk = feats[i:i + batch]
        for f, (s, p) in zip(chunk, monitor.step_batch(chunk)):
            yield f, s, p
        if progress is not None:
            progress(len(chunk))


def day_maxima(monitor: AccountMonitor, feats: list[Features], progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per (account, day): the maximum raw score of each detector (own or pooled stream).

    Returns (maxima (N_days, D), keys). Raw scores only: no calibration needed yet.
    """
    best: dict[tuple[str, int], np.ndarray] = {}
    for f, s, p in _run(monitor, feats, progress=progress):
        raw = s.raw()
        if p is not None:
            raw = np.maximum(raw, p.raw())
        key = (f.account, int(f.ts // DAY))
        best[key] = np.maximum(best[key], raw) if key in best else raw
    keys = list(best)
    return (np.stack([best[k] for k in keys]) if keys else np.empty((0, len(monitor.names)))), keys


def flagged_days(calibration: Calibration, feats: list[Features], embedder=None, progress=None) -> tuple[int, int]:
    """(flagged benign account-days, account-days) when ``feats`` are scored with ``calibration``."""
    monitor = AccountMonitor(calibration, embedder=embedder)
    days, flagged = set(), set()
    for f, s, p in _run(monitor, feats, progress=progress):
        key = (f.account, int(f.ts // DAY))
        days.add(key)
        if key not in flagged and monitor._verdict(f, s, p).flagged:
            flagged.add(key)
    return len(flagged), len(days)


def calibrate(records: Iterable[dict], *, config: DetectConfig | None = None, embedder=None,
              reference_share: float = 0.25, holdout_share: float = 0.25, seed: int = 0,
              progress=None) -> Calibration:
    """Calibrate on benign traffic records (labels, if any, are ignored: all must be benign)."""
    config = config or DetectConfig()
    accounts = group_by_account(extract(r) for r in records)
    names = sorted(accounts)
    if len(names) < 8:
        raise ConfigError(f"calibration needs benign traffic of at least 8 accounts (got {len(names)}); "
                          "thousands give a threshold that means something at a 0.1% FPR")
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    n_ref = max(1, int(len(names) * reference_share))
    n_hold = max(1, int(len(names) * holdout_share))
    ref_names, hold_names, cal_names = names[:n_ref], names[n_ref:n_ref + n_hold], names[n_ref + n_hold:]

    reference = None
    if any(c.uses_embeddings for c in select(config.detectors)):
        if embedder is None:
            from distillguard.detect.embed import shared_embedder

            embedder = shared_embedder()
        streams = []
        for a in ref_names:
            fs = accounts[a][: config.window * 4]
            streams.append((fs, embedder.embed([f.prompt for f in fs])))
            if progress is not None:
                progress(len(accounts[a]))
        reference = Reference.build(streams, size=config.reference_size, topics=config.topics, seed=seed)

    common = common_items(accounts[a] for a in ref_names)
    monitor = AccountMonitor(config=config, reference=reference, common=common, embedder=embedder)
    maxima, _ = day_maxima(monitor, _in_time_order(accounts, cal_names), progress=progress)
    tails = {n: EmpiricalTail(maxima[:, j], config.tail_extrapolation) for j, n in enumerate(monitor.names)}
    cal = Calibration(config=config, reference=reference, tails=tails, threshold=math.inf, watch_threshold=math.inf,
                      embedder=embedder.signature if embedder is not None and reference is not None else None,
                      common=common)
    # combined score per account-day: the max over its requests of Fisher's statistic, which is
    # monotone in each raw score, so the per-day max of the combination ≤ combination of maxima;
    # replay to get it exactly.
    scorer = AccountMonitor(cal, embedder=embedder)
    best: dict[tuple[str, int], float] = {}
    for f, s, p in _run(scorer, _in_time_order(accounts, cal_names)):
        score = scorer.combined(s.raw())[0]
        if p is not None:
            score = max(score, scorer.combined(p.raw())[0])
        key = (f.account, int(f.ts // DAY))
        best[key] = max(best.get(key, -1.0), score)
    day_scores = np.sort(np.fromiter(best.values(), dtype=np.float64))[::-1]
    n = len(day_scores)
    k = int(math.floor(config.target_fpr * n))           # days allowed above the threshold
    empirical = float(day_scores[min(k, n - 1)])
    analytic = float(stats.chi2.isf(config.target_fpr, 2 * len(tails)))
    cal.threshold = max(empirical, analytic)
    cal.watch_threshold = min(cal.threshold, float(day_scores[min(int(0.01 * n), n - 1)]))
    cal.stats = {"reference_accounts": len(ref_names), "calibration_accounts": len(cal_names),
                 "calibration_account_days": n, "threshold_empirical": empirical, "threshold_fisher_null": analytic,
                 "calibration_fpr": float((day_scores > cal.threshold).mean()), "heldout_accounts": len(hold_names)}
    fl, days = flagged_days(cal, _in_time_order(accounts, hold_names), embedder=embedder, progress=progress)
    cal.stats |= {"heldout_account_days": days, "heldout_flagged_days": fl,
                  "heldout_fpr": fl / days if days else None,
                  # one-sided 95% upper bound (Clopper-Pearson) on the held-out FPR
                  "heldout_fpr_upper95": float(stats.beta.ppf(0.95, fl + 1, days - fl)) if days else None}
    return cal
