"""The statistics behind the detectors, as pure functions tested on inputs with known answers.

- ``mmd_test``: kernel two-sample test (Gretton et al., JMLR 2012) with a Gaussian kernel on
  embeddings, median-heuristic bandwidth, permutation p-value; ``mmd2_to_reference``: the
  statistic alone against a fixed reference (what the online detector uses: its benign
  distribution comes from calibration, so no permutations are needed per window).
- ``ks_greater``: one-sided two-sample Kolmogorov-Smirnov (scipy) for PRADA-style distance tests.
- ``normalized_entropy``: evenness of a histogram (topic coverage).
- ``EmpiricalTail``: tail probability of a score under the benign distribution, the common
  currency in which detectors are combined (``calibrate.py``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _sq_dists(Z: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances of rows. Z: (N, D) -> (N, N)."""
    sq = np.einsum("nd,nd->n", Z, Z)
    d = sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T)
    np.maximum(d, 0.0, out=d)
    return d


def mmd2_unbiased(K: np.ndarray, m: int) -> float:
    """Unbiased MMD² from the joint kernel matrix of [X; Y], X the first m rows. K: (m+n, m+n)."""
    n = K.shape[0] - m
    Kxx, Kyy, Kxy = K[:m, :m], K[m:, m:], K[:m, m:]
    return float(
        (Kxx.sum() - np.trace(Kxx)) / (m * (m - 1))
        + (Kyy.sum() - np.trace(Kyy)) / (n * (n - 1))
        - 2.0 * Kxy.mean()
    )


def median_bandwidth(Y: np.ndarray) -> float:
    """Median heuristic: the median pairwise squared distance of the rows of Y. Y: (n, D)."""
    D = _sq_dists(Y.astype(np.float64))
    return float(np.median(D[~np.eye(len(Y), dtype=bool)])) or 1.0


def mmd_test(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    permutations: int = 200,
    rng: np.random.Generator | None = None,
    bandwidth: float | None = None,
    Kyy: np.ndarray | None = None,
) -> tuple[float, float]:
    """(MMD², permutation p-value) for H0: X and Y come from one distribution. X: (m, D), Y: (n, D).

    Gaussian kernel exp(-|x-y|² / bandwidth), bandwidth by the median heuristic on the pooled
    sample unless given. A fixed Y (the benign reference) can pass its bandwidth and kernel
    matrix ``Kyy`` (n, n) once for all windows. The p-value counts the observed statistic among
    the permutations ((1 + #≥) / (1 + P)), so under H0 it is valid at every level (Phipson &
    Smyth 2010).
    """
    m, n = len(X), len(Y)
    if m < 2 or n < 2:
        raise ValueError("mmd_test needs at least two points per sample")
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    if bandwidth is None:
        bandwidth = median_bandwidth(np.concatenate([X64, Y64]))
    xx, yy = np.einsum("nd,nd->n", X64, X64), np.einsum("nd,nd->n", Y64, Y64)
    Kxx = np.exp(-np.maximum(xx[:, None] + xx[None, :] - 2 * X64 @ X64.T, 0) / bandwidth)  # (m, m)
    Kxy = np.exp(-np.maximum(xx[:, None] + yy[None, :] - 2 * X64 @ Y64.T, 0) / bandwidth)  # (m, n)
    if Kyy is None:
        Kyy = np.exp(-np.maximum(yy[:, None] + yy[None, :] - 2 * Y64 @ Y64.T, 0) / bandwidth)
    K = np.block([[Kxx, Kxy], [Kxy.T, Kyy]])  # (N, N)
    observed = mmd2_unbiased(K, m)
    rng = rng or np.random.default_rng(0)
    # Permutations, vectorised: only which m rows form "X" changes; the statistic follows from
    # the X-X block sum, the X rows' sums and the total.
    N = m + n
    diag = np.diag(K)
    total = K.sum() - diag.sum()
    rowsum = K.sum(axis=1) - diag
    idx = np.argsort(rng.random((permutations, N)), axis=1)[:, :m]  # (P, m)
    sxx = K[idx[:, :, None], idx[:, None, :]].sum(axis=(1, 2)) - diag[idx].sum(axis=1)  # (P,)
    sxy = rowsum[idx].sum(axis=1) - sxx
    syy = total - sxx - 2.0 * sxy
    stat = sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)
    return observed, (1.0 + int((stat >= observed - 1e-12).sum())) / (1.0 + permutations)


