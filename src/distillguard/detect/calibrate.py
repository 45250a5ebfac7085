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

Tails. Beyond the largest benign score a detector's tail is extrapolated (peaks over threshold,
a generalised Pareto fit: ``stats.EmpiricalTail``), so that evidence stronger than anything seen
in benign traffic counts for more than 1/(n+1); but no detector's p goes below the floor
(``tail_floor``, ``threshold_floor``): one detector alone adds at most the threshold less an
upper quantile of what the other D - 1 add under the null, so one detector, however extreme,
plus an ordinary rest of the detectors stays below the threshold: a flag needs several kinds of
evidence. The threshold there is the Fisher null chi²_{2D}(target) where the calibrated
threshold sits at it, and the calibrated threshold (one step: ``calibrate``) where the benign
population puts it higher, so that a campaign extreme on two detectors is not asked for three.

Threshold, cross-fitted. The combined score of each benign calibration account-day is its
maximum over the day's requests (a flag on any request flags the day). Those scores are
computed with tails fitted on the *other* folds of calibration accounts (5 folds by account),
so each day is scored as an unseen benign day would be, extrapolated tails included; scoring
days with tails that contain them would understate the benign tail exactly where the threshold
sits. The threshold is the larger of the (1 - target FPR) quantile of those scores and
chi²_{2D} at the target level (the Fisher null under independence); the quantile comes from a
generalised Pareto fit to the top 10% of the day scores (``pot_quantile``), not from the few
largest days, so one unusual benign day does not set it (issue 23). The held-out benign
accounts, disjoint from the reference and calibration accounts, give the empirical FPR that the
report states, per account and per account-day, with one-sided 95% Clopper-Pearson bounds, and
say whether they are enough to show the target at all (``size_check``).

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
    common: frozenset[str] = frozenset()  # reference.common_items: shared by benign users, no link
    stats: dict = field(default_factory=dict)  # account-day counts, held-out FPR, ...
    floor: float | None = None  # every tail's floor (calibrate: tail_floor or threshold_floor)

    @property
    def target_fpr(self) -> float:
        return self.config.target_fpr

    # ---- file format: one .npz (arrays + a JSON header), no pickle ----
    def save(self, path: str | Path) -> None:
        meta = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "threshold": self.threshold,
            "watch_threshold": self.watch_threshold,
            "embedder": self.embedder,
            "stats": self.stats,
            "detectors": list(self.tails),
            "common": sorted(self.common),
            "floor": self.floor,
        }
        arrays = {f"tail.{k}": t.sorted for k, t in self.tails.items()}
        if self.reference is not None:
            arrays |= {
                "ref.embeddings": self.reference.embeddings,
                "ref.centers": self.reference.centers,
                "ref.distances": self.reference.distances,
            }
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
            raise ConfigError(
                f"{path}: calibration format {meta.get('format')!r}, expected {FORMAT!r}"
            )
        reference = None
        if "ref.embeddings" in z:
            reference = Reference(
                embeddings=z["ref.embeddings"],
                centers=z["ref.centers"],
                distances=z["ref.distances"],
            )
        config = DetectConfig.from_dict(meta["config"])
        # stored since the floor follows the threshold (calibrate); a file saved before that
        # gets the null's floor (tail_floor), whose guarantee its threshold (never below the
        # null) keeps; recalibrating fits both
        floor = meta.get("floor") or tail_floor(config.target_fpr, len(meta["detectors"]))
        tails = {
            k: EmpiricalTail(z[f"tail.{k}"], config.tail_extrapolation, floor)
            for k in meta["detectors"]
        }
        return cls(
            config=config,
            reference=reference,
            tails=tails,
            threshold=meta["threshold"],
            watch_threshold=meta["watch_threshold"],
            embedder=meta["embedder"],
            common=frozenset(meta["common"]),
            floor=floor,
            stats=meta["stats"],
        )


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
        chunk = feats[i : i + batch]
        for f, (s, p) in zip(chunk, monitor.step_batch(chunk)):
            yield f, s, p
        if progress is not None:
            progress(len(chunk))


