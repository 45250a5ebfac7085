"""The stated power is the power: scores simulated at a known effect and size are detected by the
test itself (its own p-value, at the stated level) as often as the power statement says, within
a 99.9% binomial interval of the simulation count; seeded, so the check cannot flake."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from distillguard.watermark.detect import binomial_test, weighted_binomial_test
from distillguard.watermark.power import (
    POWER,
    binomial_power,
    binomial_power_report,
    critical_count,
    weighted_power_report,
)

LEVEL = 1e-3 / 20  # Holm's first step over 20 keys


def within(hits: int, runs: int, p: float) -> bool:
    """``hits`` of ``runs`` is within the central 99.9% of Binomial(runs, p)."""
    lo, hi = binom.ppf(0.0005, runs, p), binom.ppf(0.9995, runs, p)
    return lo <= hits <= hi


def test_critical_count_is_the_exact_tests_threshold():
    for n, gamma in [(50, 0.25), (400, 0.25), (1000, 0.5), (7, 0.5)]:
        c = critical_count(n, gamma, LEVEL)
        if c <= n:
            assert binomial_test(c, n, gamma)[1] <= LEVEL
        if c - 1 >= 0:
            assert binomial_test(c - 1, n, gamma)[1] > LEVEL
    assert critical_count(7, 0.5, LEVEL) == 8  # 7 fair coins cannot reach p = 5e-5


@pytest.mark.parametrize("n,gamma", [(400, 0.25), (2000, 0.5)])
def test_binomial_mde_is_detected_with_the_stated_power(n, gamma):
    report = binomial_power_report(n, round(gamma * n), gamma, LEVEL, effect="e", unit="u")
    assert report.mde is not None
    rng = np.random.default_rng(1)
    runs = 2000
    greens = rng.binomial(n, gamma + report.mde, size=runs)
    hits = sum(binomial_test(int(g), n, gamma)[1] <= LEVEL for g in greens)
    assert within(hits, runs, POWER), (hits, report.mde)
    # and under the null the test fires at most at the level
    nulls = rng.binomial(n, gamma, size=runs)
    assert sum(binomial_test(int(g), n, gamma)[1] <= LEVEL for g in nulls) <= 2


def test_sizes_needed_for_the_observed_effect():
    """At the stated size, the observed effect has 80% power; a quarter of it has much less."""
    n, gamma = 300, 0.25
    green = round((gamma + 0.04) * n)  # a small excess, not significant at 300 pairs
    report = binomial_power_report(n, green, gamma, LEVEL, effect="e", unit="u", per_query=20)
    assert report.needed_for == "observed" and report.observed == pytest.approx(green / n - gamma)
    need = report.units_for_power
    assert need > n and binomial_power(need, gamma, LEVEL, report.observed) >= POWER
    assert binomial_power(need // 4, gamma, LEVEL, report.observed) < 0.5
    # reaching the level in an average run takes fewer than 80% power does
    assert report.units_to_reach_level < need
    assert report.to_dict()["queries_for_power"] == math.ceil(need / 20)
    assert report.ci[0] < report.observed < report.ci[1]


def test_a_negative_observed_effect_sizes_by_the_upper_bound():
    report = binomial_power_report(500, 110, 0.25, LEVEL, effect="e", unit="u")
    assert report.observed < 0 < report.ci[1]
    assert report.needed_for == "upper bound" and report.units_for_power > 500
    assert "CI's upper end" in report.summary()


def test_weighted_power_matches_the_exact_weighted_test():
    """The exact weighted test (integer weights, SynthID's layer sums), simulated at the stated
    minimum detectable effect, detects it at the stated rate."""
    rng = np.random.default_rng(2)
    weights = rng.integers(1, 6, size=600)
    gamma = 0.5
    report = weighted_power_report(
        weights, gamma * weights.sum(), gamma, LEVEL, effect="e", unit="u"
    )
    assert report.effective_units < len(weights) and report.mde is not None
    runs = 600
    hits = 0
    for _ in range(runs):
        g = rng.random(len(weights)) < gamma + report.mde
        hits += weighted_binomial_test(int(weights[g].sum()), weights.tolist(), gamma)[1] <= LEVEL
    assert within(hits, runs, POWER), (hits, report.mde)


def test_unreachable_level_has_no_detectable_effect():
    report = binomial_power_report(7, 7, 0.5, LEVEL, effect="e", unit="u")
    assert report.mde is None and "out of reach" in report.summary()


def test_a_bounded_unit_space_caps_what_more_data_can_do():
    """SynthID's g-value table has table_size entries: more text adds weight to them, not units,
    so an effect that needs more effective units than the table has is out of reach."""
    from distillguard.watermark import WatermarkParams
    from distillguard.watermark.power import unit_cap

    cap = unit_cap(WatermarkParams(scheme="synthid"))
    assert cap == WatermarkParams(scheme="synthid").synthid.table_size
    assert unit_cap(WatermarkParams(scheme="keyed-hash")) is None
    weights = np.ones(cap)  # every table index already scored once
    faint = weighted_power_report(
        weights, (0.5 + 0.001) * cap, 0.5, LEVEL, effect="e", unit="u", max_units=cap
    )
    assert faint.units_for_power is None and faint.needed_for == "observed"
    assert "only" in faint.summary() and f"{cap:,} independent units" in faint.summary()
    assert "100% of the scheme's" in faint.summary()
    unbounded = weighted_power_report(
        weights, (0.5 + 0.001) * cap, 0.5, LEVEL, effect="e", unit="u"
    )
    assert unbounded.units_for_power > cap  # the same effect, were units unbounded
    strong = weighted_power_report(
        weights[:1000], (0.5 + 0.1) * 1000, 0.5, LEVEL, effect="e", unit="u", max_units=cap
    )
    assert strong.units_for_power is not None and strong.units_for_power <= cap
