"""Turn an `analyse.Analysis` into the report's files: markdown, self-contained HTML, CSV, LaTeX, PNG.

Why separate from the analysis: the analysis decides what is true, this module only says it, and
every sentence built from numbers comes from `wording`. The text is built once as a list of blocks
(heading, paragraph, bullet list, table, figure) and then rendered to markdown and to HTML, so the
two can never say different things. The reconciliation with the published numbers comes first:
it answers the question the report exists for. Numbers are shown in points (x 100); the CSV files
keep fractions (0-1), as summary.json does.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import time
from dataclasses import dataclass

import numpy as np

from prune_eval import __version__
from prune_eval.analysis import metrics, plots, published
from prune_eval.analysis.analyse import Analysis
from prune_eval.analysis.compare import ALPHA, CONVENTION_RESAMPLES, sign_line
from prune_eval.analysis.configs import common_text, numerics_text
from prune_eval.analysis.wording import conclusion_parts, fmt_p, pts, pts_exact, seed_gap_line

FIGURES = {"forest.png": "Gaps with 95% intervals", "budget.png": "Mean F1 vs budget", "splits.png": "F1 per split with 95% intervals"}
WALK = "From the published gap to the measured gap"  # reconciliation-<n>.png, one per reconciliation


@dataclass(frozen=True)
class Block:
    kind: str  # h1 h2 h3 p ul table img
    text: str = ""
    items: tuple = ()  # ul: strings; table: rows (tuples of strings)
    header: tuple = ()
    css: str = ""  # html class (e.g. 'lead' for the conclusion a reader sees first)


def h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def p(text: str, css: str = "") -> Block:
    return Block("p", text, css=css)


def ul(items) -> Block:
    return Block("ul", items=tuple(items))


def ol(items) -> Block:
    return Block("ol", items=tuple(items))


def table(header, rows) -> Block:
    return Block("table", items=tuple(tuple(str(x) for x in r) for r in rows), header=tuple(header))


def img(name: str, caption: str | None = None) -> Block:
    return Block("img", caption or FIGURES[name], header=(name,))


def walk_name(number: int) -> str:
    return f"reconciliation-{number}.png"


# ----------------------------------------------------------------------------------------------
# Text helpers
def _ci(low: float, high: float) -> str:
    return f"[{pts_exact(low)}, {pts_exact(high)}]"


def _compute(compute) -> str:
    """summary['compute'] in a few words; tolerant of whatever shape it has."""
    if not isinstance(compute, dict):
        return "" if compute is None else str(compute)
    words = {"entering": "entering", "input_seen": "avg/layer", "official_equal_tokens": "official",
             "prefill_tflops_per_question": "TFLOPs/q"}
    parts = [f"{words[k]} {compute[k]:.4g}" for k in words if isinstance(compute.get(k), (int, float))]
    if not parts:
        parts = [f"{k} {v:.4g}" for k, v in compute.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(parts)


def _seed_column(a: Analysis, cid: str) -> str:
    cs = a.config_stats[cid]
    config = next(c for c in a.configs if c.id == cid)
    if config.info["ingested"]:
        return "answer file"
    if config.once:
        served = cs.served_seeds
        return "computed once" + (f", serves {len(served)} seeds" if len(served) > 1 else "")
    s = cs.seeds
    if s.n_seeds == 1:
        return "1"
    return f"{s.n_seeds}, identical" if s.identical_predictions else f"{s.n_seeds}, differ on {s.n_differing} q"


def config_ci(cs) -> tuple[float, float] | None:
    """A configuration's 95% interval for mean F1, or None when it has fewer than 2 images."""
    return None if cs.interval is None else (cs.interval.confidence_interval.low, cs.interval.confidence_interval.high)


def _config_ci_text(cs) -> str:
    ci = config_ci(cs)
    return "[no interval: 1 image]" if ci is None else _ci(*ci)


def _score_cell(a: Analysis, cid: str) -> str:
    cs = a.config_stats[cid]
    if cs.seeds.n_seeds > 1 and not cs.seeds.identical_predictions:
        return f"{pts(cs.seeds.mean)} ± {pts(cs.seeds.std)} (seed std) {_config_ci_text(cs)}"
    return f"{pts(cs.seeds.mean)} {_config_ci_text(cs)}"


def _paper_cell(a: Analysis, cid: str) -> str:
    entry = a.config_stats[cid].paper
    return "" if entry is None else f"{entry.value:.1f}"


def _inside(value: float, low: float, high: float, tolerance: float = published.ROUNDING) -> bool:
    return low - tolerance <= value <= high + tolerance


def _p_cell(c) -> str:
    return fmt_p(c.holm_p) if c.family else f"{fmt_p(c.permutation.p_value)} (unadjusted)"


# ----------------------------------------------------------------------------------------------
# Sections
def _summary_blocks(a: Analysis) -> list[Block]:
    counts = {}
    for e in a.entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    tested = sum(c.problem is None for c in a.comparisons)
    return [
        h(1, f"POPE report: {a.sweep_dir}"),
        p(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} by prune_eval {__version__} from the per-question "
          f"records alone. Cells: {len(a.entries)} ({status}); {len(a.configs)} configuration(s); "
          f"{len(a.comparisons)} comparison(s), {tested} tested, {a.family.size} in the Holm family."),
    ]