@dataclass
class Flags:
    """Who was flagged when ``feats`` were replayed through one monitor: the two ways the
    evaluation counts false positives (per account, flagged on any day counting once; and per
    account-day), and at which request each account was first flagged."""

    requests: dict[str, int] = field(default_factory=dict)  # account -> requests seen
    days: set[tuple[str, int]] = field(default_factory=set)  # (account, day) with a request
    flagged_days: set[tuple[str, int]] = field(default_factory=set)
    first_flag: dict[str, int] = field(default_factory=dict)  # account -> 1-based request index
    # for other thresholds from the same replay: each account-day's highest score, and each
    # account's running maximum as (request, score) at every new high
    day_max: dict[tuple[str, int], float] = field(default_factory=dict)
    highs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def flagged_accounts(self) -> int:
        return len(self.first_flag)

    def at(self, threshold: float) -> tuple[set[str], set[tuple[str, int]], dict[str, int]]:
        """(flagged accounts, flagged account-days, first flagged request) had the threshold been
        ``threshold`` (verdicts do not feed back into scores without embeddings)."""
        days = {k for k, v in self.day_max.items() if v > threshold}
        first = {
            a: next(n for n, v in hs if v > threshold)
            for a, hs in self.highs.items()
            if hs[-1][1] > threshold
        }
        return set(first), days, first


