"""Tests for prune_eval.analysis.stats: agreement with scipy/statsmodels and closed forms, properties,
validation, and calibration by simulation (slow).

Every statistic that scipy, statsmodels or a closed form also computes is tested equal to it; what
only we compute (cluster resampling) is tested against them in the case where they coincide
(clusters of one question), then calibrated by simulation with real clustering.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import comb
from statsmodels.stats.multitest import multipletests

from prune_eval.analysis import metrics, stats
from prune_eval.analysis.metrics import FN, FP, TN, TP


# ----------------------------------------------------------------------------------------------
# Data builders
def confusion_index(label_yes: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """COUNT_FIELDS index of each question from its label and whether the answer was right."""
    return np.where(label_yes, np.where(correct, TP, FN), np.where(correct, TN, FP))


def counts_from_index(index: np.ndarray) -> np.ndarray:
    """index (..., Q) -> counts (..., 6), summing the questions of each cell."""
    return (index[..., None] == np.arange(6)).sum(-2).astype(float)


def random_pair(
    rng: np.random.Generator,
    n_clusters: int,
    n_splits: int,
    per_cell: int,
    p_a: float = 0.8,
    p_b: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """Paired counts (C, S, 6) of two methods on the same random labels."""
    shape = (n_clusters, n_splits, per_cell)
    yes = rng.random(shape) < 0.5
    index_a = confusion_index(yes, rng.random(shape) < p_a)
    index_b = confusion_index(yes, rng.random(shape) < p_b)
    return counts_from_index(index_a), counts_from_index(index_b)


def one_question_per_cluster(correct_a, correct_b, yes) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 6) one-hot counts: clusters of size one, a single split."""
    n = len(yes)
    return (
        stats.question_counts(np.zeros(n, int), confusion_index(yes, correct_a), n_splits=1),
        stats.question_counts(np.zeros(n, int), confusion_index(yes, correct_b), n_splits=1),
    )


def pooled_f1_from_fields(tp, fp, fn, axis=-1):
    """metrics.f1 on summed TP/FP/FN given as separate arrays — the same floats as ours."""
    zeros = np.zeros_like(np.sum(tp, axis=axis))
    totals = np.stack(
        [np.sum(tp, axis=axis), np.sum(fp, axis=axis), zeros, np.sum(fn, axis=axis), zeros, zeros],
        axis=-1,
    )
    return metrics.f1(totals)


# ----------------------------------------------------------------------------------------------
# Paired cluster bootstrap
@pytest.mark.parametrize("method", ["percentile", "basic", "bca"])
def test_cluster_bootstrap_equals_scipy_bootstrap_on_cluster_sums(method):
    """scipy.stats.bootstrap(paired=True) resampling per-cluster TP/FP/FN sums is the cluster
    bootstrap of pooled F1; with the same seed our draws are scipy's, so everything must agree."""
    rng = np.random.default_rng(0)
    a, b = random_pair(rng, n_clusters=40, n_splits=2, per_cell=rng.integers(1, 7))
    a[:10] *= 3  # unequal cluster sizes (labels scale with both methods: still paired)
    b[:10] *= 3
    fields = [x.sum(1)[:, f] for x in (a, b) for f in (TP, FP, FN)]  # six (C,) arrays

    def statistic(tp_a, fp_a, fn_a, tp_b, fp_b, fn_b, axis=-1):
        return pooled_f1_from_fields(tp_a, fp_a, fn_a, axis) - pooled_f1_from_fields(
            tp_b, fp_b, fn_b, axis
        )

    ours = stats.paired_cluster_bootstrap(
        a, b, metric=metrics.pooled_f1, n_resamples=2000, method=method, rng=123
    )
    ref = scipy.stats.bootstrap(
        fields,
        statistic,
        paired=True,
        n_resamples=2000,
        method="BCa" if method == "bca" else method,
        rng=np.random.default_rng(123),
    )
    np.testing.assert_allclose(
        ours.bootstrap_distribution, ref.bootstrap_distribution, rtol=0, atol=1e-14
    )
    np.testing.assert_allclose(
        [ours.confidence_interval.low, ours.confidence_interval.high],
        [ref.confidence_interval.low, ref.confidence_interval.high],
        rtol=1e-12,
    )
    assert ours.standard_error == pytest.approx(ref.standard_error, rel=1e-12)
    assert ours.estimate == pytest.approx(statistic(*fields), rel=1e-14)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_question_bootstrap_equals_scipy_bootstrap_for_accuracy(method):
    """Clusters of one question, accuracy = mean of 0/1: scipy's paired bootstrap exactly."""
    rng = np.random.default_rng(22)
    yes = rng.random(150) < 0.5
    correct_a, correct_b = rng.random(150) < 0.8, rng.random(150) < 0.75
    qa, qb = one_question_per_cluster(correct_a, correct_b, yes)
    ours = stats.paired_bootstrap(
        qa, qb, metric=metrics.pooled_accuracy, n_resamples=3000, method=method, rng=5
    )
    ref = scipy.stats.bootstrap(
        (correct_a.astype(float), correct_b.astype(float)),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        paired=True,
        n_resamples=3000,
        method="BCa" if method == "bca" else method,
        rng=np.random.default_rng(5),
    )
    np.testing.assert_allclose(ours.bootstrap_distribution, ref.bootstrap_distribution, atol=1e-15)
    assert ours.confidence_interval.low == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert ours.confidence_interval.high == pytest.approx(ref.confidence_interval.high, rel=1e-12)