def mmd2_to_reference(X: np.ndarray, Y: np.ndarray, bandwidth: float, kyy_mean: float) -> float:
    """Unbiased MMD² of a window X (m, D) against a fixed reference Y (n, D), Gaussian kernel
    exp(-|x-y|² / bandwidth); ``kyy_mean`` is the reference's off-diagonal kernel mean, computed
    once. Equals ``mmd2_unbiased`` on the joint kernel matrix, at the cost of the (m, m) and
    (m, n) blocks only (float32: the online scorer runs it every ``stride`` prompts)."""
    m = len(X)
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    xx, yy = np.einsum("nd,nd->n", X32, X32), np.einsum("nd,nd->n", Y32, Y32)
    Kxx = np.exp(-np.maximum(xx[:, None] + xx[None, :] - 2 * X32 @ X32.T, 0) / bandwidth)  # (m, m)
    Kxy = np.exp(-np.maximum(xx[:, None] + yy[None, :] - 2 * X32 @ Y32.T, 0) / bandwidth)  # (m, n)
    return float(
        (Kxx.sum(dtype=np.float64) - np.trace(Kxx)) / (m * (m - 1))
        + kyy_mean
        - 2.0 * Kxy.mean(dtype=np.float64)
    )


def ks_greater(sample: np.ndarray, reference: np.ndarray) -> float:
    """p-value of a one-sided KS test that ``sample`` tends to be larger than ``reference``."""
    # alternative="less": the CDF of `sample` lies below the reference's, i.e. larger values.
    return float(stats.ks_2samp(sample, reference, alternative="less", method="asymp").pvalue)


def normalized_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of a histogram divided by log(#bins hit possible), in [0, 1]."""
    total = counts.sum()
    if total <= 1:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(min(len(counts), total)))


class EmpiricalTail:
    """P(S ≥ s) for a benign score S, from benign samples: conformal inside the data, a fitted
    generalised Pareto tail beyond it (peaks over threshold), and a floor.

    - up to the largest benign score: ``(1 + #{benign ≥ s}) / (1 + n)`` (conformal, exact);
    - beyond it: ``k/(n+1) · GPD.sf(s - u)``, u the score that the top k = max(20, 10%) samples
      exceed, the GPD (shape ξ, scale σ) fitted to their excesses by maximum likelihood
      (``scipy.stats.genpareto``; Pickands-Balkema-de Haan: exceedances over a high threshold are
      GPD), capped at the conformal value 1/(n+1);
    - never below ``floor`` (if given) nor ``1/(n+1) / max_extrapolation``: calibration sets the
      floor (``calibrate.tail_floor``, ``threshold_floor``) so that one detector alone,
      together with an ordinary rest of the others, cannot reach the threshold (a heavy user or
      a logprob researcher resembles an attacker in one respect; flags need several kinds of
      evidence).

    ``max_extrapolation=1`` keeps the plain conformal floor. With a few hundred samples the
    tail fit is rough; calibration therefore sets its threshold on benign days scored by tails
    fitted *without* them (cross-fitting), so whatever the extrapolation does to unseen benign
    days is in the threshold.
    """

    MIN_EXCEEDANCES = 20

    def __init__(self, samples: np.ndarray, max_extrapolation: float = 1.0, floor: float = 0.0):
        self.max_extrapolation = max_extrapolation
        self.sorted = np.sort(np.asarray(samples, dtype=np.float64))
        self.floor = floor
        n = len(self.sorted)
        self.gpd: tuple[float, float, float, int] | None = None  # (u, ξ, σ, k)
        k = max(self.MIN_EXCEEDANCES, n // 10)
        if max_extrapolation > 1 and n >= 2 * self.MIN_EXCEEDANCES:
            u = float(self.sorted[n - k - 1])
            excess = self.sorted[n - k :] - u
            if excess.max() > 0:
                with np.errstate(all="ignore"):
                    xi, _, sigma = stats.genpareto.fit(excess, floc=0.0)
                if np.isfinite(xi) and np.isfinite(sigma) and sigma > 0:
                    self.gpd = (
                        u,
                        float(min(xi, 1.0)),
                        float(sigma),
                        k,
                    )  # ξ ≥ 1: no finite mean; cap it

    def pvalues(self, s: np.ndarray) -> np.ndarray:
        """``pvalue`` of every score in ``s`` (N,), vectorised (calibration scores ~10⁵ requests)."""
        s = np.asarray(s, dtype=np.float64)
        n = len(self.sorted)
        greater_eq = n - np.searchsorted(self.sorted, s, side="left")
        p = (1.0 + greater_eq) / (1.0 + n)
        if self.gpd is not None:
            u, xi, sigma, k = self.gpd
            beyond = greater_eq == 0
            if beyond.any():
                tail = k / (n + 1.0) * stats.genpareto.sf(s[beyond] - u, xi, scale=sigma)
                p[beyond] = np.maximum(
                    np.minimum(p[beyond], tail), p[beyond] / self.max_extrapolation
                )
        return np.maximum(p, self.floor)

    def pvalue(self, s: float) -> float:
        n = len(self.sorted)
        greater_eq = n - int(np.searchsorted(self.sorted, s, side="left"))
        p = (1.0 + greater_eq) / (1.0 + n)
        if greater_eq == 0 and self.gpd is not None:
            u, xi, sigma, k = self.gpd
            tail = k / (n + 1.0) * float(stats.genpareto.sf(s - u, xi, scale=sigma))
            p = max(min(p, tail), p / self.max_extrapolation)
        return max(p, self.floor)
