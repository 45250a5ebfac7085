"""The statistics on inputs with known answers: the MMD and PRADA tests keep their nominal
false-positive rate on benign-vs-benign windows, and find a real difference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from distillguard.detect.reference import nn_distances
from distillguard.detect.stats import (
    EmpiricalTail,
    _sq_dists,
    ks_greater,
    median_bandwidth,
    mmd2_to_reference,
    mmd2_unbiased,
    mmd_test,
    normalized_entropy,
)
from tests.detect.conftest import topic_embeddings

ALPHA, TRIALS = 0.05, 200


def _fpr_ok(rejections: int) -> bool:
    """Rejections under H0 consistent with ≤ ALPHA: below the binomial 99.9% quantile."""
    return rejections <= stats.binom.ppf(0.999, TRIALS, ALPHA)


def test_mmd_unbiased_is_zero_in_expectation_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    vals = []
    for _ in range(200):
        Z = rng.normal(size=(40, 3))
        D = ((Z[:, None] - Z[None]) ** 2).sum(-1)
        vals.append(mmd2_unbiased(np.exp(-D / 2), 20))
    assert abs(np.mean(vals)) < 3 * np.std(vals) / math.sqrt(len(vals))


def test_mmd2_to_reference_equals_the_joint_kernel_statistic(space):
    rng = np.random.default_rng(7)
    X, Y = (
        topic_embeddings(rng, space, 24, spread=0.6),
        topic_embeddings(rng, space, 50, spread=0.6),
    )
    bw = median_bandwidth(Y)
    Z = np.concatenate([X, Y]).astype(np.float64)
    K = np.exp(-_sq_dists(Z) / bw)
    Kyy = K[24:, 24:]
    kyy_mean = (Kyy.sum() - np.trace(Kyy)) / (50 * 49)
    assert mmd2_to_reference(X, Y, bw, kyy_mean) == pytest.approx(mmd2_unbiased(K, 24), abs=1e-5)


def test_mmd_test_false_positive_rate_on_benign_windows_is_nominal(space):
    rng = np.random.default_rng(1)
    reference = topic_embeddings(rng, space, 128, spread=0.6)
    # as the mmd detector runs it: the reference's bandwidth and kernel computed once
    bw = median_bandwidth(reference)
    Kyy = np.exp(-_sq_dists(reference.astype(np.float64)) / bw)
    rejections = sum(
        mmd_test(
            topic_embeddings(rng, space, 32, spread=0.6),
            reference,
            permutations=100,
            rng=rng,
            bandwidth=bw,
            Kyy=Kyy,
        )[1]
        <= ALPHA
        for _ in range(TRIALS)
    )
    assert _fpr_ok(rejections), rejections
    assert rejections >= stats.binom.ppf(
        0.001, TRIALS, ALPHA
    )  # and it does reject at about α (not a dead test)


def test_mmd_test_power_on_a_different_topic_mix(space):
    rng = np.random.default_rng(2)
    reference = topic_embeddings(rng, space, 128, spread=0.6)
    p = [
        mmd_test(
            topic_embeddings(rng, space[:4], 32, spread=0.6), reference, permutations=100, rng=rng
        )[1]
        for _ in range(20)
    ]
    assert np.mean(np.array(p) <= ALPHA) >= 0.9


def test_prada_distance_test_false_positive_rate_on_benign_streams_is_nominal(space):
    """Benign streams: users who dwell on 2 random topics. Reference distances from 100 such users;
    a new user's window of distances is tested against them."""
    rng = np.random.default_rng(3)

    def user(n=64):
        return topic_embeddings(rng, space[rng.choice(len(space), 2, replace=False)], n, spread=0.6)

    reference = np.concatenate([nn_distances(user()) for _ in range(100)])
    rejections = sum(ks_greater(nn_distances(user()), reference) <= ALPHA for _ in range(TRIALS))
    assert _fpr_ok(rejections), rejections
    sweeps = [
        ks_greater(nn_distances(topic_embeddings(rng, space, 64, spread=0.6)), reference)
        for _ in range(20)
    ]
    assert np.mean(np.array(sweeps) <= ALPHA) >= 0.9


def test_normalized_entropy_known_values():
    assert normalized_entropy(np.array([5, 5, 5, 5])) == 1.0
    assert normalized_entropy(np.array([20, 0, 0, 0])) == 0.0
    assert math.isclose(normalized_entropy(np.array([1, 1, 0, 0])), 1.0)


def test_empirical_tail_is_conformal():
    tail = EmpiricalTail(np.arange(1, 100))  # 1..99
    assert tail.pvalue(99) == 2 / 100 and tail.pvalue(98.5) == 2 / 100  # conformal inside the data
    assert tail.pvalue(1e9) == 1 / 100  # floor 1/(n+1): one detector cannot claim more
    quantiles = -np.log(
        1 - np.arange(1, 100) / 100
    )  # exponential quantiles (a uniform's tail ends at its max)
    pot = EmpiricalTail(quantiles, max_extrapolation=100)
    assert 1 / 100 / 100 < pot.pvalue(quantiles[-1] + 0.5) < 1 / 100  # fitted tail beyond the data
    assert pot.pvalue(1e9) == 1 / 100 / 100  # down to its floor
    assert EmpiricalTail(np.arange(1, 100), max_extrapolation=100, floor=1e-3).pvalue(1e9) == 1e-3
    assert tail.pvalue(0) == 1.0
    assert tail.pvalue(99) == 2 / 100
    # under H0 (a new benign score from the same distribution) P(p ≤ a) ≤ a
    rng = np.random.default_rng(4)
    draws = [EmpiricalTail(rng.normal(size=99)).pvalue(rng.normal()) for _ in range(2000)]
    assert np.mean(np.array(draws) <= 0.1) <= 0.1 + 3 * math.sqrt(0.09 / 2000)


def test_gpd_tail_extrapolates_the_tail_probability_of_a_known_distribution():
    """Peaks over threshold on 2,000 exponential samples: beyond the largest sample (where the
    conformal p-value is stuck at 1/2001) the fitted tail tracks the true P(S ≥ s) = e^-s."""
    rng = np.random.default_rng(9)
    tail = EmpiricalTail(rng.exponential(size=2000), max_extrapolation=1e6)
    for s in (10.0, 12.0, 14.0):  # true tails 4.5e-5, 6.1e-6, 8.3e-7
        assert (
            s > tail.sorted[-1] and 0.2 < tail.pvalue(s) / math.exp(-s) < 10
        )  # vs 1/2001 ≈ 5e-4 conformal