def test_bootstrap_se_matches_closed_forms():
    """Clusters of one question: SE -> sqrt(var(d)/n) (population variance). Equal cluster sizes:
    SE of the pooled accuracy difference -> Miller's clustered SE. Within Monte Carlo error."""
    rng = np.random.default_rng(1)
    n = 400
    yes = rng.random(n) < 0.5
    correct_a, correct_b = rng.random(n) < 0.8, rng.random(n) < 0.7
    qa, qb = one_question_per_cluster(correct_a, correct_b, yes)
    res = stats.paired_bootstrap(qa, qb, metric=metrics.pooled_accuracy, n_resamples=20_000, rng=2)
    d = correct_a.astype(float) - correct_b
    assert res.standard_error == pytest.approx(np.sqrt(np.var(d) / n), rel=0.03)  # MC sd ~0.5%

    a, b = random_pair(rng, n_clusters=100, n_splits=3, per_cell=6)
    res = stats.paired_cluster_bootstrap(
        a, b, metric=metrics.pooled_accuracy, n_resamples=20_000, rng=3
    )
    per_cluster_d = metrics.accuracy(a.sum(1)) - metrics.accuracy(b.sum(1))  # 18 questions each
    scores_d = np.repeat(per_cluster_d, 18)  # a cluster-constant score has the same clustered SE
    clusters = np.repeat(np.arange(100), 18)
    assert res.standard_error == pytest.approx(
        stats.clustered_standard_error(scores_d, clusters), rel=0.03
    )


def test_bootstrap_replicates_are_the_metric_on_resampled_clusters():
    """Vectorised batch == one replicate at a time with tensordot, and batching changes nothing."""
    a, b = random_pair(np.random.default_rng(4), n_clusters=25, n_splits=3, per_cell=6)
    res = stats.paired_cluster_bootstrap(a, b, metric=metrics.mean_f1, n_resamples=300, rng=5)
    weights = stats._cluster_weights(np.random.default_rng(5), 25, 300)
    assert np.all(weights.sum(1) == 25)
    slow = [
        metrics.mean_f1(np.tensordot(w, a, 1)) - metrics.mean_f1(np.tensordot(w, b, 1))
        for w in weights
    ]
    np.testing.assert_allclose(res.bootstrap_distribution, slow, rtol=0, atol=1e-14)
    batched = stats.paired_cluster_bootstrap(
        a, b, metric=metrics.mean_f1, n_resamples=300, batch=7, rng=5
    )
    np.testing.assert_array_equal(batched.bootstrap_distribution, res.bootstrap_distribution)


def test_same_rng_same_result_and_generator_is_advanced():
    a, b = random_pair(np.random.default_rng(6), n_clusters=30, n_splits=3, per_cell=6)
    first = stats.paired_cluster_bootstrap(a, b, metric=metrics.mean_f1, n_resamples=200, rng=7)
    again = stats.paired_cluster_bootstrap(
        a, b, metric=metrics.mean_f1, n_resamples=200, rng=np.random.default_rng(7)
    )
    np.testing.assert_array_equal(first.bootstrap_distribution, again.bootstrap_distribution)
    assert first.confidence_interval == again.confidence_interval and first.p_value == again.p_value
    gen = np.random.default_rng(7)
    one = stats.paired_cluster_bootstrap(a, b, metric=metrics.mean_f1, n_resamples=200, rng=gen)
    two = stats.paired_cluster_bootstrap(a, b, metric=metrics.mean_f1, n_resamples=200, rng=gen)
    assert not np.array_equal(one.bootstrap_distribution, two.bootstrap_distribution)


def test_bootstrap_p_value_rule():
    """p = (#{|d* - d| >= |d|} + 1) / (B + 1), recomputed from the returned distribution."""
    a, b = random_pair(
        np.random.default_rng(8), n_clusters=30, n_splits=3, per_cell=6, p_a=0.75, p_b=0.7
    )
    res = stats.paired_cluster_bootstrap(a, b, metric=metrics.mean_f1, n_resamples=999, rng=9)
    c = np.sum(np.abs(res.bootstrap_distribution - res.estimate) >= abs(res.estimate))
    assert res.p_value == (c + 1) / 1000


