"""Every sentence the report generates from numbers, as pure functions of those numbers.

Why one module: a sentence must be true for the numbers it states, including the degenerate cases
(a gap of exactly 0, identical predictions under one parsing rule but not the other, a zero-width
interval, a p-value at the resampling floor, one image, one split). Keeping the wording apart from
the statistics lets tests/test_wording.py build comparisons from random records and check every
sentence against the numbers it states. Numbers are shown in points (x 100); `pts_exact` never
prints a non-zero value as 0.00.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ZERO = 1e-12  # metric differences below this are rounding, not a difference (stats._tie_tolerance)


def is_zero(x: float) -> bool:
    return abs(x) < ZERO


def pts(x: float, sign: bool = False) -> str:
    """Points with two decimals; never '-0.00'."""
    value = 100 * x
    if abs(value) < 0.005:
        value = 0.0
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def pts_exact(x: float, sign: bool = False) -> str:
    """Like `pts`, but a value that is not 0 never prints as 0.00: three decimals, or '<0.001'."""
    value = 100 * x
    if is_zero(x) or abs(value) >= 0.005:
        return pts(0.0 if is_zero(x) else x, sign)
    if abs(value) >= 0.0005:
        return f"{value:+.3f}" if sign else f"{value:.3f}"
    if sign:
        return "+<0.001" if value > 0 else "-<0.001"
    return "<0.001" if value > 0 else ">-0.001"


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p: float) -> str:
    """'p < 0.001' or 'p = 0.002'."""
    return f"p {fmt_p(p)}" if p < 0.001 else f"p = {fmt_p(p)}"


def seed_range(seeds: Sequence) -> str:
    """'0–4' for three or more consecutive integers, else '0, 3, 7'."""
    seeds = sorted(seeds)
    if len(seeds) >= 3 and all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def ci_text(low: float, high: float) -> str:
    """'95% CI -0.40 to 0.64', saying so when the interval has no width."""
    text = f"95% CI {pts_exact(low)} to {pts_exact(high)}"
    return text + (", zero width: every resample gave the same gap" if low == high else "")


# ----------------------------------------------------------------------------------------------
# The verdict of one comparison
@dataclass(frozen=True)
class GapFacts:
    """What a verdict may say about one comparison A - B (fractions, not points)."""

    a: str
    b: str
    metric: str  # "mean F1", or "F1 on the adversarial split" when there is one split
    n_questions: int
    problem: str | None = None  # set: not comparable, nothing else is used
    identical: bool = False  # identical predictions under LLaVA's rule (the primary convention)
    identical_exact: bool = False  # ... and under exact match
    n_differ_exact: int = 0  # questions whose exact-match predictions differ
    gap: float = 0.0
    low: float = 0.0
    high: float = 0.0
    p: float = 1.0  # the p shown: Holm-adjusted in the family, raw otherwise
    family_size: int | None = None  # None: a diagnostic comparison, p unadjusted
    at_floor: bool = False  # the raw permutation p is 1/(B+1): no resample was as extreme
    floor: float = 0.0  # 1/(B+1), or the Holm-adjusted floor in the family
    reject: bool = False  # at alpha, Holm in the family, unadjusted for a diagnostic
    mde: float = 0.0
    mde_level: str = "alpha = 0.05"


def verdict(f: GapFacts) -> str:
    """One sentence: the gap, its interval, its p-value, and what that means."""
    if f.problem:
        return f"not comparable: {f.problem}; no test was run."
    if f.identical and f.identical_exact:
        return (f"{f.a} and {f.b} gave identical predictions on all {f.n_questions} questions under both parsing rules: "
                "every gap is exactly 0; nothing to test.")
    if f.identical:
        return (f"{f.a} and {f.b} gave identical predictions under LLaVA's rule on all {f.n_questions} questions, so the "
                f"gap under the papers' convention is exactly 0 and there is nothing to test; under exact match their "
                f"predictions differ on {f.n_differ_exact} question(s) (see Conventions).")
    if is_zero(f.gap):
        head = f"{f.a}'s {f.metric} equals {f.b}'s (gap 0.00"
    else:
        head = (f"{f.a}'s {f.metric} is {pts_exact(abs(f.gap))} points {'higher' if f.gap > 0 else 'lower'} than "
                f"{f.b}'s ({ci_text(f.low, f.high)}")
    if is_zero(f.gap):
        head += f"; {ci_text(f.low, f.high)}"
    if f.family_size is None:
        p_text = f"unadjusted {p_phrase(f.p)}, a diagnostic comparison outside the Holm family"
    elif f.family_size > 1:
        p_text = f"{p_phrase(f.p)} after Holm over {f.family_size} comparisons"
    else:
        p_text = f"{p_phrase(f.p)}, the only comparison in the Holm family"
    if f.at_floor and f.p >= 0.001:
        p_text += f" (no resample was as extreme: {fmt_p(f.floor)} is the smallest p these resamples give)"
    excludes_zero = f.low > 0 or f.high < 0
    if f.reject:
        tail = "a real difference at this sample size."
    elif is_zero(f.gap):
        tail = "no difference in this metric."
    elif f.mde > 0 and abs(f.gap) < f.mde and not excludes_zero:
        tail = (f"the gap is smaller than the {pts(f.mde)}-point minimum detectable effect (at {f.mde_level}): "
                "not distinguishable from noise.")
    else:
        tail = (f"not significant (minimum detectable effect {pts(f.mde)} points at {f.mde_level})"
                + ("; the bootstrap interval excludes 0, so the gap is suggestive" if excludes_zero else "")
                + ": not established at this sample size.")
    return f"{head}; {p_text}): {tail}"


# ----------------------------------------------------------------------------------------------
# Does the sign of a gap depend on the convention?
@dataclass(frozen=True)
class ConventionGap:
    label: str
    data: str
    estimate: float
    low: float
    high: float


def _sign(x: float) -> int:
    return 0 if is_zero(x) else (1 if x > 0 else -1)


def sign_line(gaps: Sequence[ConventionGap]) -> str:
    """The first gap is the papers' convention; say how the others' signs relate to it."""
    primary, others = gaps[0], list(gaps[1:])

    def name(g: ConventionGap) -> str:
        return f"{g.label} ({g.data})"

    def excl(g: ConventionGap) -> str:
        return " — and its 95% CI excludes 0" if g.low > 0 or g.high < 0 else ""

    zero = [g for g in others if _sign(g.estimate) == 0]
    if _sign(primary.estimate) == 0:
        nonzero = [g for g in others if _sign(g.estimate) != 0]
        if not nonzero:
            return "The gap is exactly 0 under every convention shown."
        listed = "; ".join(f"{name(g)} {pts_exact(g.estimate, True)}{excl(g)}" for g in nonzero)
        return f"The gap is exactly 0 under the papers' convention, so it has no sign; it is not 0 under: {listed}."
    flips = [g for g in others if _sign(g.estimate) == -_sign(primary.estimate)]
    parts = []
    if flips:
        parts.append("The sign flips under: " + "; ".join(name(g) + excl(g) for g in flips) + ".")
    if zero:
        parts.append("The gap is exactly 0 under: " + "; ".join(name(g) for g in zero) + ".")
    if not parts:
        return "The sign of the gap is the same under every convention shown."
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Seeds
def served_seeds(label: str, seeds: Sequence) -> str:
    """A configuration computed once that serves several requested seeds."""
    if len(seeds) > 1:
        return f"{label} does not use the seed: one computation serves seeds {seed_range(seeds)}"
    if len(seeds) == 1:
        return f"{label} does not use the seed: computed once (seed {seeds[0]} requested)"
    return f"{label} does not use the seed: computed once"


@dataclass(frozen=True)
class SeedGapFacts:
    """The gap A - B on each common seed, and whether any seed changed a prediction."""

    seeds: tuple  # the common seeds (a side computed once serves every seed of the other)
    gaps: tuple  # gap on each seed, fractions
    changed_predictions: bool  # some seed changed some prediction on either side
    low: float | None = None  # seed + image interval, when seeds changed predictions
    high: float | None = None
    estimate: float | None = None  # its estimate: mean over A's seeds minus mean over B's seeds
    a_once: bool = False  # A computed once (does not use the seed)
    b_once: bool = False


def seed_gap_line(f: SeedGapFacts) -> str:
    """The gap's mean ± std over the common seeds; the seed + image interval when seeds matter."""
    if f.a_once and f.b_once:
        return "neither configuration uses the seed: one computation each, so the gap has no seed variation."
    if len(f.seeds) < 2:
        return f"one common seed ({seed_range(f.seeds)}): seed variation of the gap not measured."
    gaps = [float(g) for g in f.gaps]
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1))
    head = f"over seeds {seed_range(f.seeds)} the gap is {pts_exact(mean, True)} ± {pts_exact(std)} (mean ± std)"
    if not f.changed_predictions:
        return head + "; the seeds changed no prediction on either side, so the gap is the same on every seed."
    return (head + f"; seeds changed predictions, so the interval resamples seeds and images together: "
            f"{pts_exact(f.estimate, True)} [95% CI {pts_exact(f.low)} to {pts_exact(f.high)}].")


