"""Turn a `report.Analysis` into the report's files: markdown, self-contained HTML, CSV, LaTeX, PNG.

Why separate from `prune_eval.analysis.report`: the analysis decides what is true, this module only says it.
The text is built once as a list of blocks (heading, paragraph, bullet list, table, figure) and then
rendered to markdown and to HTML, so the two can never say different things. Numbers are shown in
points (x 100); the CSV files keep fractions (0-1), as summary.json does.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from dataclasses import dataclass

import numpy as np

from prune_eval import __version__
from prune_eval.analysis import metrics, plots, published
from prune_eval.analysis.report import ALPHA, CONVENTION_RESAMPLES, Analysis, fmt_p, pts, sign_line

FIGURES = {"forest.png": "Gaps with 95% intervals", "budget.png": "Mean F1 vs budget",
           "splits.png": "F1 per split"}


@dataclass(frozen=True)
class Block:
    kind: str  # h1 h2 h3 p ul table img
    text: str = ""
    items: tuple = ()  # ul: strings; table: rows (tuples of strings)
    header: tuple = ()


def h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def p(text: str) -> Block:
    return Block("p", text)


def ul(items) -> Block:
    return Block("ul", items=tuple(items))


def table(header, rows) -> Block:
    return Block("table", items=tuple(tuple(str(x) for x in r) for r in rows), header=tuple(header))


# ----------------------------------------------------------------------------------------------
# Text helpers
def _ci(low: float, high: float) -> str:
    return f"[{pts(low)}, {pts(high)}]"


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
    s = a.config_stats[cid].seeds
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


# ----------------------------------------------------------------------------------------------
# Sections
def _summary_blocks(a: Analysis) -> list[Block]:
    counts = {}
    for e in a.entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    tested = sum(c.problem is None for c in a.comparisons)
    floor = sum(c.problem is None and not c.permutation.exact and c.permutation.p_value <= 1.5 / (a.n_resamples + 1)
                for c in a.comparisons)
    return [
        h(1, f"POPE report: {a.sweep_dir}"),
        p(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} by prune_eval {__version__} from the per-question "
          f"records alone. Cells: {len(a.entries)} ({status}); {len(a.configs)} configuration(s) (cells that differ "
          f"only in seed); {len(a.comparisons)} comparison(s), {tested} tested."),
        p("The primary metric is the papers' POPE number: the mean over splits of per-split F1 under LLaVA's "
          "parsing rule, in points (x 100). Intervals are 95% paired cluster-bootstrap percentile intervals "
          f"(images resampled with all their questions, {a.n_resamples} resamples, seed {a.seed}); p-values are "
          f"paired image-cluster permutation tests ({a.n_resamples} resamples), Holm-adjusted over all "
          f"{tested} tested comparisons of this report at alpha = {ALPHA}. cells.csv and gaps.csv hold "
          "fractions (0-1)."),
        *([p(f"{floor} of the {tested} permutation p-values sit at the Monte Carlo floor 1/(B+1) = "
             f"{1 / (a.n_resamples + 1):.1e}, so Holm-adjusted p-values cannot go below {tested / (a.n_resamples + 1):.2g}; "
             "raise --resamples for finer p-values.")] if floor else []),
        *([p("Unless its label says otherwise, a configuration uses: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in a.common.items()) + ".")]
          if a.common else []),
    ]


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


def _config_blocks(a: Analysis) -> list[Block]:
    rows = []
    for c in a.configs:
        i = c.info
        tokens = sorted({f"{x.data.visual_tokens:.4g}" for x in c.cells if x.data.visual_tokens is not None})
        rows.append((c.id, c.label, i["model"], i["method"], i["version"] or i["code_version"] or "",
                     "" if i["budget"] is None else i["budget"], ", ".join(map(str, tokens)), _compute(i["compute"]),
                     i["quant"], i["preprocess"], f"{i['data']} ({len(c.cells[0].data.keys)} q)",
                     ", ".join("-" if x.seed is None else str(x.seed) for x in c.cells)))
    return [h(2, "Configurations"),
            p("Version: the method's algorithm version if it has one (SparseVLM v1/v1.5/v2), else its code version. "
              "Tokens: mean visual tokens entering the LLM from the records; compute: summary.json's compute "
              "accounting where present (equivalent tokens per layer, official figure, TFLOPs)."
              + (" Ingested answer files: the model is the answers' model_id; quant and preprocessing are not "
                 "recorded (?)." if any(c.info["ingested"] for c in a.configs) else "")),
            table(("id", "configuration", "model", "method", "version", "budget", "tokens", "compute", "quant",
                   "preprocess", "data", "seeds"), rows)]


def _score_blocks(a: Analysis) -> list[Block]:
    rows, findings = [], []
    for c in a.configs:
        cs = a.config_stats[c.id]
        ll, ex = cs.means["llava"], cs.means["exact"]
        yes = np.mean([s["yes_ratio"] for s in ll["splits"].values()])
        rows.append((c.id, c.label, _score_cell(a, c.id), _seed_column(a, c.id), pts(ll["pooled_f1"]),
                     pts(ll["mean_accuracy"]), pts(ex["mean_f1"]), pts(ex["pooled_f1"]), f"{yes:.3f}", _paper_cell(a, c.id)))
        if cs.seeds.n_seeds > 1:
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
                "prediction. Paper: the published value for this model, method, version and budget."),
              table(("id", "configuration", "mean F1 [95% CI]", "seeds", "pooled F1", "mean acc",
                     "mean F1 exact", "pooled F1 exact", "yes-ratio", "paper"), rows)]
    if findings:
        blocks += [h(3, "Seeds"), ul(findings)]
    return blocks


def _split_blocks(a: Analysis) -> list[Block]:
    rows = []
    for c in a.configs:
        for split, s in a.config_stats[c.id].means["llava"]["splits"].items():
            e = a.config_stats[c.id].means["exact"]["splits"][split]
            rows.append((c.id, split, int(round(s["n"])), pts(s["accuracy"]), pts(s["precision"]), pts(s["recall"]),
                         pts(s["f1"]), f"{s['yes_ratio']:.3f}", pts(e["f1"]), int(round(e["other_yes"] + e["other_no"]))))
    return [h(2, "Per split"),
            p("LLaVA rule unless marked exact; 'other' = answers that are neither 'yes' nor 'no' under exact "
              "match (wrong for accuracy, ignored by precision and recall). Means over seeds."),
            table(("id", "split", "n", "accuracy", "precision", "recall", "F1", "yes-ratio", "F1 exact", "other"), rows)]


def _comparison_blocks(a: Analysis) -> list[Block]:
    rows, problems = [], []
    for n, c in enumerate(a.comparisons, start=1):
        if c.problem:
            problems.append(f"#{n} {c.pair.a.label} vs {c.pair.b.label}: not comparable: {c.problem}.")
            continue
        ci, acc, m = c.bootstrap.confidence_interval, c.accuracy, c.mcnemar
        rows.append((n, c.pair.a.label, c.pair.b.label, c.pair.differs_in,
                     c.pair.seed_note or "-", f"{c.n_questions} / {c.n_images}", f"{pts(c.bootstrap.estimate, True)} {_ci(ci.low, ci.high)}",
                     fmt_p(c.permutation.p_value), fmt_p(c.holm_p), pts(c.mde),
                     f"{pts(acc.estimate, True)} ± {pts(acc.standard_error)} (unclustered {pts(acc.standard_error_unclustered)})",
                     pts(acc.minimum_detectable_effect), f"{m.b}/{m.c}, p {fmt_p(m.p_value)}",
                     "" if c.paper_gap is None else f"{c.paper_gap:+.1f}"))
    blocks = [h(2, "Comparisons"),
              p("Gap = A - B in mean F1 (points) with its 95% interval; perm p = paired image-cluster permutation "
                "test (primary); Holm p = adjusted over the report's family; MDE = the smallest true gap detected "
                "with 80% power at alpha 0.05 (from the bootstrap SE). Accuracy columns: pooled-accuracy gap with "
                "Miller's clustered SE (and the unclustered one, to show what clustering adds) and its MDE. "
                "McNemar: questions A got right and B wrong / the reverse, exact p (ignores clustering: secondary). "
                "The test of configurations with several seeds runs on the seed named in the 'seed' column.")]
    if rows:
        blocks.append(table(("#", "A", "B", "differs in", "seed", "questions / images", "gap [95% CI]", "perm p",
                             "Holm p", "MDE", "accuracy gap ± clustered SE", "acc MDE", "McNemar b/c", "paper gap"), rows))
    seeds = [f"#{n}: gap by seed " + ", ".join(f"{s}: {pts(g, True)}" for s, g in c.seed_gaps)
             for n, c in enumerate(a.comparisons, start=1) if c.seed_gaps]
    if seeds:
        blocks += [p("Seeds changed predictions; the gap on each common seed (the test above uses the first):"), ul(seeds)]
    if problems:
        blocks += [h(3, "Not comparable"), ul(problems)]
    return blocks


def _convention_blocks(a: Analysis) -> list[Block]:
    blocks = [h(2, "Conventions"),
              p("The same predictions scored under each convention the papers and tools use; the gap's sign can "
                "depend on the convention. Rows on other question files compare the same two configurations run on "
                "those files. Not part of the Holm family (a sensitivity analysis, not more tests); rows other than the "
                f"first use {min(a.n_resamples, CONVENTION_RESAMPLES)} bootstrap resamples.")]
    identical = [f"#{n}" for n, c in enumerate(a.comparisons, start=1) if c.problem is None and c.identical]
    for n, c in enumerate(a.comparisons, start=1):
        if c.problem or c.identical:
            continue
        blocks += [h(3, f"#{n} {c.pair.a.label} vs {c.pair.b.label}"),
                   table(("convention", "data", "gap A - B [95% CI]"),
                         [(g.label, g.data, f"{pts(g.estimate, True)} {_ci(g.low, g.high)}") for g in c.conventions]),
                   p(sign_line(c))]
    if identical:
        blocks.append(p(f"{', '.join(identical)}: identical predictions, so every convention gives a gap of 0."))
    return blocks if len(blocks) > 2 else []


def _published_blocks(a: Analysis) -> list[Block]:
    rows, gaps, used = [], [], set()
    for c in a.configs:
        cs = a.config_stats[c.id]
        if cs.paper is None:
            continue
        used.add(cs.paper.source)
        ci = config_ci(cs)
        inside = "n/a" if ci is None else "yes" if _inside(cs.paper.value, 100 * ci[0], 100 * ci[1]) else "NO"
        rows.append((c.id, c.label, published.label(cs.paper), f"{cs.paper.value:.1f}", cs.paper.source,
                     f"{pts(cs.seeds.mean)} {_config_ci_text(cs)}", inside,
                     ", ".join(published.setup_differences(c.info)) or "same"))
    for n, cmp in enumerate(a.comparisons, start=1):
        if cmp.paper_gap is None or cmp.problem:
            continue
        ci = cmp.bootstrap.confidence_interval
        inside = _inside(cmp.paper_gap, 100 * ci.low, 100 * ci.high, 2 * published.ROUNDING)
        gaps.append(f"#{n} {cmp.pair.a.label} vs {cmp.pair.b.label}: the papers' gap {cmp.paper_gap:+.1f} is "
                    f"{'inside' if inside else 'OUTSIDE'} our 95% CI {_ci(ci.low, ci.high)} (our gap {pts(cmp.bootstrap.estimate, True)}).")
    if not rows:
        return [h(2, "Published numbers"),
                p(f"No configuration matches a published value (the table covers {published.MODEL} with vanilla, "
                  "VisionZip, SparseVLM v1/v1.5 and the baselines of VisionZip's Table 1; ingested answer files "
                  "carry no model, method or budget and are not matched).")]
    blocks = [h(2, "Published numbers"),
              p(f"Matched on model ({published.MODEL}), method, algorithm version and budget. 'Inside' allows "
                f"±{published.ROUNDING} (±{2 * published.ROUNDING:.1f} for a gap) for the papers' rounding to one decimal. The papers' metric is the mean "
                "F1 over the three splits under LLaVA's rule (x 100), as our primary metric."),
              p("Setup: how the cell departs from the papers' setup (LLaVA's scripts: "
                + ", ".join(f"{k} {v}" for k, v in published.PAPER_SETUP.items())
                + "); the papers' gaps are compared only between cells in that setup."),
              table(("id", "configuration", "published as", "paper", "source", "ours [95% CI]", "inside",
                     "setup vs paper"), rows)]
    if gaps:
        blocks.append(ul(gaps))
    sources = [f"{key}: {published.SOURCES[key].citation()}" + (f". Note: {published.SOURCES[key].note}" if published.SOURCES[key].note else "")
               for key in sorted(used)]
    return blocks + [h(3, "Sources"), ul(sources)]


def _figure_blocks(names) -> list[Block]:
    if not names:
        return []
    return [h(2, "Figures")] + [Block("img", FIGURES[n], header=(n,)) for n in FIGURES if n in names]


def blocks_of(a: Analysis, figure_names) -> list[Block]:
    return [*_summary_blocks(a), *_verdict_blocks(a), *_not_used_blocks(a), *_config_blocks(a), *_score_blocks(a),
            *_split_blocks(a), *_comparison_blocks(a), *_convention_blocks(a), *_published_blocks(a),
            *_figure_blocks(figure_names)]


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
            out.append(b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(map(_md_cell, b.header)) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.items]
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.header[0]})")
    return "\n\n".join(out) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}"
       "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 6px;"
       "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}")


def to_html(blocks, images: dict) -> str:
    """One file: CSS inline, figures as data: URIs; nothing is fetched when it is opened."""
    e = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(blocks[0].text)}</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b.kind.startswith("h"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{e(x)}</th>" for x in b.header)
            body = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in b.items)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
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


def cells_csv(a: Analysis) -> bytes:
    """One row per cell of the sweep, used or not; every metric per rule and split for used cells."""
    config_of = {x.data.name: c for c in a.configs for x in c.cells}
    splits = sorted({s for c in a.configs for x in c.cells for s in x.splits})
    metric_cols = [(rule, name) for rule in metrics.PARSE_RULES for name in metrics.AGGREGATE_METRICS]
    split_cols = [(rule, s, f) for rule in metrics.PARSE_RULES for s in splits
                  for f in (*metrics.SPLIT_METRICS, *metrics.COUNT_FIELDS, "n")]
    header = ["cell", "status", "note", "config", "label", "model", "checkpoint", "tokenization", "method", "version",
              "code_version", "budget", "visual_tokens", "compute", "quant", "preprocess", "data", "seed", "n_questions",
              "n_images"] + [f"{r}/{m}" for r, m in metric_cols] + [f"{r}/{s}/{f}" for r, s, f in split_cols]
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
               i["quant"], i["preprocess"], i["data"], "" if cell.seed is None else cell.seed, len(cell.data.keys),
               len(cell.clusters)]
        row += [summaries[r][m] for r, m in metric_cols]
        row += [summaries[r]["splits"].get(s, {}).get(f, "") for r, s, f in split_cols]
        rows.append(row)
    return _csv(header, rows)


def gaps_csv(a: Analysis) -> bytes:
    """One row per comparison and convention; the test columns are filled on the primary row."""
    header = ["comparison", "a", "b", "a_cell", "b_cell", "factor", "differs_in", "seed", "comparable", "problem", "convention",
              "convention_label", "data", "gap", "ci_low", "ci_high", "bootstrap_se", "permutation_p", "holm_p",
              "significant", "mde", "accuracy_gap", "accuracy_se_clustered", "accuracy_se_unclustered", "accuracy_mde",
              "mcnemar_b", "mcnemar_c", "mcnemar_p", "n_questions", "n_images", "paper_gap_points", "verdict"]
    rows = []
    for n, c in enumerate(a.comparisons, start=1):
        base = [n, c.pair.a.label, c.pair.b.label, c.pair.cell_a.data.name, c.pair.cell_b.data.name, c.pair.factor,
                c.pair.differs_in,
                c.pair.seed_note, c.problem is None, c.problem or ""]
        if c.problem:
            rows.append(base + [""] * (len(header) - len(base) - 1) + [c.verdict])
            continue
        for k, g in enumerate(c.conventions):
            tests = [""] * 16
            if k == 0:
                acc, m = c.accuracy, c.mcnemar
                tests = [c.bootstrap.standard_error, c.permutation.p_value, c.holm_p, c.reject, c.mde, acc.estimate,
                         acc.standard_error, acc.standard_error_unclustered, acc.minimum_detectable_effect, m.b, m.c,
                         m.p_value, c.n_questions, c.n_images, "" if c.paper_gap is None else c.paper_gap, c.verdict]
            rows.append(base + [g.key, g.label, g.data, g.estimate, g.low, g.high] + tests)
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
                  r"A & B & Gap [95\% CI] & Holm $p$ & MDE & Paper gap \\", r"\midrule"]
        for c in tested:
            ci = c.bootstrap.confidence_interval
            paper = "--" if c.paper_gap is None else f"{c.paper_gap:+.1f}"
            lines.append(f"{_tex(c.pair.a.label)} & {_tex(c.pair.b.label)} & {pts(c.bootstrap.estimate, True)} "
                         f"[{pts(ci.low)}, {pts(ci.high)}] & {_tex(fmt_p(c.holm_p))} & {pts(c.mde)} & {paper} \\\\")
        lines += [r"\bottomrule", r"\end{tabular}",
                  r"\caption{Gaps A $-$ B in mean F1 (points): paired image-cluster bootstrap intervals, permutation "
                  r"$p$-values Holm-adjusted over the table, minimum detectable effect at 80\% power.}", r"\end{table}"]
    return ("\n".join(lines) + "\n").encode()


# ----------------------------------------------------------------------------------------------
# Figures
def make_figures(a: Analysis) -> dict:
    out = {}
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
    if families:
        out["budget.png"] = plots.budget_curves(
            [plots.Series(k, *zip(*[r[:4] for r in v]), published=tuple((r[0], r[4]) for r in v if r[4] is not None))
             for k, v in families.items()], references)
    splits = sorted({s for c in a.configs for s in c.cells[0].splits})
    if a.configs:
        values = np.array([[100 * a.config_stats[c.id].means["llava"]["splits"].get(s, {}).get("f1", np.nan) for s in splits]
                           for c in a.configs])
        out["splits.png"] = plots.split_bars([c.label for c in a.configs], splits, values)
    return out


def render_all(a: Analysis, *, figures: bool = True) -> dict:
    """File name -> bytes for everything in SWEEP_DIR/report/."""
    images = make_figures(a) if figures else {}
    blocks = blocks_of(a, images)
    return {"report.md": to_markdown(blocks).encode(), "report.html": to_html(blocks, images).encode(),
            "cells.csv": cells_csv(a), "gaps.csv": gaps_csv(a), "table.tex": table_tex(a), **images}