# ----------------------------------------------------------------------------------------------
# Paired cluster permutation test
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_exact_equals_scipy_for_accuracy(alternative):
    rng = np.random.default_rng(10)
    n = 11  # 2^11 = 2048 <= n_resamples: exact in both
    yes = rng.random(n) < 0.5
    correct_a, correct_b = rng.random(n) < 0.8, rng.random(n) < 0.4
    qa, qb = one_question_per_cluster(correct_a, correct_b, yes)
    ours = stats.paired_cluster_permutation_test(
        qa, qb, metric=metrics.pooled_accuracy, alternative=alternative, n_resamples=5000
    )
    ref = scipy.stats.permutation_test(
        (correct_a.astype(float), correct_b.astype(float)),
        lambda x, y, axis: (x.sum(axis) - y.sum(axis)) / n,
        permutation_type="samples",
        alternative=alternative,
        n_resamples=5000,
    )
    assert ours.exact and len(ours.null_distribution) == 2**n
    assert ours.statistic == pytest.approx(ref.statistic, abs=1e-15)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    np.testing.assert_allclose(
        np.sort(ours.null_distribution), np.sort(ref.null_distribution), atol=1e-14
    )


def test_permutation_exact_equals_scipy_for_f1():
    """F1 is not a mean: scipy recomputes it from the swapped per-question confusion indices."""
    rng = np.random.default_rng(11)
    n = 12
    yes = rng.random(n) < 0.5
    correct_a, correct_b = rng.random(n) < 0.9, rng.random(n) < 0.5
    qa, qb = one_question_per_cluster(correct_a, correct_b, yes)

    def f1_of_index(index, axis):
        return pooled_f1_from_fields(index == TP, index == FP, index == FN, axis)

    ours = stats.paired_cluster_permutation_test(qa, qb, metric=metrics.pooled_f1, n_resamples=5000)
    ref = scipy.stats.permutation_test(
        (confusion_index(yes, correct_a), confusion_index(yes, correct_b)),
        lambda x, y, axis: f1_of_index(x, axis) - f1_of_index(y, axis),
        permutation_type="samples",
        n_resamples=5000,
    )
    assert ours.exact and ours.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_permutation_monte_carlo_p_value_rule_and_agreement_with_exact():
    a, b = random_pair(
        np.random.default_rng(12), n_clusters=12, n_splits=3, per_cell=6, p_a=0.85, p_b=0.7
    )
    exact = stats.paired_cluster_permutation_test(a, b, metric=metrics.mean_f1, n_resamples=4096)
    mc = stats.paired_cluster_permutation_test(
        a, b, metric=metrics.mean_f1, n_resamples=4095, rng=13
    )
    assert exact.exact and not mc.exact and len(mc.null_distribution) == 4095
    c = np.sum(np.abs(mc.null_distribution) >= abs(mc.statistic) - 1e-12)
    assert mc.p_value == (c + 1) / 4096
    se = np.sqrt(exact.p_value * (1 - exact.p_value) / 4095)
    assert abs(mc.p_value - exact.p_value) < 4 * se + 1 / 4096


# ----------------------------------------------------------------------------------------------
# McNemar, Miller, Holm
@pytest.mark.parametrize("b,c", [(0, 0), (3, 3), (7, 2), (0, 9), (40, 25), (120, 150)])
def test_mcnemar_equals_binomial_closed_form(b, c):
    correct_a = np.r_[np.ones(b), np.zeros(c), np.ones(30), np.zeros(11)]
    correct_b = np.r_[np.zeros(b), np.ones(c), np.ones(30), np.zeros(11)]
    res = stats.mcnemar_exact(correct_a, correct_b)
    k, n = min(b, c), b + c
    closed = min(1.0, 2 * sum(comb(n, i, exact=True) for i in range(k + 1)) / 2**n)
    assert (res.b, res.c, res.statistic) == (b, c, k)
    assert res.p_value == pytest.approx(closed, rel=1e-12)


def test_clustered_se_hand_example():
    scores = np.array([1, 1, 0, 1, 0, 0, 1.0])
    clusters = ["x", "x", "x", "y", "y", "z", "z"]
    m = scores.mean()  # 4/7
    sums = [2 - 3 * m, 1 - 2 * m, 1 - 2 * m]  # per-cluster sums of deviations
    assert stats.clustered_standard_error(scores, clusters) == pytest.approx(
        np.sqrt(sum(s**2 for s in sums)) / 7
    )
    # Miller's Eq. 4 written out: SE_CLT^2 (population variance / n) + within-cluster cross terms
    ids = np.array(clusters)
    cross = sum(
        (scores[i] - m) * (scores[j] - m)
        for i in range(7)
        for j in range(7)
        if i != j and ids[i] == ids[j]
    )
    miller = np.sqrt(np.var(scores) / 7 + cross / 49)
    assert stats.clustered_standard_error(scores, clusters) == pytest.approx(miller, rel=1e-14)


def test_clustered_se_with_singleton_clusters_is_population_variance_se():
    scores = np.random.default_rng(14).random(50)
    se = stats.clustered_standard_error(scores, np.arange(50))
    assert se == pytest.approx(np.sqrt(np.var(scores, ddof=0) / 50), rel=1e-13)
    assert se != pytest.approx(np.sqrt(np.var(scores, ddof=1) / 50), rel=1e-6)