def replay_flags(
    calibration: Calibration, feats: list[Features], embedder=None, progress=None
) -> Flags:
    """Replay ``feats`` (time order) through one monitor, as the gateway would see them."""
    monitor = AccountMonitor(calibration, embedder=embedder)
    out = Flags()
    for f, s, p in _run(monitor, feats, progress=progress):
        key = (f.account, int(f.ts // DAY))
        out.days.add(key)
        out.requests[f.account] = s.n
        v = monitor._verdict(f, s, p)
        if v.score > out.day_max.get(key, -math.inf):
            out.day_max[key] = v.score
        hs = out.highs.setdefault(f.account, [])
        if not hs or v.score > hs[-1][1]:
            hs.append((s.n, v.score))
        if v.flagged:
            out.flagged_days.add(key)
            out.first_flag.setdefault(f.account, s.n)
    return out


def flagged_days(
    calibration: Calibration, feats: list[Features], embedder=None, progress=None
) -> tuple[int, int]:
    """(flagged benign account-days, account-days) when ``feats`` are scored with ``calibration``."""
    flags = replay_flags(calibration, feats, embedder=embedder, progress=progress)
    return len(flags.flagged_days), len(flags.days)


def cp_upper(flagged: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate from ``flagged`` of ``n`` trials."""
    if n <= 0:
        return 1.0
    if flagged >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, flagged + 1, n - flagged))


def accounts_needed(target_fpr: float, confidence: float = 0.95) -> int:
    """The fewest benign accounts whose clean check (none flagged) bounds the FPR by
    ``target_fpr``: the Clopper-Pearson bound with no exceedance is 1 - (1 - confidence)^(1/n),
    so n >= ln(1/alpha) / -ln(1 - target), about ln(1/alpha)/target (3,000 at 0.1% and 95%)."""
    alpha = 1.0 - confidence
    return math.ceil(math.log(1.0 / alpha) / -math.log1p(-target_fpr) - 1e-9)


def pot_quantile(samples: np.ndarray, p: float) -> float | None:
    """The score that benign days exceed with probability ``p``, from the peaks over threshold:
    with the top k of n samples above u fitted by a GPD (``stats.EmpiricalTail``, the fit the
    detectors' tails use), P(S >= s) = k/(n+1) GPD.sf(s - u), solved for s. None when p is not in
    the fitted tail (k/(n+1) <= p: the empirical quantile is well inside the data) or there
    is no fit (fewer than 40 samples, or a flat top).

    Why: at a 0.1% target on a few thousand account-days the empirical quantile is one of the
    top few order statistics, i.e. the single most unusual benign days, and moves with every
    outlier a larger or smaller calibration happens to contain (issue 23: 400 arena users gave
    91.5, 1,600 gave 59.7); a tail model fitted to the top 10% uses all of those days."""
    tail = EmpiricalTail(samples, max_extrapolation=math.inf)
    if tail.gpd is None:
        return None
    u, xi, sigma, k = tail.gpd
    q = p * (len(tail.sorted) + 1.0) / k  # the GPD's exceedance probability at the answer
    if q >= 1.0:
        return None
    return float(u + stats.genpareto.isf(q, xi, scale=sigma))


# The share of the null's sum of the other D - 1 detectors' -2 ln p that a detector at its floor
# leaves room for (``tail_floor``): the quantile of chi²_{2(D-1)} at this level.
FLOOR_ROOM = 0.75
# Below what that room is left: "threshold" (threshold_floor) or "null" (tail_floor alone).
FLOOR_FROM = "threshold"


def tail_floor(target_fpr: float, detectors: int, room: float = FLOOR_ROOM) -> float:
    """The smallest benign tail probability one detector may claim: -2 ln of it is the
    Fisher-null threshold chi²_{2D}(target) less the ``room`` quantile of chi²_{2(D-1)}, the
    sum the other D - 1 detectors add when their p are uniform (benign: the null).

    Why this and not a fixed share of the threshold: a benign account that is extreme in one
    respect (a user who refills a skeleton of their own: ``template``; a heavy user: ``volume``)
    is not rare, and its other detectors still add about 2 each (-2 ln of a uniform p). With
    the floor at 90% of the null (the rule before) one detector at its floor plus an ordinary
    rest crossed the calibrated threshold, which sits close to the null (issue 23: 8 of the 10
    benign accounts flagged on seeds 11/23/37). The calibrated threshold is never below the null
    (``calibrate``), so with this floor one detector, however extreme, flags only together with
    a rest that is itself beyond its null's ``room`` quantile: evidence of a second kind. Why a
    floor and not a rule such as "two detectors below p = 0.01": it keeps Fisher's one
    continuous score (the threshold, the watch level and the reasons read it), applies through
    the tails alike in ``detect()``, the calibration's cross-fitted threshold, the online
    monitor and the partitioned job, and leaves campaigns, which are extreme on several
    detectors at once, their score: two detectors at their floors reach 2 (null - the room
    quantile), above the null for every built-in set (D <= 10 at a 0.1% target; at D = 7,
    2 x 21.3 against 36.1), and the rest of a campaign adds its own. An upper quantile rather
    than the mean: the account is scored after every request and flagged at its maximum, so
    its rest gets many draws; not a higher one (0.9): at D >= 7 two floors would no longer pass
    the null, and campaigns extreme on two detectors (low-and-slow: ``fresh`` and ``template``)
    would need a third.

    With one detector there is no rest: its floor is the target itself, and it cannot pass the
    null threshold alone either."""
    return threshold_floor(float(stats.chi2.isf(target_fpr, 2 * detectors)), detectors, room)


def threshold_floor(threshold: float, detectors: int, room: float = FLOOR_ROOM) -> float:
    """``tail_floor`` with the room left below a calibrated ``threshold`` instead of the Fisher
    null: -2 ln of it is the threshold less the ``room`` quantile of chi²_{2(D-1)}. Never above
    the null's floor for a threshold at or above the null (calibrate's thresholds are)."""
    rest = float(stats.chi2.ppf(room, 2 * (detectors - 1))) if detectors > 1 else 0.0
    return math.exp(-0.5 * (threshold - rest))


def _raw_scores(monitor: AccountMonitor, feats: list[Features], progress=None):
    """Per request: (account-day key, own raw scores (D,), pooled raw scores (D,) or None, the
    account's share of its cluster's behaviour)."""
    for f, s, p in _run(monitor, feats, progress=progress):
        yield (
            (f.account, int(f.ts // DAY)),
            s.raw(),
            (p.raw() if p is not None else None),
            monitor.linker.share(f.account) if p is not None else 0.0,
        )


def _attributed(own: np.ndarray, pooled: np.ndarray, share) -> np.ndarray:
    """Own scores raised towards the cluster's by the account's share (AccountMonitor._verdict)."""
    return own + share * np.maximum(pooled - own, 0.0)


def _day_fisher(rows, tails: list[EmpiricalTail]) -> dict[tuple[str, int], float]:
    """Per account-day: the max over its requests of Fisher's -2 Σ ln p_d (own stream, raised
    towards the pooled stream's by the account's share)."""
    keys = [k for k, _, _, _ in rows]
    own = np.stack([r for _, r, _, _ in rows])  # (N, D)
    logp = np.stack([np.log(t.pvalues(own[:, j])) for j, t in enumerate(tails)], axis=1)
    score = -2.0 * logp.sum(axis=1)  # (N,)
    pooled_idx = [i for i, (_, _, p, s) in enumerate(rows) if p is not None and s > 0]
    if pooled_idx:
        pooled = np.stack([rows[i][2] for i in pooled_idx])
        share = np.array([rows[i][3] for i in pooled_idx])
        plogp = np.stack([np.log(t.pvalues(pooled[:, j])) for j, t in enumerate(tails)], axis=1)
        score[pooled_idx] = _attributed(score[pooled_idx], -2.0 * plogp.sum(axis=1), share)
    best: dict[tuple[str, int], float] = {}
    for k, v in zip(keys, score.tolist()):
        if v > best.get(k, -1.0):
            best[k] = v
    return best


def calibrate(
    records: Iterable[dict],
    *,
    config: DetectConfig | None = None,
    embedder=None,
    reference_share: float = 0.25,
    max_reference_accounts: int = 120,
    holdout_share: float = 0.25,
    folds: int = 5,
    seed: int = 0,
    progress=None,
    too_small: str = "allow",
    per: str = "account-day",
    floor_from: str | None = None,
) -> Calibration:
    """Calibrate on benign traffic records (labels, if any, are ignored: all must be benign).

    Accounts are split into reference (``reference_share``, at most ``max_reference_accounts``:
    the reference needs a few hundred prompts, the tails need every day they can get), held-out
    (``holdout_share``) and calibration (the rest, in ``folds`` folds for the cross-fitted
    threshold).

    ``per``: what the target counts, "account-day" (``DetectConfig.target_fpr``'s unit) or
    "account" (flagged on any day of the calibration's window counts once; issue 23's unit).

    ``too_small``: when the held-out accounts are too few to show the target FPR per account
    (``size_check``), "allow" only says so in ``stats`` ("verifiable", "size_message"), "refuse"
    raises ConfigError with that message. Either way the threshold is set from the tail of the
    benign days, not from their few largest (``pot_quantile``).

    ``floor_from``: where a detector at its tail floor leaves the rest's room, below the
    calibrated threshold ("threshold", ``threshold_floor``) or below the Fisher null ("null",
    ``tail_floor``: the rule of 54e98ad, kept for comparison); None: ``FLOOR_FROM``."""
    floor_from = floor_from or FLOOR_FROM
    if floor_from not in ("threshold", "null"):
        raise ConfigError(f"floor_from={floor_from!r}: expected 'threshold' or 'null'")
    if too_small not in ("allow", "refuse"):
        raise ConfigError(f"too_small={too_small!r}: expected 'allow' or 'refuse'")
    if per not in ("account-day", "account"):
        raise ConfigError(f"per={per!r}: expected 'account-day' or 'account'")
    config = config or DetectConfig()
    accounts = group_by_account(extract(r) for r in records)
    names = sorted(accounts)
    if len(names) < 8:
        raise ConfigError(
            f"calibration needs benign traffic of at least 8 accounts (got {len(names)}); "
            "thousands give a threshold that means something at a 0.1% FPR"
        )
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    n_ref = max(1, min(int(len(names) * reference_share), max_reference_accounts))
    n_hold = max(1, int(len(names) * holdout_share))
    ref_names, hold_names, cal_names = (
        names[:n_ref],
        names[n_ref : n_ref + n_hold],
        names[n_ref + n_hold :],
    )
    size = size_check(config.target_fpr, len(hold_names), holdout_share)
    if not size["verifiable"] and too_small == "refuse":
        raise ConfigError(size["size_message"])

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
        reference = Reference.build(
            streams, size=config.reference_size, topics=config.topics, seed=seed
        )

    common = common_items(accounts[a] for a in ref_names)
    monitor = AccountMonitor(config=config, reference=reference, common=common, embedder=embedder)
    rows = list(_raw_scores(monitor, _in_time_order(accounts, cal_names), progress=progress))
    if not rows:
        raise ConfigError("the calibration accounts sent no requests")
    D = len(monitor.names)
    maxima: dict[tuple[str, int], np.ndarray] = {}
    for k, own, pooled, share in rows:
        raw = own if pooled is None else _attributed(own, pooled, share)
        maxima[k] = np.maximum(maxima[k], raw) if k in maxima else raw
    day_keys = list(maxima)
    M = np.stack([maxima[k] for k in day_keys])  # (days, D)
    fold_of = {a: i % folds for i, a in enumerate(cal_names)}
    day_fold = np.array([fold_of[a] for a, _ in day_keys])
    cross_fit = len(cal_names) >= 2 * folds
    analytic = float(stats.chi2.isf(config.target_fpr, 2 * D))

    def fit(mask: np.ndarray, floor: float) -> list[EmpiricalTail]:
        return [EmpiricalTail(M[mask, j], config.tail_extrapolation, floor) for j in range(D)]

    def threshold_under(floor: float):
        """The threshold with every tail floored at ``floor``: (threshold, sorted benign
        scores, empirical quantile, tail-fit quantile)."""
        # cross-fitted day scores: each fold's days scored with tails fitted on the other folds
        day_scores_map: dict[tuple[str, int], float] = {}
        for i in range(folds if cross_fit else 0):
            fold_rows = [r for r in rows if fold_of[r[0][0]] == i]
            if fold_rows:
                day_scores_map |= _day_fisher(fold_rows, fit(day_fold != i, floor))
        if not day_scores_map:  # too few accounts to cross-fit: in-sample (optimistic; in stats)
            day_scores_map = _day_fisher(rows, fit(np.ones(len(day_keys), dtype=bool), floor))
        if per == "account":
            # the target per account over the calibration's window (flagged on any day counts
            # once), as the evaluation counts it: an account seen on d days has d chances
            best: dict[str, float] = {}
            for (a, _), v in day_scores_map.items():
                best[a] = max(best.get(a, -math.inf), v)
            day_scores_map = {(a, 0): v for a, v in best.items()}
        scores = np.sort(np.fromiter(day_scores_map.values(), dtype=np.float64))[::-1]
        n = len(scores)
        k = int(math.floor(config.target_fpr * n))  # days allowed above the threshold
        empirical = float(scores[min(k, n - 1)])
        fitted = pot_quantile(scores, config.target_fpr)
        # The fitted tail instead of the few largest days, so that one unusual benign day does
        # not set the threshold. Beyond the data (fewer days than 1/target) the fit is not
        # trusted to raise it above the largest benign day (a GPD on ~20 exceedances
        # extrapolates wildly); there the calibration is too small for its target, and
        # size_check says so.
        estimate = empirical
        if fitted is not None:
            estimate = fitted if n * config.target_fpr >= 1 else min(fitted, empirical)
        return max(estimate, analytic), scores, empirical, fitted

    # The floor leaves one detector's room below the threshold, not below the Fisher null
    # (floor_from="threshold"): first the threshold under the null's floor (tail_floor), then
    # the floor that leaves the rest's ``FLOOR_ROOM`` quantile below that threshold, and the
    # threshold again under it. The second threshold is never lower than the first (a lower
    # floor only raises scores), so a detector at its floor plus a rest at that quantile still
    # stays below it: tail_floor's guarantee, held against the threshold actually used. Where
    # the benign population puts the threshold far above the null (apps, heavy users, NATs:
    # 63.5 against 36.1 on detect_scale's generator) the null's floor asked three detectors at
    # their floors where two are extreme in a campaign (docs/detection-at-scale.md). One step
    # and not a fixed point: each step could raise the threshold again by as much as the floor
    # moved, and one step already keeps the guarantee.
    null_floor = tail_floor(config.target_fpr, D)
    threshold, day_scores, empirical, fitted = threshold_under(null_floor)
    threshold_null_floor, floor = threshold, null_floor
    if floor_from == "threshold" and D > 1 and threshold > analytic:
        floor = threshold_floor(threshold, D)
        threshold, day_scores, empirical, fitted = threshold_under(floor)
    n = len(day_scores)
    tails = dict(zip(monitor.names, fit(np.ones(len(day_keys), dtype=bool), floor)))
    cal = Calibration(
        config=config,
        reference=reference,
        tails=tails,
        threshold=threshold,
        watch_threshold=math.inf,
        embedder=embedder.signature if embedder is not None and reference is not None else None,
        common=common,
        floor=floor,
    )
    cal.watch_threshold = min(cal.threshold, float(day_scores[min(int(0.01 * n), n - 1)]))
    cal.stats = {
        "reference_accounts": len(ref_names),
        "calibration_accounts": len(cal_names),
        "calibration_account_days": len(maxima),
        "fpr_unit": per,  # what target_fpr counts: benign account-days or benign accounts
        "threshold_sample": n,
        "cross_fitted_folds": folds if cross_fit else 0,
        "threshold_empirical": empirical,
        "threshold_tail_fit": fitted,
        "threshold_fisher_null": analytic,
        "tail_floor": floor,
        "tail_floor_from": floor_from if floor != null_floor else "null",
        "tail_floor_null": null_floor,
        "threshold_null_floor": threshold_null_floor,  # the first step's (threshold_floor's room)
        "calibration_fpr": float((day_scores > cal.threshold).mean()),
        "heldout_accounts": len(hold_names),
    }
    flags = replay_flags(
        cal, _in_time_order(accounts, hold_names), embedder=embedder, progress=progress
    )
    fl, days = len(flags.flagged_days), len(flags.days)
    fa, na = flags.flagged_accounts, len(flags.requests)
    # counted the two ways bench/detect_fpr.py counts: per account-day, and per account (flagged
    # on any day counts once), each with its one-sided 95% Clopper-Pearson upper bound
    cal.stats |= {
        "heldout_account_days": days,
        "heldout_flagged_days": fl,
        "heldout_fpr": fl / days if days else None,
        "heldout_fpr_upper95": cp_upper(fl, days) if days else None,
        "heldout_flagged_accounts": fa,
        "heldout_account_fpr": fa / na if na else None,
        "heldout_account_fpr_upper95": cp_upper(fa, na) if na else None,
    }
    if size["size_message"]:
        size["size_message"] += (
            f"; this threshold: {cal.threshold:.1f}, from {n:,} benign "
            f"{'accounts' if per == 'account' else 'account-days'}"
        )
    cal.stats |= size
    return cal


def size_check(target_fpr: float, heldout_accounts: int, holdout_share: float) -> dict:
    """Whether the held-out benign accounts can show the target at all: even with none flagged,
    n accounts bound the FPR only by 1 - 0.05^(1/n) (95%), so a 0.1% target needs 2,995
    held-out accounts (~12,000 benign accounts at the default 25% held out). The message names
    both numbers and the two ways out."""
    needed = accounts_needed(target_fpr)
    reachable = cp_upper(0, heldout_accounts) if heldout_accounts else 1.0
    ok = heldout_accounts >= needed
    total = math.ceil(needed / holdout_share) if holdout_share > 0 else None
    return {
        "heldout_accounts_needed": needed,
        "verifiable": ok,
        "size_message": None
        if ok
        else (
            f"the calibration held out {heldout_accounts} benign accounts, but showing a false-"
            f"positive rate of {target_fpr:g} per account (95% Clopper-Pearson bound, even with "
            f"none flagged) needs {needed:,}: calibrate on at least {total:,} benign accounts, "
            f"or raise --target-fpr to {reachable:.2g}, the smallest rate these accounts can "
            "show. A small calibration also moves the threshold: the few most unusual benign "
            "days it happens to hold set it, and it tends to come out higher than a large "
            "calibration's, so extraction that scores below it is missed (on arena traffic, 400 "
            "benign users missed a slow harvester that 1,600 flagged: docs/detection.md)"
        ),
    }
