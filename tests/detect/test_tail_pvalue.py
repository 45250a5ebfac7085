"""The monitor's per-request p-value (monitor._TailPvalue) is EmpiricalTail.pvalue, bit for bit,
inside the data, in a fitted tail of either sign of shape, at its support's end, and floored."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distillguard.detect.monitor import _TailPvalue
from distillguard.detect.stats import EmpiricalTail


def _tails():
    rng = np.random.default_rng(0)
    yield EmpiricalTail(rng.exponential(3.0, 500))  # conformal only
    yield EmpiricalTail(rng.pareto(2.0, 400) * 5, max_extrapolation=1e4)  # heavy: ξ > 0
    yield EmpiricalTail(rng.uniform(0, 10, 300), max_extrapolation=1e4)  # bounded: ξ < 0
    yield EmpiricalTail(rng.normal(20, 4, 1000), max_extrapolation=1e6, floor=1e-5)
    yield EmpiricalTail(np.r_[np.zeros(200), rng.exponential(1.0, 60)], max_extrapolation=1e3)


@pytest.mark.parametrize("tail", list(_tails()))
def test_equals_empirical_tail_pvalue(tail):
    fast = _TailPvalue(tail)
    top = float(tail.sorted[-1])
    scores = np.r_[
        tail.sorted,
        np.linspace(-5, 3 * top + 10, 2001),
        [top, np.nextafter(top, np.inf), -np.inf, np.inf, 0.0, 1e300],
    ]
    for s in scores:
        assert fast(float(s)) == tail.pvalue(float(s)), s
        assert fast(np.float64(s)) == tail.pvalue(float(s)), s
    assert math.isnan(fast(float("nan"))) == math.isnan(tail.pvalue(float("nan")))


def test_the_cases_are_all_there():
    shapes = [t.gpd[1] for t in _tails() if t.gpd is not None]
    assert min(shapes) < 0 < max(shapes)
    bounded = next(t for t in _tails() if t.gpd is not None and t.gpd[1] < 0)
    u, xi, sigma, _ = bounded.gpd
    end = u - sigma / xi  # the fitted tail's upper end: sf is 0 from there on
    assert _TailPvalue(bounded)(end + 1.0) == bounded.pvalue(end + 1.0)