def test_clustered_se_and_paired_difference_equal_statsmodels_ols():
    """OLS on a constant with cluster covariance: use_correction=False is Miller's CR0 exactly; the
    default multiplies the variance by G/(G-1) * (N-1)/(N-K) with K = 1 regressor."""
    rng = np.random.default_rng(15)
    groups = np.repeat(np.arange(60), rng.integers(1, 9, 60))
    n, g = len(groups), 60
    d = (
        (rng.random(n) < 0.8).astype(float)
        - (rng.random(n) < 0.7)
        + 0.3 * rng.normal(size=60)[groups]
    )
    x = np.ones(n)
    cr0 = sm.OLS(d, x).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}, use_t=False
    )
    default = sm.OLS(d, x).fit(cov_type="cluster", cov_kwds={"groups": groups})
    se = stats.clustered_standard_error(d, groups)
    assert se == pytest.approx(cr0.bse[0], rel=1e-12)
    assert default.bse[0] == pytest.approx(se * np.sqrt(g / (g - 1) * (n - 1) / (n - 1)), rel=1e-12)

    res = stats.paired_difference(d, np.zeros(n), groups, confidence_level=0.9)
    assert (res.n_questions, res.n_clusters) == (n, g)
    assert res.estimate == pytest.approx(cr0.params[0], rel=1e-12)
    assert res.p_value == pytest.approx(cr0.pvalues[0], rel=1e-10)
    np.testing.assert_allclose(
        [res.confidence_interval.low, res.confidence_interval.high],
        cr0.conf_int(alpha=0.1)[0],
        rtol=1e-12,
    )
    unclustered = sm.OLS(d, x).fit(cov_type="HC0")  # White's SE on a constant = sqrt(var(d)/n)
    assert res.standard_error_unclustered == pytest.approx(unclustered.bse[0], rel=1e-12)


def test_minimum_detectable_effect_closed_form():
    z = scipy.stats.norm.ppf
    assert stats.minimum_detectable_effect(0.01) == pytest.approx((z(0.975) + z(0.8)) * 0.01)
    assert stats.minimum_detectable_effect(0.01, alpha=0.01, power=0.9) == pytest.approx(
        (z(0.995) + z(0.9)) * 0.01
    )
    res = stats.paired_difference(np.r_[1, 0, 1, 1.0], np.r_[0, 0, 1, 0.0], [0, 0, 1, 1])
    assert res.minimum_detectable_effect == pytest.approx(2.8015852 * res.standard_error, rel=1e-7)


