"""Paired, image-clustered statistics for comparing two pruning methods on the same POPE questions.

Pure numpy/scipy/statsmodels: no torch, no files. Facts, formulas and citations:
../shared/notes/statistics.md ("the notes" below).

Why clustered: POPE asks ~18 questions about each of 500 images, and answers about one image are
correlated, so the unit of independent sampling is the image, not the question. The resampling
functions therefore take confusion counts per cluster, `counts` of shape (C, S, 6) (clusters x
splits x `metrics.COUNT_FIELDS`), and a vectorised `metric(counts (..., S, 6)) -> (...)` such as
`metrics.mean_f1` or `metrics.metric_function("f1/random", splits)`. A resample of clusters is a
weight vector over clusters, so every replicate's counts are one matrix product and the metric (F1
included, which is not a mean over questions) is recomputed exactly on every replicate.

Shaped like `scipy.stats`: data positional, options keyword-only with defaults, an explicit `rng`
(None, an int seed, or a `numpy.random.Generator`, which is advanced), frozen results that keep the
estimate, the interval, the p-value and the resampled distribution. scipy and statsmodels do the
work where they can (McNemar, Holm, the normal quantiles); tests/test_stats.py checks the hand-
written parts against them and against closed forms, and checks calibration by simulation.

p-value rules (the notes, "Paired bootstrap" and "Paired permutation"):
- permutation: p = (c + 1) / (B + 1) with c = #{|T*| >= |T|} (two-sided; Monte Carlo), or c / 2^C
  when all 2^C swap patterns are enumerated (exact); as `scipy.stats.permutation_test`.
- bootstrap: the distribution centred at the estimate stands in for the null, c = #{|d* - d| >= |d|}
  (the two-sided form of Berg-Kirkpatrick et al. 2012's #{d* > 2d}), p = (c + 1) / (B + 1). It is
  less conservative than the permutation test (Riezler & Maxwell 2005): prefer the permutation
  p-value, and the bootstrap for the interval.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import norm
from statsmodels.stats.contingency_tables import mcnemar as _sm_mcnemar
from statsmodels.stats.multitest import multipletests

from prune_eval.analysis.metrics import COUNT_FIELDS, FN, FP, OTHER_NO, OTHER_YES, TN, TP, recall

__all__ = [
    "BootstrapResult",
    "ConfidenceInterval",
    "HolmResult",
    "McNemarResult",
    "PairedDifference",
    "PairedSeedIntervalResult",
    "PermutationResult",
    "SeedIntervalResult",
    "SeedSummary",
    "ShareResult",
    "cluster_share_interval",
    "clustered_standard_error",
    "holm",
    "mcnemar_exact",
    "minimum_detectable_effect",
    "paired_bootstrap",
    "paired_cluster_bootstrap",
    "paired_cluster_permutation_test",
    "paired_difference",
    "paired_seed_and_question_interval",
    "question_counts",
    "seed_and_question_interval",
    "seed_summary",
]

Metric = Callable[[np.ndarray], np.ndarray]
RngLike = np.random.Generator | int | None

BOOTSTRAP_METHODS = ("percentile", "basic", "bca")
ALTERNATIVES = ("two-sided", "greater", "less")
N_FIELDS = len(COUNT_FIELDS)


# ----------------------------------------------------------------------------------------------
# Results
@dataclass(frozen=True)
class ConfidenceInterval:
    low: float
    high: float


@dataclass(frozen=True)
class BootstrapResult:
    """metric(A) - metric(B): estimate on the full data, interval and SE from the resamples."""

    estimate: float
    confidence_interval: ConfidenceInterval
    standard_error: float  # std (ddof=1) of the bootstrap distribution, as scipy
    p_value: float  # two-sided, centred bootstrap, (c + 1) / (B + 1)
    bootstrap_distribution: np.ndarray  # (B,)
    n_clusters: int


@dataclass(frozen=True)
class PermutationResult:
    statistic: float  # metric(A) - metric(B)
    p_value: float
    null_distribution: np.ndarray  # (B,) or (2^C,) when exact
    exact: bool  # all 2^C swap patterns enumerated


@dataclass(frozen=True)
class McNemarResult:
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    statistic: float  # min(b, c), as statsmodels
    p_value: float


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-question score differences with Miller's (2024) clustered standard error."""

    estimate: float
    standard_error: float  # clustered (Miller Eq. 4)
    standard_error_unclustered: float  # sqrt(var(d) / n), population variance
    confidence_interval: ConfidenceInterval  # normal, from the clustered SE
    p_value: float  # two-sided z-test, clustered SE
    n_questions: int
    n_clusters: int
    minimum_detectable_effect: float