# ----------------------------------------------------------------------------------------------
# The reconciliation's conclusion
def _pt(x: float) -> str:
    """A points value (already x 100) with its sign."""
    return pts_exact(x / 100, True)


def _inside(value: float, low: float, high: float, tolerance: float) -> bool:
    return low - tolerance <= value <= high + tolerance


def explanations(r) -> list[tuple[str, float, str]]:
    """(name, size in points, evidence) of each measured explanation, largest first.

    `r` is a reconcile.Reconciliation: published and measured gaps in points, the version effect,
    the setup effects measured here, the residual, the numerical floor, the convention spread."""
    items = []
    if r.version_effect:
        items.append((r.version_label, r.version_effect,
                      "; ".join(r.version_notes) + f", so the published gap for the versions run is {_pt(r.versions_gap)}"))
    for axis, effect in r.setup_effects:
        items.append((f"setup, {axis}", effect, "measured here: our setting vs the paper's"))
    if r.residual is not None:
        where = "the published gap for the versions run" if r.version_effect else "the published gap"
        within = _inside(r.start, r.low, r.high, r.tolerance)
        items.append(("remaining discrepancy", r.residual,
                      f"measured minus {where}" + (" and the setup effects above" if r.setup_effects else "") + "; "
                      + ("within sampling noise (inside the measured 95% CI)" if within else
                         "beyond sampling noise (outside the measured 95% CI): implementation or setup differences not "
                         "measured here")))
    if r.floor is not None:
        items.append(("numerical floor", r.floor.points, f"the largest change numerics alone made here ({r.floor.answers} answers at most)"))
    return sorted(items, key=lambda item: -abs(item[1]))


