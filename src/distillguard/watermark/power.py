"""What a "not traced" can say: the power of a watermark test at the size it was run.

Every test of this package is one-sided on a score S = Σ_i w_i·g_i over independent units
(distinct (context, token) pairs, SynthID table indices, the suspect's contexts), with
g_i ~ Bernoulli(γ) under H0 (γ = 1/2 for SynthID's g-values) and weights w_i that do not depend
on the key. The alternative here shifts every unit's green probability by the same δ:

    δ = E[g] - γ     the green-fraction excess (green lists), the mean g-value shift (SynthID)

so E[S] = (γ + δ)·Σw. A key is traced when its p-value passes Holm's first step, p <= α/m for
m keys, so that is the ``level`` a leaking account's key must reach.

Power is computed from the test's own decision rule: the exact binomial tail for unweighted
scores (every w_i = 1); for weighted scores the normal approximation of S (mean (γ+δ)·Σw,
variance (γ+δ)(1-γ-δ)·Σw²) against the test's critical z, which the caller may give (the open
test's Chernoff bound rejects later than a normal test would; its critical z comes from the
bound itself). Both are checked against simulated scores at a known δ in
``tests/watermark/test_power.py``.

Reported next to a negative result: the smallest δ the test detects with 80% power at this
size, the observed δ with a 95% interval, and how many units (and queries, at the observed
units per query) the observed δ would need: to reach the level in an average run, and to be
detected with 80% power. When the observed δ is not positive, the sizes are for the interval's
upper end (the largest effect the data leave plausible), and say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import bdtrc, betaincinv
from scipy.stats import norm

POWER = 0.8  # the conventional target: a real effect of the stated size is missed 1 time in 5
CONFIDENCE = 0.95
_MAX_UNITS = 10**12  # beyond this "needs more data" has stopped meaning anything


@dataclass(frozen=True)
class Power:
    """The power statement of one key's test at the size it was run."""

    test: str  # the decision rule the power is for: binomial | weighted | chernoff | fisher-rank
    effect: str  # what the effect measures
    level: float  # the p-value a key must reach to be traced (alpha / keys)
    units: int  # scored units
    unit: str  # what a unit is ("distinct (context, token) pairs", "canaries", ...)
    effective_units: float  # (Σw)² / Σw²: the units an unweighted test of equal power would need
    mde: float | None  # smallest effect detected with 80% power here; None: none can be
    observed: float
    ci: tuple[float, float]  # 95% interval of the observed effect
    power_at_observed: float
    needed_for: str  # the effect the sizes below are for: "observed" | "upper bound" | "none"
    units_to_reach_level: int | None  # None: no effect to scale (not positive even at the bound)
    units_for_power: int | None
    per_query: float | None = None  # units per query (answer, prompt, canary)
    query: str = "queries"
    advice: list[str] = field(default_factory=list)
    # the most independent units the scheme has (SynthID: its g-value table); None: unbounded
    unit_cap: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Power:
        """The inverse of :meth:`to_dict` (its derived query counts dropped)."""
        names = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if k == "ci" else v for k, v in data.items() if k in names})

    def queries(self, units: int | None) -> int | None:
        if units is None or not self.per_query:
            return None
        return math.ceil(units / self.per_query)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci"] = list(self.ci)
        out["queries_to_reach_level"] = self.queries(self.units_to_reach_level)
        out["queries_for_power"] = self.queries(self.units_for_power)
        return out

    def summary(self) -> str:
        """Two or three sentences for a terminal, next to "not traced"."""

        def num(x: int | None) -> str:
            return "-" if x is None else f"{x:,}"

        lines = [
            f"power: {self.units:,} {self.unit} detect {self.effect} of "
            + (
                f"{self.mde:+.4f}"
                if self.mde is not None
                else "no size (the level is out of reach)"
            )
            + f" or more with {POWER:.0%} power at p <= {self.level:.2g}"
            + f"; observed {self.observed:+.4f} (95% CI {self.ci[0]:+.4f} to {self.ci[1]:+.4f})."
        ]
        if self.units_for_power is not None:
            q_level, q_power = (
                self.queries(self.units_to_reach_level),
                self.queries(self.units_for_power),
            )
            at = "that effect" if self.needed_for == "observed" else "the CI's upper end"
            lines.append(
                f"At {at}, ~{num(self.units_to_reach_level)} {self.unit}"
                + (f" (~{num(q_level)} {self.query})" if q_level is not None else "")
                + f" would reach the level in an average run, ~{num(self.units_for_power)}"
                + (f" (~{num(q_power)} {self.query})" if q_power is not None else "")
                + f" for {POWER:.0%} power."
            )
        elif self.needed_for == "none":
            lines.append("No positive effect is left plausible: more data would not trace.")
        else:
            at = "that effect" if self.needed_for == "observed" else "the CI's upper end"
            why = (
                f": the scheme has only {self.unit_cap:,} independent units (more text adds "
                "weight to them, not units)"
                if self.unit_cap
                else ""
            )
            lines.append(f"At {at}, no amount of data reaches the level{why}.")
        if self.unit_cap and self.units >= self.unit_cap // 2:
            lines.append(
                f"{self.units / self.unit_cap:.0%} of the scheme's {self.unit_cap:,} units are "
                "already scored: more of the same data adds little; a larger effect does."
            )
        if self.advice:
            lines.append("To raise the power: " + "; ".join(self.advice) + ".")
        return "\n".join(lines)