@dataclass(frozen=True)
class HolmResult:
    p_values: np.ndarray  # Holm-adjusted, in the input order
    reject: np.ndarray  # bool, at the family-wise level alpha


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float  # ddof=1; nan for one seed
    n_seeds: int
    seeds: tuple
    identical_predictions: bool
    n_questions: int
    n_differing: int  # questions on which some seed disagrees with another
    finding: str  # the above in plain words, for the report


@dataclass(frozen=True)
class SeedIntervalResult:
    estimate: float  # mean over seeds of the metric
    confidence_interval: ConfidenceInterval
    standard_error: float
    bootstrap_distribution: np.ndarray  # (B,)
    per_seed: np.ndarray  # (K,) metric of each seed
    n_seeds: int
    n_clusters: int


@dataclass(frozen=True)
class PairedSeedIntervalResult:
    """mean_k metric(A_k) - mean_j metric(B_j) over each side's seeds, images and seeds resampled."""

    estimate: float
    confidence_interval: ConfidenceInterval
    standard_error: float
    bootstrap_distribution: np.ndarray  # (B,)
    per_seed_a: np.ndarray  # (K_a,)
    per_seed_b: np.ndarray  # (K_b,)
    n_clusters: int


@dataclass(frozen=True)
class ShareResult:
    """A share of questions (e.g. answers equal to vanilla's) with an image-cluster bootstrap interval."""

    estimate: float
    confidence_interval: ConfidenceInterval  # percentile; inside [0, 1]
    standard_error: float  # bootstrap SE
    clustered_standard_error: float  # Miller's Eq. 4, for comparison
    n_questions: int
    n_clusters: int


