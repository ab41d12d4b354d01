"""Why a measured gap differs from the published one, axis by axis.

For every comparison of two methods that has a published counterpart, a walk from the gap as a
paper printed it to the gap measured here, one row per axis, each with its measured effect and the
evidence:
- version: which algorithm version each published number belongs to, the version run, and the
  published gap for the versions actually run (VisionZip's Table 1 compares against SparseVLM v1's
  75.1; v1.5's own paper reports 77.5 at 64 tokens);
- budget meaning: nominal budget vs visual tokens entering the LLM and seen per layer, prefill
  TFLOPs; with several budgets, the gap at equal average visual tokens per layer (interpolated);
- metric convention: the gap under the papers' convention and every other one, with both sides'
  values (a re-implementation usually prints pooled accuracy or pooled F1);
- setup: model, checkpoint layout/tokenizer, preprocessing, dtype/quantization, question file: for
  each axis where a counterpart was run, its effect on each method and on the gap (the interaction,
  with a paired interval), else "same as the paper" or "differs from the paper, not measured" with
  the override that would measure it;
- sampling noise: the measured gap's interval, whether the published gaps lie inside, the MDE;
- numerical floor: answers and points that change when only numerics change (evaluation path,
  batch composition, compile, fp16 vs bf16), from cells that differ only in those.
Then one conclusion that ranks the explanations by measured size (wording.conclusion). All values
here are in points (x 100), as the papers print them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from prune_eval.analysis import metrics, published, stats
from prune_eval.analysis.compare import CONVENTION_RESAMPLES, Comparison
from prune_eval.analysis.configs import Config, ConfigStats, base_label, coarse_factors, display
from prune_eval.analysis.pairs import choose_cells
from prune_eval.analysis.wording import conclusion, pts_exact

ROUND = 2 * published.ROUNDING  # a published gap is a difference of two values rounded to 0.1


def p(x: float) -> float:
    """fraction -> points"""
    return 100 * float(x)


def sgn(x: float) -> str:
    """A points value with its sign, two decimals (never -0.00)."""
    return pts_exact(x / 100, True)


@dataclass(frozen=True)
class Step:
    axis: str
    published: str  # what the paper has
    measured: str  # what was measured here
    effect: float | None  # points, this axis's effect on the gap (None: not measured / not a step)
    evidence: str
    walk: bool = False  # a step of the published -> measured chart


@dataclass(frozen=True)
class Floor:
    """Numerics-only partners of a configuration: the largest change they made."""

    points: float  # max |change of mean F1|, points
    answers: int  # max answers changed
    text: str


@dataclass(frozen=True)
class Reconciliation:
    number: int  # the comparison's number in the report
    a: str
    b: str
    published_gap: float | None  # points, as one table printed it
    published_text: str
    versions_gap: float | None  # points, for the versions run
    versions_text: str
    version_effect: float | None
    measured: float  # points
    low: float
    high: float
    mde: float
    mde_level: str
    steps: tuple
    setup_effects: tuple  # (axis, effect points) in the walk
    floor: Floor | None
    floor_command: str
    convention_shift: float  # points: the largest move of the gap under another convention
    convention_text: str  # ... under which convention
    version_label: str = "algorithm version"
    version_notes: tuple = ()  # "the published 75.1 is SparseVLM v1's; v1.5, which was run, publishes 77.5"
    unmeasured: tuple = ()  # (axis, how to measure it)
    reprinted: tuple = ()  # (convention, gap, A, B) in points: pooled accuracy and pooled F1 under LLaVA's rule
    tolerance: float = ROUND  # points: a published gap is a difference of two values rounded to 0.1
    conclusion: str = ""

    @property
    def start(self) -> float | None:
        """The published reference the measured gap is compared with: for the versions run if known."""
        return self.versions_gap if self.versions_gap is not None else self.published_gap

    @property
    def residual(self) -> float | None:
        if self.start is None:
            return None
        return self.measured - self.start - sum(e for _, e in self.setup_effects)

    def walk(self) -> list[tuple[str, str, float]]:
        """(label, 'total' | 'step', points) from the published gap to the measured one."""
        out = []
        if self.published_gap is not None:
            out.append(("published", "total", self.published_gap))
        if self.version_effect is not None and self.published_gap is not None and self.versions_gap is not None:
            out += [("version", "step", self.version_effect), ("published, versions run", "total", self.versions_gap)]
        elif self.published_gap is None and self.versions_gap is not None:
            out.append(("published, versions run", "total", self.versions_gap))
        if self.residual is not None:
            out.append(("remaining", "step", self.residual))
        out += [(axis, "step", effect) for axis, effect in self.setup_effects]
        out.append(("measured", "total", self.measured))
        return out


def inside(value: float, low: float, high: float, tolerance: float = ROUND) -> bool:
    return low - tolerance <= value <= high + tolerance


# ----------------------------------------------------------------------------------------------
# Counterparts: configurations that differ from a given one in one setup axis
SETUP_AXES = (
    # (axis, info key, the paper's value, override that measures it, factor key)
    ("checkpoint layout and tokenizer", "model", published.PAPER_MODEL, f"model={published.PAPER_MODEL}", "model"),
    ("preprocessing", "preprocess", published.PAPER_SETUP["preprocess"], "preprocess=pad", "preprocess"),
    ("dtype / quantization", "quant", published.PAPER_SETUP["quant"], "quant=fp16", "quant"),
    ("question file", "data", published.PAPER_SETUP["data"], "data.version=llava-1.5", "data"),  # ingest: --pope-version llava-1.5
)


INGEST_FLAGS = {"model": "--model", "preprocess": "--preprocess", "quant": "--quant", "data": "--pope-version"}


def _same_factors_except(x: Config, y: Config, key: str) -> bool:
    """Every factor of the two configurations but `key` is equal (a factor one of them lacks counts as None)."""
    keys = set(x.factors) | set(y.factors)
    return all(x.factors.get(k) == y.factors.get(k) for k in keys if k != key)


def _differs_only_in(x: Config, y: Config, key: str) -> bool:
    if x.info["ingested"] != y.info["ingested"]:
        return False
    if x.info["ingested"]:
        cx, cy = coarse_factors(x.info), coarse_factors(y.info)
        return cx[key] != cy[key] and all(cx[k] == cy[k] for k in cx if k != key)
    return x.factors.get(key) != y.factors.get(key) and _same_factors_except(x, y, key)


def counterparts(config: Config, configs: Sequence[Config], key: str) -> list[Config]:
    return [c for c in configs if c is not config and c.once == config.once and _differs_only_in(config, c, key)]


def _f1(cell) -> float:
    return p(metrics.mean_f1(cell.counts["llava"].sum(0)))


def interaction(a, b, a2, b2, *, n_resamples: int, seed: int) -> stats.BootstrapResult | None:
    """(A - B) - (A' - B') with a paired cluster bootstrap: [A, B'] vs [B, A'] stacked over splits,
    scored as the sum of the two halves' mean F1 (all four cells answer the same questions)."""
    if len({a.fingerprint, b.fingerprint, a2.fingerprint, b2.fingerprint}) != 1 or len(a.clusters) < 2:
        return None
    s = len(a.splits)

    def metric(counts):
        return metrics.mean_f1(counts[..., :s, :]) + metrics.mean_f1(counts[..., s:, :])

    x = np.concatenate([a.counts["llava"], b2.counts["llava"]], axis=1)
    y = np.concatenate([b.counts["llava"], a2.counts["llava"]], axis=1)
    return stats.paired_cluster_bootstrap(x, y, metric=metric, n_resamples=min(n_resamples, CONVENTION_RESAMPLES), rng=seed)