def test_holm_equals_statsmodels_and_closed_form():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    res = stats.holm(p, alpha=0.05)
    reject, adjusted, _, _ = multipletests(p, alpha=0.05, method="holm")
    np.testing.assert_array_equal(res.p_values, adjusted)
    np.testing.assert_array_equal(res.reject, reject)
    order = np.argsort(p)
    step = np.maximum.accumulate(np.minimum(1, (len(p) - np.arange(len(p))) * p[order]))
    np.testing.assert_allclose(res.p_values[order], step, rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# Seeds
def test_seed_summary_identical_predictions():
    preds = np.array(["yes", "no"] * 4455)
    res = stats.seed_summary({s: 0.8512 for s in range(5)}, {s: preds.copy() for s in range(5)})
    assert res.identical_predictions and res.n_differing == 0 and res.n_seeds == 5 and res.std == 0
    assert res.finding == (
        "seeds 0-4 gave identical predictions on all 8910 questions: the seed std (0) "
        "says nothing about question-sampling uncertainty"
    )


def test_seed_summary_differing_predictions_and_one_seed():
    rng = np.random.default_rng(16)
    base = rng.integers(0, 2, 8910)
    preds = {s: base.copy() for s in (0, 3, 7)}
    preds[3][:200] ^= 1
    preds[7][100:312] ^= 1  # questions 0..311 differ somewhere
    res = stats.seed_summary({0: 0.85, 3: 0.86, 7: 0.84}, preds)
    assert not res.identical_predictions and res.n_differing == 312
    assert res.std == pytest.approx(0.01) and res.mean == pytest.approx(0.85)
    assert res.finding.startswith(
        "predictions differ between seeds 0, 3, 7 on 312 of 8910 questions (3.5%)"
    )
    one = stats.seed_summary({0: 0.85}, {0: base})
    assert np.isnan(one.std) and one.n_seeds == 1 and "not measured" in one.finding


def test_seed_interval_identical_seeds_is_the_cluster_bootstrap():
    a, _ = random_pair(np.random.default_rng(17), n_clusters=40, n_splits=3, per_cell=6)
    one = stats.seed_and_question_interval([a], metric=metrics.mean_f1, n_resamples=500, rng=18)
    three = stats.seed_and_question_interval(
        [a, a, a], metric=metrics.mean_f1, n_resamples=500, rng=18
    )
    np.testing.assert_allclose(three.bootstrap_distribution, one.bootstrap_distribution, rtol=1e-14)
    assert one.estimate == pytest.approx(float(metrics.mean_f1(a.sum(0))))


def test_seed_interval_carries_between_seed_variance():
    """Clusters identical within each seed: question resampling adds nothing, so the SE must be the
    bootstrap SE of a mean over K seeds, std(ddof=0)/sqrt(K), within Monte Carlo error."""
    rng = np.random.default_rng(19)
    k = 6
    cells = [
        counts_from_index(confusion_index(np.arange(6) < 3, rng.random((3, 6)) < 0.8))
        for _ in range(k)
    ]
    by_seed = [np.broadcast_to(cell, (30, 3, 6)).copy() for cell in cells]  # (C, S, 6) per seed
    res = stats.seed_and_question_interval(
        by_seed, metric=metrics.mean_f1, n_resamples=20_000, rng=20
    )
    per_seed = np.array([metrics.mean_f1(c.sum(0)) for c in by_seed])
    np.testing.assert_allclose(res.per_seed, per_seed)
    assert res.estimate == pytest.approx(per_seed.mean())
    assert res.standard_error == pytest.approx(np.std(per_seed) / np.sqrt(k), rel=0.03)


# ----------------------------------------------------------------------------------------------
# Properties
@st.composite
def paired_counts(draw):
    n_clusters, n_splits, per_cell = (
        draw(st.integers(2, 9)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return random_pair(
        np.random.default_rng(seed), n_clusters, n_splits, per_cell, p_a=0.7, p_b=0.6
    )


METRICS = st.sampled_from(
    [metrics.mean_f1, metrics.pooled_f1, metrics.pooled_accuracy, metrics.mean_accuracy]
)


@settings(max_examples=40, deadline=None)
@given(paired_counts(), METRICS)
def test_swapping_methods_negates_the_estimate_and_keeps_the_p_value(pair, metric):
    a, b = pair
    boot_ab = stats.paired_cluster_bootstrap(a, b, metric=metric, n_resamples=200, rng=1)
    boot_ba = stats.paired_cluster_bootstrap(b, a, metric=metric, n_resamples=200, rng=1)
    assert boot_ba.estimate == -boot_ab.estimate and boot_ba.p_value == boot_ab.p_value
    np.testing.assert_array_equal(boot_ba.bootstrap_distribution, -boot_ab.bootstrap_distribution)
    assert boot_ba.confidence_interval.low == pytest.approx(
        -boot_ab.confidence_interval.high, abs=1e-12
    )
    perm_ab = stats.paired_cluster_permutation_test(a, b, metric=metric, n_resamples=200, rng=2)
    perm_ba = stats.paired_cluster_permutation_test(b, a, metric=metric, n_resamples=200, rng=2)
    assert perm_ba.statistic == -perm_ab.statistic and perm_ba.p_value == perm_ab.p_value
    for p in (boot_ab.p_value, perm_ab.p_value):
        assert 0 < p <= 1


@settings(max_examples=30, deadline=None)
@given(paired_counts(), METRICS, st.sampled_from(stats.ALTERNATIVES))
def test_identical_methods_give_zero_and_p_value_one(pair, metric, alternative):
    a, _ = pair
    perm = stats.paired_cluster_permutation_test(
        a, a, metric=metric, n_resamples=100, alternative=alternative, rng=3
    )
    boot = stats.paired_cluster_bootstrap(a, a, metric=metric, n_resamples=100, rng=3)
    assert perm.statistic == 0 and perm.p_value == 1 and np.all(perm.null_distribution == 0)
    assert boot.estimate == 0 and boot.p_value == 1
    assert boot.confidence_interval == stats.ConfidenceInterval(0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Validation
A, B = random_pair(np.random.default_rng(21), n_clusters=5, n_splits=3, per_cell=2)


@pytest.mark.parametrize(
    "counts_b,match",
    [
        (B[:, :2], r"must have the same shape; got \(5, 3, 6\) and \(5, 2, 6\)"),
        (B[:4], "counts_a has 5 clusters but counts_b has 4"),
        (B[..., :5], r"counts_b must have shape \(clusters, splits, 6\), .*got shape \(5, 3, 5\)"),
        (B[:1], "counts_b has 1 cluster"),
        (-B, "finite non-negative counts"),
        (np.roll(B, 1, axis=-1), "disagree on the labels"),
    ],
)
def test_bad_counts_are_named(counts_b, match):
    for fn in (stats.paired_cluster_bootstrap, stats.paired_cluster_permutation_test):
        with pytest.raises(ValueError, match=match):
            fn(A, counts_b, metric=metrics.mean_f1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"confidence_level": 1.5},
            "confidence_level must be a number strictly between 0 and 1; got 1.5",
        ),
        ({"confidence_level": 95}, "confidence_level .* got 95"),
        (
            {"method": "studentized"},
            "unknown method 'studentized'; choices: percentile, basic, bca",
        ),
        ({"n_resamples": 1}, "n_resamples must be an integer >= 2; got 1"),
        ({"batch": 0}, "batch must be an integer >= 1 or None; got 0"),
        ({"rng": "seed"}, "rng must be None, an int seed or a numpy.random.Generator; got 'seed'"),
        ({"metric": "mean_f1"}, "metric must be a function"),
        ({"metric": lambda c: 0.5}, r"metric must map counts \(..., S, 6\) to \(...\)"),
    ],
)
def test_bad_bootstrap_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stats.paired_cluster_bootstrap(A, B, **{"metric": metrics.mean_f1, **kwargs})


def test_bad_permutation_and_other_inputs_are_named():
    with pytest.raises(
        ValueError, match="unknown alternative 'two_sided'; choices: two-sided, greater, less"
    ):
        stats.paired_cluster_permutation_test(A, B, metric=metrics.mean_f1, alternative="two_sided")
    assert stats.paired_cluster_bootstrap(
        A, B, metric=metrics.mean_f1, method="BCa", n_resamples=50, rng=0
    )
    with pytest.raises(ValueError, match="same length; got 3 and 2"):
        stats.paired_difference([1, 0, 1], [1, 0], [0, 0, 1])
    with pytest.raises(ValueError, match=r"one label per question, shape \(3,\); got \(2,\)"):
        stats.paired_difference([1, 0, 1], [1, 0, 0], [0, 0])
    with pytest.raises(ValueError, match="power must be a number strictly between 0 and 1; got 80"):
        stats.minimum_detectable_effect(0.01, power=80)
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0, 2], [1, 0])
    with pytest.raises(ValueError, match="same length"):
        stats.mcnemar_exact([0, 1, 1], [1, 0])
    with pytest.raises(ValueError, match=r"numbers in \[0, 1\]"):
        stats.holm([0.2, 1.3])
    with pytest.raises(ValueError, match=r"same seeds; got \[0, 1\] and \[0, 2\]"):
        stats.seed_summary({0: 0.8, 1: 0.8}, {0: [1], 2: [1]})
    with pytest.raises(ValueError, match="one-hot counts per question"):
        stats.paired_bootstrap(A, B, metric=metrics.mean_f1)
    with pytest.raises(
        ValueError, match=r"counts_by_seed\[0\] and counts_by_seed\[1\] disagree on the labels"
    ):
        stats.seed_and_question_interval([A, np.roll(A, 1, axis=-1)], metric=metrics.mean_f1)