def conventions_sentence(r) -> str:
    """How the same measured gap reads under the conventions re-implementations print."""
    if not r.reprinted:
        return ""
    text = "Under the conventions re-implementations usually print, the measured gap reads: " + "; ".join(
        f"{label} {va:.2f} vs {vb:.2f}, gap {_pt(gap)}" for label, gap, va, vb in r.reprinted) + "."
    if r.convention_text and not any(r.convention_text.startswith(label) for label, *_ in r.reprinted):
        text += (f" The largest departure from the papers' convention is under {r.convention_text} "
                 f"({_pt(r.convention_shift)} points).")
    return text


def conclusion_parts(r) -> tuple[str, list[str], list[str]]:
    """The conclusion as (headline, ranked explanations, remarks); `conclusion` joins them."""
    ci = f"[95% CI {_pt(r.low)} to {_pt(r.high)}]"
    if r.published_gap is not None:
        head = [f"{r.published_text}; measured here: {_pt(r.measured)} points {ci}."]
    else:
        head = [f"No table prints both configurations at this budget; published for the versions run: {r.versions_text}; "
                f"measured here: {_pt(r.measured)} points {ci}."]
    reference = r.published_gap if r.published_gap is not None else r.versions_gap
    ranked = explanations(r)
    if reference is not None and not is_zero(reference) and not is_zero(r.measured) and (reference > 0) != (r.measured > 0):
        text = "The sign is reversed relative to the published gap."
        top = ranked[0][0] if ranked else ""
        if r.version_effect and top == r.version_label and r.versions_gap is not None:
            if not is_zero(r.versions_gap) and (r.versions_gap > 0) == (r.measured > 0):
                text += (f" The reversal is explained by the {r.version_label}: for the versions run the published gap is "
                         f"{_pt(r.versions_gap)}, the same sign as measured.")
            elif _inside(r.versions_gap, r.low, r.high, r.tolerance):
                text += (f" The {r.version_label} accounts for most of it: for the versions run the published gap "
                         f"{_pt(r.versions_gap)} lies inside the measured 95% CI.")
        head.append(text)
    items = [f"({k}) {name}: {_pt(size) if name != 'numerical floor' else f'up to {abs(size):.2f}'} points — {why}"
             for k, (name, size, why) in enumerate(ranked, start=1)]
    parts = []
    if r.published_gap is not None:
        where = "inside" if _inside(r.published_gap, r.low, r.high, r.tolerance) else "outside"
        parts.append(f"The published {_pt(r.published_gap)} lies {where} the measured 95% CI"
                     + (f"; the published {_pt(r.versions_gap)} for the versions run lies "
                        f"{'inside' if _inside(r.versions_gap, r.low, r.high, r.tolerance) else 'outside'} it."
                        if r.versions_gap is not None and r.version_effect else "."))
    parts.append(conventions_sentence(r))
    if r.unmeasured:
        parts.append("Not measured: " + "; ".join(f"{axis} ({how})" for axis, how in r.unmeasured) + ".")
    return " ".join(head), items, [x for x in parts if x]


def conclusion(r) -> str:
    """The plain-words conclusion: explanations ranked by measured size, each with its number."""
    head, items, remarks = conclusion_parts(r)
    ranked = f"Explanations ranked by measured size: {'; '.join(items)}." if items else ""
    return " ".join(x for x in (head, ranked, *remarks) if x)