def _method_blocks(a: Analysis) -> list[Block]:
    tested = [c for c in a.comparisons if c.problem is None]
    floor = sum(c.at_floor for c in tested)
    blocks = [h(2, "How to read this report"),
              p("The primary metric is the papers' POPE number: the mean over splits of per-split F1 under LLaVA's "
                "parsing rule, in points (x 100). Intervals are 95% paired cluster-bootstrap percentile intervals "
                f"(images resampled with all their questions, {a.n_resamples} resamples, seed {a.seed}); they describe "
                "generalisation to new images, not whether a paper's number on the same questions was reproduced. p-values "
                f"are paired image-cluster permutation tests ({a.n_resamples} resamples). The Holm family at alpha = {ALPHA} "
                f"is the comparisons in {a.family.describe()}, without comparisons against vanilla or the random baseline "
                f"and without pairs with identical predictions: {a.family.size} comparison(s). The others are diagnostic: "
                "their p-values are unadjusted and say so. The minimum detectable effect (80% power) of a family member is "
                + (f"at alpha/{a.family.size} (Holm's strictest step)" if a.family.size > 1 else "at alpha")
                + ", a diagnostic's at alpha. cells.csv and gaps.csv "
                "hold fractions (0-1).")]
    if floor:
        blocks.append(p(f"{floor} of the {len(tested)} permutation p-values sit at the Monte Carlo floor 1/(B+1) = "
                        f"{1 / (a.n_resamples + 1):.1e}: no resample was as extreme; raise --resamples for finer p-values."))
    if a.common:
        blocks.append(p("Unless its label says otherwise, a configuration uses: " + common_text(a.common) + "."))
    return blocks


def _reconciliation_blocks(a: Analysis, figure_names) -> list[Block]:
    if not a.reconciliations:
        methods = sorted({e.method for e in published.TABLE})
        return [h(2, "Reconciliation with the published numbers"),
                p("No comparison of two methods has a published counterpart here. Published POPE numbers exist for "
                  f"{published.MODEL} ({', '.join(methods)}; algorithm versions as published) at 64/128/192 tokens; "
                  "ingested answer files are matched when ingested with --model, --method (--version) and --budget.")]
    blocks = [h(2, "Reconciliation with the published numbers")]
    for r in a.reconciliations:
        start = "" if r.published_gap is None else f"published {pts_exact(r.published_gap / 100, True)} → "
        head, ranked, remarks = conclusion_parts(r)
        blocks += [h(3, f"#{r.number} {r.a} vs {r.b}: {start}measured {pts_exact(r.measured / 100, True)} points"),
                   p(head, css="lead")]
        if ranked:
            blocks += [p("Explanations ranked by measured size:"), ol(re.sub(r"^\(\d+\) ", "", x) for x in ranked)]
        blocks += [p(remark) for remark in remarks]
        if walk_name(r.number) in figure_names:
            blocks.append(img(walk_name(r.number), f"#{r.number}: {WALK}"))
        blocks.append(table(("axis", "published", "measured here", "effect on the gap (points)", "evidence"),
                            [(s.axis, s.published, s.measured, "" if s.effect is None else pts_exact(s.effect / 100, True),
                              s.evidence) for s in r.steps]))
    blocks.append(p("Effect: for 'version' and 'setup' rows, how much that axis moves the gap (a step of the walk from the "
                    "published to the measured gap); for convention rows, the gap under that convention minus the gap under "
                    "the papers'; for the numerical floor, the largest change numerics alone made. 'remaining' in the chart is "
                    "what the measured axes leave unexplained (implementation, unmeasured setup, sampling noise)."))
    return blocks


def _verdict_blocks(a: Analysis) -> list[Block]:
    if not a.comparisons:
        return [h(2, "Verdicts"), p("No two configurations differ in exactly one factor: nothing to compare. "
                                    "Use --pair CELL_A CELL_B to compare two cells explicitly.")]
    items = []
    for c in a.comparisons:
        where = c.pair.differs_in + (f"; {c.pair.seed_note}" if c.pair.seed_note else "")
        items.append(f"{c.pair.a.label} vs {c.pair.b.label} ({where}): {c.verdict}")
    return [h(2, "Verdicts"), ul(items)]


def _not_used_blocks(a: Analysis) -> list[Block]:
    bad = [e for e in a.entries if e.status != "complete"]
    if not bad:
        return [h(2, "Cells not used"), p(f"None: all {len(a.entries)} cells are complete and verified.")]
    return [h(2, "Cells not used"),
            p("Missing = requested in plan.json but no complete summary; failed = error.json; partial = records "
              "but no summary; busy = locked by a running job; excluded = complete but failed verification."),
            table(("cell", "status", "why"), [(e.name, e.status, e.note) for e in bad])]


