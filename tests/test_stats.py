"""alignjax/stats.py against independent computations: a NumPy-loop percentile bootstrap, SciPy's
Mann-Whitney U for rliable's probability of improvement, and hand-made verdict cases."""

import numpy as np
import pytest
from scipy import stats as sps

from alignjax import stats

DATA = np.array([0.887, 0.068, 0.726, 0.943, 0.445])


def _numpy_percentile_bootstrap(x, confidence=0.95, n=20_000, seed=123):
    """The textbook percentile bootstrap of the mean, written out with a NumPy loop."""
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for i in range(n):
        means[i] = x[rng.integers(0, len(x), len(x))].mean()
    a = (1 - confidence) / 2
    return np.quantile(means, a), np.quantile(means, 1 - a)


def test_bootstrap_ci_matches_a_numpy_loop():
    lo, hi = stats.bootstrap_ci(DATA, 0.95, n_resamples=20_000)
    ref_lo, ref_hi = _numpy_percentile_bootstrap(DATA)
    # two independent Monte Carlo estimates of the same quantiles
    assert abs(lo - ref_lo) < 0.02 and abs(hi - ref_hi) < 0.02
    assert lo < DATA.mean() < hi
    # a 90% interval is inside the 95% one
    lo90, hi90 = stats.bootstrap_ci(DATA, 0.90, n_resamples=20_000)
    assert lo < lo90 < hi90 < hi


def test_summarize_counts_finite_values_and_handles_degenerate_cases():
    s = stats.summarize([0.1, np.nan, 0.3])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.2) and np.isnan(s["values"][1])
    assert stats.summarize([0.5])["n"] == 1 and np.isnan(stats.summarize([0.5])["ci"][0])
    assert stats.summarize([0.2, 0.2, 0.2])["ci"] == [0.2, 0.2]
    assert stats.summarize([])["n"] == 0


@pytest.mark.parametrize("lower", [True, False])
def test_probability_of_improvement_is_mann_whitney_u_over_nm(lower):
    rng = np.random.default_rng(0)
    a, b = rng.random(7).round(1), rng.random(5).round(1)  # rounding makes ties
    u = sps.mannwhitneyu(b, a).statistic if lower else sps.mannwhitneyu(a, b).statistic
    assert stats.probability_of_improvement(a, b, lower) == pytest.approx(u / (len(a) * len(b)))
    assert stats.probability_of_improvement([0.1, 0.2], [0.5, 0.6], lower_is_better=True) == 1.0


def test_paired_difference_uses_common_seeds_and_judges_the_ci():
    a = {0: 0.1, 1: 0.2, 2: 0.15, 3: 0.12, 4: np.nan}
    b = {0: 0.9, 1: 0.8, 2: 0.85, 3: 0.95, 5: 0.7}
    d = stats.paired_difference(a, b, lower_is_better=True, min_n=4)
    assert d["seeds"] == [0, 1, 2, 3] and d["n"] == 4
    assert d["mean"] == pytest.approx(np.mean([0.1 - 0.9, 0.2 - 0.8, 0.15 - 0.85, 0.12 - 0.95]))
    assert d["verdict"] == "supported" and d["p_improvement"] == 1.0
    assert stats.paired_difference(a, b, lower_is_better=False, min_n=4)["verdict"] == "contradicted"
    mixed = stats.paired_difference({0: 0.1, 1: 0.9, 2: 0.5}, {0: 0.5, 1: 0.5, 2: 0.5}, True, min_n=3)
    assert mixed["verdict"] == "inconclusive"
    assert stats.paired_difference({0: 0.1}, {0: 0.9}, True, min_n=1)["verdict"] == "inconclusive"  # no CI


def test_verdict_cases():
    assert stats.verdict([-0.3, -0.1], True) == "supported"
    assert stats.verdict([0.1, 0.3], True) == "contradicted"
    assert stats.verdict([-0.1, 0.3], True) == "inconclusive"
    assert stats.verdict([0.1, 0.3], False) == "supported"
    assert stats.verdict([np.nan, np.nan], False) == "inconclusive"


def test_band_is_the_per_column_summary():
    curves = np.array([[0.1, 0.5], [0.3, np.nan], [0.2, 0.7]])
    mean, lo, hi = stats.band(curves)
    np.testing.assert_allclose(mean, [0.2, 0.6])
    assert (lo <= mean).all() and (mean <= hi).all()


def test_sign_flip_p_value_enumerates_every_sign_pattern():
    import itertools

    d = np.array([-0.3, -0.1, -0.25, 0.05, -0.2])
    stat = abs(d.mean())
    flips = [abs((d * np.array(s)).mean()) for s in itertools.product([1, -1], repeat=len(d))]
    ref = np.mean([f >= stat - 1e-12 for f in flips])  # NumPy enumeration of all 2^5 patterns
    assert stats.sign_flip_p_value(d) == pytest.approx(ref)
    assert stats.sign_flip_p_value([-0.1, -0.2, -0.3, -0.4, -0.5]) == pytest.approx(2 / 32)


def test_verdict_needs_min_n_paired_seeds():
    a, b = {s: 0.1 for s in range(4)}, {s: 0.9 - 0.01 * s for s in range(4)}
    assert stats.paired_difference(a, b, True)["verdict"] == "inconclusive"  # 4 < 5
    assert stats.paired_difference(a, b, True, min_n=4)["verdict"] == "supported"
