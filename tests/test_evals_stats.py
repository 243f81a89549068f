"""evals.stats against independent references: scipy, statsmodels, brute force, hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower

from evals import stats


def _pairs(only_a: int, only_b: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return np.array(a, float), np.array(b, float)


def test_mcnemar_hand_computed_case() -> None:
    # 2 vs 10 discordant: p = 2 * (C(12,0)+C(12,1)+C(12,2)) / 2^12 = 2 * 79 / 4096
    a, b = _pairs(2, 10, 30, 8)
    r = stats.mcnemar_exact(a, b)
    assert (r.only_a, r.only_b) == (2, 10)
    assert r.p_value == pytest.approx(2 * 79 / 4096, abs=1e-15)


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (0, 1), (3, 3), (1, 9), (7, 2), (15, 40), (0, 25), (60, 45)])
def test_mcnemar_matches_scipy_binomtest_and_statsmodels(only_a: int, only_b: int) -> None:
    a, b = _pairs(only_a, only_b, 11, 5)
    p = stats.mcnemar_exact(a, b).p_value
    m = only_a + only_b
    ref_binom = 1.0 if m == 0 else sps.binomtest(only_a, m, 0.5).pvalue
    table = [[5, only_b], [only_a, 11]]  # rows a=0/1, cols b=0/1 (only discordant cells matter)
    ref_sm = sm_mcnemar(table, exact=True).pvalue
    assert p == pytest.approx(ref_binom, rel=1e-12, abs=1e-15)
    assert p == pytest.approx(ref_sm, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("only_a,only_b", [(600, 700), (0, 3000), (1500, 1500), (510, 514)])
def test_mcnemar_with_over_1024_discordant_pairs(only_a: int, only_b: int) -> None:
    # 2.0**m overflowed a float at m >= 1024 (OverflowError on any 0/1 benchmark of a few thousand items).
    a, b = _pairs(only_a, only_b, 40, 40)
    r = stats.mcnemar_exact(a, b)
    assert (r.only_a, r.only_b) == (only_a, only_b)
    # independent reference: the exact two-sided tail summed in log space
    m, k = only_a + only_b, min(only_a, only_b)
    log_terms = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2)
                 for i in range(k + 1)]
    top = max(log_terms)
    ref = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in log_terms))
    assert r.p_value == pytest.approx(ref, rel=1e-9, abs=1e-300)
    assert r.p_value == pytest.approx(sm_mcnemar([[40, only_b], [only_a, 40]], exact=True).pvalue, rel=1e-9)


def test_mcnemar_rejects_non_binary() -> None:
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0.5, 1], [1, 0])


def test_holm_known_case_and_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 13):
        pv = rng.uniform(0, 0.2, size=m)
        pv[0] = pv[-1]  # ties must be handled like statsmodels
        ref = multipletests(pv, method="holm")[1]
        assert stats.holm(pv) == pytest.approx(list(ref), abs=1e-15)
    assert stats.holm([]) == []


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c of them correct) containing at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            got = stats.pass_at_k(n, c, k)
            assert got == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12)
            assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert stats.pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    with pytest.raises(ValueError):
        stats.pass_at_k(3, 4, 1)


def test_paired_t_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.2, 40)
    b = a + rng.normal(0.05, 0.1, 40)
    for alt in ("two-sided", "greater", "less"):
        ref = sps.ttest_rel(b, a, alternative=alt).pvalue
        assert stats.paired_t_test(a, b, alternative=alt) == pytest.approx(ref, rel=1e-10)


def test_noninferiority_matches_one_sided_t_and_decides() -> None:
    rng = np.random.default_rng(1)
    a = rng.binomial(1, 0.7, 300).astype(float)
    b = a.copy()
    flip = rng.choice(300, 12, replace=False)
    b[flip] = 1 - b[flip]
    d = b - a
    for margin in (0.0, 0.02, 0.05):
        ni = stats.noninferiority(a, b, margin, alpha=0.05)
        ref = sps.ttest_1samp(d, -margin, alternative="greater")
        assert ni.p_value == pytest.approx(ref.pvalue, rel=1e-10)
        lo = ref.confidence_interval(confidence_level=0.95).low
        assert ni.lower_bound == pytest.approx(lo, rel=1e-10)
        assert ni.passed == (ref.pvalue < 0.05)
    # A clear 10-point drop must fail a 2-point margin; identical scores pass any positive margin.
    worse = a.copy()
    worse[np.flatnonzero(a == 1)[:30]] = 0
    assert not stats.noninferiority(a, worse, 0.02).passed
    assert stats.noninferiority(a, a.copy(), 0.02).passed


def test_bootstrap_ci_close_to_scipy_and_seeded() -> None:
    rng = np.random.default_rng(2)
    x = rng.binomial(1, 0.6, 200).astype(float) - rng.binomial(1, 0.5, 200)
    ours = stats.bootstrap_ci(x, n_resamples=20000, seed=5)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(9))
    assert ours.estimate == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.01)
    # Same seed -> same interval; constant differences -> a zero-width interval at the constant.
    assert stats.bootstrap_ci(x, n_resamples=500, seed=7) == stats.bootstrap_ci(x, n_resamples=500, seed=7)
    c = stats.paired_bootstrap_ci(np.zeros(30), np.full(30, 0.25), n_resamples=300)
    assert (c.low, c.estimate, c.high) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_coverage_is_near_nominal() -> None:
    # Known truth: Bernoulli(0.3) differences; a 90% CI should cover the true mean ~90% of the time.
    rng = np.random.default_rng(11)
    cover = 0
    trials = 200
    for t in range(trials):
        x = rng.binomial(1, 0.3, 150).astype(float)
        ci = stats.bootstrap_ci(x, confidence=0.90, n_resamples=400, seed=t)
        cover += ci.low <= 0.3 <= ci.high
    assert 0.82 <= cover / trials <= 0.97


def test_mde_matches_statsmodels_power() -> None:
    for n, sd in ((50, 0.4), (400, 0.3), (1000, 0.5)):
        es = NormalIndPower().solve_power(effect_size=None, nobs1=n, alpha=0.05, power=0.8, ratio=0)
        # statsmodels also counts the (negligible) opposite tail, hence rel 1e-4, not exact.
        mde = stats.minimum_detectable_effect(n, sd)
        assert mde == pytest.approx(es * sd, rel=1e-4)
        power = NormalIndPower().power(effect_size=mde / sd, nobs1=n, alpha=0.05, ratio=0)
        assert power == pytest.approx(0.8, abs=1e-4)
        need = stats.required_sample_size(es * sd, sd)
        assert need in (n, n + 1)  # ceil of the inverse
    assert stats.power_warning(30, 0.4, 0.02) is not None
    assert "needs n >=" in stats.power_warning(30, 0.4, 0.02)  # type: ignore[operator]
    assert stats.power_warning(100000, 0.4, 0.02) is None


def test_zero_flips_are_not_proof() -> None:
    # No example changed: the smoothed discordance (0.5 flips each way over n + 1 pairs) gives
    # var = 1/(n+1), so 5 identical items cannot show non-inferiority but 400 can.
    a5 = np.array([1, 1, 0, 1, 0], float)
    assert stats.diff_sd(a5, a5) == pytest.approx(math.sqrt(1 / 6))
    assert not stats.noninferiority(a5, a5.copy(), 0.05).passed
    a400 = (np.arange(400) % 5 != 0).astype(float)
    ni = stats.noninferiority(a400, a400.copy(), 0.05)
    se = math.sqrt(1 / 401) / math.sqrt(400)
    assert ni.passed and ni.lower_bound == pytest.approx(-sps.t.ppf(0.95, 399) * se)
    assert ni.p_value == pytest.approx(sps.t.sf(0.05 / se, 399))
    # Identical continuous scores give no estimate of the noise either: inconclusive, not proof.
    x = np.linspace(-3, -2, 10)
    assert stats.diff_sd(x, x) == 0.0
    ni = stats.noninferiority(x, x.copy(), 0.01)
    assert (ni.passed, ni.p_value, ni.lower_bound) == (False, 1.0, -math.inf)


def test_one_pair_or_no_spread_is_inconclusive_not_p_zero() -> None:
    # One example (n < 2): no t-test exists; a p-value of 0 let one NLL text pass non-inferiority.
    ni = stats.noninferiority([-8.0], [-8.1], 0.5)
    assert not ni.passed and ni.p_value == 1.0
    assert not stats.noninferiority([0.0], [0.0], 0.5).passed  # one 0/1 item, smoothed SD or not
    assert stats.paired_t_test([-8.0], [-7.0]) == 1.0  # nor "improved" on one example
    # A constant difference (zero spread) on a few continuous scores: inconclusive, for the guard and the
    # two-sided test alike.
    a = np.array([-8.0, -7.5, -9.0])
    assert not stats.noninferiority(a, a - 0.25, 0.5).passed  # exactly constant
    assert not stats.noninferiority(a, a - 0.01, 0.5).passed  # constant up to float rounding (SD ~1e-16)
    assert stats.paired_t_test(a, a + 0.25) == 1.0 and stats.paired_t_test(a, a + 0.3) == 1.0
    with pytest.raises(ValueError, match="alternative"):
        stats.paired_t_test(a, a + 0.3, alternative="bigger")


def test_noninferiority_passes_a_real_small_continuous_difference() -> None:
    # A guard pass that is not bit-identical: log-lik/token 0.02 worse with noise, margin 0.1.
    rng = np.random.default_rng(4)
    a = rng.normal(-8.0, 0.6, 60)
    b = a + rng.normal(-0.02, 0.05, 60)
    ni = stats.noninferiority(a, b, 0.1)
    ref = sps.ttest_1samp(b - a, -0.1, alternative="greater")
    assert ni.passed and ni.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert -0.1 < ni.lower_bound < 0 and ni.lower_bound == pytest.approx(
        ref.confidence_interval(confidence_level=0.95).low, rel=1e-10)
    assert not stats.noninferiority(a, b, 0.01).passed  # the same data cannot show a 0.01 margin