def _runtime_numerics(c) -> str:
    found = [n for n in (c.data.numerics or {}).values()]
    distinct = {json.dumps(n, sort_keys=True) for n in found}
    if not found or distinct == {"null"}:
        return "not recorded"
    if len(distinct) > 1:
        return f"MIXED: {len(distinct)} different runtime numerics over {len(found)} parts"
    n = found[0]
    return f"{n.get('path')} path, {n.get('device_name')}, {n.get('dtype')}, torch {n.get('torch')}"


def _config_blocks(a: Analysis) -> list[Block]:
    rows = []
    for c in a.configs:
        i = c.info
        tokens = sorted({f"{x.data.visual_tokens:.4g}" for x in c.cells if x.data.visual_tokens is not None})
        seeds = ("computed once" if c.once else ", ".join("-" if x.seed is None else str(x.seed) for x in c.cells))
        rows.append((c.id, c.label, i["model"], i["method"], i["version"] or i["code_version"] or "",
                     "" if i["budget"] is None else i["budget"], ", ".join(map(str, tokens)), _compute(i["compute"]),
                     i["quant"], i["preprocess"], f"{i['data']} ({len(c.cells[0].data.keys)} q)",
                     "" if i["ingested"] else numerics_text(i["numerics"]), _runtime_numerics(c.cells[0]), seeds))
    return [h(2, "Configurations"),
            p("Version: the method's algorithm version if it has one (SparseVLM v1/v1.5/v2), else its code version. "
              "Tokens: mean visual tokens entering the LLM from the records; compute: summary.json's compute "
              "accounting where present (visual tokens per layer, official figure, TFLOPs). Numerics: as configured "
              "(part of the cell's identity) and as run (from the record parts' footers; MIXED if a cell holds parts "
              "computed under different numerics, which only eval.allow_mixed_numerics=true permits)."
              + (" Ingested answer files: model, method and budget as given to prune_eval.ingest; '?' = not given."
                 if any(c.info["ingested"] for c in a.configs) else "")),
            table(("id", "configuration", "model", "method", "version", "budget", "tokens", "compute", "quant",
                   "preprocess", "data", "numerics", "run on", "seeds"), rows)]


def _score_blocks(a: Analysis) -> list[Block]:
    rows, findings = [], []
    for c in a.configs:
        cs = a.config_stats[c.id]
        ll, ex = cs.means["llava"], cs.means["exact"]
        rows.append((c.id, c.label, _score_cell(a, c.id), _seed_column(a, c.id), pts(ll["pooled_f1"]),
                     pts(ll["pooled_accuracy"]), pts(ll["mean_accuracy"]), pts(ex["mean_f1"]), pts(ex["pooled_f1"]),
                     f"{ll['pooled_yes_ratio']:.3f}", f"{ll['label_yes_ratio']:.3f}", _paper_cell(a, c.id)))
        if c.once:
            findings.append(f"{c.id} {c.label}: {cs.seeds.finding}.")
        elif cs.seeds.n_seeds > 1:
            text = f"{c.id} {c.label}: {cs.seeds.finding}."
            if not cs.seeds.identical_predictions:
                text += (f" Mean over seeds {pts(cs.seeds.mean)} ± {pts(cs.seeds.std)} (seed std); seed + question "
                         f"95% interval {_config_ci_text(cs)}.")
            findings.append(text)
        if cs.left_out:
            findings.append(f"{c.id}: cell(s) {', '.join(cs.left_out)} answer other questions than the first seed; "
                            "left out of this configuration's statistics.")
    blocks = [h(2, "Scores"),
              p("Mean F1 is the primary metric with its 95% interval (images resampled; with several seeds that "
                "changed predictions, seeds are resampled too). Seeds: number run, and whether they changed any "
                "prediction. Two quantities are called 'yes-ratio' elsewhere, named apart here: 'pred. yes-ratio' is the "
                "share of all questions the model answered yes (LLaVA's eval_pope.py yes ratio, pooled over splits; a low "
                "value means the model says no too often); 'label yes-ratio' is the share of questions whose LABEL is yes, "
                "which is what lmms-eval's pope task reports as yes_ratio (0.5 on balanced POPE whatever the model "
                "answers). Paper: the published value for this model, method, version and budget."),
              table(("id", "configuration", "mean F1 [95% CI]", "seeds", "pooled F1", "pooled acc", "mean acc",
                     "mean F1 exact", "pooled F1 exact", "pred. yes-ratio", "label yes-ratio", "paper"), rows)]
    if findings:
        blocks += [h(3, "Seeds"), ul(findings)]
    return blocks


def _share(s) -> str:
    return f"{pts(s.estimate)} {_ci(s.confidence_interval.low, s.confidence_interval.high)}"