# ---- unweighted: the exact binomial test ----------------------------------------------------------


@lru_cache(maxsize=4096)
def critical_count(n: int, gamma: float, level: float) -> int:
    """The smallest green count k with P(Bin(n, γ) >= k) <= level (n + 1: none is).

    scipy.special's ufuncs rather than scipy.stats' distribution objects: the same tails at a
    thousandth of the call overhead, which matters here (a power statement makes hundreds)."""

    def passes(k: int) -> bool:
        return k > n or float(bdtrc(k - 1, n, gamma)) <= level  # P(X > k - 1)

    if not passes(n):
        return n + 1
    lo, hi = max(0, math.floor(gamma * n)), n  # invariant: P(X >= lo) > level >= P(X >= hi)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def binomial_power(n: int, gamma: float, level: float, delta: float) -> float:
    """P(the exact binomial test of n units rejects at ``level``) when each is green w.p. γ + δ."""
    if n <= 0:
        return 0.0
    c = critical_count(n, gamma, level)
    if c > n:
        return 0.0
    return float(bdtrc(c - 1, n, min(1.0, max(0.0, gamma + delta))))


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact two-sided interval of a binomial proportion (beta quantiles, as
    ``scipy.stats.binomtest(...).proportion_ci(method="exact")`` gives, without its overhead)."""
    tail = (1 - CONFIDENCE) / 2
    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, tail))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - tail))
    return low, high


def smallest_n(ok, start: int, limit: int = _MAX_UNITS) -> int | None:
    """The smallest n >= 1 with ok(n), for ok false below some size and true above it (up to
    the discreteness of the binomial, which makes this the first crossing found by bisection);
    None past ``limit``."""
    hi = max(1, start)
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = 0
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def binomial_power_report(
    n: int,
    green: int,
    gamma: float,
    level: float,
    *,
    effect: str,
    unit: str,
    per_query: float | None = None,
    query: str = "queries",
    advice: Sequence[str] = (),
    max_units: int | None = None,
) -> Power:
    """:class:`Power` of the exact binomial test that saw ``green`` of ``n`` units green
    (``max_units``: the most units the scheme has; sizes beyond it are None)."""
    if n <= 0:
        return _empty(
            "binomial", effect, level, unit, per_query, query, advice, effective_units=0.0
        )
    c = critical_count(n, gamma, level)
    mde = None
    if c <= n and binomial_power(n, gamma, level, 1 - gamma) >= POWER:
        mde = brentq(lambda d: binomial_power(n, gamma, level, d) - POWER, 0.0, 1 - gamma)
    low, high = clopper_pearson(green, n)
    observed = green / n - gamma
    at, needed_for = _effect_to_scale(observed, high - gamma)
    reach = power_n = None
    if at is not None:
        p1 = gamma + at
        reach = smallest_n(
            lambda m: critical_count(m, gamma, level) <= m * p1, max(1, n // 4)
        )  # the expected count reaches the critical one
        power_n = smallest_n(lambda m: binomial_power(m, gamma, level, at) >= POWER, max(1, n // 4))
        if max_units is not None:
            reach = reach if reach is not None and reach <= max_units else None
            power_n = power_n if power_n is not None and power_n <= max_units else None
    return Power(
        test="binomial",
        effect=effect,
        level=level,
        units=n,
        unit=unit,
        effective_units=float(n),
        mde=mde,
        observed=observed,
        ci=(low - gamma, high - gamma),
        power_at_observed=binomial_power(n, gamma, level, max(observed, 0.0)),
        needed_for=needed_for,
        units_to_reach_level=reach,
        units_for_power=power_n,
        per_query=per_query,
        query=query,
        advice=list(advice),
        unit_cap=max_units,
    )


# ---- weighted: the normal approximation against the test's critical z ----------------------------


def normal_power(n_eff: float, gamma: float, delta: float, critical_z: float) -> float:
    """P(reject) for a weighted score of ``n_eff`` effective units, each green w.p. γ + δ,
    by a test that rejects at z >= ``critical_z`` (z standardised under H0)."""
    p1 = min(1.0, max(0.0, gamma + delta))
    shift = delta * math.sqrt(n_eff) - critical_z * math.sqrt(gamma * (1 - gamma))
    sd1 = math.sqrt(p1 * (1 - p1))
    if sd1 == 0:
        return 1.0 if shift > 0 else 0.0
    return float(norm.cdf(shift / sd1))


def weighted_power_report(
    weights: Sequence[float] | np.ndarray, score: float, gamma: float, level: float, **kw
) -> Power:
    """:class:`Power` of a test on S = Σ w·g (observed ``score``); see :func:`moments_power_report`
    for the keywords."""
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    return moments_power_report(
        int(w.size), float(w.sum()), float((w**2).sum()), score, gamma, level, **kw
    )


def moments_power_report(
    units: int,
    total: float,
    squares: float,
    score: float,
    gamma: float,
    level: float,
    *,
    test: str = "weighted",
    critical_z: float | None = None,
    effect: str,
    unit: str,
    per_query: float | None = None,
    query: str = "queries",
    advice: Sequence[str] = (),
    max_units: int | None = None,
) -> Power:
    """:class:`Power` of a test on S = Σ w·g over ``units`` units with Σw = ``total`` and
    Σw² = ``squares`` (all the normal approximation needs), that rejects at z >= ``critical_z``
    (default: the normal quantile of ``level``, right for the exact weighted test at these sizes;
    the Chernoff bound passes its own, larger, value). More data is assumed to bring more units
    of the same weight profile."""
    if units <= 0 or total <= 0:
        return _empty(test, effect, level, unit, per_query, query, advice, effective_units=0.0)
    n_eff = total**2 / squares
    z_c = float(norm.isf(level)) if critical_z is None else critical_z
    sd0 = math.sqrt(gamma * (1 - gamma))
    top = 1 - gamma - 1e-12
    mde = None
    if normal_power(n_eff, gamma, top, z_c) >= POWER:
        mde = brentq(lambda d: normal_power(n_eff, gamma, d, z_c) - POWER, 0.0, top)
    fraction = score / total
    observed = fraction - gamma
    low, high = _wilson(fraction, n_eff)
    at, needed_for = _effect_to_scale(observed, high - gamma)
    reach = power_n = None
    if at is not None:
        sd1 = math.sqrt((gamma + at) * (1 - gamma - at))
        # the effective units needed, as multiples of this run's
        scale_reach = (z_c * sd0 / at) ** 2 / n_eff
        scale_power = ((z_c * sd0 + float(norm.isf(1 - POWER)) * sd1) / at) ** 2 / n_eff
        reach, power_n = _units(scale_reach * units), _units(scale_power * units)
        if max_units is not None:  # effective units never exceed the units there are
            reach = reach if scale_reach * n_eff <= max_units else None
            power_n = power_n if scale_power * n_eff <= max_units else None
    return Power(
        test=test,
        effect=effect,
        level=level,
        units=units,
        unit=unit,
        effective_units=n_eff,
        mde=mde,
        observed=observed,
        ci=(low - gamma, high - gamma),
        power_at_observed=normal_power(n_eff, gamma, max(observed, 0.0), z_c),
        needed_for=needed_for,
        units_to_reach_level=reach,
        units_for_power=power_n,
        per_query=per_query,
        query=query,
        advice=list(advice),
        unit_cap=max_units,
    )


def _units(x: float) -> int | None:
    return None if not math.isfinite(x) or x > _MAX_UNITS else max(1, math.ceil(x))


def _wilson(fraction: float, n: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion from ``n`` (effective) trials."""
    z = float(norm.isf((1 - CONFIDENCE) / 2))
    p = min(1.0, max(0.0, fraction))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _effect_to_scale(observed: float, upper: float) -> tuple[float | None, str]:
    if observed > 0:
        return observed, "observed"
    if upper > 0:
        return upper, "upper bound"
    return None, "none"


