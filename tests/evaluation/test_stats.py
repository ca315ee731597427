"""Evaluation statistics (tunelab.evaluation.stats) against scipy and published worked examples."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sp

from tunelab.errors import TunelabError
from tunelab.evaluation.stats import (
    bootstrap_mean_ci, mann_whitney, paired_bootstrap, sample_size_means, sample_size_proportions, two_proportion_test, welch_test,
    wilson_interval,
)  # fmt: skip

RNG = np.random.default_rng(7)
A = RNG.normal(0.50, 0.20, 60).round(3).tolist()
B = RNG.normal(0.62, 0.25, 45).round(3).tolist()


def test_paired_bootstrap_is_reproducible_and_covers_the_true_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 300)
    b = a + 0.5 + rng.normal(0.0, 0.3, 300)  # true difference 0.5, shared example noise
    first, again, other = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=4)
    assert first == again and first.ci_low != other.ci_low
    assert first.diff == pytest.approx(float(np.mean(b - a))) and first.mean_b - first.mean_a == pytest.approx(first.diff)
    assert first.ci_low < 0.5 < first.ci_high and first.ci_high - first.ci_low < 0.15  # pairing makes it narrow
    assert first.p_value == 0.0 and "p < 0.0005" in first.render()
    json.dumps(first.to_dict())


def test_paired_bootstrap_of_equal_lists_and_p_value_rule():
    same = paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (same.diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    # p = 2 x share of resampled differences at or below 0 when the observed one is positive
    a, b = [0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 1, -1]
    result = paired_bootstrap(a, b, n_resamples=5000, seed=1)
    rng = np.random.default_rng(1)
    means = np.asarray(b, float)[rng.integers(0, 8, size=(5000, 8))].mean(axis=1)
    assert result.p_value == pytest.approx(min(1.0, 2 * np.mean(means <= 0)))


def test_bootstrap_mean_ci():
    ci = bootstrap_mean_ci(A, seed=1)
    assert ci.mean == pytest.approx(np.mean(A)) and ci.ci_low < ci.mean < ci.ci_high
    se = np.std(A, ddof=1) / math.sqrt(len(A))  # the percentile interval is close to the normal one here
    assert ci.ci_high - ci.ci_low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_mean_ci(A, seed=1) == ci


def test_two_proportion_test_equals_chi_squared_without_correction_and_the_normal_formula():
    result = two_proportion_test(48, 80, 56, 70)
    chi2, p, _, _ = sp.chi2_contingency([[48, 32], [56, 14]], correction=False)
    assert result.p_value == pytest.approx(p, abs=1e-9) and result.z**2 == pytest.approx(chi2, abs=1e-9)
    pooled = 104 / 150
    z = (56 / 70 - 48 / 80) / math.sqrt(pooled * (1 - pooled) * (1 / 80 + 1 / 70))
    assert result.z == pytest.approx(z, abs=1e-12) and result.p_value == pytest.approx(2 * sp.norm.sf(z), abs=1e-12)
    # Newcombe (1998), example (a): 56/70 - 48/80; method 10 (hybrid score) 0.0524 to 0.3339, method 1 (Wald) 0.0575 to 0.3425
    assert result.diff == pytest.approx(0.2)
    assert (round(result.ci_low, 4), round(result.ci_high, 4)) == (0.0524, 0.3339)
    assert (round(result.wald_low, 4), round(result.wald_high, 4)) == (0.0575, 0.3425)
    assert (result.rate_b_low, result.rate_b_high) == wilson_interval(56, 70)
    # Newcombe (1998, single proportion), 81/263: Wilson 0.2553 to 0.3662
    assert tuple(round(x, 4) for x in wilson_interval(81, 263)) == (0.2553, 0.3662)
    assert two_proportion_test(0, 10, 0, 12).p_value == 1.0  # no variance, no evidence


def test_welch_test_matches_scipy():
    result = welch_test(A, B)
    expected = sp.ttest_ind(B, A, equal_var=False)
    assert result.t == pytest.approx(expected.statistic, abs=1e-9) and result.p_value == pytest.approx(expected.pvalue, abs=1e-9)
    if hasattr(expected, "confidence_interval"):  # scipy >= 1.11
        ci = expected.confidence_interval(0.95)
        assert result.ci_low == pytest.approx(ci.low, abs=1e-9) and result.ci_high == pytest.approx(ci.high, abs=1e-9)
    va, vb = np.var(A, ddof=1), np.var(B, ddof=1)
    df = (va / 60 + vb / 45) ** 2 / ((va / 60) ** 2 / 59 + (vb / 45) ** 2 / 44)
    assert result.df == pytest.approx(df)
    pooled = math.sqrt((59 * va + 44 * vb) / 103)
    assert result.cohens_d == pytest.approx((np.mean(B) - np.mean(A)) / pooled)


def test_mann_whitney_matches_scipy_and_counts_pairs():
    result = mann_whitney(A, B)
    assert result.p_value == pytest.approx(sp.mannwhitneyu(B, A, alternative="two-sided").pvalue, abs=1e-9)
    wins = sum((b > a) + 0.5 * (b == a) for a in A for b in B)
    assert result.prob_b_beats_a == pytest.approx(wins / (len(A) * len(B)))
    assert mann_whitney([1, 2], [3, 4]).prob_b_beats_a == 1.0


def test_sample_sizes_follow_the_documented_formulas():
    # pooled (Fleiss) formula: (1.95996*sqrt(2*.55*.45) + 0.84162*sqrt(.25+.24))^2 / 0.01 = 387.3 -> 388 (the unpooled one gives 385)
    size = sample_size_proportions(0.5, 0.6)
    assert size.per_group == 388 and size.total == 776
    z_a, z_b = sp.norm.ppf(0.975), sp.norm.ppf(0.8)
    assert size.per_group == math.ceil((z_a * math.sqrt(2 * 0.55 * 0.45) + z_b * math.sqrt(0.49)) ** 2 / 0.01)
    assert sample_size_proportions(0.6, 0.5).per_group == 388
    assert sample_size_means(0.5).per_group == 63  # 2 (1.95996 + 0.84162)^2 / 0.25 = 62.8
    assert sample_size_means(-0.2, alpha=0.01, power=0.9).per_group == math.ceil(2 * (sp.norm.ppf(0.995) + sp.norm.ppf(0.9)) ** 2 / 0.04)
    assert "388 per arm" in size.render()


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: paired_bootstrap([], [1.0]), "a:"),
        (lambda: paired_bootstrap([1.0, 2.0], [1.0]), "a has 2 values and b has 1"),
        (lambda: bootstrap_mean_ci([1.0, float("nan")]), "finite"),
        (lambda: welch_test([1.0], [1.0, 2.0]), "a:"),
        (lambda: two_proportion_test(1, 0, 1, 5), "n_a=0"),
        (lambda: two_proportion_test(6, 5, 1, 5), "successes_a=6"),
        (lambda: sample_size_proportions(1.2, 0.5), "p_a=1.2"),
        (lambda: sample_size_proportions(0.5, 0.5), "p_a and p_b"),
        (lambda: sample_size_proportions(0.4, 0.5, alpha=0), "alpha=0"),
        (lambda: sample_size_means(0.5, power=1.0), "power=1.0"),
        (lambda: sample_size_means(0), "effect_size_d=0"),
    ],
)
def test_bad_input_names_the_argument(call, named):
    with pytest.raises(TunelabError, match=named.replace("(", r"\(")):
        call()
