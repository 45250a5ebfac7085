"""The power the forensics tests state is the power they have: the open test's Chernoff bound and
the canary test's Fisher combination, run on scores simulated at the stated minimum detectable
effect, detect it as often as stated (within a 99.9% binomial interval of the runs; seeded)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom, chi2

from distillguard.forensics.canary_power import canary_power, fisher_power
from distillguard.forensics.open_test import (
    chernoff_critical_score,
    chernoff_log_p,
    open_power,
)
from distillguard.watermark.power import POWER

LEVEL = 1e-3 / 20


def within(hits: int, runs: int, p: float) -> bool:
    return binom.ppf(0.0005, runs, p) <= hits <= binom.ppf(0.9995, runs, p)


def suspect_weights(seed: int, contexts: int = 300, top_k: int = 8) -> np.ndarray:
    """Weights shaped like the open test's: each context's top-k probabilities, peaked."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(top_k, 0.3), size=contexts).ravel()


def test_chernoff_critical_score_is_where_the_bound_meets_the_level():
    w = suspect_weights(0)
    for level in (1e-3, LEVEL, 1e-12):
        s = chernoff_critical_score(w, 0.25, level)
        assert math.isclose(chernoff_log_p(s, w, 0.25), math.log(level), rel_tol=1e-6)
        assert chernoff_log_p(s * 0.99, w, 0.25) > math.log(level)
    assert chernoff_critical_score(w[:3], 0.25, LEVEL) == math.inf  # 3 units cannot reach it


def test_open_test_power_matches_simulated_chernoff_decisions():
    w = suspect_weights(1)
    gamma = 0.25
    report = open_power(w, gamma * w.sum(), gamma, LEVEL, effect="e", unit="u")
    assert report.test == "chernoff" and report.mde is not None
    rng = np.random.default_rng(3)
    runs = 500
    log_level = math.log(LEVEL)
    hits = 0
    for _ in range(runs):
        g = rng.random(len(w)) < gamma + report.mde
        hits += chernoff_log_p(float(w[g].sum()), w, gamma) <= log_level
    assert within(hits, runs, POWER), (hits, report.mde)
    # the bound costs power: a normal z-test of the same weights would claim a smaller effect
    normal = open_power(w, gamma * w.sum(), gamma, LEVEL, critical_z=3.89, effect="e", unit="u")
    assert normal.mde < report.mde


def simulate_fisher(theta: float, canaries: int, decoys: int, runs: int, seed: int) -> int:
    """How many of ``runs`` accounts, each with ``canaries`` canaries memorised w.p. θ, the
    canary test (rank p-values, Fisher, χ² reference) traces at LEVEL."""
    rng = np.random.default_rng(seed)
    chance = rng.integers(1, decoys + 2, size=(runs, canaries))
    ranks = np.where(rng.random((runs, canaries)) < theta, 1, chance)
    stat = -2 * np.log(ranks / (decoys + 1)).sum(axis=1)
    return int((chi2.sf(stat, 2 * canaries) <= LEVEL).sum())


def test_canary_power_matches_simulated_ranks():
    report = canary_power(12, 0, 19, LEVEL)
    assert report.mde is not None
    runs = 3000
    assert within(simulate_fisher(report.mde, 12, 19, runs, seed=4), runs, POWER)
    # and at the effect halfway there, the stated power holds too (not only at 80%)
    half = report.mde / 2
    assert within(
        simulate_fisher(half, 12, 19, runs, seed=5), runs, fisher_power(half, 12, 19, LEVEL)
    )


def test_canary_sizes_needed():
    report = canary_power(12, 4, 19, LEVEL)  # 4 of 12 ranked first: θ ≈ 0.30, not yet traced
    assert report.needed_for == "observed" and 0 < report.observed < report.ci[1]
    need = report.units_for_power
    assert fisher_power(report.observed, need, 19, LEVEL) >= POWER
    assert fisher_power(report.observed, need - 1, 19, LEVEL) < POWER + 0.05
    runs = 2000
    hits = simulate_fisher(report.observed, need, 19, runs, seed=6)
    assert hits / runs >= POWER - 0.05


def test_what_the_canary_test_cannot_detect():
    """Too few canaries: out of reach whatever the suspect learned. A small memorised fraction:
    out of reach however many canaries (discrete p-values against χ²), and simulation agrees."""
    few = canary_power(3, 3, 49, LEVEL)
    assert few.mde is None and simulate_fisher(1.0, 3, 49, 50, seed=7) == 0
    small = canary_power(200, 6, 19, LEVEL)  # 3% ranked first: chance is 5%
    assert small.needed_for == "upper bound"
    faint = canary_power(1000, 85, 19, LEVEL)  # θ ≈ 0.036
    assert faint.needed_for == "observed" and faint.units_for_power is None
    assert simulate_fisher(faint.observed, 5000, 19, 200, seed=8) == 0