def _empty(test, effect, level, unit, per_query, query, advice, *, effective_units) -> Power:
    return Power(
        test=test,
        effect=effect,
        level=level,
        units=0,
        unit=unit,
        effective_units=effective_units,
        mde=None,
        observed=0.0,
        ci=(-1.0, 1.0),
        power_at_observed=0.0,
        needed_for="none",
        units_to_reach_level=None,
        units_for_power=None,
        per_query=per_query,
        query=query,
        advice=list(advice),
    )


def detection_power(
    detection,
    level: float,
    *,
    unit: str,
    effect: str,
    per_query: float | None = None,
    query: str = "queries",
    advice: Sequence[str] = (),
    max_units: int | None = None,
) -> Power:
    """:class:`Power` of one :class:`~distillguard.watermark.detect.Detection`: the exact
    binomial when it was unweighted, the weighted normal approximation when it carries its
    weights' sums (the moments are all the approximation needs)."""
    if detection.weight_sum is None:
        return binomial_power_report(
            detection.scored,
            detection.green,
            detection.gamma,
            level,
            effect=effect,
            unit=unit,
            per_query=per_query,
            query=query,
            advice=advice,
            max_units=max_units,
        )
    return moments_power_report(
        detection.scored,
        detection.weight_sum,
        detection.weight_sq_sum,
        detection.weighted_score,
        detection.gamma,
        level,
        effect=effect,
        unit=unit,
        per_query=per_query,
        query=query,
        advice=advice,
        max_units=max_units,
    )