# ----------------------------------------------------------------------------------------------
# Calibration by simulation (slow): 500 images x 3 splits x 6 questions, labels balanced.
N_IMAGES, N_SPLITS, N_QUESTIONS = 500, 3, 6
# Probit model: correct iff beta_m + image + image-by-method + question + noise > 0. The image and
# question effects are shared by both methods (paired); the image-by-method effect makes the
# difference between methods correlated within images (one method fails a whole image).
SD = {"image": 0.6, "image_by_method": 0.8, "question": 0.6}
SCALE = np.sqrt(1 + sum(v**2 for v in SD.values()))
CLUSTERS = np.repeat(np.arange(N_IMAGES), N_SPLITS * N_QUESTIONS)
SPLIT_INDEX = np.broadcast_to(
    np.arange(N_SPLITS)[:, None], (N_IMAGES, N_SPLITS, N_QUESTIONS)
).ravel()


def beta_for(accuracy: float) -> float:
    """Intercept giving this marginal accuracy: P(correct) = Phi(beta / SCALE). With balanced labels
    and correctness independent of the label, each split's population F1 equals the accuracy."""
    return float(scipy.stats.norm.ppf(accuracy) * SCALE)


def simulate(rng: np.random.Generator, accuracy_a: float, accuracy_b: float):
    """-> correct (2, C, S, Q) bool, confusion index (2, C, S, Q), counts (2, C, S, 6)."""
    shape = (N_IMAGES, N_SPLITS, N_QUESTIONS)
    shared = rng.normal(0, SD["image"], (N_IMAGES, 1, 1)) + rng.normal(0, SD["question"], shape)
    own = rng.normal(0, SD["image_by_method"], (2, N_IMAGES, 1, 1)) + rng.normal(size=(2, *shape))
    beta = np.array([beta_for(accuracy_a), beta_for(accuracy_b)])[:, None, None, None]
    correct = beta + shared + own > 0
    index = confusion_index(np.arange(N_QUESTIONS) < N_QUESTIONS // 2, correct)
    return correct, index, counts_from_index(index)


def run_simulations(n_sims, accuracy_a, accuracy_b, *, n_unclustered, n_resamples, seed):
    """Rejection rates at 0.05 and coverage of the true gap for each procedure. The question-level
    bootstrap (9000 questions per draw) runs on the first `n_unclustered` simulations only, with
    half the resamples: it is 20x slower and its failure is large."""
    rng = np.random.default_rng(seed)
    truth = accuracy_a - accuracy_b  # accuracy gap = F1 gap (population)
    reject: dict[str, list] = {}
    cover: dict[str, list] = {}

    def record(name, p_value, ci=None):
        reject.setdefault(name, []).append(p_value <= 0.05)
        if ci is not None:
            cover.setdefault(name, []).append(ci.low <= truth <= ci.high)

    for i in range(n_sims):
        correct, index, counts = simulate(rng, accuracy_a, accuracy_b)
        for name, metric in (("mean_f1", metrics.mean_f1), ("accuracy", metrics.pooled_accuracy)):
            boot = stats.paired_cluster_bootstrap(
                counts[0], counts[1], metric=metric, n_resamples=n_resamples, rng=rng
            )
            perm = stats.paired_cluster_permutation_test(
                counts[0], counts[1], metric=metric, n_resamples=n_resamples, rng=rng
            )
            record(f"cluster bootstrap {name}", boot.p_value, boot.confidence_interval)
            record(f"cluster permutation {name}", perm.p_value)
        miller = stats.paired_difference(correct[0].ravel(), correct[1].ravel(), CLUSTERS)
        record("Miller clustered z accuracy", miller.p_value, miller.confidence_interval)
        if i < n_unclustered:
            qa, qb = (
                stats.question_counts(SPLIT_INDEX, x.ravel(), n_splits=N_SPLITS) for x in index
            )
            flat = stats.paired_bootstrap(
                qa, qb, metric=metrics.mean_f1, n_resamples=n_resamples // 2, rng=rng
            )
            record("UNclustered bootstrap mean_f1", flat.p_value, flat.confidence_interval)
    return {k: np.mean(v) for k, v in reject.items()}, {k: np.mean(v) for k, v in cover.items()}


def show(capsys, title, reject, cover):
    with capsys.disabled():
        print(f"\n{title}")
        for name in reject:
            coverage = f"  95% CI coverage {cover[name]:6.1%}" if name in cover else ""
            print(f"  {name:32s} reject {reject[name]:6.1%}{coverage}")


@pytest.mark.slow
def test_calibration_under_the_null(capsys):
    """Same accuracy (0.85), correlated within images: tests reject ~5%, CIs cover 0 ~95%, and the
    question-level bootstrap under-covers — the reason to resample images."""
    reject, cover = run_simulations(2000, 0.85, 0.85, n_unclustered=200, n_resamples=499, seed=2024)
    show(capsys, "null (2000 simulations; unclustered: 200)", reject, cover)
    for name, rate in reject.items():
        if not name.startswith("UN"):
            assert 0.035 <= rate <= 0.065, (name, rate)
    for name, coverage in cover.items():
        if not name.startswith("UN"):
            assert 0.93 <= coverage <= 0.97, (name, coverage)
    assert cover["UNclustered bootstrap mean_f1"] < 0.92
    assert reject["UNclustered bootstrap mean_f1"] > 0.08


@pytest.mark.slow
def test_power_and_coverage_with_a_planted_gap(capsys):
    """B is 4 points less accurate: every clustered test rejects in most simulations, and the
    intervals cover the planted gap (0.04 in accuracy and in population F1) ~95%."""
    reject, cover = run_simulations(1000, 0.86, 0.82, n_unclustered=0, n_resamples=499, seed=7)
    show(capsys, "planted gap 0.04 (1000 simulations)", reject, cover)
    for name, rate in reject.items():
        assert rate >= 0.9, (name, rate)
    for name, coverage in cover.items():
        assert 0.93 <= coverage <= 0.97, (name, coverage)


# ----------------------------------------------------------------------------------------------
# The gap's seed + image interval and the clustered share interval
def test_paired_seed_interval_with_one_seed_each_is_the_paired_cluster_bootstrap():
    a, b = random_pair(np.random.default_rng(31), n_clusters=40, n_splits=3, per_cell=6)
    seeded = stats.paired_seed_and_question_interval([a], [b], metric=metrics.mean_f1, n_resamples=500, rng=32)
    plain = stats.paired_cluster_bootstrap(a, b, metric=metrics.mean_f1, n_resamples=500, rng=32)
    np.testing.assert_allclose(seeded.bootstrap_distribution, plain.bootstrap_distribution, rtol=1e-12, atol=1e-15)
    assert seeded.estimate == pytest.approx(plain.estimate)
    assert seeded.confidence_interval == plain.confidence_interval


def test_paired_seed_interval_estimate_and_seed_variance():
    """Clusters identical within each seed: image resampling adds nothing, so the SE is the
    bootstrap SE of a difference of two independent means over seeds (closed form, ddof=0)."""
    rng = np.random.default_rng(33)

    def seeds(k, p):
        cells = [counts_from_index(confusion_index(np.arange(6) < 3, rng.random((3, 6)) < p)) for _ in range(k)]
        return [np.broadcast_to(c, (30, 3, 6)).copy() for c in cells]

    a, b = seeds(6, 0.8), seeds(4, 0.7)
    res = stats.paired_seed_and_question_interval(a, b, metric=metrics.mean_f1, n_resamples=20_000, rng=34)
    fa = np.array([metrics.mean_f1(c.sum(0)) for c in a])
    fb = np.array([metrics.mean_f1(c.sum(0)) for c in b])
    assert res.estimate == pytest.approx(fa.mean() - fb.mean())
    np.testing.assert_allclose(res.per_seed_a, fa)
    expected = np.sqrt(np.var(fa) / len(fa) + np.var(fb) / len(fb))
    assert res.standard_error == pytest.approx(expected, rel=0.03)


def test_paired_seed_interval_refuses_different_questions():
    a, b = random_pair(np.random.default_rng(35), n_clusters=10, n_splits=1, per_cell=4)
    with pytest.raises(ValueError, match="disagree on the labels"):
        stats.paired_seed_and_question_interval([a], [np.roll(b, 1, axis=-1)], metric=metrics.mean_f1)


def test_cluster_share_interval_equals_scipy_bootstrap_on_single_question_clusters():
    """With one question per cluster, the draw is scipy.stats.bootstrap's (same rng, percentile)."""
    hits = np.random.default_rng(36).random(300) < 0.9
    ours = stats.cluster_share_interval(hits, np.arange(300), n_resamples=999, rng=37)
    theirs = scipy.stats.bootstrap((hits.astype(float),), np.mean, n_resamples=999, method="percentile",
                                   random_state=np.random.default_rng(37), vectorized=True)
    assert ours.estimate == pytest.approx(hits.mean())
    assert ours.confidence_interval.low == pytest.approx(theirs.confidence_interval.low)
    assert ours.confidence_interval.high == pytest.approx(theirs.confidence_interval.high)
    assert ours.standard_error == pytest.approx(theirs.standard_error)


def test_cluster_share_interval_clustered_se_equals_statsmodels():
    rng = np.random.default_rng(38)
    clusters = np.repeat(np.arange(60), 7)
    hits = rng.random(len(clusters)) < np.repeat(rng.uniform(0.3, 1.0, 60), 7)
    res = stats.cluster_share_interval(hits, clusters, n_resamples=200, rng=39)
    fit = sm.OLS(hits.astype(float), np.ones(len(hits))).fit(cov_type="cluster", cov_kwds={"groups": clusters, "use_correction": False})
    assert res.clustered_standard_error == pytest.approx(float(fit.bse[0]), rel=1e-9)
    assert 0 <= res.confidence_interval.low <= res.estimate <= res.confidence_interval.high <= 1


SEED_SD = {"seed": 0.05, "seed_by_image": 0.5}  # probit scale: ~0.9 points of run-to-run accuracy std


@pytest.mark.slow
def test_paired_seed_interval_calibration(capsys):
    """A seeded method (5 seeds) against a deterministic one (computed once): the 95% interval of
    the gap covers the population gap (over images AND seeds) 93-97% of the time; the first seed's
    image-only interval under-covers. With fewer seeds and a larger global seed effect the seed part
    is too narrow (a bootstrap over 3 seeds with a 3-point seed std covered 91% in a trial run)."""
    rng = np.random.default_rng(2025)
    truth = 0.80 - 0.78
    covered, covered_first = [], []
    shape = (N_IMAGES, N_SPLITS, N_QUESTIONS)
    labels = np.arange(N_QUESTIONS) < N_QUESTIONS // 2
    for _ in range(1000):
        shared = rng.normal(0, SD["image"], (N_IMAGES, 1, 1)) + rng.normal(0, SD["question"], shape)
        scale_a = np.sqrt(SCALE**2 + sum(v**2 for v in SEED_SD.values()))
        beta_a, beta_b = scipy.stats.norm.ppf(0.80) * scale_a, scipy.stats.norm.ppf(0.78) * SCALE
        own_a = rng.normal(0, SD["image_by_method"], (N_IMAGES, 1, 1))
        a = []
        for _ in range(5):
            seed_effect = rng.normal(0, SEED_SD["seed"]) + rng.normal(0, SEED_SD["seed_by_image"], (N_IMAGES, 1, 1))
            a.append(counts_from_index(confusion_index(labels, beta_a + shared + own_a + seed_effect + rng.normal(size=shape) > 0)))
        own_b = rng.normal(0, SD["image_by_method"], (N_IMAGES, 1, 1))
        b = [counts_from_index(confusion_index(labels, beta_b + shared + own_b + rng.normal(size=shape) > 0))]
        res = stats.paired_seed_and_question_interval(a, b, metric=metrics.mean_f1, n_resamples=499, rng=rng)
        covered.append(res.confidence_interval.low <= truth <= res.confidence_interval.high)
        first = stats.paired_cluster_bootstrap(a[0], b[0], metric=metrics.mean_f1, n_resamples=499, rng=rng)
        covered_first.append(first.confidence_interval.low <= truth <= first.confidence_interval.high)
    with capsys.disabled():
        print(f"\nseed + image interval of a gap (5 seeds vs 1): coverage {np.mean(covered):.1%}; "
              f"first seed only, images resampled: {np.mean(covered_first):.1%}")
    assert 0.93 <= np.mean(covered) <= 0.97
    assert np.mean(covered_first) < 0.92  # one seed misses the run-to-run variance: why seeds are resampled
