"""Statistics for paired checkpoint comparisons.

Paired designs (both checkpoints on the same examples) remove the between-example variance, which is
most of the variance on small eval sets; that is why every test here works on per-example pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ArrayLike = Sequence[float] | np.ndarray


def _as_array(x: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: need a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or inf")
    return arr


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a_N, b_N = _as_array(a, "a"), _as_array(b, "b")
    if a_N.shape != b_N.shape:
        raise ValueError(f"paired samples differ in length: {a_N.size} vs {b_N.size}")
    return a_N, b_N


@dataclass(frozen=True)
class CI:
    estimate: float
    low: float
    high: float
    confidence: float


def bootstrap_ci(x: ArrayLike, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> CI:
    """Percentile bootstrap CI of the mean (seeded, so the same data always gives the same interval)."""
    x_N = _as_array(x, "x")
    n = x_N.size
    rng = np.random.default_rng(seed)
    means_R = np.empty(n_resamples)
    block = max(1, 2_000_000 // n)  # bound memory of the index matrix
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        idx_BN = rng.integers(0, n, size=(stop - start, n))
        means_R[start:stop] = x_N[idx_BN].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means_R, [alpha / 2, 1 - alpha / 2])
    return CI(float(x_N.mean()), float(lo), float(hi), confidence)


def paired_bootstrap_ci(a: ArrayLike, b: ArrayLike, *, confidence: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0) -> CI:
    """CI of mean(b - a), resampling examples (pairs stay together)."""
    a_N, b_N = _paired(a, b)
    return bootstrap_ci(b_N - a_N, confidence=confidence, n_resamples=n_resamples, seed=seed)


@dataclass(frozen=True)
class McNemarResult:
    only_a: int  # a right, b wrong ("broken" by b)
    only_b: int  # a wrong, b right ("fixed" by b)
    p_value: float


def is_binary(x: ArrayLike) -> bool:
    arr = np.asarray(x, dtype=np.float64)
    return bool(np.all((arr == 0.0) | (arr == 1.0)))


def mcnemar_exact(a: ArrayLike, b: ArrayLike) -> McNemarResult:
    """Exact (binomial) two-sided McNemar test on the discordant pairs."""
    a_N, b_N = _paired(a, b)
    if not (is_binary(a_N) and is_binary(b_N)):
        raise ValueError("mcnemar_exact needs 0/1 scores")
    only_a = int(np.sum((a_N == 1) & (b_N == 0)))
    only_b = int(np.sum((a_N == 0) & (b_N == 1)))
    m = only_a + only_b
    if m == 0:
        return McNemarResult(only_a, only_b, 1.0)
    # scipy's exact binomial test works in log space: summing C(m, i) / 2.0**m overflowed at m >= 1024
    # discordant pairs (any 0/1 benchmark of a few thousand examples). Under p = 1/2 the distribution is
    # symmetric, so its two-sided p-value is twice the smaller tail, capped at 1.
    return McNemarResult(only_a, only_b, float(sps.binomtest(only_a, m, 0.5).pvalue))


def _no_spread(sd: float, a_N: np.ndarray, b_N: np.ndarray) -> bool:
    """SD of the differences at floating-point rounding level of the scores (a constant shift computed in
    floats is not exactly constant): a t statistic of ~1e15 there is an artifact, not evidence."""
    scale = max(1.0, float(np.max(np.abs(a_N))), float(np.max(np.abs(b_N))))
    return sd <= 1e-12 * scale


def paired_t_test(a: ArrayLike, b: ArrayLike, *, null: float = 0.0, alternative: str = "two-sided") -> float:
    """p-value of a t-test on d = b - a against mean `null` ('two-sided' | 'greater' | 'less')."""
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    a_N, b_N = _paired(a, b)
    d_N = b_N - a_N
    n = d_N.size
    mean = float(d_N.mean())
    sd = float(d_N.std(ddof=1)) if n > 1 else 0.0
    if n < 2 or _no_spread(sd, a_N, b_N):
        # No observed spread (always so for one pair) is no estimate of the noise, not proof: a p-value of
        # 0 here let one example "show" an effect or non-inferiority. Inconclusive instead.
        return 1.0
    t = (mean - null) / (sd / math.sqrt(n))
    if alternative == "two-sided":
        return float(2 * sps.t.sf(abs(t), n - 1))
    if alternative == "greater":
        return float(sps.t.sf(t, n - 1))
    return float(sps.t.cdf(t, n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values (same order as the input)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj_sorted
    return [float(v) for v in out]


@dataclass(frozen=True)
class NonInferiority:
    margin: float
    p_value: float
    lower_bound: float  # one-sided (1 - alpha) lower confidence bound of mean(b - a)
    passed: bool


def noninferiority(a: ArrayLike, b: ArrayLike, margin: float, *, alpha: float = 0.05) -> NonInferiority:
    """H0: mean(b - a) <= -margin vs H1: mean(b - a) > -margin (paired one-sided t-test).

    Passing means b is shown to be at most `margin` worse than a. Several guards each tested at alpha
    need no multiplicity correction (intersection-union test: the gate needs all of them to pass).
    With 0/1 scores and no flips at all the observed SD is 0 and a t-test would "prove" anything on
    5 items; then the SD of the smoothed discordance (half a flip each way, see `diff_sd`) is used.
    Fewer than 2 pairs, or continuous scores with no spread at all, give no estimate of the noise:
    inconclusive (p = 1, lower bound -inf, not passed), never a p-value of 0.
    """
    if margin < 0:
        raise ValueError(f"non-inferiority margin must be >= 0, got {margin}")
    a_N, b_N = _paired(a, b)
    d_N = b_N - a_N
    n = d_N.size
    mean = float(d_N.mean())
    sd = float(d_N.std(ddof=1)) if n > 1 else 0.0
    if sd == 0.0 and is_binary(a_N) and is_binary(b_N):
        sd = _smoothed_binary_sd(a_N, b_N)
    if n < 2 or _no_spread(sd, a_N, b_N):
        return NonInferiority(margin, 1.0, -math.inf, False)
    se = sd / math.sqrt(n)
    p = float(sps.t.sf((mean + margin) / se, n - 1))
    lower = mean - float(sps.t.ppf(1 - alpha, n - 1)) * se
    return NonInferiority(margin, p, lower, p < alpha)


def _smoothed_binary_sd(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """SD of paired 0/1 differences with half a pseudo-flip added in each direction (n + 1 pairs)."""
    n1 = a_N.size + 1
    only_a = float(np.sum((a_N == 1) & (b_N == 0))) + 0.5
    only_b = float(np.sum((a_N == 0) & (b_N == 1))) + 0.5
    return math.sqrt((only_a + only_b) / n1 - ((only_b - only_a) / n1) ** 2)


def minimum_detectable_effect(n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired test detects with `power` (normal approx.)."""
    if n < 1:
        return math.inf
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return float(z * sd / math.sqrt(n))


