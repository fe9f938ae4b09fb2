"""Statistics over seeds for studies (alignjax/study.py): bootstrap intervals, paired differences,
probability of improvement, and the verdict on a claim.

Every aggregate carries its n. Resampling is scipy's (`scipy.stats.bootstrap`, percentile method), not
hand-written; the probability of improvement is rliable's definition (Agarwal et al., 2021):

    P(a > b) = 1/(n m) sum_ij ( 1[a_i better than b_j] + 1/2 1[a_i == b_j] )      (Mann-Whitney U / nm)

A claim "a is better than b on metric M" is judged from the paired difference d_s = M_a(s) - M_b(s) over
the seeds s both ran, with a percentile-bootstrap CI [lo, hi] at `confidence`:

    supported      the CI lies wholly on the claimed side of 0
    contradicted   the CI lies wholly on the other side of 0
    inconclusive   the CI contains 0, or fewer than `min_n` paired seeds (default 5)

A percentile-bootstrap CI of a mean never leaves the range of the values, so when every paired
difference has the same sign it excludes 0: with few seeds it is anti-conservative. Next to it each
comparison reports the exact two-sided sign-flip permutation p-value of the mean difference
(`scipy.stats.permutation_test`, every one of the 2^n sign patterns): with 5 seeds it cannot go below
2/32 = 0.0625, which is the honest strength of a 5-seed claim.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

DEFAULT_RESAMPLES = 10_000


def _finite(values) -> np.ndarray:
    x = np.asarray(values, np.float64).reshape(-1)
    return x[np.isfinite(x)]


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `values` [n] (NaN when n < 2; the point when all equal)."""
    x = _finite(values)
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(values, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """{values, n, mean, ci: [lo, hi]} of the finite entries of `values` (per-seed metric values)."""
    x = _finite(values)
    lo, hi = bootstrap_ci(x, confidence, n_resamples, seed)
    return {"values": [float(v) for v in np.asarray(values, np.float64).reshape(-1)], "n": int(len(x)),
            "mean": float(x.mean()) if len(x) else math.nan, "ci": [lo, hi]}


def probability_of_improvement(a, b, lower_is_better: bool) -> float:
    """rliable's P(a improves on b): the Mann-Whitney U statistic of a vs b divided by n m."""
    a, b = _finite(a), _finite(b)
    if not len(a) or not len(b):
        return math.nan
    if lower_is_better:
        a, b = -a, -b
    wins = (a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()
    return float(wins / (len(a) * len(b)))


def sign_flip_p_value(differences) -> float:
    """Exact two-sided permutation p-value of mean(differences) = 0 under random signs (scipy)."""
    d = _finite(differences)
    if len(d) < 2:
        return math.nan
    if np.all(d == 0):
        return 1.0
    res = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                               alternative="two-sided")
    return float(res.pvalue)


def paired_difference(a_by_seed: dict, b_by_seed: dict, lower_is_better: bool, confidence: float = 0.95,
                      n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, min_n: int = 5) -> dict:
    """Difference a - b over the seeds both have a finite value for: {seeds, n, mean, ci, p_improvement,
    p_value, verdict} where the claim is "a is better than b" (lower or higher, as stated); the verdict
    needs at least `min_n` paired seeds."""
    seeds = sorted(s for s in set(a_by_seed) & set(b_by_seed)
                   if np.isfinite(a_by_seed[s]) and np.isfinite(b_by_seed[s]))
    d = np.array([a_by_seed[s] - b_by_seed[s] for s in seeds], np.float64)
    out = summarize(d, confidence, n_resamples, seed)
    out["seeds"] = seeds
    out["p_improvement"] = probability_of_improvement([a_by_seed[s] for s in seeds],
                                                      [b_by_seed[s] for s in seeds], lower_is_better)
    out["p_value"] = sign_flip_p_value(d)
    out["verdict"] = verdict(out["ci"], lower_is_better) if len(d) >= min_n else "inconclusive"
    out["min_n"] = min_n
    return out


def verdict(ci, lower_is_better: bool) -> str:
    """supported / contradicted / inconclusive for "a better than b" from the CI of a - b."""
    lo, hi = ci
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    better, worse = (hi < 0, lo > 0) if lower_is_better else (lo > 0, hi < 0)
    return "supported" if better else "contradicted" if worse else "inconclusive"


def band(curves, confidence: float = 0.95, n_resamples: int = 2_000, seed: int = 0):
    """Mean and bootstrap CI per column of `curves` [n_seeds, T] (NaN entries skipped): (mean, lo, hi) [T]."""
    curves = np.asarray(curves, np.float64)
    cols = [summarize(curves[:, t], confidence, n_resamples, seed) for t in range(curves.shape[1])]
    return (np.array([c["mean"] for c in cols]), np.array([c["ci"][0] for c in cols]),
            np.array([c["ci"][1] for c in cols]))