def _setup_value(info: dict, key: str) -> str:
    value = info[key]
    return "not recorded" if value in ("?", None, "") else str(value)


def setup_steps(c: Comparison, configs: Sequence[Config], *, n_resamples: int, seed: int) -> tuple[list[Step], list[tuple[str, float]]]:
    a, b = c.pair.a, c.pair.b
    steps, walk = [], []
    model = a.info["model"]
    if published.base_model(model) != published.MODEL:
        steps.append(Step("setup: model", published.MODEL, model, None,
                          f"differs from the paper: the published numbers are {published.MODEL}'s; no sweep of {model} measures "
                          f"this (run model={published.MODEL})"))
    for axis, key, paper_value, override, factor in SETUP_AXES:
        ours = _setup_value(a.info, key)
        if key == "model":
            if published.base_model(model) != published.MODEL:
                continue
            same = model == paper_value
        else:
            same = ours == paper_value
        measured = []
        for a2 in counterparts(a, configs, factor):
            b2 = next((x for x in counterparts(b, configs, factor) if x.info[key] == a2.info[key]), None)
            if b2 is None:
                continue
            ca, cb, _ = choose_cells(a, b)
            ca2, cb2, _ = choose_cells(a2, b2)
            effect_a, effect_b = _f1(ca) - _f1(ca2), _f1(cb) - _f1(cb2)
            boot = interaction(ca, cb, ca2, cb2, n_resamples=n_resamples, seed=seed)
            gap_effect = (_f1(ca) - _f1(cb)) - (_f1(ca2) - _f1(cb2))
            ci = "" if boot is None else f" [95% CI {sgn(p(boot.confidence_interval.low))} to {sgn(p(boot.confidence_interval.high))}]"
            other = _setup_value(a2.info, key)
            measured.append((other, gap_effect, f"{ours} vs {other}: {a.label} {sgn(effect_a)}, {b.label} {sgn(effect_b)}, "
                                                f"gap {sgn(gap_effect)}{ci}"))
        paper_run = next((m for m in measured if m[0] == paper_value), None)
        evidence = "; ".join(m[2] for m in measured)
        if same:
            text = "same as the paper" + (f"; measured against other settings: {evidence}" if measured else "")
            steps.append(Step(f"setup: {axis}", paper_value, ours, None, text))
        elif ours == "not recorded":
            steps.append(Step(f"setup: {axis}", paper_value, ours, None,
                              "not recorded for the answer file (pass it to prune_eval.ingest); not measured"))
        elif paper_run is not None:
            steps.append(Step(f"setup: {axis}", paper_value, ours, paper_run[1],
                              f"differs from the paper; measured (the effect of ours vs the paper's setting): {evidence}", walk=True))
            walk.append((axis, paper_run[1]))
        else:
            how = (f"ingest answers produced with {INGEST_FLAGS[key]} {paper_value.removeprefix('pope ')}" if a.info["ingested"]
                   else f"rerun with {override}")
            steps.append(Step(f"setup: {axis}", paper_value, ours, None,
                              f"differs from the paper, not measured: {how} to measure it"
                              + (f"; measured against other settings: {evidence}" if measured else "")))
    return steps, walk


