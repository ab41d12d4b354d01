"""Every sentence the report writes is true for the numbers it states (issue 18.2).

Comparisons are built from random records in the record format (real POPE questions, simulated
answers) with hypothesis, including the degenerate cases: gaps of exactly 0, predictions identical
under LLaVA's rule but not under exact match, zero-width intervals, p-values at the resampling floor,
one image, one split, seeds that change nothing. Each sentence is parsed back and checked against
the numbers of the comparison it describes: verdicts, the sign-by-convention line, the seed line of a
gap, and the reconciliation's conclusion.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_report import experiment_of, pope_questions, write_cell

from prune_eval.analysis import analyse, compare, wording
from prune_eval.analysis.wording import is_zero, pts, pts_exact

RESAMPLES = 200  # the permutation floor 1/201 is above 0.001, so "at the floor" sentences appear
QUESTIONS = pope_questions("llava-1.5")
IMAGES = sorted({q["image"] for q in QUESTIONS})


# ----------------------------------------------------------------------------------------------
# Checking sentences against numbers
def _number(text: str) -> float:
    return float(text.replace("+", ""))


def check_verdict(c: compare.Comparison, family_size: int) -> None:
    v = c.verdict
    if c.problem:
        assert v.startswith("not comparable: ") and v.endswith("no test was run."), v
        return
    assert ("identical predictions" in v) == c.identical, v
    if c.identical:
        assert ("under both parsing rules" in v) == c.identical_exact, v
        if not c.identical_exact:
            assert f"differ on {c.n_differ_exact} question(s)" in v
        assert "real difference" not in v and "higher" not in v and "lower" not in v
        return
    gap, ci = c.bootstrap.estimate, c.bootstrap.confidence_interval
    moved = re.search(r"is (\S+) points (higher|lower) than", v)
    if moved:
        assert not is_zero(gap) and moved[1] == pts_exact(abs(gap)) and (moved[2] == "higher") == (gap > 0), v
    else:
        assert is_zero(gap) and "equals" in v and "gap 0.00" in v, v
    interval = re.search(r"95% CI (\S+) to ([^,;)\s]+)", v)
    assert interval and interval[1] == pts_exact(ci.low) and interval[2] == pts_exact(ci.high), v
    assert ("zero width" in v) == (ci.low == ci.high), v
    p = re.search(r"p (< 0\.001|= [0-9.]+)", v)
    shown = c.holm_p if c.family else c.permutation.p_value
    assert p[1] == ("< 0.001" if shown < 0.001 else f"= {shown:.3f}"), v
    holm = re.search(r"after Holm over (\d+) comparisons", v)
    assert bool(holm) == (c.family and family_size > 1), v
    if holm:
        assert int(holm[1]) == family_size
    assert ("unadjusted" in v) == (not c.family), v
    assert ("the only comparison in the Holm family" in v) == (c.family and family_size == 1), v
    assert ("a real difference" in v) == c.reject, v
    small = re.search(r"smaller than the (\S+)-point minimum detectable effect", v)
    if small:
        assert abs(gap) < c.mde and small[1] == pts(c.mde) and not c.reject, v
    assert ("excludes 0" in v) == ((ci.low > 0 or ci.high < 0) and not c.reject and not small), v
    assert ("no resample was as extreme" in v) == (c.at_floor and shown >= 0.001), v
    if "no difference in this metric" in v:
        assert is_zero(gap)


def _sign(x: float) -> int:
    return 0 if is_zero(x) else (1 if x > 0 else -1)


def check_sign_line(c: compare.Comparison) -> None:
    line = compare.sign_line(c)
    gaps = list(c.conventions)
    primary, others = gaps[0], gaps[1:]
    names = {f"{g.label} ({g.data})": g for g in others}
    if line == "The sign of the gap is the same under every convention shown.":
        assert _sign(primary.estimate) != 0 and all(_sign(g.estimate) == _sign(primary.estimate) for g in others)
        return
    if line == "The gap is exactly 0 under every convention shown.":
        assert all(_sign(g.estimate) == 0 for g in gaps)
        return
    if line.startswith("The gap is exactly 0 under the papers' convention"):
        assert _sign(primary.estimate) == 0
        listed = line.split("it is not 0 under: ", 1)[1].rstrip(".")
        for item in listed.split("; "):
            name = next(n for n in names if item.startswith(n))
            assert _sign(names[name].estimate) != 0
            assert pts_exact(names[name].estimate, True) in item
        assert sum(_sign(g.estimate) != 0 for g in others) == len(listed.split("; "))
        return
    assert _sign(primary.estimate) != 0, line
    flips = re.search(r"The sign flips under: (.*?)\.(?: The gap|$)", line)
    zeros = re.search(r"The gap is exactly 0 under: (.*)\.$", line)
    flipped = [n for n in names if flips and n in flips[1]]
    zeroed = [n for n in names if zeros and n in zeros[1]]
    for name, g in names.items():
        assert (name in flipped) == (_sign(g.estimate) == -_sign(primary.estimate)), (line, name, g.estimate)
        assert (name in zeroed) == (_sign(g.estimate) == 0), (line, name)


def check_seed_line(c: compare.Comparison) -> None:
    f = c.seeds
    if f is None:
        return
    line = wording.seed_gap_line(f)
    if f.a_once and f.b_once:
        assert line.startswith("neither configuration uses the seed")
        return
    if len(f.seeds) < 2:
        assert "seed variation of the gap not measured" in line
        return
    m = re.search(r"the gap is (\S+) ± (\S+) \(mean ± std\)", line)
    gaps = np.array(f.gaps)
    assert m[1] == pts_exact(gaps.mean(), True) and m[2] == pts_exact(gaps.std(ddof=1)), line
    assert ("changed no prediction" in line) == (not f.changed_predictions), line
    if "resamples seeds and images together" in line:
        assert f.low <= f.estimate <= f.high or f.low == f.high


def check_conclusion(r) -> None:
    text = r.conclusion
    assert f"measured here: {pts_exact(r.measured / 100, True)} points" in text
    ranked = re.search(r"Explanations ranked by measured size: (.*?)\.(?: The published| Under| Not measured|$)", text)
    if ranked:
        sizes = [abs(_number(m)) for m in re.findall(r"\(\d+\) [^:]+: (?:up to )?([+-]?[0-9.]+|[+-]?<0\.001) points", ranked[1])
                 if "<" not in m]
        assert sizes == sorted(sizes, reverse=True), text
    reversed_ = (r.published_gap is not None and not is_zero(r.published_gap) and not is_zero(r.measured)
                 and (r.published_gap > 0) != (r.measured > 0))
    assert ("The sign is reversed" in text) == reversed_, text
    if "The reversal is explained by" in text:
        assert r.versions_gap is not None and (r.versions_gap > 0) == (r.measured > 0) and not is_zero(r.versions_gap)
    if r.published_gap is not None:
        inside = r.low - r.tolerance <= r.published_gap <= r.high + r.tolerance
        assert f"The published {pts_exact(r.published_gap / 100, True)} lies {'inside' if inside else 'outside'}" in text, text
    for name, size, _ in wording.explanations(r):
        if name == "remaining discrepancy":
            assert abs(size - (r.measured - r.start - sum(e for _, e in r.setup_effects))) < 1e-9


# ----------------------------------------------------------------------------------------------
# Random records
def questions_for(n_images: int, splits: tuple) -> list[dict]:
    chosen = set(IMAGES[:n_images])
    return [q for q in QUESTIONS if q["image"] in chosen and q["split"] in splits]


def answers(questions: list[dict], rng: np.random.Generator, accuracy: float) -> list[str]:
    out = []
    for q in questions:
        right = rng.random() < accuracy
        word = q["label"] if right else ("no" if q["label"] == "yes" else "yes")
        out.append(word.capitalize())
    return out


@st.composite
def scenarios(draw):
    return {
        "n_images": draw(st.sampled_from([1, 2, 3, 5, 9, 12])),  # > 7 images: Monte Carlo permutations (floor)
        "splits": draw(st.sampled_from([("adversarial",), ("adversarial", "popular", "random")])),
        "kind": draw(st.sampled_from(["random", "identical", "identical_llava_only", "all_correct", "one_flip", "far_apart"])),
        "accuracy": draw(st.floats(0.05, 0.95)),
        "version": draw(st.sampled_from(["v1", "v1.5", "v2"])),
        "seeds_b": draw(st.integers(1, 3)),
        "b_seeds_identical": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31)),
    }


def build(sweep: Path, s: dict) -> None:
    rng = np.random.default_rng(s["seed"])
    q = questions_for(s["n_images"], s["splits"])
    a = answers(q, rng, 1.0 if s["kind"] == "all_correct" else s["accuracy"])
    if s["kind"] == "identical":
        b = list(a)
    elif s["kind"] == "identical_llava_only":
        b = [x + "." if rng.random() < 0.5 else x for x in a]
    elif s["kind"] == "all_correct":
        b = list(a)
    elif s["kind"] == "one_flip":
        b = list(a)
        b[0] = "No" if b[0] == "Yes" else "Yes"
    elif s["kind"] == "far_apart":
        b = answers(q, rng, 1 - s["accuracy"])
    else:
        b = answers(q, rng, s["accuracy"])
    write_cell(sweep, "vz", q, a, experiment=experiment_of("visionzip", 64), budget=64)
    for k in range(s["seeds_b"]):
        seeded = b if (k == 0 or s["b_seeds_identical"]) else answers(q, rng, s["accuracy"])
        write_cell(sweep, f"svlm-s{k}", q, seeded, experiment=experiment_of("sparsevlm", 64, version=s["version"], seed=k), budget=64)
        if k > 0:
            write_cell(sweep, f"vz-s{k}", q, a, experiment=experiment_of("visionzip", 64, seed=k), budget=64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_sentence_is_true_for_its_numbers(s) -> None:
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), s)
        a = analyse.analyse(Path(folder), n_resamples=RESAMPLES, seed=1)
    for c in a.comparisons:
        check_verdict(c, a.family.size)
        if c.problem is None:
            check_sign_line(c)
            check_seed_line(c)
    for r in a.reconciliations:
        check_conclusion(r)


# ----------------------------------------------------------------------------------------------
# The degenerate cases, one by one
def run(build_cells) -> analyse.Analysis:
    with tempfile.TemporaryDirectory() as folder:
        build_cells(Path(folder))
        return analyse.analyse(Path(folder), n_resamples=RESAMPLES, seed=1)


def test_identical_under_llava_rule_but_not_exact_match() -> None:
    q = questions_for(3, ("adversarial", "popular", "random"))
    a = ["Yes" if x["label"] == "yes" else "No" for x in q]

    def cells(folder):
        write_cell(folder, "vz", q, a, experiment=experiment_of("visionzip", 64), budget=64)
        write_cell(folder, "svlm", q, [x + "." for x in a], experiment=experiment_of("sparsevlm", 64, version="v1"), budget=64)

    (c,) = run(cells).comparisons
    assert c.identical and not c.identical_exact and c.n_differ_exact == len(q)
    assert f"under exact match their predictions differ on {len(q)} question(s)" in c.verdict
    assert not c.family  # identical predictions are diagnostic: nothing to test
    # the papers' convention gives exactly 0; exact match does not: no sign to flip
    line = compare.sign_line(c)
    assert line.startswith("The gap is exactly 0 under the papers' convention, so it has no sign")
    assert "flips" not in line


def test_zero_gap_with_different_predictions_and_zero_width_interval() -> None:
    """Both configurations answer every question correctly but one writes 'Yes.' on one question:
    every LLaVA-rule metric is equal (gap 0, interval [0, 0]) although the answers differ."""
    q = questions_for(4, ("adversarial",))
    a = ["Yes" if x["label"] == "yes" else "No" for x in q]
    b = list(a)
    b[0] = "No" if a[0] == "Yes" else "Yes"
    b[1] = "No" if a[1] == "Yes" else "Yes"

    def cells(folder):
        write_cell(folder, "vz", q, a, experiment=experiment_of("visionzip", 64), budget=64)
        write_cell(folder, "svlm", q, b, experiment=experiment_of("sparsevlm", 64, version="v1.5"), budget=64)

    (c,) = run(cells).comparisons
    check_verdict(c, 1)
    assert "F1 on the adversarial split" in c.verdict  # one split: not "mean F1"


def test_p_at_the_resampling_floor_is_said() -> None:
    q = questions_for(12, ("adversarial", "popular", "random"))
    right = ["Yes" if x["label"] == "yes" else "No" for x in q]
    wrong = ["No" if x["label"] == "yes" else "Yes" for x in q]

    def cells(folder):
        write_cell(folder, "vz", q, right, experiment=experiment_of("visionzip", 64), budget=64)
        write_cell(folder, "svlm", q, wrong, experiment=experiment_of("sparsevlm", 64, version="v1"), budget=64)

    (c,) = run(cells).comparisons
    assert c.at_floor and c.permutation.p_value == pytest.approx(1 / (RESAMPLES + 1))
    assert f"no resample was as extreme: {1 / (RESAMPLES + 1):.3f} is the smallest p these resamples give" in c.verdict
    assert "a real difference" in c.verdict


def test_one_image_is_not_comparable() -> None:
    q = questions_for(1, ("adversarial", "popular", "random"))

    def cells(folder):
        write_cell(folder, "vz", q, ["Yes"] * len(q), experiment=experiment_of("visionzip", 64), budget=64)
        write_cell(folder, "svlm", q, ["No"] * len(q), experiment=experiment_of("sparsevlm", 64, version="v1"), budget=64)

    a = run(cells)
    (c,) = a.comparisons
    assert c.verdict == "not comparable: only 1 image: nothing to resample; no test was run."
    assert a.family.size == 0 and not a.reconciliations


@pytest.mark.parametrize("value, shown", [(0.0, "0.00"), (1e-9, "<0.001"), (-2.5e-6, ">-0.001"), (3.3e-5, "0.003"),
                                          (0.0001, "0.01"), (-0.1234, "-12.34")])
def test_small_numbers_never_print_as_zero(value, shown) -> None:
    assert pts_exact(value) == shown
    assert pts(-1e-9) == "0.00" and pts(-1e-9, True) == "+0.00"  # never '-0.00'