def unit_cap(params) -> int | None:
    """The most independent units a scheme's tests can score (its optional ``unit_space``)."""
    space = getattr(params.impl, "unit_space", None)
    return space(params) if space is not None else None


# What raises `watermark detect`'s power, without and with --teacher.
DETECT_ADVICE = (
    (
        "more of the account's answers (a longer ledger export)",
        "--teacher smollm2: entropy-aware weights (more power; the test stays exact)",
    ),
    ("more of the account's answers (a longer ledger export)",),
)


@dataclass(frozen=True)
class TracePower:
    """The power statement of every key of a :class:`~distillguard.watermark.detect.Trace`,
    and which untraced key is nearest to being traced (None: every key was traced)."""

    per_key: list[Power]
    closest: int | None
    label: str | None  # the closest key's account (or key id)

    def annotate(self, payload: dict) -> dict:
        """``payload`` (a Trace's ``to_dict``) with each key's power and the closest's on top."""
        keys = [{**k, "power": p.to_dict()} for k, p in zip(payload["keys"], self.per_key)]
        top = (
            {"account": self.label, **self.per_key[self.closest].to_dict()}
            if self.closest is not None
            else None
        )
        return {**payload, "keys": keys, "power": top}


def trace_power(
    trace,
    *,
    texts: int,
    query: str = "texts",
    advice: Sequence[str] = (),
    max_units: int | None = None,
) -> TracePower:
    """The power of each key's test in ``trace``, at the level Holm's first step asks of one key
    (alpha / keys); ``texts``: how many texts were scored (for the units per text)."""
    level = trace.alpha / max(1, len(trace.results))
    per_key = [
        detection_power(
            d,
            level,
            unit="scored units",
            effect="a green-fraction excess over gamma (SynthID: mean g-value shift)",
            per_query=d.scored / max(1, texts),
            query=query,
            advice=advice,
            max_units=max_units,
        )
        for d in trace.results
    ]
    left = [i for i, p in enumerate(trace.adjusted_p) if p >= trace.alpha]
    closest = min(left, key=lambda i: trace.results[i].log10_p) if left else None
    label = None
    if closest is not None:
        d = trace.results[closest]
        label = d.account or d.key_id
    return TracePower(per_key, closest, label)


__all__ = [
    "CONFIDENCE",
    "DETECT_ADVICE",
    "POWER",
    "Power",
    "TracePower",
    "binomial_power",
    "binomial_power_report",
    "clopper_pearson",
    "critical_count",
    "detection_power",
    "moments_power_report",
    "normal_power",
    "trace_power",
    "unit_cap",
    "weighted_power_report",
]