# ----------------------------------------------------------------------------------------------
# The numerical floor
def numerics_floor(config: Config, comparisons: Sequence[Comparison]) -> Floor | None:
    """The largest change of this configuration's mean F1 and answers among its numerics-only partners."""
    found = []
    for c in comparisons:
        if c.problem is None and c.pair.numerics_only and config in (c.pair.a, c.pair.b):
            other = c.pair.b if c.pair.a is config else c.pair.a
            found.append((abs(p(c.bootstrap.estimate)), c.n_differ, f"{c.pair.differs_in} ({other.label}): {c.n_differ} answers, "
                                                                    f"{sgn(p(c.bootstrap.estimate) if c.pair.a is config else -p(c.bootstrap.estimate))}"))
    if not found:
        return None
    return Floor(max(f[0] for f in found), max(f[1] for f in found), "; ".join(f[2] for f in found))


def _floor_step(c: Comparison, comparisons: Sequence[Comparison]) -> tuple[Step, Floor | None, str]:
    a, b = c.pair.a, c.pair.b
    fa, fb = numerics_floor(a, comparisons), numerics_floor(b, comparisons)
    gap_changes = []
    for ca in comparisons:
        if ca.problem or not ca.pair.numerics_only or a not in (ca.pair.a, ca.pair.b):
            continue
        a2 = ca.pair.b if ca.pair.a is a else ca.pair.a
        for cb in comparisons:
            if cb.problem or not cb.pair.numerics_only or b not in (cb.pair.a, cb.pair.b):
                continue
            b2 = cb.pair.b if cb.pair.a is b else cb.pair.a
            if a2.factors.get("numerics") == b2.factors.get("numerics") and a2.factors.get("quant") == b2.factors.get("quant"):
                da = p(ca.bootstrap.estimate) * (1 if ca.pair.a is a else -1)
                db = p(cb.bootstrap.estimate) * (1 if cb.pair.a is b else -1)
                gap_changes.append((abs(da - db), f"{ca.pair.differs_in}: gap changes by {sgn(-(da - db))}"))
    command = "a prune_eval run of the configuration under two numerics: eval.fast=true,false, eval.batch_size=1,8 or quant=fp16,bf16"
    if fa is None and fb is None:
        return Step("numerical floor", "—", "not measured", None,
                    f"no cells that differ only in numerics; {command}, measures it"), None, command
    floors = [f for f in (fa, fb) if f is not None]
    floor = Floor(max([f.points for f in floors] + [g[0] for g in gap_changes]), max(f.answers for f in floors),
                  "; ".join(f.text for f in floors))
    evidence = "; ".join(filter(None, [f"{a.label}: {fa.text}" if fa else f"{a.label}: not measured",
                                       f"{b.label}: {fb.text}" if fb else f"{b.label}: not measured",
                                       "; ".join(g[1] for g in gap_changes)]))
    return Step("numerical floor", "—", f"up to {floor.points:.2f} points, {floor.answers} answers", floor.points, evidence), floor, command


