"""The power of the canary test (:mod:`distillguard.forensics.canaries`) at the number of canaries
an account was served: what its "not traced" can say.

The test combines each canary's rank p-value p = r / (D + 1) (D decoys) by Fisher's statistic
T = -2 Σ log p_i against χ²(2c) for c canaries. The alternative is stated as a **memorised
fraction** θ: each canary is, independently, learned well enough to rank first with probability
θ, and otherwise ranks at chance (uniform on 1..D+1), so P(r = 1) = θ + (1 - θ)/(D + 1). The
count of first ranks is then sufficient for θ, which gives the observed θ and its exact
(Clopper-Pearson) interval.

T's distribution under the alternative is the c-fold convolution of one canary's D + 1 values,
computed on a grid of 0.02 by FFT (the rounding moves T by about 0.02·√(c/12): 0.2 at 1,000
canaries, where T's own spread is about 60); beyond 1,000 canaries by the normal approximation.
``tests/forensics/test_power.py`` checks the stated power against simulated ranks.

A property of the test this makes visible: rank p-values are discrete, so one canary's
-2 log p has mean below χ²'s 2 under H0 (1.76 with 19 decoys); a memorised fraction too small
to lift it above 2 (about 0.06 at 19 decoys) is never detected, however many canaries.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chi2, norm

from distillguard.watermark.power import POWER, Power, clopper_pearson, smallest_n

# past this many canaries "serve more" has stopped meaning anything
_MAX_CANARIES = 10**7

_STEP = 0.02  # grid of T
_EXACT_UP_TO = 1_000  # canaries; the normal approximation beyond (CLT: a sum of 1,000)


def _values(decoys: int) -> np.ndarray:
    """-2 log p of each rank 1..D+1."""
    return -2.0 * np.log(np.arange(1, decoys + 2) / (decoys + 1))


def _probs(theta: float, decoys: int) -> np.ndarray:
    q = np.full(decoys + 1, (1 - theta) / (decoys + 1))
    q[0] += theta
    return q


def fisher_power(theta: float, canaries: int, decoys: int, level: float) -> float:
    """P(Fisher's combination of ``canaries`` rank p-values passes ``level``) when each canary is
    ranked first w.p. θ and uniformly otherwise."""
    if canaries <= 0:
        return 0.0
    crit = float(chi2.isf(level, 2 * canaries))
    values, probs = _values(decoys), _probs(theta, decoys)
    if canaries * values[0] < crit:
        return 0.0  # even every canary ranked first falls short
    if canaries > _EXACT_UP_TO:
        mean = float(probs @ values)
        var = float(probs @ values**2) - mean**2
        return float(norm.sf((crit - canaries * mean) / math.sqrt(canaries * var)))
    bins = np.rint(values / _STEP).astype(np.int64)
    one = np.zeros(int(bins.max()) + 1)
    np.add.at(one, bins, probs)
    size = canaries * (len(one) - 1) + 1
    length = 1 << (size - 1).bit_length()
    total = np.fft.irfft(np.fft.rfft(one, length) ** canaries, length)[:size]
    total = np.clip(total, 0, None)
    first = math.ceil(crit / _STEP - 1e-9)
    return float(min(1.0, total[first:].sum()))


def canary_power(canaries: int, top1: int, decoys: int, level: float) -> Power:
    """:class:`Power` of one account's canary test: ``top1`` of its ``canaries`` ranked first."""
    chance = 1 / (decoys + 1)
    advice = [
        "serve more canaries to the account (an earlier canary level on the ladder, or a "
        "longer canary phase before blocking)",
        "test a suspect trained on more of the account's answers (canaries count only if it "
        "trained on them)",
    ]
    if 2 * math.log(decoys + 1) < float(chi2.isf(level, 2)):
        advice.append(
            f"more decoys (--decoys; at {decoys}, one canary's best p is {chance:.2g}, weaker "
            f"than the level {level:.2g})"
        )
    mde = None
    if fisher_power(1.0, canaries, decoys, level) >= POWER:
        mde = brentq(
            lambda t: fisher_power(t, canaries, decoys, level) - POWER, 0.0, 1.0, xtol=1e-4
        )
    low, high = clopper_pearson(top1, canaries)

    def theta(rate: float) -> float:  # the memorised fraction that gives this first-rank rate
        return (rate - chance) / (1 - chance)

    observed = theta(top1 / canaries)
    at, needed_for = (observed, "observed") if observed > 0 else (theta(high), "upper bound")
    if at <= 0:
        needed_for = "none"
    reach = power_n = None
    if at > 0:
        values = _values(decoys)
        mean = float(_probs(at, decoys) @ values)
        reach = smallest_n(
            lambda c: c * mean >= float(chi2.isf(level, 2 * c)), canaries, _MAX_CANARIES
        )
        power_n = smallest_n(
            lambda c: fisher_power(at, c, decoys, level) >= POWER, canaries, _MAX_CANARIES
        )
    return Power(
        test="fisher-rank",
        effect="a memorised fraction (canaries ranked first beyond chance)",
        level=level,
        units=canaries,
        unit="canaries",
        effective_units=float(canaries),
        mde=mde,
        observed=observed,
        ci=(theta(low), theta(high)),
        power_at_observed=fisher_power(max(observed, 0.0), canaries, decoys, level),
        needed_for=needed_for,
        units_to_reach_level=reach,
        units_for_power=power_n,
        advice=advice,
    )


__all__ = ["canary_power", "fisher_power"]
