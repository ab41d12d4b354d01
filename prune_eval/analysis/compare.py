"""Every statistic of one pair of configurations, the declared Holm family, and the verdicts.

For each pair: the gap in the papers' metric with a paired image-cluster bootstrap interval, a
paired image-cluster permutation p-value (primary), McNemar's exact test, Miller's clustered SE of
the accuracy gap, the minimum detectable effect, the gap under every convention the papers and tools
mix, the gap's mean ± std over the common seeds and, when seeds change predictions, a paired
interval that resamples seeds and images together.

The Holm family is declared, not implied: the comparisons in the factors the user asked about (the
factors swept on the command line, read from plan.json, or `--primary FACTOR`), minus diagnostic
pairs (against vanilla or the random baseline, and pairs with identical predictions). Diagnostic
pairs keep their unadjusted p-value and say so. The minimum detectable effect of a family member is
given at alpha / m (Holm's strictest step, m the family size), a diagnostic's at alpha, unadjusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from prune_eval.analysis import metrics, published, stats, wording
from prune_eval.analysis.configs import Config, ConfigStats, Scored, used_cells
from prune_eval.analysis.pairs import FACTOR_WORDS, Pair, choose_cells

ALPHA = 0.05
CONVENTION_RESAMPLES = 2_000  # at most, for the sensitivity rows: their intervals are context, not tests
# (key, label, parsing rule, metric): the same predictions scored as each source scores them
CONVENTIONS = (
    ("mean_f1/llava", "mean F1 over splits, LLaVA rule (the papers)", "llava", "mean_f1"),
    ("pooled_f1/llava", "pooled F1, LLaVA rule", "llava", "pooled_f1"),
    ("pooled_accuracy/llava", "pooled accuracy, LLaVA rule (what re-implementations often print)", "llava", "pooled_accuracy"),
    ("mean_accuracy/llava", "mean accuracy over splits, LLaVA rule", "llava", "mean_accuracy"),
    ("mean_f1/exact", "mean F1 over splits, exact match", "exact", "mean_f1"),
    ("pooled_f1/exact", "pooled F1, exact match (lmms-eval's pope)", "exact", "pooled_f1"),
    ("pooled_accuracy/exact", "pooled accuracy, exact match (lmms-eval's pope_accuracy)", "exact", "pooled_accuracy"),
)
DEFAULT_PRIMARY = frozenset({"method", "answers", "implementation", "explicit"})  # without plan.json or --primary


@dataclass(frozen=True)
class Gap:
    """metric(A) - metric(B) under one convention, with its 95% paired cluster-bootstrap interval."""

    key: str
    label: str
    data: str
    estimate: float
    low: float
    high: float
    value_a: float | None = None
    value_b: float | None = None


@dataclass(frozen=True)
class Comparison:
    pair: Pair
    problem: str | None  # set when the two cells cannot be compared; nothing else is then
    n_questions: int = 0
    n_images: int = 0
    identical: bool = False  # identical predictions under LLaVA's rule
    identical_exact: bool = False
    n_differ: int = 0  # questions whose LLaVA-rule predictions differ
    n_differ_exact: int = 0
    bootstrap: stats.BootstrapResult | None = None
    permutation: stats.PermutationResult | None = None
    mcnemar: stats.McNemarResult | None = None
    accuracy: stats.PairedDifference | None = None  # pooled accuracy, Miller's clustered SE
    conventions: tuple = ()  # Gap, ...
    seeds: wording.SeedGapFacts | None = None
    paper_gap: float | None = None  # points, when both sides match published numbers in the papers' setup
    family: bool = False  # in the Holm family
    holm_p: float | None = None
    mde: float | None = None  # for mean F1, from the bootstrap SE, at mde_level
    mde_level: str = ""
    reject: bool = False
    at_floor: bool = False
    verdict: str = ""
    subset: tuple = ()  # Gap, ... on the compression-sensitive subset (agreement.subset_gaps)

    @property
    def p_shown(self) -> float | None:
        return self.holm_p if self.family else (self.permutation.p_value if self.permutation else None)

    @property
    def metric_name(self) -> str:
        splits = self.pair.cell_a.splits
        return "mean F1" if len(splits) != 1 else f"F1 on the {splits[0]} split"


def question_mismatch(a: Scored, b: Scored) -> str | None:
    """Why two cells do not answer the same questions, or None when they do."""
    if a.fingerprint == b.fingerprint:
        return None
    keys_a, keys_b = set(a.data.keys), set(b.data.keys)
    if keys_a != keys_b:
        return (f"different question sets: {a.data.name} has {len(keys_a)} questions, {b.data.name} has "
                f"{len(keys_b)}, {len(keys_a & keys_b)} in common")
    differ = a.data.keys[(a.data.label != b.data.label) | (a.data.image != b.data.image)]
    return f"the same {len(keys_a)} question ids, but {len(differ)} differ in label or image (e.g. {differ[0]})"


def bootstrap_gap(a: np.ndarray, b: np.ndarray, metric, *, n_resamples: int, seed: int) -> stats.BootstrapResult:
    return stats.paired_cluster_bootstrap(a, b, metric=metric, n_resamples=n_resamples, rng=seed)


def data_label(cell: Scored) -> str:
    return f"{cell.info['data']}, {len(cell.data.keys)} q"


def convention_gaps(a: Scored, b: Scored, *, n_resamples: int, seed: int, primary: stats.BootstrapResult | None = None,
                    keys: Sequence[str] | None = None) -> list[Gap]:
    """The gap A - B under each convention (the first, the papers', reuses `primary` when given)."""
    out = []
    for key, label, rule, name in CONVENTIONS:
        if keys is not None and key not in keys:
            continue
        fn = metrics.metric_function(name, a.splits)
        boot = primary if (primary is not None and key == CONVENTIONS[0][0]) else bootstrap_gap(
            a.counts[rule], b.counts[rule], fn, n_resamples=min(n_resamples, CONVENTION_RESAMPLES), seed=seed)
        out.append(Gap(key, label, data_label(a), boot.estimate, boot.confidence_interval.low, boot.confidence_interval.high,
                       float(fn(a.counts[rule].sum(0))), float(fn(b.counts[rule].sum(0)))))
    return out


def _data_version_gaps(pair: Pair, configs: Sequence[Config], *, n_resamples: int, seed: int) -> list[Gap]:
    """The primary gap on the other question files where both configurations were also run."""
    if pair.factor in ("answers", "explicit", "implementation") or pair.a.info["ingested"]:
        return []
    out = []
    for other_a in configs:
        if other_a is pair.a or {k for k in set(other_a.factors) | set(pair.a.factors)
                                 if other_a.factors.get(k) != pair.a.factors.get(k)} != {"data"}:
            continue
        wanted = {**pair.b.factors, "data": other_a.factors["data"]}
        other_b = next((c for c in configs if c.factors == wanted and c.once == pair.b.once), None)
        if other_b is None:
            continue
        ca, cb, _ = choose_cells(other_a, other_b)
        if question_mismatch(ca, cb):
            continue
        boot = bootstrap_gap(ca.counts["llava"], cb.counts["llava"], metrics.mean_f1, n_resamples=n_resamples, seed=seed)
        out.append(Gap("mean_f1/llava", CONVENTIONS[0][1], data_label(ca), boot.estimate,
                       boot.confidence_interval.low, boot.confidence_interval.high))
    return out


def _f1(cell: Scored) -> float:
    return float(metrics.mean_f1(cell.counts["llava"].sum(0)))


def seed_gap(pair: Pair, stats_a: ConfigStats, stats_b: ConfigStats, *, n_resamples: int, seed: int) -> wording.SeedGapFacts | None:
    """The gap on each common seed; with seeds that change predictions, the seed + image interval."""
    if pair.factor == "explicit" or pair.a.info["ingested"] or pair.b.info["ingested"]:
        return None
    a_cells = [c for c in used_cells(pair.a) if c.fingerprint == pair.cell_a.fingerprint]
    b_cells = [c for c in used_cells(pair.b) if c.fingerprint == pair.cell_b.fingerprint]
    a_once, b_once = pair.a.once, pair.b.once
    if a_once and b_once:
        return wording.SeedGapFacts((), (), False, a_once=True, b_once=True)
    if a_once or b_once:
        once = a_cells[0] if a_once else b_cells[0]
        seeded = b_cells if a_once else a_cells
        seeds = tuple(c.seed for c in seeded)
        gaps = tuple(_f1(once) - _f1(c) if a_once else _f1(c) - _f1(once) for c in seeded)
    else:
        by_a, by_b = {c.seed: c for c in a_cells}, {c.seed: c for c in b_cells}
        seeds = tuple(sorted(s for s in set(by_a) & set(by_b) if s is not None))
        gaps = tuple(_f1(by_a[s]) - _f1(by_b[s]) for s in seeds)
    changed = (len(a_cells) > 1 and not stats_a.seeds.identical_predictions) or (len(b_cells) > 1 and not stats_b.seeds.identical_predictions)
    facts = wording.SeedGapFacts(seeds, gaps, changed, a_once=a_once, b_once=b_once)
    if changed and len(seeds) >= 2 and len(pair.cell_a.clusters) >= 2:
        res = stats.paired_seed_and_question_interval([c.counts["llava"] for c in a_cells], [c.counts["llava"] for c in b_cells],
                                                      metric=metrics.mean_f1, n_resamples=n_resamples, rng=seed)
        facts = replace(facts, low=res.confidence_interval.low, high=res.confidence_interval.high, estimate=res.estimate)
    return facts


def compare(pair: Pair, configs: Sequence[Config], config_stats: dict, *, n_resamples: int, seed: int) -> Comparison:
    """Every statistic of one pair; each resampling call gets a fresh rng from `seed` (reproducible,
    independent of the order of comparisons). Inputs stats.py rejects make the pair "not comparable"
    with stats' message, so one odd cell cannot stop the report."""
    try:
        return _compare(pair, configs, config_stats, n_resamples=n_resamples, seed=seed)
    except ValueError as e:
        return Comparison(pair, f"cannot be tested: {e}")


def _compare(pair: Pair, configs: Sequence[Config], config_stats: dict, *, n_resamples: int, seed: int) -> Comparison:
    a, b = pair.cell_a, pair.cell_b
    problem = question_mismatch(a, b)
    if problem is None and len(a.clusters) < 2:
        problem = f"only {len(a.clusters)} image: nothing to resample"
    if problem:
        return Comparison(pair, problem)
    ca, cb = a.counts["llava"], b.counts["llava"]
    boot = bootstrap_gap(ca, cb, metrics.mean_f1, n_resamples=n_resamples, seed=seed)
    perm = stats.paired_cluster_permutation_test(ca, cb, metric=metrics.mean_f1, n_resamples=n_resamples, rng=seed)
    correct_a, correct_b = a.data.pred["llava"] == a.data.label, b.data.pred["llava"] == b.data.label
    gaps = convention_gaps(a, b, n_resamples=n_resamples, seed=seed, primary=boot)
    gaps += _data_version_gaps(pair, configs, n_resamples=min(n_resamples, CONVENTION_RESAMPLES), seed=seed)
    sa, sb = config_stats[pair.a.id], config_stats[pair.b.id]
    pa, pb = sa.paper, sb.paper
    differ = {rule: int(np.sum(a.data.pred[rule] != b.data.pred[rule])) for rule in metrics.PARSE_RULES}
    return Comparison(
        pair, None, n_questions=len(a.data.keys), n_images=len(a.clusters),
        identical=differ["llava"] == 0, identical_exact=differ["exact"] == 0,
        n_differ=differ["llava"], n_differ_exact=differ["exact"],
        bootstrap=boot, permutation=perm, mcnemar=stats.mcnemar_exact(correct_a, correct_b),
        accuracy=stats.paired_difference(correct_a.astype(float), correct_b.astype(float), a.data.image),
        conventions=tuple(gaps), seeds=seed_gap(pair, sa, sb, n_resamples=n_resamples, seed=seed),
        paper_gap=round(pa.value - pb.value, 2) if pa and pb and pair.factor == "method" and not (
            published.setup_differences(pair.a.info) or published.setup_differences(pair.b.info)) else None,
    )


# ----------------------------------------------------------------------------------------------
# The family and the verdicts
@dataclass(frozen=True)
class Family:
    """Which comparisons form the Holm family, and why."""

    factors: frozenset  # the primary factors
    source: str  # how they were chosen: '--primary', 'plan.json' or 'default'
    size: int = 0

    def describe(self) -> str:
        words = ", ".join(FACTOR_WORDS.get(f, f) for f in sorted(self.factors)) or "none"
        how = {"--primary": "named with --primary", "plan.json": "the factors swept on the command line (plan.json)",
               "default": "the default without plan.json (methods, answer files, --pair)"}[self.source]
        return f"{words} ({how})"


def in_family(c: Comparison, factors: frozenset) -> bool:
    """A tested, non-identical comparison in a primary factor, and not against a baseline."""
    return (c.problem is None and not c.identical and (c.pair.factor in factors or c.pair.factor == "explicit")
            and not c.pair.baseline)


def finish(comparisons: list[Comparison], family: Family, *, n_resamples: int) -> tuple[list[Comparison], Family]:
    """Holm over the family's permutation p-values, the MDE at the family's level, the verdicts."""
    members = [i for i, c in enumerate(comparisons) if in_family(c, family.factors)]
    m = len(members)
    out = list(comparisons)
    if members:
        holm = stats.holm([comparisons[i].permutation.p_value for i in members], alpha=ALPHA)
        for i, p, r in zip(members, holm.p_values, holm.reject):
            out[i] = replace(out[i], family=True, holm_p=float(p), reject=bool(r))
    floor = 1 / (n_resamples + 1)
    for i, c in enumerate(out):
        if c.problem is not None:
            out[i] = replace(c, verdict=wording.verdict(wording.GapFacts(c.pair.a.label, c.pair.b.label, "mean F1", 0, problem=c.problem)))
            continue
        alpha = ALPHA / m if c.family else ALPHA
        level = (f"alpha = {ALPHA}/{m}, Holm's strictest step" if c.family and m > 1
                 else f"alpha = {ALPHA}" + ("" if c.family else ", unadjusted"))
        mde = stats.minimum_detectable_effect(c.bootstrap.standard_error, alpha=alpha)
        reject = c.reject if c.family else bool(c.permutation.p_value <= ALPHA)
        at_floor = not c.permutation.exact and c.permutation.p_value <= floor * (1 + 1e-9)
        c = replace(c, mde=mde, mde_level=level, reject=reject, at_floor=at_floor)
        ci = c.bootstrap.confidence_interval
        facts = wording.GapFacts(
            c.pair.a.label, c.pair.b.label, c.metric_name, c.n_questions, identical=c.identical,
            identical_exact=c.identical_exact, n_differ_exact=c.n_differ_exact, gap=c.bootstrap.estimate, low=ci.low,
            high=ci.high, p=c.p_shown, family_size=m if c.family else None, at_floor=at_floor,
            floor=min(1.0, (m if c.family else 1) * floor), reject=reject, mde=mde, mde_level=level)
        out[i] = replace(c, verdict=wording.verdict(facts))
    return out, replace(family, size=m)


def sign_line(c: Comparison) -> str:
    """Does the sign of the gap depend on the convention? (wording.sign_line on this comparison)"""
    return wording.sign_line([wording.ConventionGap(g.label, g.data, g.estimate, g.low, g.high) for g in c.conventions])