# ----------------------------------------------------------------------------------------------
# Budget meaning
def _compute(info: dict, key: str) -> float | None:
    value = (info.get("compute") or {}).get(key) if isinstance(info.get("compute"), dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _same_except_budget(x: Config, y: Config) -> bool:
    if x.info["ingested"] or y.info["ingested"] or x.info["method"] != y.info["method"] or x.info["version"] != y.info["version"]:
        return False
    return _same_factors_except(x, y, "method") and x.once == y.once


def equal_compute_gap(c: Comparison, configs: Sequence[Config], stats_by_id: dict) -> tuple[float, str] | None:
    """The gap at equal average visual tokens per layer: the other side's mean F1 interpolated
    (linearly, never extrapolated) between its budgets at this side's compute. Points."""
    a, b = c.pair.a, c.pair.b
    for side, other, sign in ((a, b, 1), (b, a, -1)):
        target = _compute(side.info, "input_seen")
        points = sorted((_compute(x.info, "input_seen"), p(stats_by_id[x.id].seeds.mean), x.info["budget"])
                        for x in configs if _same_except_budget(x, other) and _compute(x.info, "input_seen") is not None)
        if target is None or len(points) < 2:
            continue
        for (x0, y0, b0), (x1, y1, b1) in zip(points, points[1:]):
            if x0 <= target <= x1 and x1 > x0:
                value = y0 + (y1 - y0) * (target - x0) / (x1 - x0)
                gap = sign * (p(stats_by_id[side.id].seeds.mean) - value)
                return gap, (f"{other.label} interpolated between its budgets {b0} and {b1} to {side.label}'s "
                             f"{target:.1f} visual tokens per layer")
    return None


def budget_step(c: Comparison, configs: Sequence[Config], stats_by_id: dict) -> Step:
    a, b = c.pair.a, c.pair.b

    def side(x: Config) -> str:
        entering, seen, tflops = (_compute(x.info, k) for k in ("entering", "input_seen", "prefill_tflops_per_question"))
        if entering is None and seen is None:
            return f"{x.label}: nominal {x.info['budget']}, compute not recorded"
        text = f"{x.label}: nominal {x.info['budget']}, {entering:.0f} entering the LLM, {seen:.1f} per layer on average"
        return text + (f", {tflops:.3g} prefill TFLOPs per question" if tflops is not None else "")

    equal = equal_compute_gap(c, configs, stats_by_id)
    evidence = "; ".join([side(a), side(b)])
    if equal is not None:
        evidence += f". At equal average visual tokens per layer (interpolated: {equal[1]}) the gap is {sgn(equal[0])}"
        return Step("budget meaning", "nominal budget (each paper's own meaning)", f"gap at equal compute {sgn(equal[0])} (interpolated)",
                    equal[0] - p(c.bootstrap.estimate), evidence + " (effect: vs the gap at equal nominal budget; not a step of the walk)")
    return Step("budget meaning", "nominal budget (each paper's own meaning)", "equal nominal budget", None,
                evidence + ("; run several budgets of both methods to get the gap at equal compute" if _compute(a.info, "input_seen") is not None else ""))


# ----------------------------------------------------------------------------------------------
# The whole reconciliation of one comparison
def short(entry: published.Published) -> str:
    source = published.SOURCES[entry.source]
    return source.short or f"{source.paper}, {source.table}"


def _same_except_version(x: Config, y: Config, version: str | None) -> bool:
    """y is x with the method's algorithm version set to `version` (same method, budget, setup)."""
    if x.info["ingested"] != y.info["ingested"] or y.info["method"] != x.info["method"] or y.info["version"] != version:
        return False
    if y.info["budget"] != x.info["budget"]:
        return False
    if x.info["ingested"]:
        cx, cy = coarse_factors(x.info), coarse_factors(y.info)
        return all(cx[k] == cy[k] for k in cx if k != "method")
    return _same_factors_except(x, y, "method") and x.once == y.once


def measured_version_effect(c: Comparison, configs: Sequence[Config], printed, *, n_resamples: int, seed: int) -> str:
    """'; measured here: ...' when the published table's version was also run in the same setup."""
    out = []
    for side, entry in ((c.pair.a, printed[0]), (c.pair.b, printed[1])):
        version = published.normalize_version(entry.version)
        if version == side.info["version"]:
            continue
        other = next((x for x in configs if _same_except_version(side, x, version)), None)
        if other is None:
            continue
        ours, theirs, _ = choose_cells(side, other)
        if ours.fingerprint != theirs.fingerprint or len(ours.clusters) < 2:
            continue
        boot = stats.paired_cluster_bootstrap(ours.counts["llava"], theirs.counts["llava"], metric=metrics.mean_f1,
                                              n_resamples=min(n_resamples, CONVENTION_RESAMPLES), rng=seed)
        sign = 1 if side is c.pair.a else -1
        low, high = sorted((sign * p(boot.confidence_interval.low), sign * p(boot.confidence_interval.high)))
        out.append(f"measured here: {side.label} minus {other.label} = {sgn(p(boot.estimate))} [95% CI "
                   f"{sgn(p(boot.confidence_interval.low))} to {sgn(p(boot.confidence_interval.high))}], so running the "
                   f"table's version instead would move the gap by {sgn(-sign * p(boot.estimate))} [95% CI {sgn(-high)} to {sgn(-low)}]")
    return "".join(f"; {text}" for text in out)


def version_text(method: str, entry: published.Published | None, run_version: str | None) -> str:
    name = display(method)
    if entry is None:
        return f"{name} {run_version or ''}".strip() + ": no published number"
    version = f" {entry.version}" if entry.version else ""
    return f"{name}{version} {entry.value:.1f} ({short(entry)})"


def reconcile(number: int, c: Comparison, configs: Sequence[Config], stats_by_id: dict[str, ConfigStats],
              comparisons: Sequence[Comparison], *, n_resamples: int, seed: int) -> Reconciliation | None:
    """The walk from the published gap to the measured one, or None without a published counterpart."""
    pair = c.pair
    if c.problem is not None or pair.factor != "method" or not (pair.a.info["metadata"] and pair.b.info["metadata"]):
        return None
    ia, ib = pair.a.info, pair.b.info
    if ia["budget"] is None and ib["budget"] is None:
        return None
    budget = ia["budget"] if ia["budget"] is not None else ib["budget"]
    printed = published.published_pair(ia["method"], ib["method"], budget) if ia["method"] != ib["method"] else None
    va = published.lookup(published.MODEL, ia["method"], ia["version"], budget if ia["method"] != "vanilla" else None, ia["params"])
    vb = published.lookup(published.MODEL, ib["method"], ib["version"], budget if ib["method"] != "vanilla" else None, ib["params"])
    if printed is None and (va is None or vb is None):
        return None
    published_gap = round(printed[0].value - printed[1].value, 2) if printed else None
    versions_gap = round(va.value - vb.value, 2) if va and vb else None
    measured, ci = p(c.bootstrap.estimate), c.bootstrap.confidence_interval
    low, high = p(ci.low), p(ci.high)
    steps = []
    if printed:
        ea, eb = printed
        va_text = f"{display(ia['method'])}{' ' + ea.version if ea.version else ''} {ea.value:.1f}"
        vb_text = f"{display(ib['method'])}{' ' + eb.version if eb.version else ''} {eb.value:.1f}"
        published_text = f"{short(ea)} prints {va_text} vs {vb_text}, a gap of {sgn(published_gap)}"
        steps.append(Step("published gap", published_text, "—", published_gap, "as printed in one table"))
    else:
        published_text = "no table prints both methods at this budget"
    run = f"{base_label(ia)} vs {base_label(ib)}"
    notes, changed = [], []
    if printed:
        for info, entry, now in ((ia, printed[0], va), (ib, printed[1], vb)):
            if published.normalize_version(entry.version) == info["version"]:
                continue
            name = display(info["method"])
            changed.append(name)
            was = f"{name} {entry.version}'s" if entry.version else f"{name}'s (no version named)"
            ran = f"{info['version'] or 'the version run'}, which was run,"
            notes.append(f"the published {entry.value:.1f} is {was}; {ran} "
                         + (f"publishes {now.value:.1f} ({short(now)})" if now else "has no published number"))
    same_versions = bool(printed) and not changed
    effect = round(versions_gap - published_gap, 2) if printed and versions_gap is not None and changed else None
    if va and vb:
        versions_text = f"{version_text(ia['method'], va, ia['version'])} vs {version_text(ib['method'], vb, ib['version'])}: {sgn(versions_gap)}"
    else:
        missing = ia if va is None else ib
        versions_text = (f"no published POPE number for {display(missing['method'])} {missing['version'] or ''} at {budget} "
                         f"(published versions: {', '.join(published.versions_published(missing['method'])) or 'none'})").replace("  ", " ")
    if same_versions:
        evidence = "the published values belong to the versions run"
    elif printed:
        evidence = "; ".join(notes) + f"; published for the versions run: {versions_text}"
    else:
        evidence = f"published for the versions run: {versions_text}"
    table_versions = " vs ".join(f"{display(e.method)} {e.version or '(one version)'}" for e in printed) if printed else "—"
    if printed and changed:
        evidence += measured_version_effect(c, configs, printed, n_resamples=n_resamples, seed=seed)
    steps.append(Step("version", table_versions, run, effect, evidence, walk=effect is not None))
    steps.append(budget_step(c, configs, stats_by_id))
    primary = c.conventions[0].estimate
    spread, spread_text = 0.0, ""
    reprinted = tuple((g.label.split(" (")[0], p(g.estimate), p(g.value_a), p(g.value_b)) for g in c.conventions
                      if g.key in ("pooled_accuracy/llava", "pooled_f1/llava"))
    for g in c.conventions:
        if "subset" in g.key or g.data != c.conventions[0].data:
            continue
        shift = p(g.estimate - primary)
        if g.key != c.conventions[0].key and abs(shift) >= abs(spread):
            spread, spread_text = shift, g.label
        values = f"{pair.a.label} {pts_exact(g.value_a)} vs {pair.b.label} {pts_exact(g.value_b)}" if g.value_a is not None else ""
        steps.append(Step(f"metric convention: {g.label}", "the papers' convention" if g.key == c.conventions[0].key else "—",
                          values, None if g.key == c.conventions[0].key else shift,
                          f"gap {sgn(p(g.estimate))} [95% CI {sgn(p(g.low))} to {sgn(p(g.high))}]"
                          + ("" if g.key == c.conventions[0].key else f"; {sgn(shift)} vs the papers' convention")))
    setup, setup_walk = setup_steps(c, configs, n_resamples=n_resamples, seed=seed)
    steps += setup
    refs = [(name, value) for name, value in (("the published gap", published_gap), ("the published gap for the versions run", versions_gap)) if value is not None]
    steps.append(Step("sampling noise", "—", f"{sgn(measured)} [95% CI {sgn(low)} to {sgn(high)}]", None,
                      "; ".join(f"{name} {sgn(v)} is {'inside' if inside(v, low, high) else 'outside'} the 95% CI"
                                for name, v in refs) + f"; minimum detectable effect {c.mde * 100:.2f} points ({c.mde_level})"))
    floor_step, floor, command = _floor_step(c, comparisons)
    steps.append(floor_step)
    steps.append(Step("measured gap", "—", f"{sgn(measured)} (mean F1 over splits, LLaVA rule)", measured, f"{run}, {c.n_questions} questions"))
    unmeasured = [(s.axis.removeprefix("setup: "), s.evidence.split("not measured: ", 1)[1].split(" to measure it")[0])
                  for s in steps if s.axis.startswith("setup") and "not measured: " in s.evidence and "to measure it" in s.evidence]
    if floor is None:
        unmeasured.append(("numerical floor", command))
    return Reconciliation(number, pair.a.label, pair.b.label, published_gap, published_text, versions_gap, versions_text,
                          effect, measured, low, high, 100 * c.mde, c.mde_level, tuple(steps), tuple(setup_walk), floor,
                          command, spread, spread_text, " and ".join(changed) + " version" if changed else "algorithm version",
                          tuple(notes), tuple(unmeasured), reprinted)


def reconciliations(comparisons: Sequence[Comparison], configs: Sequence[Config], stats_by_id: dict, *,
                    n_resamples: int, seed: int) -> list[Reconciliation]:
    """Reconcile the method comparisons with a published counterpart; with several setups, only
    those in the report's common setup (the others appear as setup axes of these)."""
    candidates = [(n, c) for n, c in enumerate(comparisons, start=1)
                  if c.problem is None and c.pair.factor == "method" and not c.pair.baseline]
    if candidates:
        fewest = min(c.pair.a.departures + c.pair.b.departures for _, c in candidates)
        candidates = [(n, c) for n, c in candidates if c.pair.a.departures + c.pair.b.departures == fewest or c.pair.a.info["ingested"]]
    out = []
    for n, c in candidates:
        r = reconcile(n, c, configs, stats_by_id, comparisons, n_resamples=n_resamples, seed=seed)
        if r is not None:
            out.append(replace(r, conclusion=conclusion(r)))
    return out