def _agreement_blocks(a: Analysis) -> list[Block]:
    if not a.agreements and not a.subsets:
        return []
    label = {x.name: f"{c.id} {c.label}" + ("" if len(c.cells) == 1 else f" (seed {x.seed})") for c in a.configs for x in c.cells}
    blocks = [h(2, "Which answers change")]
    if a.agreements:
        rows = [(label[g.cell], label.get(g.vanilla_cell, g.vanilla_cell), f"{g.n_questions} / {g.n_images}", _share(g.equal),
                 _share(g.right_to_wrong), _share(g.wrong_to_right),
                 pts_exact(g.wrong_to_right.estimate - g.right_to_wrong.estimate, True))
                for g in a.agreements.values()]
        blocks += [h(3, "Agreement with vanilla"),
                   p("Share of answers (LLaVA rule) equal to the unpruned model's on the same questions (EffiVLM-Bench's "
                     "'loyalty'), and the two kinds of change: right -> wrong (vanilla right, this wrong) and wrong -> right, "
                     "in % of all questions with 95% image-cluster bootstrap intervals. Net = wrong -> right minus right -> "
                     "wrong = this accuracy minus vanilla's."),
                   table(("configuration", "vanilla", "questions / images", "agree [95% CI]", "right -> wrong [95% CI]",
                          "wrong -> right [95% CI]", "net"), rows)]
    if a.subsets:
        rows = [(label[s.cell], label.get(s.downsample_cell, s.downsample_cell), f"{s.n_questions} / {s.n_images}",
                 "empty or 1 image: no interval" if s.accuracy is None else _share(s.accuracy)) for s in a.subsets.values()]
        blocks += [h(3, "Compression-sensitive subset"),
                   p("VTC-Bench's filter (Liao et al., arXiv 2510.07143): the questions the unpruned model answers correctly "
                     "and the downsampling baseline at the same budget answers wrongly. Accuracy on that subset, with a 95% "
                     "image-cluster bootstrap interval (by construction vanilla scores 100 and downsample 0 there). Gaps on "
                     "the subset are in the Comparisons section, labelled as such."),
                   table(("configuration", "downsample baseline", "subset questions / images", "accuracy on the subset [95% CI]"), rows)]
    return blocks


def _split_blocks(a: Analysis) -> list[Block]:
    rows = []
    for c in a.configs:
        cs = a.config_stats[c.id]
        for split, s in cs.means["llava"]["splits"].items():
            e = cs.means["exact"]["splits"][split]
            ci = (cs.split_intervals or {}).get(split)
            rows.append((c.id, split, int(round(s["n"])), pts(s["accuracy"]), pts(s["precision"]), pts(s["recall"]),
                         pts(s["f1"]) + ("" if ci is None else f" {_ci(*ci)}"), f"{s['yes_ratio']:.3f}", pts(e["f1"]),
                         int(round(e["other_yes"] + e["other_no"]))))
    return [h(2, "Per split"),
            p("LLaVA rule unless marked exact; F1 with its 95% image-cluster interval; pred. yes-ratio = share of this "
              "split's questions answered yes; 'other' = answers that are neither 'yes' nor 'no' under exact match (wrong "
              "for accuracy, ignored by precision and recall). Means over seeds."),
            table(("id", "split", "n", "accuracy", "precision", "recall", "F1 [95% CI]", "pred. yes-ratio", "F1 exact", "other"), rows)]


def _comparison_blocks(a: Analysis) -> list[Block]:
    rows, problems = [], []
    for n, c in enumerate(a.comparisons, start=1):
        if c.problem:
            problems.append(f"#{n} {c.pair.a.label} vs {c.pair.b.label}: not comparable: {c.problem}.")
            continue
        ci, acc, m = c.bootstrap.confidence_interval, c.accuracy, c.mcnemar
        rows.append((n, c.pair.a.label, c.pair.b.label, c.pair.differs_in, "yes" if c.family else "diagnostic",
                     c.pair.seed_note or "-", f"{c.n_questions} / {c.n_images}", f"{pts_exact(c.bootstrap.estimate, True)} {_ci(ci.low, ci.high)}",
                     fmt_p(c.permutation.p_value), _p_cell(c), pts(c.mde),
                     f"{pts(acc.estimate, True)} ± {pts(acc.standard_error)} (unclustered {pts(acc.standard_error_unclustered)})",
                     pts(acc.minimum_detectable_effect), f"{m.b}/{m.c}, p {fmt_p(m.p_value)}",
                     "" if c.paper_gap is None else f"{c.paper_gap:+.1f}"))
    blocks = [h(2, "Comparisons"),
              p("Gap = A - B in mean F1 (points) with its 95% interval; perm p = paired image-cluster permutation "
                "test (primary); p used = Holm-adjusted for family members, unadjusted for diagnostic comparisons; MDE = "
                "the smallest true gap detected with 80% power (at alpha/m in the family, alpha otherwise; from the "
                "bootstrap SE). Accuracy columns: pooled-accuracy gap with Miller's clustered SE (and the unclustered one, "
                "to show what clustering adds) and its MDE at alpha. McNemar: questions A got right and B wrong / the "
                "reverse, exact p (ignores clustering: secondary). The test of configurations with several seeds runs on "
                "the seed named in the 'seed' column; the seed lines below use every seed.")]
    if rows:
        blocks.append(table(("#", "A", "B", "differs in", "family", "seed", "questions / images", "gap [95% CI]", "perm p",
                             "p used", "MDE", "accuracy gap ± clustered SE", "acc MDE", "McNemar b/c", "paper gap"), rows))
    seeds = [f"#{n} {c.pair.a.label} vs {c.pair.b.label}: {seed_gap_line(c.seeds)}"
             for n, c in enumerate(a.comparisons, start=1) if c.seeds is not None and c.problem is None]
    if seeds:
        blocks += [h(3, "Seeds in gaps"), ul(seeds)]
    subset = [f"#{n} {c.pair.a.label} vs {c.pair.b.label}: " + "; ".join(
              f"{g.label.split(' on the ')[0]} {pts_exact(g.estimate, True)} {_ci(g.low, g.high)} "
              f"({pts(g.value_a)} vs {pts(g.value_b)}; {g.data})" for g in c.subset)
              for n, c in enumerate(a.comparisons, start=1) if c.subset]
    if subset:
        blocks += [h(3, "Gaps on the compression-sensitive subset"),
                   p("The same comparisons restricted to the questions vanilla answers correctly and the downsampling "
                     "baseline at that budget answers wrongly (VTC-Bench's filter); each with its own 95% image-cluster "
                     "interval over the subset. Not part of the Holm family."), ul(subset)]
    if problems:
        blocks += [h(3, "Not comparable"), ul(problems)]
    return blocks