def required_sample_size(min_effect: float, sd: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    if min_effect <= 0:
        raise ValueError("min_effect must be > 0")
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return int(math.ceil((z * sd / min_effect) ** 2))


def diff_sd(a: ArrayLike, b: ArrayLike) -> float:
    """SD of paired differences for power planning.

    Zero observed flips on 0/1 scores do not mean zero noise: then the smoothed discordance SD is used
    (about 1/sqrt(n), in line with the rule of three). Identical continuous scores (e.g. a deterministic
    NLL of the same weights) really have no noise: 0.
    """
    a_N, b_N = _paired(a, b)
    d_N = b_N - a_N
    sd = float(d_N.std(ddof=1)) if d_N.size > 1 else 0.0
    if sd > 0:
        return sd
    return _smoothed_binary_sd(a_N, b_N) if is_binary(a_N) and is_binary(b_N) else 0.0


def power_warning(n: int, sd: float, min_effect: float, *, alpha: float = 0.05, power: float = 0.8) -> str | None:
    mde = minimum_detectable_effect(n, sd, alpha=alpha, power=power)
    if mde <= min_effect:
        return None
    need = required_sample_size(min_effect, sd, alpha=alpha, power=power)
    return (f"underpowered: n={n} detects differences >= {mde:.3f} with {power:.0%} power, "
            f"configured minimum effect is {min_effect:.3f} (needs n >= {need})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the stable product form."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
