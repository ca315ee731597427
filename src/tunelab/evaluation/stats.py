"""Statistics for comparing two models: is the difference real, how big is it, how many examples
would show it. Thin, checked wrappers over scipy, each returning a small report with ``render()``
(one or two plain lines) and ``to_dict()`` (JSON-ready: NaN becomes ``None``).

Conventions shared by every function:

- "a" is the baseline, "b" the candidate; every difference is ``b - a``, so a positive number
  means b is better on a higher-is-better metric.
- ``confidence`` is the level of the intervals (0.95 gives 95% intervals); tests are two-sided.
- Bad input (empty lists, non-finite values, n=0, a probability outside [0, 1], alpha or power
  outside (0, 1)) raises ``TunelabError`` naming the argument.

The bootstrap resamples examples (rows), not metric values in isolation: for paired data the same
indices are drawn for both models, which keeps the pairing that makes paired comparisons sharp.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from tunelab.errors import TunelabError

RESAMPLE_CELLS = 4_000_000  # indices drawn per chunk (32 MB of int64): bounds memory for large evaluation sets


# ----------------------------------------------------------------------------- checks


def _values(values, name: str, minimum: int = 1) -> np.ndarray:
    """``values`` as a float array of at least ``minimum`` finite numbers, or an error naming it."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise TunelabError(f"{name}: give a list of numbers; it holds something else ({str(values)[:80]}).") from None
    if array.ndim != 1:
        raise TunelabError(f"{name}: give a flat list of numbers, one per example (got an array of shape {array.shape}).")
    if len(array) < minimum:
        raise TunelabError(
            f"{name}: needs at least {minimum} value{'s' * (minimum > 1)}, got {len(array)}. Check that the file or arm it came from is not empty."
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise TunelabError(f"{name}: value {bad[0]} is {array[bad[0]]}; every value must be a finite number (drop or fix missing scores first).")
    return array


def _open_unit(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise TunelabError(
            f"{name}={value!r}: give a number strictly between 0 and 1 (e.g. {name}=0.05 for alpha, 0.8 for power, 0.95 for confidence)."
        )
    return float(value)


def _probability(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise TunelabError(f"{name}={value!r}: a proportion must lie between 0 and 1.")
    return float(value)


def _count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise TunelabError(f"{name}={value!r}: give a whole number of at least {minimum}.")
    return int(value)


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - (1 - confidence) / 2))


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _as_dict(report) -> dict:
    return {key: _finite_or_none(value) for key, value in asdict(report).items()}


def format_p(p: float | None, n_resamples: int | None = None) -> str:
    """A p-value as people read it: three significant digits, '< 1/n' where a bootstrap saw no crossing."""
    if p is None or not math.isfinite(p):
        return "p undefined"
    if n_resamples and p == 0:
        return f"p < {1 / n_resamples:.2g}"
    return f"p = {p:.3g}" if p >= 1e-4 else f"p = {p:.1e}"


def _pct(confidence: float) -> str:
    return f"{confidence:.0%}"


# ----------------------------------------------------------------------------- bootstrap


@dataclass
class MeanCI:
    """A mean with its percentile-bootstrap interval."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float
    n_resamples: int
    seed: int

    def to_dict(self) -> dict:
        return _as_dict(self)

    def render(self) -> str:
        return f"{self.mean:.4g} ({_pct(self.confidence)} CI {self.ci_low:.4g} to {self.ci_high:.4g}, n={self.n})"


@dataclass
class BootstrapResult:
    """Paired bootstrap of ``mean(b) - mean(a)`` over examples."""

    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    confidence: float
    n_resamples: int
    seed: int

    def to_dict(self) -> dict:
        return _as_dict(self)

    def render(self) -> str:
        return (
            f"paired bootstrap (n={self.n}, {self.n_resamples} resamples): {self.mean_b:.4g} - {self.mean_a:.4g} = {self.diff:+.4g} "
            f"({_pct(self.confidence)} CI {self.ci_low:+.4g} to {self.ci_high:+.4g}), {format_p(self.p_value, self.n_resamples)}"
        )


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """The mean of ``values`` over ``n_resamples`` draws of len(values) indices with replacement.
    Drawn in chunks so a large evaluation set does not need an n_resamples x n index matrix at once;
    the chunks come from one generator, so the result depends only on the seed."""
    rng = np.random.default_rng(seed)
    n = len(values)
    rows = max(1, RESAMPLE_CELLS // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _percentile_ci(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(values, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> MeanCI:
    """The mean of ``values`` with a percentile-bootstrap interval: no normality assumed, which
    matters for bounded or skewed scores (0/1 accuracy, ratings on a 1-5 scale)."""
    array = _values(values, "values")
    n_resamples = _count(n_resamples, "n_resamples", 1)
    confidence = _open_unit(confidence, "confidence")
    low, high = _percentile_ci(_resampled_means(array, n_resamples, seed), confidence)
    return MeanCI(float(array.mean()), low, high, len(array), confidence, n_resamples, seed)


def paired_bootstrap(a, b, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> BootstrapResult:
    """Paired percentile bootstrap of ``mean(b) - mean(a)``: ``a[i]`` and ``b[i]`` are two models'
    scores on example i, and each resample draws the same examples for both, so the example-to-
    example variation that both models share cancels out.

    The p-value is two-sided: the share of resampled differences on the other side of 0 from the
    observed one (0 included), doubled and clipped to 1; 1 when the observed difference is 0.
    Deterministic for a given seed."""
    a, b = _values(a, "a"), _values(b, "b")
    if len(a) != len(b):
        raise TunelabError(
            f"paired_bootstrap: a has {len(a)} values and b has {len(b)}; paired scores need one value per example in each, in the same order."
        )
    n_resamples = _count(n_resamples, "n_resamples", 1)
    confidence = _open_unit(confidence, "confidence")
    diffs = b - a
    means = _resampled_means(diffs, n_resamples, seed)  # the mean of differences is the difference of means
    low, high = _percentile_ci(means, confidence)
    observed = float(diffs.mean())
    if observed > 0:
        p = 2 * float(np.mean(means <= 0))
    elif observed < 0:
        p = 2 * float(np.mean(means >= 0))
    else:
        p = 1.0
    return BootstrapResult(float(a.mean()), float(b.mean()), observed, low, high, min(p, 1.0), len(a), confidence, n_resamples, seed)


# ----------------------------------------------------------------------------- proportions


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of successes/n: unlike the Wald interval it stays inside [0, 1] and
    keeps its coverage near 0% and 100%, where fine-tuned models' accuracies often sit."""
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ProportionTest:
    """Two-proportion z test (pooled), with Wilson intervals per rate and two intervals of the
    difference: Newcombe's hybrid score interval (method 10 of Newcombe 1998; the one to quote)
    and the textbook Wald interval."""

    successes_a: int
    n_a: int
    successes_b: int
    n_b: int
    rate_a: float
    rate_a_low: float
    rate_a_high: float
    rate_b: float
    rate_b_low: float
    rate_b_high: float
    diff: float  # rate_b - rate_a
    ci_low: float  # Newcombe
    ci_high: float
    wald_low: float
    wald_high: float
    z: float
    p_value: float
    confidence: float

    def to_dict(self) -> dict:
        return _as_dict(self)

    def render(self) -> str:
        c = _pct(self.confidence)
        return "\n".join([
            f"rate a: {self.successes_a}/{self.n_a} = {self.rate_a:.2%} (Wilson {c} CI {self.rate_a_low:.2%} to {self.rate_a_high:.2%})",
            f"rate b: {self.successes_b}/{self.n_b} = {self.rate_b:.2%} (Wilson {c} CI {self.rate_b_low:.2%} to {self.rate_b_high:.2%})",
            f"difference b - a: {self.diff:+.2%} (Newcombe {c} CI {self.ci_low:+.2%} to {self.ci_high:+.2%}; Wald {self.wald_low:+.2%} to "
            f"{self.wald_high:+.2%})",
            f"two-proportion z test: z = {self.z:.3f}, {format_p(self.p_value)}",
        ])  # fmt: skip


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int, confidence: float = 0.95) -> ProportionTest:
    """Pooled two-proportion z test, two-sided. Its p-value equals that of Pearson's chi-squared
    test on the 2x2 table without continuity correction (z squared is the chi-squared statistic).
    When both rates are 0% or both 100% there is no variance and no evidence of a difference: z=0, p=1."""
    from scipy.stats import norm

    n_a, n_b = _count(n_a, "n_a", 1), _count(n_b, "n_b", 1)
    successes_a, successes_b = _count(successes_a, "successes_a"), _count(successes_b, "successes_b")
    for name, x, n in (("successes_a", successes_a, n_a), ("successes_b", successes_b, n_b)):
        if x > n:
            raise TunelabError(f"{name}={x} is more than its number of trials ({n}); give successes between 0 and n.")
    confidence = _open_unit(confidence, "confidence")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se_null = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = (p_b - p_a) / se_null if se_null > 0 else 0.0
    p_value = float(2 * norm.sf(abs(z)))
    crit = _z(confidence)
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    (la, ua), (lb, ub) = wilson_interval(successes_a, n_a, confidence), wilson_interval(successes_b, n_b, confidence)
    diff = p_b - p_a
    low = diff - math.sqrt((p_b - lb) ** 2 + (ua - p_a) ** 2)
    high = diff + math.sqrt((ub - p_b) ** 2 + (p_a - la) ** 2)
    return ProportionTest(
        successes_a, n_a, successes_b, n_b, p_a, la, ua, p_b, lb, ub, diff, low, high,
        max(-1.0, diff - crit * se), min(1.0, diff + crit * se), z, p_value, confidence,
    )  # fmt: skip