def _convention_blocks(a: Analysis) -> list[Block]:
    blocks = [h(2, "Conventions"),
              p("The same predictions scored under each convention the papers and tools use; the gap's sign can "
                "depend on the convention. Rows on other question files compare the same two configurations run on "
                "those files. Not part of the Holm family (a sensitivity analysis, not more tests); rows other than the "
                f"first use {min(a.n_resamples, CONVENTION_RESAMPLES)} bootstrap resamples.")]
    identical = []
    for n, c in enumerate(a.comparisons, start=1):
        if c.problem:
            continue
        if c.identical and c.identical_exact:
            identical.append(f"#{n}")
            continue
        blocks += [h(3, f"#{n} {c.pair.a.label} vs {c.pair.b.label}"),
                   table(("convention", "data", "A", "B", "gap A - B [95% CI]"),
                         [(g.label, g.data, "" if g.value_a is None else pts(g.value_a), "" if g.value_b is None else pts(g.value_b),
                           f"{pts_exact(g.estimate, True)} {_ci(g.low, g.high)}") for g in c.conventions]),
                   p(sign_line(c))]
    if identical:
        blocks.append(p(f"{', '.join(identical)}: identical predictions under both parsing rules, so every convention "
                        "gives a gap of exactly 0."))
    return blocks if len(blocks) > 2 else []


def _reproduction(diff: float, floor) -> str:
    if abs(diff) <= published.ROUNDING:
        return "reproduced to the paper's rounding"
    if floor is None:
        return "differs by more than rounding; numerical floor not measured"
    if abs(diff) <= published.ROUNDING + floor.points:
        return "within rounding + the numerical floor"
    return "differs by more than rounding + the numerical floor"


def _published_blocks(a: Analysis) -> list[Block]:
    rows, gaps, used = [], [], set()
    for c in a.configs:
        cs = a.config_stats[c.id]
        if cs.paper is None:
            continue
        sources = published.sources_of(cs.paper)
        used.update(sources)
        diff = 100 * cs.seeds.mean - cs.paper.value
        floor = (a.floors or {}).get(c.id)
        rows.append((c.id, c.label, published.label(cs.paper), f"{cs.paper.value:.1f}", ", ".join(sources),
                     pts(cs.seeds.mean), f"{diff:+.2f}",
                     "not measured" if floor is None else f"{floor.points:.2f} ({floor.answers} answers)",
                     _reproduction(diff, floor), _config_ci_text(cs),
                     ", ".join(published.setup_differences(c.info)) or "same"))
    for n, cmp in enumerate(a.comparisons, start=1):
        if cmp.paper_gap is None or cmp.problem:
            continue
        ci = cmp.bootstrap.confidence_interval
        inside = _inside(cmp.paper_gap, 100 * ci.low, 100 * ci.high, 2 * published.ROUNDING)
        gaps.append(f"#{n} {cmp.pair.a.label} vs {cmp.pair.b.label}: ours {pts(cmp.bootstrap.estimate, True)} vs the papers' "
                    f"{cmp.paper_gap:+.1f} (ours - paper {100 * cmp.bootstrap.estimate - cmp.paper_gap:+.2f}); the papers' gap is "
                    f"{'inside' if inside else 'OUTSIDE'} our 95% CI {_ci(ci.low, ci.high)} (generalisation to new images).")
    if not rows:
        return [h(2, "Published numbers"),
                p(f"No configuration matches a published value (the table covers {published.MODEL} with vanilla, "
                  "VisionZip, SparseVLM v1/v1.5, FastV and the other baselines of VisionZip's and SparseVLM's first tables; "
                  "ingested answer files are matched when ingested with --model/--method/--budget).")]
    blocks = [h(2, "Published numbers and reproduction"),
              p("Matched on model, method, algorithm version and budget. The papers scored the same questions, so the "
                "reproduction test is the discrepancy 'ours - paper' beside the numerical floor (the largest change that "
                "numerics alone made to this configuration here) and the papers' rounding to 0.1 (±"
                f"{published.ROUNDING}); the 95% CI says how the score would vary over new images, not whether the "
                "paper's number was reproduced. The papers' metric is our primary metric (mean F1 over the three splits, "
                "LLaVA's rule, x 100)."),
              p("Setup: how the cell departs from the papers' setup (LLaVA's scripts: "
                + ", ".join(f"{k} {v}" for k, v in published.PAPER_SETUP.items())
                + "); the papers' gaps are compared only between cells in that setup."),
              table(("id", "configuration", "published as", "paper", "source(s)", "ours", "ours - paper",
                     "numerical floor", "reproduction", "95% CI (new images)", "setup vs paper"), rows)]
    if gaps:
        blocks.append(ul(gaps))
    sources = [f"{key}: {published.SOURCES[key].citation()}" + (f". Note: {published.SOURCES[key].note}" if published.SOURCES[key].note else "")
               for key in published.SOURCES if key in used]
    return blocks + [h(3, "Sources"), ul(sources)]


