"""One detector at its floor plus an ordinary rest of the detectors does not flag; two detectors
with moderate evidence do (issue 23: benign users flagged by ``template`` at its floor alone).

Known truth: benign scores are standard normal draws, so each detector's benign tail p of a
fresh benign score is (conformally) uniform, and the others' -2 ln p sum is the null's
chi²_{2(D-1)}. The threshold is the Fisher null chi²_{2D}(target), the lowest a calibration
can set (``calibrate`` takes the larger of its estimate and this; test_calibrate checks it),
so what does not flag here does not flag at any calibrated threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from distillguard.detect import AccountMonitor, Calibration, DetectConfig
from distillguard.detect.calibrate import FLOOR_ROOM, _day_fisher, tail_floor
from distillguard.detect.stats import EmpiricalTail

DETECTORS = ("volume", "timing", "shape", "template", "cot", "fresh", "linking")
D = len(DETECTORS)
TARGET = 0.001
NULL = float(stats.chi2.isf(TARGET, 2 * D))
EXTREME = 1e6  # far beyond every benign sample: the tail's p is its floor


@pytest.fixture(scope="module")
def tails() -> list[EmpiricalTail]:
    rng = np.random.default_rng(0)
    floor = tail_floor(TARGET, D)
    return [EmpiricalTail(rng.normal(size=4000), 1e4, floor) for _ in range(D)]


def fisher(tails, raw: np.ndarray) -> np.ndarray:
    """-2 Σ ln p over the detectors, per row of ``raw`` (N, D)."""
    return -2.0 * sum(np.log(t.pvalues(raw[:, j])) for j, t in enumerate(tails))


def test_the_floor_leaves_the_others_an_upper_quantile_of_their_null_sum():
    for d in range(1, 11):  # up to every built-in detector at once
        null = stats.chi2.isf(TARGET, 2 * d)
        one = -2 * math.log(tail_floor(TARGET, d))
        rest = stats.chi2.ppf(FLOOR_ROOM, 2 * (d - 1)) if d > 1 else 0.0
        assert one + rest == pytest.approx(null)
        assert d == 1 or 2 * one > null  # two detectors at their floors pass the null
    # the rule before left the others 10% of the null: 3.6 at D = 7, less than two uniform
    # p add on average (4)
    assert -2 * math.log(tail_floor(TARGET, D)) < 0.9 * NULL - 4


def test_one_extreme_detector_and_an_ordinary_rest_does_not_flag(tails):
    rng = np.random.default_rng(1)
    n = 20_000
    raw = rng.normal(size=(n, D))  # fresh benign accounts: every p uniform
    raw[:, 3] = EXTREME  # ... but one detector (template) beyond anything benign
    score = fisher(tails, raw)
    assert tails[3].pvalue(EXTREME) == tail_floor(TARGET, D)
    # flags need the rest beyond its null's FLOOR_ROOM quantile (binomial 99.9% bound)
    allowed = stats.binom.ppf(0.999, n, 1 - FLOOR_ROOM)
    assert (score > NULL).sum() <= allowed
    # the rule before (the floor at 90% of the null) flagged nearly all of them
    old = [EmpiricalTail(t.sorted, 1e4, math.exp(-0.45 * NULL)) for t in tails]
    assert (fisher(old, raw) > NULL).mean() > 0.9
    # an ordinary rest (every other detector at its benign median) leaves it well below
    median = np.zeros((1, D))
    median[0, 3] = EXTREME
    assert fisher(tails, median)[0] < NULL - 2


def test_two_detectors_with_moderate_evidence_do_flag(tails):
    # p = 1e-4 each (beyond the 4,000 benign samples: the fitted tail), the rest at the median
    q = float(stats.norm.isf(1e-4))
    raw = np.zeros((1, D))
    raw[0, [0, 5]] = q  # volume and fresh
    p = [t.pvalue(q) for t in tails[:1]]
    assert 2e-5 < p[0] < 5e-4  # moderate: far above the floor
    assert fisher(tails, raw)[0] > NULL + 3
    # and two at their floors (a campaign extreme on two detectors) pass with room
    raw[0, [0, 5]] = EXTREME
    assert fisher(tails, raw)[0] > NULL + 5


def test_the_online_monitor_and_the_offline_replay_combine_alike(tails):
    """The floor lives in the calibration's tails, so ``AccountMonitor.combined`` (serve --detect,
    monitor) and the offline replay's ``_day_fisher`` (calibration, detect()) give one score."""
    cal = Calibration(
        config=DetectConfig(target_fpr=TARGET, detectors=DETECTORS),
        reference=None,
        tails=dict(zip(DETECTORS, tails)),
        threshold=NULL,
        watch_threshold=NULL,
        embedder=None,
    )
    monitor = AccountMonitor(cal)
    rng = np.random.default_rng(2)
    for raw in (np.r_[rng.normal(size=3), EXTREME, rng.normal(size=3)], np.full(D, EXTREME)):
        online, _ = monitor.combined(raw)
        offline = _day_fisher([(("a", 0), raw, None, 0.0)], tails)[("a", 0)]
        assert online == pytest.approx(offline, rel=1e-12)
    assert monitor.combined(np.r_[np.zeros(3), EXTREME, np.zeros(3)])[0] < cal.threshold