# ----------------------------------------------------------------------------- scores


@dataclass
class WelchResult:
    """Welch's t test (unequal variances) of ``mean(b) - mean(a)``."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    diff: float
    ci_low: float
    ci_high: float
    t: float  # scipy.stats.ttest_ind(b, a, equal_var=False).statistic
    df: float  # Welch-Satterthwaite degrees of freedom
    p_value: float
    cohens_d: float  # diff / pooled standard deviation; NaN when both arms are constant
    confidence: float

    def to_dict(self) -> dict:
        return _as_dict(self)

    def render(self) -> str:
        d = f"{self.cohens_d:+.3f}" if math.isfinite(self.cohens_d) else "undefined (no variance)"
        return (
            f"Welch t test: t = {self.t:.3f}, df = {self.df:.1f}, {format_p(self.p_value)}; difference {self.diff:+.4g} "
            f"({_pct(self.confidence)} CI {self.ci_low:+.4g} to {self.ci_high:+.4g}); Cohen's d = {d}"
        )


def welch_test(a, b, confidence: float = 0.95) -> WelchResult:
    """Welch's t test, two-sided, through ``scipy.stats.ttest_ind(b, a, equal_var=False)``, with
    the interval of the mean difference on the Welch-Satterthwaite degrees of freedom
    ``(va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1))`` and Cohen's d on the pooled
    standard deviation (the effect size ``sample_size_means`` takes)."""
    from scipy.stats import t as t_dist
    from scipy.stats import ttest_ind

    a, b = _values(a, "a", 2), _values(b, "b", 2)
    confidence = _open_unit(confidence, "confidence")
    na, nb = len(a), len(b)
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    diff = float(b.mean() - a.mean())
    se2 = va / na + vb / nb
    if se2 > 0:
        result = ttest_ind(b, a, equal_var=False)
        statistic, p_value = float(result.statistic), float(result.pvalue)
        df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
        half = float(t_dist.ppf(1 - (1 - confidence) / 2, df)) * math.sqrt(se2)
    else:  # both arms constant: the difference is exact
        statistic = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p_value, df, half = (1.0 if diff == 0 else 0.0), float(na + nb - 2), 0.0
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    d = diff / pooled if pooled > 0 else math.nan
    return WelchResult(na, nb, float(a.mean()), float(b.mean()), math.sqrt(va), math.sqrt(vb), diff, diff - half, diff + half,
                       statistic, df, p_value, d, confidence)  # fmt: skip


@dataclass
class MannWhitneyResult:
    """Mann-Whitney U test of b against a, with the common-language effect size."""

    n_a: int
    n_b: int
    u: float  # U of b: pairs (a_i, b_j) with b_j > a_i, ties counting one half
    p_value: float
    prob_b_beats_a: float  # U / (n_a n_b): P(random b > random a) + P(tie) / 2

    def to_dict(self) -> dict:
        return _as_dict(self)

    def render(self) -> str:
        return f"Mann-Whitney U = {self.u:.1f}, {format_p(self.p_value)}; P(a random b beats a random a) = {self.prob_b_beats_a:.3f} (0.5: no effect)"


def mann_whitney(a, b) -> MannWhitneyResult:
    """Two-sided Mann-Whitney U test (``scipy.stats.mannwhitneyu(b, a)``): no normality assumed,
    robust to the outliers and ceilings of per-example scores."""
    from scipy.stats import mannwhitneyu

    a, b = _values(a, "a"), _values(b, "b")
    result = mannwhitneyu(b, a, alternative="two-sided")
    u = float(result.statistic)
    return MannWhitneyResult(len(a), len(b), u, float(result.pvalue), u / (len(a) * len(b)))


# ----------------------------------------------------------------------------- sample sizes


@dataclass
class SampleSize:
    """Examples needed in each arm to detect an effect with a two-sided test."""

    per_group: int
    total: int
    alpha: float
    power: float
    effect: float  # p_b - p_a, or Cohen's d
    formula: str

    def to_dict(self) -> dict:
        return _as_dict(self)

    def render(self) -> str:
        return f"{self.per_group:,} per arm ({self.total:,} in all) to detect {self.formula} at alpha {self.alpha:g} with {self.power:.0%} power"


def _round_up(n: float) -> int:
    return max(2, math.ceil(n - 1e-9))  # the tolerance keeps an exact integer from rounding up on float noise


def sample_size_proportions(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> SampleSize:
    """Per-arm n for the pooled two-proportion z test (normal approximation, no continuity correction;
    Fleiss, Levin & Paik 2003, eq. 4.14 without the correction)::

        n = (z_{1-alpha/2} * sqrt(2 p q) + z_{power} * sqrt(p_a q_a + p_b q_b))^2 / (p_a - p_b)^2

    with p = (p_a + p_b) / 2, q = 1 - p. The first term uses the variance under the null, as the
    test does. For 0.5 vs 0.6 at alpha 0.05 and power 0.8 it gives 387.3, so 388 per arm (the
    unpooled shortcut (z_a + z_b)^2 (p_a q_a + p_b q_b) / d^2 gives 385)."""
    from scipy.stats import norm

    p_a, p_b = _probability(p_a, "p_a"), _probability(p_b, "p_b")
    alpha, power = _open_unit(alpha, "alpha"), _open_unit(power, "power")
    if p_a == p_b:
        raise TunelabError(f"p_a and p_b are both {p_a}: no sample size detects a difference of 0. Give the smallest difference worth detecting.")
    z_alpha, z_power = float(norm.ppf(1 - alpha / 2)), float(norm.ppf(power))
    p = (p_a + p_b) / 2
    numerator = z_alpha * math.sqrt(2 * p * (1 - p)) + z_power * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
    n = _round_up(numerator**2 / (p_a - p_b) ** 2)
    return SampleSize(n, 2 * n, alpha, power, p_b - p_a, f"{p_a:.1%} vs {p_b:.1%}")


def sample_size_means(effect_size_d: float, alpha: float = 0.05, power: float = 0.8) -> SampleSize:
    """Per-arm n to detect a standardised mean difference d (Cohen's d) with a two-sided test,
    normal approximation::

        n = 2 (z_{1-alpha/2} + z_{power})^2 / d^2

    d = 0.5 at alpha 0.05 and power 0.8 gives 62.8, so 63 per arm (the exact t test needs 64)."""
    from scipy.stats import norm

    if not (isinstance(effect_size_d, (int, float)) and math.isfinite(effect_size_d) and effect_size_d != 0):
        raise TunelabError(f"effect_size_d={effect_size_d!r}: give a non-zero Cohen's d (0.2 small, 0.5 medium, 0.8 large).")
    alpha, power = _open_unit(alpha, "alpha"), _open_unit(power, "power")
    n = _round_up(2 * (float(norm.ppf(1 - alpha / 2)) + float(norm.ppf(power))) ** 2 / effect_size_d**2)
    return SampleSize(n, 2 * n, alpha, power, float(effect_size_d), f"Cohen's d = {abs(effect_size_d):.3g}")