def _figure_blocks(names) -> list[Block]:
    shown = [n for n in FIGURES if n in names]
    return [h(2, "Figures")] + [img(n) for n in shown] if shown else []


def blocks_of(a: Analysis, figure_names) -> list[Block]:
    return [*_summary_blocks(a), *_reconciliation_blocks(a, figure_names), *_method_blocks(a), *_verdict_blocks(a),
            *_not_used_blocks(a), *_config_blocks(a), *_score_blocks(a), *_agreement_blocks(a), *_split_blocks(a),
            *_comparison_blocks(a), *_convention_blocks(a), *_published_blocks(a), *_figure_blocks(figure_names)]


# ----------------------------------------------------------------------------------------------
# Markdown and HTML
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks) -> str:
    out = []
    for b in blocks:
        if b.kind.startswith("h"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(f"**{b.text}**" if b.css == "lead" else b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "ol":
            out.append("\n".join(f"{k}. {item}" for k, item in enumerate(b.items, start=1)))
        elif b.kind == "table":
            lines = ["| " + " | ".join(map(_md_cell, b.header)) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.items]
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.header[0]})")
    return "\n\n".join(out) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;line-height:1.45;color:#1a1a1a}"
       "h1{font-size:1.5em;word-break:break-all}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
       "h3{margin-top:1.4em}"
       "p.lead{font-size:1.08em;background:#f4f8fc;border-left:4px solid #2f6fb0;padding:.7em 1em;margin:.6em 0}"
       ".scroll{overflow-x:auto}"
       "table{border-collapse:collapse;margin:1em 0;font-size:0.84em}th,td{border:1px solid #ccc;padding:3px 6px;"
       "text-align:left;vertical-align:top}th{background:#f3f3f3;position:sticky;top:0}"
       "td{max-width:34em;overflow-wrap:break-word}td:first-child{white-space:nowrap}img{max-width:100%}figure{margin:1em 0}")