# ----------------------------------------------------------------------------------------------
# Input validation: every message names the bad value and what is allowed.
def _as_generator(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be None, an int seed or a numpy.random.Generator; got {rng!r}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    key = value.lower() if isinstance(value, str) else value
    if key not in choices:
        raise ValueError(f"unknown {name} {value!r}; choices: {', '.join(choices)}")
    return key


def _check_fraction(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not 0 < value < 1
    ):
        raise ValueError(f"{name} must be a number strictly between 0 and 1; got {value!r}")
    return float(value)


def _check_int(name: str, value: int | None, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return int(value)


def _check_counts(counts: np.ndarray, name: str) -> np.ndarray:
    """(C, S, 6) non-negative finite counts with at least two clusters to resample."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != N_FIELDS:
        raise ValueError(
            f"{name} must have shape (clusters, splits, {N_FIELDS}), last axis in the order "
            f"{', '.join(COUNT_FIELDS)}; got shape {arr.shape}"
        )
    if arr.shape[0] < 2:
        raise ValueError(f"{name} has {arr.shape[0]} cluster(s); resampling needs at least 2")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must hold finite non-negative counts; got min {np.nanmin(arr)}")
    return arr


def _label_counts(counts: np.ndarray) -> np.ndarray:
    """(..., S, 6) -> (..., S, 2): questions labelled yes and no, whatever the predictions."""
    yes = counts[..., TP] + counts[..., FN] + counts[..., OTHER_YES]
    no = counts[..., FP] + counts[..., TN] + counts[..., OTHER_NO]
    return np.stack([yes, no], axis=-1)


def _check_same_questions(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Paired data must be the same questions: same shape and the same labels in every cell."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has {a.shape[0]} clusters but {name_b} has {b.shape[0]}; paired data must "
            "cover the same clusters (images) in the same order"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {a.shape} and {b.shape}"
        )
    bad = np.argwhere(np.any(_label_counts(a) != _label_counts(b), axis=-1))  # (n_bad, 2)
    if len(bad):
        c, s = bad[0]
        raise ValueError(
            f"{name_a} and {name_b} disagree on the labels of {len(bad)} (cluster, split) cells "
            f"(first: cluster {c}, split {s}); paired data must answer the same questions"
        )


def _check_paired_counts(
    counts_a: np.ndarray, counts_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_counts(counts_a, "counts_a"), _check_counts(counts_b, "counts_b")
    _check_same_questions(a, b, "counts_a", "counts_b")
    return a, b


def _check_metric(metric: Metric) -> Metric:
    if not callable(metric):
        raise ValueError(
            f"metric must be a function of counts (..., S, 6) -> (...); got {metric!r}"
        )
    return metric


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or len(arr) < 2 or not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} must be a 1-d array of at least 2 finite scores; got shape {arr.shape}"
        )
    return arr


def _cluster_index(clusters: Sequence, n: int) -> tuple[np.ndarray, int]:
    """Cluster labels of any hashable type -> (index (n,) in 0..G-1, G)."""
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ValueError(
            f"clusters must have one label per question, shape ({n},); got {labels.shape}"
        )
    _, index = np.unique(labels, return_inverse=True)
    return index.reshape(-1), int(index.max()) + 1


# ----------------------------------------------------------------------------------------------
# Resampling machinery
def _evaluate(metric: Metric, counts: np.ndarray) -> np.ndarray:
    """metric on counts (..., S, 6), checking it is vectorised: the output must have shape (...)."""
    out = np.asarray(metric(counts), dtype=np.float64)
    if out.shape != counts.shape[:-2]:
        raise ValueError(
            f"metric must map counts (..., S, 6) to (...); it mapped shape {counts.shape} "
            f"to {out.shape}"
        )
    return out


def _batch_sizes(n_resamples: int, batch: int | None) -> list[int]:
    step = batch or n_resamples
    return [min(step, n_resamples - k) for k in range(0, n_resamples, step)]


def _cluster_weights(rng: np.random.Generator, n_clusters: int, size: int) -> np.ndarray:
    """(size, C) multiplicities of each cluster in each resample.

    Drawn as `scipy.stats.bootstrap` draws its indices (`integers(0, C, (size, C))`), so with
    clusters of one question and the same seed our replicates are scipy's: the tests rely on it.
    """
    index = rng.integers(0, n_clusters, (size, n_clusters))  # (B, C) drawn clusters
    index += n_clusters * np.arange(size)[:, None]  # row offsets: one bincount for all rows
    weights = np.bincount(index.ravel(), minlength=size * n_clusters)
    return weights.reshape(size, n_clusters).astype(float)


@functools.lru_cache(maxsize=2)
def _seeded_first_weights(seed: int, n_clusters: int, size: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    weights = _cluster_weights(rng, n_clusters, size)
    weights.setflags(write=False)
    return weights, rng.bit_generator.state


def _first_weights(rng: RngLike, n_clusters: int, size: int) -> tuple[np.ndarray, np.random.Generator]:
    """The first (size, C) cluster weights drawn from `rng`, and the generator to continue with.

    Exactly `_cluster_weights(_as_generator(rng), ...)`; an int seed's draw is cached (with the
    generator state after it), because a report resamples the same 500 images with the same seed
    hundreds of times and drawing the weights dominated its run time.
    """
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        weights, state = _seeded_first_weights(int(rng), n_clusters, size)
        generator = np.random.default_rng()
        generator.bit_generator.state = state
        return weights, generator
    generator = _as_generator(rng)
    return _cluster_weights(generator, n_clusters, size), generator


def _weighted_totals(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Counts of each resample: (B, C) @ (C, S*6) -> (B, S, 6)."""
    c, s, f = counts.shape
    return (weights @ counts.reshape(c, s * f)).reshape(-1, s, f)


def _tie_tolerance(value: float) -> float:
    """Metric differences that are equal in exact arithmetic can differ by rounding (x/n - y/n);
    1e-12 absorbs that and is far below any real difference (1/9000 ~ 1e-4)."""
    return 1e-12 * max(1.0, abs(value))


def _jackknife(a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    """Leave-one-cluster-out differences: totals (S, 6) - counts (C, S, 6) -> (C,)."""
    return _evaluate(metric, a.sum(0) - a) - _evaluate(metric, b.sum(0) - b)


def _bca_levels(distribution: np.ndarray, estimate: float, jackknife: np.ndarray, alpha: float):
    """BCa quantile levels (Efron & Tibshirani 1993, 14.3), as scipy: bias from the share of
    replicates below the estimate (ties count half), acceleration from the cluster jackknife."""
    below = np.count_nonzero(distribution < estimate) + np.count_nonzero(distribution <= estimate)
    z0 = ndtri(below / (2 * len(distribution)))
    dev = jackknife.mean() - jackknife  # (C,)
    denominator = 6 * np.sum(dev**2) ** 1.5
    accel = np.sum(dev**3) / denominator if denominator > 0 else 0.0
    z = z0 + ndtri(np.array([alpha, 1 - alpha]))
    return ndtr(z0 + z / (1 - accel * z))


def _interval(distribution: np.ndarray, estimate: float, levels, method: str) -> ConfidenceInterval:
    low, high = np.quantile(distribution, levels)  # linear interpolation, as scipy
    if method == "basic":
        low, high = 2 * estimate - high, 2 * estimate - low
    return ConfidenceInterval(float(low), float(high))


def _centred_p_value(distribution: np.ndarray, estimate: float) -> float:
    extreme = np.abs(distribution - estimate) >= abs(estimate) - _tie_tolerance(estimate)
    return float((np.count_nonzero(extreme) + 1) / (len(distribution) + 1))


# ----------------------------------------------------------------------------------------------
# Resampling tests
def paired_cluster_bootstrap(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    *,
    metric: Metric,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    method: str = "percentile",
    batch: int | None = None,
    rng: RngLike = None,
) -> BootstrapResult:
    """Interval for metric(A) - metric(B), resampling clusters (images) with all their questions.

    Both methods get the same draw (paired), and the metric is recomputed on each replicate's summed
    counts. `method`: 'percentile', 'basic' or 'bca' (bias and skew corrected, acceleration from the
    jackknife over clusters). Percentile intervals are too narrow with few clusters (the notes):
    with few images lean on the permutation test. `batch` bounds memory to (batch, C) weights and
    does not change the result.
    """
    a, b = _check_paired_counts(counts_a, counts_b)
    metric = _check_metric(metric)
    n_resamples = _check_int("n_resamples", n_resamples, 2)
    batch = _check_int("batch", batch, 1, allow_none=True)
    confidence_level = _check_fraction("confidence_level", confidence_level)
    method = _check_choice("method", method, BOOTSTRAP_METHODS)

    estimate = float(_evaluate(metric, a.sum(0)) - _evaluate(metric, b.sum(0)))
    parts = []
    for k, size in enumerate(_batch_sizes(n_resamples, batch)):
        if k == 0:
            weights, rng = _first_weights(rng, a.shape[0], size)  # (b, C)
        else:
            weights = _cluster_weights(rng, a.shape[0], size)
        parts.append(
            _evaluate(metric, _weighted_totals(weights, a))
            - _evaluate(metric, _weighted_totals(weights, b))
        )
    distribution = np.concatenate(parts)  # (B,)
    alpha = (1 - confidence_level) / 2
    levels = (alpha, 1 - alpha)
    if method == "bca":
        levels = _bca_levels(distribution, estimate, _jackknife(a, b, metric), alpha)
    return BootstrapResult(
        estimate=estimate,
        confidence_interval=_interval(distribution, estimate, levels, method),
        standard_error=float(np.std(distribution, ddof=1)),
        p_value=_centred_p_value(distribution, estimate),
        bootstrap_distribution=distribution,
        n_clusters=a.shape[0],
    )


def paired_bootstrap(
    question_counts_a: np.ndarray,
    question_counts_b: np.ndarray,
    *,
    metric: Metric,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    method: str = "percentile",
    batch: int | None = None,
    rng: RngLike = None,
) -> BootstrapResult:
    """The textbook paired bootstrap (Koehn 2004) that resamples questions and ignores images.

    Kept to show by how much it under-covers when answers are correlated within images; use
    `paired_cluster_bootstrap` for inference. Input: one-hot counts per question, (N, S, 6), e.g.
    from `question_counts` — clusters of size one, so the same code path does the work.
    """
    for name, counts in (
        ("question_counts_a", question_counts_a),
        ("question_counts_b", question_counts_b),
    ):
        arr = np.asarray(counts)
        if arr.ndim != 3 or not np.all(arr.sum(axis=(1, 2)) == 1):
            raise ValueError(
                f"{name} must be one-hot counts per question, shape (N, S, 6) with one 1 per row"
            )
    return paired_cluster_bootstrap(
        question_counts_a,
        question_counts_b,
        metric=metric,
        n_resamples=n_resamples,
        confidence_level=confidence_level,
        method=method,
        batch=batch,
        rng=rng,
    )


def question_counts(
    split_index: np.ndarray, count_index: np.ndarray, *, n_splits: int
) -> np.ndarray:
    """Per-question one-hot counts (N, S, 6) from split positions and `metrics.confusion_index`."""
    split_index, count_index = np.asarray(split_index), np.asarray(count_index)
    out = np.zeros((len(split_index), n_splits, N_FIELDS))
    out[np.arange(len(split_index)), split_index, count_index] = 1
    return out


def _all_swaps(n_clusters: int) -> np.ndarray:
    """Every swap pattern: (2^C, C) of 0/1, row k = binary digits of k (row 0 = no swap)."""
    return ((np.arange(2**n_clusters)[:, None] >> np.arange(n_clusters)) & 1).astype(float)


def _random_swaps(rng: np.random.Generator, size: int, n_clusters: int) -> np.ndarray:
    """(size, C) of 0/1: swap each cluster with probability 1/2."""
    return rng.integers(0, 2, (size, n_clusters)).astype(float)


def _swapped_differences(
    a: np.ndarray, b: np.ndarray, metric: Metric, swaps: np.ndarray
) -> np.ndarray:
    """metric(A') - metric(B') when swapped clusters trade counts: A' = A + moved, B' = B - moved"""
    c, s, f = a.shape
    moved = (swaps @ (b - a).reshape(c, s * f)).reshape(-1, s, f)  # (B, C) @ (C, S*6) -> (B, S, 6)
    return _evaluate(metric, a.sum(0) + moved) - _evaluate(metric, b.sum(0) - moved)


def _permutation_p_value(
    null: np.ndarray, statistic: float, alternative: str, exact: bool
) -> float:
    tol = _tie_tolerance(statistic)
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(statistic) - tol  # the swap null is symmetric about 0
    elif alternative == "greater":
        extreme = null >= statistic - tol
    else:
        extreme = null <= statistic + tol
    count = np.count_nonzero(extreme)
    return float(count / len(null) if exact else (count + 1) / (len(null) + 1))


def paired_cluster_permutation_test(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    *,
    metric: Metric,
    n_resamples: int = 10_000,
    alternative: str = "two-sided",
    batch: int | None = None,
    rng: RngLike = None,
) -> PermutationResult:
    """Approximate randomization by image: H0 says A and B are exchangeable within each image.

    Each cluster's A and B counts are swapped with probability 1/2 and the metric difference is
    recomputed. Exact (all 2^C patterns, p = c / 2^C) when 2^C <= n_resamples, else Monte Carlo
    with p = (c + 1) / (B + 1). 'greater' tests metric(A) > metric(B).
    """
    a, b = _check_paired_counts(counts_a, counts_b)
    metric = _check_metric(metric)
    n_resamples = _check_int("n_resamples", n_resamples, 1)
    batch = _check_int("batch", batch, 1, allow_none=True)
    alternative = _check_choice("alternative", alternative, ALTERNATIVES)
    rng = _as_generator(rng)

    statistic = float(_evaluate(metric, a.sum(0)) - _evaluate(metric, b.sum(0)))
    n_clusters = a.shape[0]
    exact = 2**n_clusters <= n_resamples
    if exact:
        null = _swapped_differences(a, b, metric, _all_swaps(n_clusters))
    else:
        null = np.concatenate(
            [
                _swapped_differences(a, b, metric, _random_swaps(rng, size, n_clusters))
                for size in _batch_sizes(n_resamples, batch)
            ]
        )
    return PermutationResult(
        statistic, _permutation_p_value(null, statistic, alternative, exact), null, exact
    )


# ----------------------------------------------------------------------------------------------
# Closed-form tests on per-question scores
def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """Exact McNemar test on paired 0/1 correctness (statsmodels). It ignores clustering: report it
    beside the clustered tests, never instead of them."""
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"correct_a and correct_b must be 1-d of the same length; got {a.shape} and {b.shape}"
        )
    for name, arr in (("correct_a", a), ("correct_b", b)):
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(
                f"{name} must hold 0/1 (or bool) correctness; got values {np.unique(arr)[:5]}"
            )
    a, b = a.astype(bool), b.astype(bool)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    res = _sm_mcnemar(table, exact=True)
    b_count, c_count = int(table[0][1]), int(table[1][0])
    return McNemarResult(
        b=b_count, c=c_count, statistic=float(res.statistic), p_value=float(res.pvalue)
    )


def _clustered_variance(scores: np.ndarray, index: np.ndarray, n_clusters: int) -> float:
    """Miller Eq. 4 squared: (1/n^2) sum_c (sum_{i in c} (s_i - mean))^2.

    Expanding the square gives Miller's SE_CLT^2 + cross terms, with SE_CLT^2 = var(s) / n and var
    the POPULATION variance (divide by n); hence one question per cluster gives sqrt(var(s) / n).
    This is CR0: statsmodels' cluster covariance with use_correction=False. inspect_ai multiplies by
    C / (C - 1) (statsmodels' default); lmms-eval uses var with ddof=1 in the CLT term.
    """
    sums = np.bincount(index, weights=scores - scores.mean(), minlength=n_clusters)  # (G,)
    return float(np.sum(sums**2)) / len(scores) ** 2


def clustered_standard_error(scores: np.ndarray, clusters: Sequence) -> float:
    """Standard error of the mean of per-question scores when questions share a cluster (image)."""
    s = _check_scores(scores, "scores")
    index, n_clusters = _cluster_index(clusters, len(s))
    return float(np.sqrt(_clustered_variance(s, index, n_clusters)))


def minimum_detectable_effect(
    standard_error: float, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """Smallest true gap a two-sided level-alpha test detects with the given power,
    (z_{1-alpha/2} + z_power) * SE (the notes, "Power"): what this benchmark can see at all."""
    alpha, power = _check_fraction("alpha", alpha), _check_fraction("power", power)
    if not np.isfinite(standard_error) or standard_error < 0:
        raise ValueError(f"standard_error must be finite and >= 0; got {standard_error!r}")
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * standard_error)


def paired_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    clusters: Sequence,
    *,
    confidence_level: float = 0.95,
    alpha: float = 0.05,
    power: float = 0.8,
) -> PairedDifference:
    """Miller's paired analysis of mean scores (accuracy): d_i = a_i - b_i, clustered SE of mean(d).

    Only for metrics that are means over questions; F1 is not one (use the resampling functions).
    """
    a, b = _check_scores(scores_a, "scores_a"), _check_scores(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(
            f"scores_a and scores_b must have the same length; got {len(a)} and {len(b)}"
        )
    confidence_level = _check_fraction("confidence_level", confidence_level)
    index, n_clusters = _cluster_index(clusters, len(a))
    d = a - b
    estimate = float(d.mean())
    se = float(np.sqrt(_clustered_variance(d, index, n_clusters)))
    z = norm.ppf(0.5 + confidence_level / 2)
    p_value = float(2 * norm.sf(abs(estimate) / se)) if se > 0 else float(estimate == 0)
    return PairedDifference(
        estimate=estimate,
        standard_error=se,
        standard_error_unclustered=float(np.sqrt(np.var(d) / len(d))),
        confidence_interval=ConfidenceInterval(estimate - z * se, estimate + z * se),
        p_value=p_value,
        n_questions=len(d),
        n_clusters=n_clusters,
        minimum_detectable_effect=minimum_detectable_effect(se, alpha=alpha, power=power),
    )


def holm(p_values: Sequence[float], *, alpha: float = 0.05) -> HolmResult:
    """Holm's step-down adjustment across the family of gaps in one report (statsmodels)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(
            f"p_values must be a non-empty 1-d sequence of numbers in [0, 1]; got {p_values!r}"
        )
    reject, adjusted, _, _ = multipletests(p, alpha=_check_fraction("alpha", alpha), method="holm")
    return HolmResult(p_values=adjusted, reject=reject)


# ----------------------------------------------------------------------------------------------
# Seeds
def _seed_label(seeds: Sequence) -> str:
    """'0-4' for a run of consecutive integers, else '0, 3, 7'."""
    ints = all(isinstance(s, (int, np.integer)) for s in seeds)
    if ints and len(seeds) >= 3 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def _differing_questions(predictions: list[np.ndarray]) -> int:
    first = predictions[0]
    differ = np.zeros(first.shape, dtype=bool)
    for other in predictions[1:]:
        differ |= other != first
    return int(differ.sum())


def _seed_finding(seeds: tuple, n_questions: int, n_differing: int, std: float) -> str:
    label = _seed_label(seeds)
    if len(seeds) == 1:
        return f"only seed {label} was run on {n_questions} questions: seed variation not measured"
    if n_differing == 0:
        return (
            f"seeds {label} gave identical predictions on all {n_questions} questions: the seed "
            f"std ({std:.3g}) says nothing about question-sampling uncertainty"
        )
    return (
        f"predictions differ between seeds {label} on {n_differing} of {n_questions} questions "
        f"({n_differing / n_questions:.1%}): the seed std ({std:.3g}) measures run-to-run "
        "randomness; combine it with question sampling (seed_and_question_interval)"
    )


def seed_summary(values_by_seed: Mapping, predictions_by_seed: Mapping) -> SeedSummary:
    """Mean and std of a metric over seeds, and whether the seeds changed any prediction at all.

    With greedy decoding and deterministic methods every seed gives the same predictions: the seed
    std is then 0 and says nothing about whether a gap is real (the notes, "The design we are in").
    The `finding` says which case the data are in, so the report states it instead of assuming it.
    """
    if not values_by_seed:
        raise ValueError("values_by_seed is empty; pass at least one seed")
    if set(values_by_seed) != set(predictions_by_seed):
        raise ValueError(
            f"values_by_seed and predictions_by_seed must have the same seeds; got "
            f"{sorted(values_by_seed, key=str)} and {sorted(predictions_by_seed, key=str)}"
        )
    seeds = tuple(sorted(values_by_seed))
    values = np.array([float(values_by_seed[s]) for s in seeds])
    predictions = [np.asarray(predictions_by_seed[s]) for s in seeds]
    shapes = {p.shape for p in predictions}
    if len(shapes) != 1 or len(predictions[0].shape) != 1:
        raise ValueError(
            f"predictions_by_seed must be 1-d arrays of one length; got shapes {sorted(shapes)}"
        )
    n_questions, n_differing = len(predictions[0]), _differing_questions(predictions)
    # deviations from the first value: identical values give exactly 0, not rounding noise
    std = float(np.std(values - values[0], ddof=1)) if len(seeds) > 1 else float("nan")
    return SeedSummary(
        mean=float(values.mean()),
        std=std,
        n_seeds=len(seeds),
        seeds=seeds,
        identical_predictions=n_differing == 0,
        n_questions=n_questions,
        n_differing=n_differing,
        finding=_seed_finding(seeds, n_questions, n_differing, std),
    )


def _check_seed_counts(counts_by_seed: Sequence[np.ndarray]) -> np.ndarray:
    """One (C, S, 6) array per seed, all over the same questions -> (K, C, S, 6)."""
    arrays = [_check_counts(c, f"counts_by_seed[{k}]") for k, c in enumerate(counts_by_seed)]
    if not arrays:
        raise ValueError("counts_by_seed is empty; pass one (C, S, 6) array per seed")
    for k, arr in enumerate(arrays[1:], start=1):
        _check_same_questions(arrays[0], arr, "counts_by_seed[0]", f"counts_by_seed[{k}]")
    return np.stack(arrays)


def _seed_replicates(stack: np.ndarray, cluster_w: np.ndarray, rng: np.random.Generator, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed metric (K,) and the bootstrap replicates (B,): each replicate's drawn clusters
    (`cluster_w` (B, C)) summed for every seed, then averaged over seeds drawn with replacement."""
    k, c, s, f = stack.shape  # (K, C, S, 6)
    seed_w = _cluster_weights(rng, k, len(cluster_w)) / k  # (B, K), rows sum to 1
    totals = (cluster_w @ stack.transpose(1, 0, 2, 3).reshape(c, k * s * f)).reshape(len(cluster_w), k, s, f)
    return _evaluate(metric, stack.sum(1)), np.sum(_evaluate(metric, totals) * seed_w, axis=1)


def seed_and_question_interval(
    counts_by_seed: Sequence[np.ndarray],
    *,
    metric: Metric,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    rng: RngLike = None,
) -> SeedIntervalResult:
    """Percentile interval for the mean over seeds of a metric, when seeds change predictions.

    Estimator: the mean over the K seeds of metric(counts of seed k). Seeds and images are crossed
    (every seed answers every question), so each replicate resamples clusters AND seeds, both with
    replacement and independently — the pigeonhole bootstrap (Owen 2007, Ann. Appl. Stat. 1:386),
    which is mildly conservative. The replicate is the mean over the drawn seeds of the metric on
    the drawn clusters (the same clusters for all seeds), so the interval carries question-sampling
    variance and between-seed variance / K. One seed, or identical seeds, give the cluster
    bootstrap.
    """
    stack = _check_seed_counts(counts_by_seed)  # (K, C, S, 6)
    metric = _check_metric(metric)
    n_resamples = _check_int("n_resamples", n_resamples, 2)
    confidence_level = _check_fraction("confidence_level", confidence_level)
    n_seeds, n_clusters = stack.shape[:2]
    cluster_w, rng = _first_weights(rng, n_clusters, n_resamples)  # (B, C)
    per_seed, distribution = _seed_replicates(stack, cluster_w, rng, metric)
    alpha = (1 - confidence_level) / 2
    estimate = float(per_seed.mean())
    return SeedIntervalResult(
        estimate=estimate,
        confidence_interval=_interval(distribution, estimate, (alpha, 1 - alpha), "percentile"),
        standard_error=float(np.std(distribution, ddof=1)),
        bootstrap_distribution=distribution,
        per_seed=per_seed,
        n_seeds=n_seeds,
        n_clusters=n_clusters,
    )


def paired_seed_and_question_interval(
    counts_a_by_seed: Sequence[np.ndarray],
    counts_b_by_seed: Sequence[np.ndarray],
    *,
    metric: Metric,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    rng: RngLike = None,
) -> PairedSeedIntervalResult:
    """Percentile interval for a gap between two configurations whose seeds change predictions.

    Estimator: mean over A's K_a seeds of metric(A_k) minus mean over B's K_b seeds of metric(B_j)
    (K_b = 1 for a configuration computed once, e.g. a method that does not use the seed). Each
    replicate draws images once for both sides (paired: the same questions) and, independently, each
    side's seeds with replacement (the two sides' seeds are separate sources of randomness; a seed
    number shared by two methods couples nothing). It is `seed_and_question_interval` applied to a
    difference (Owen 2007's pigeonhole bootstrap, mildly conservative); with one seed per side its
    replicates are `paired_cluster_bootstrap`'s for the same rng. Calibrated by simulation in
    tests/test_stats.py.
    """
    a = _check_seed_counts(counts_a_by_seed)  # (K_a, C, S, 6)
    b = _check_seed_counts(counts_b_by_seed)  # (K_b, C, S, 6)
    _check_same_questions(a[0], b[0], "counts_a_by_seed[0]", "counts_b_by_seed[0]")
    metric = _check_metric(metric)
    n_resamples = _check_int("n_resamples", n_resamples, 2)
    confidence_level = _check_fraction("confidence_level", confidence_level)
    n_clusters = a.shape[1]
    cluster_w, rng = _first_weights(rng, n_clusters, n_resamples)  # (B, C), shared by both sides

    per_a, dist_a = _seed_replicates(a, cluster_w, rng, metric)
    per_b, dist_b = _seed_replicates(b, cluster_w, rng, metric)
    distribution = dist_a - dist_b
    estimate = float(per_a.mean() - per_b.mean())
    alpha = (1 - confidence_level) / 2
    return PairedSeedIntervalResult(
        estimate=estimate,
        confidence_interval=_interval(distribution, estimate, (alpha, 1 - alpha), "percentile"),
        standard_error=float(np.std(distribution, ddof=1)),
        bootstrap_distribution=distribution,
        per_seed_a=per_a,
        per_seed_b=per_b,
        n_clusters=n_clusters,
    )


def cluster_share_interval(
    hits: np.ndarray,
    clusters: Sequence,
    *,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    rng: RngLike = None,
) -> ShareResult:
    """The share of questions where `hits` is true, with a percentile interval that resamples
    clusters (images) with all their questions: agreement with vanilla, right->wrong flips, accuracy
    on a subset. Built on `seed_and_question_interval` with one "seed" (each cluster's hits counted
    as true positives and misses as false negatives, so the share is recall), so it draws exactly
    what that bootstrap draws; the interval stays inside [0, 1], which a normal interval from the
    clustered SE (also returned) does not near 0 or 1.
    """
    h = np.asarray(hits)
    if h.ndim != 1 or len(h) == 0 or not np.all(np.isin(h, (0, 1))):
        raise ValueError(f"hits must be a non-empty 1-d array of 0/1 (or bool); got shape {h.shape}")
    index, n_clusters = _cluster_index(clusters, len(h))
    counts = np.zeros((n_clusters, 1, N_FIELDS))
    counts[:, 0, TP] = np.bincount(index, weights=h.astype(float), minlength=n_clusters)
    counts[:, 0, FN] = np.bincount(index, weights=1.0 - h, minlength=n_clusters)
    res = seed_and_question_interval([counts], metric=lambda c: recall(c[..., 0, :]), n_resamples=n_resamples,
                                     confidence_level=confidence_level, rng=rng)
    scores = h.astype(float)
    clustered = float(np.sqrt(_clustered_variance(scores, index, n_clusters))) if len(h) > 1 else 0.0
    return ShareResult(float(scores.mean()), res.confidence_interval, res.standard_error, clustered, len(h), n_clusters)