def to_html(blocks, images: dict) -> str:
    """One file: CSS inline, figures as data: URIs; nothing is fetched when it is opened."""
    e = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(blocks[0].text)}</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b.kind.startswith("h"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p class='{b.css}'>{e(b.text)}</p>" if b.css else f"<p>{e(b.text)}</p>")
        elif b.kind in ("ul", "ol"):
            out.append(f"<{b.kind}>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + f"</{b.kind}>")
        elif b.kind == "table":
            head = "".join(f"<th>{e(x)}</th>" for x in b.header)
            body = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in b.items)
            out.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        elif b.kind == "img":
            data = base64.b64encode(images[b.header[0]]).decode()
            out.append(f"<figure><img alt='{e(b.text)}' src='data:image/png;base64,{data}'><figcaption>{e(b.text)}</figcaption></figure>")
    return "\n".join(out + ["</body></html>"]) + "\n"


# ----------------------------------------------------------------------------------------------
# CSV and LaTeX
def _csv(header, rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _share_cols(s) -> list:
    return ["", "", ""] if s is None else [s.estimate, s.confidence_interval.low, s.confidence_interval.high]


def cells_csv(a: Analysis) -> bytes:
    """One row per cell of the sweep, used or not; every metric per rule and split for used cells;
    agreement with vanilla and the compression-sensitive subset where they exist."""
    config_of = {x.data.name: c for c in a.configs for x in c.cells}
    splits = sorted({s for c in a.configs for x in c.cells for s in x.splits})
    metric_cols = [(rule, name) for rule in metrics.PARSE_RULES for name in metrics.AGGREGATE_METRICS]
    split_cols = [(rule, s, f) for rule in metrics.PARSE_RULES for s in splits
                  for f in (*metrics.SPLIT_METRICS, *metrics.COUNT_FIELDS, "n")]
    agreement_cols = ["vanilla_cell", "agree", "agree_low", "agree_high", "right_to_wrong", "right_to_wrong_low",
                      "right_to_wrong_high", "wrong_to_right", "wrong_to_right_low", "wrong_to_right_high",
                      "subset_downsample_cell", "subset_questions", "subset_images", "subset_accuracy", "subset_accuracy_low",
                      "subset_accuracy_high"]
    header = ["cell", "status", "note", "config", "label", "model", "checkpoint", "tokenization", "method", "version",
              "code_version", "budget", "visual_tokens", "compute", "quant", "preprocess", "data", "numerics", "seed",
              "computed_once", "n_questions", "n_images"] + [f"{r}/{m}" for r, m in metric_cols] + agreement_cols \
        + [f"{r}/{s}/{f}" for r, s, f in split_cols]
    rows = []
    for entry in a.entries:
        cell = entry.cell
        if cell is None:
            rows.append([entry.name, entry.status, entry.note] + [""] * (len(header) - 3))
            continue
        i, cfg = cell.info, config_of[entry.name]
        summaries = {rule: metrics.summarize(cell.counts[rule].sum(0), cell.splits) for rule in metrics.PARSE_RULES}
        row = [entry.name, entry.status, entry.note, cfg.id, cfg.label, i["model"], i["checkpoint"], i["tokenization"],
               i["method"], i["version"] or "", i["code_version"] or "", i["budget"] if i["budget"] is not None else "",
               cell.data.visual_tokens if cell.data.visual_tokens is not None else "", _compute(i["compute"]),
               i["quant"], i["preprocess"], i["data"], "" if i["ingested"] else json.dumps(i["numerics"], sort_keys=True),
               "" if cell.seed is None else cell.seed, cfg.once, len(cell.data.keys), len(cell.clusters)]
        row += [summaries[r][m] for r, m in metric_cols]
        g = (a.agreements or {}).get(entry.name)
        row += ["", *[""] * 9] if g is None else [g.vanilla_cell, *_share_cols(g.equal), *_share_cols(g.right_to_wrong),
                                                   *_share_cols(g.wrong_to_right)]
        s = (a.subsets or {}).get(entry.name)
        row += [""] * 6 if s is None else [s.downsample_cell, s.n_questions, s.n_images, *_share_cols(s.accuracy)]
        row += [summaries[r]["splits"].get(sp, {}).get(f, "") for r, sp, f in split_cols]
        rows.append(row)
    return _csv(header, rows)


def gaps_csv(a: Analysis) -> bytes:
    """One row per comparison and convention (and subset gap); the test columns are filled on the primary row."""
    header = ["comparison", "a", "b", "a_cell", "b_cell", "factor", "differs_in", "seed", "comparable", "problem",
              "convention", "convention_label", "data", "gap", "ci_low", "ci_high", "value_a", "value_b", "bootstrap_se",
              "permutation_p", "family", "holm_p", "significant", "mde", "mde_level", "accuracy_gap", "accuracy_se_clustered",
              "accuracy_se_unclustered", "accuracy_mde", "mcnemar_b", "mcnemar_c", "mcnemar_p", "n_questions", "n_images",
              "seed_gap_mean", "seed_gap_std", "seed_ci_low", "seed_ci_high", "paper_gap_points", "verdict"]
    rows = []
    n_tests = 22
    for n, c in enumerate(a.comparisons, start=1):
        base = [n, c.pair.a.label, c.pair.b.label, c.pair.cell_a.data.name, c.pair.cell_b.data.name, c.pair.factor,
                c.pair.differs_in, c.pair.seed_note, c.problem is None, c.problem or ""]
        if c.problem:
            rows.append(base + [""] * (len(header) - len(base) - 1) + [c.verdict])
            continue
        for k, g in enumerate((*c.conventions, *c.subset)):
            tests = [""] * n_tests
            if k == 0:
                acc, m, s = c.accuracy, c.mcnemar, c.seeds
                seed_cols = ["", "", "", ""]
                if s is not None and len(s.gaps) >= 2:
                    seed_cols = [float(np.mean(s.gaps)), float(np.std(s.gaps, ddof=1)),
                                 "" if s.low is None else s.low, "" if s.high is None else s.high]
                tests = [c.bootstrap.standard_error, c.permutation.p_value, c.family, "" if c.holm_p is None else c.holm_p,
                         c.reject, c.mde, c.mde_level, acc.estimate, acc.standard_error, acc.standard_error_unclustered,
                         acc.minimum_detectable_effect, m.b, m.c, m.p_value, c.n_questions, c.n_images, *seed_cols,
                         "" if c.paper_gap is None else c.paper_gap, c.verdict]
            values = ["" if g.value_a is None else g.value_a, "" if g.value_b is None else g.value_b]
            rows.append(base + [g.key, g.label, g.data, g.estimate, g.low, g.high, *values] + tests)
    return _csv(header, rows)


TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
       "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$", "·": r"$\cdot$"}


def _tex(text) -> str:
    return "".join(TEX.get(ch, ch) for ch in str(text))


def table_tex(a: Analysis) -> bytes:
    """Two booktabs tables: scores per configuration, and the tested gaps."""
    lines = [r"% prune_eval report: needs \usepackage{booktabs}", r"\begin{table}[t]\centering\small",
             r"\begin{tabular}{llrrrr}", r"\toprule",
             r"Configuration & Data & Mean F1 [95\% CI] & Accuracy & Pooled F1 & Paper \\", r"\midrule"]
    for c in a.configs:
        cs = a.config_stats[c.id]
        ci = config_ci(cs)
        interval = "--" if ci is None else f"[{pts(ci[0])}, {pts(ci[1])}]"
        lines.append(f"{_tex(c.label)} & {_tex(c.info['data'])} & {pts(cs.seeds.mean)} {interval} & "
                     f"{pts(cs.means['llava']['mean_accuracy'])} & {pts(cs.means['llava']['pooled_f1'])} & "
                     f"{_paper_cell(a, c.id) or '--'} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{POPE mean F1 over splits (LLaVA rule, $\times 100$) with 95\% image-cluster bootstrap intervals.}",
              r"\end{table}"]
    tested = [c for c in a.comparisons if c.problem is None]
    if tested:
        lines += [r"\begin{table}[t]\centering\small", r"\begin{tabular}{llrrrr}", r"\toprule",
                  r"A & B & Gap [95\% CI] & $p$ & MDE & Paper gap \\", r"\midrule"]
        for c in tested:
            ci = c.bootstrap.confidence_interval
            paper = "--" if c.paper_gap is None else f"{c.paper_gap:+.1f}"
            p_text = fmt_p(c.holm_p) if c.family else fmt_p(c.permutation.p_value) + r"$^\dagger$"
            lines.append(f"{_tex(c.pair.a.label)} & {_tex(c.pair.b.label)} & {pts(c.bootstrap.estimate, True)} "
                         f"[{pts(ci.low)}, {pts(ci.high)}] & {_tex(p_text)} & {pts(c.mde)} & {paper} \\\\")
        lines += [r"\bottomrule", r"\end{tabular}",
                  r"\caption{Gaps A $-$ B in mean F1 (points): paired image-cluster bootstrap intervals, permutation "
                  r"$p$-values Holm-adjusted over the declared family ($^\dagger$: diagnostic, unadjusted), minimum "
                  r"detectable effect at 80\% power.}", r"\end{table}"]
    return ("\n".join(lines) + "\n").encode()


# ----------------------------------------------------------------------------------------------
# Figures
def make_figures(a: Analysis) -> dict:
    out = {}
    for r in a.reconciliations:
        out[walk_name(r.number)] = plots.reconciliation([plots.Walk(f"#{r.number} {r.a} vs {r.b}", tuple(r.walk()), (r.low, r.high))])
    tested = [c for c in a.comparisons if c.problem is None]
    if tested:
        out["forest.png"] = plots.forest([
            plots.ForestRow(f"#{a.comparisons.index(c) + 1} {c.pair.a.label} vs {c.pair.b.label}", 100 * c.bootstrap.estimate,
                            100 * c.bootstrap.confidence_interval.low, 100 * c.bootstrap.confidence_interval.high,
                            c.reject, c.paper_gap)
            for c in tested])
    families: dict[str, list] = {}
    references = []
    for c in a.configs:
        cs, i = a.config_stats[c.id], c.info
        low, high = config_ci(cs) or (cs.seeds.mean, cs.seeds.mean)
        if i["method"] == "vanilla":
            references.append((c.label, 100 * cs.seeds.mean))
        elif isinstance(i["budget"], (int, float)):
            key = c.label.replace(f" @{i['budget']}", "")
            paper = cs.paper.value if cs.paper and not published.setup_differences(i) else None
            families.setdefault(key, []).append((i["budget"], 100 * cs.seeds.mean, 100 * low, 100 * high, paper))
    if len({b for rows in families.values() for b, *_ in rows}) >= 2:  # a budget plot needs at least two budgets
        out["budget.png"] = plots.budget_curves(
            [plots.Series(k, *zip(*[r[:4] for r in v]), published=tuple((r[0], r[4]) for r in v if r[4] is not None))
             for k, v in families.items()], references)
    splits = sorted({s for c in a.configs for s in c.cells[0].splits})
    if a.configs:
        values = np.array([[100 * a.config_stats[c.id].means["llava"]["splits"].get(s, {}).get("f1", np.nan) for s in splits]
                           for c in a.configs])
        errors = np.full((2,) + values.shape, np.nan)
        for k, c in enumerate(a.configs):
            for j, s in enumerate(splits):
                ci = (a.config_stats[c.id].split_intervals or {}).get(s)
                if ci is not None:
                    errors[:, k, j] = (values[k, j] - 100 * ci[0], 100 * ci[1] - values[k, j])
        out["splits.png"] = plots.split_bars([c.label for c in a.configs], splits, values, np.clip(errors, 0, None))
    return out


def render_all(a: Analysis, *, figures: bool = True) -> dict:
    """File name -> bytes for everything in SWEEP_DIR/report/."""
    images = make_figures(a) if figures else {}
    blocks = blocks_of(a, images)
    return {"report.md": to_markdown(blocks).encode(), "report.html": to_html(blocks, images).encode(),
            "cells.csv": cells_csv(a), "gaps.csv": gaps_csv(a), "table.tex": table_tex(a), **images}
