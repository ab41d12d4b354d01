"""`python -m prune_eval.report SWEEP_DIR`: what a sweep's records say, with error bars and verdicts.

Why: "VisionZip beats SparseVLM by 1.9 points at 64 tokens" is a claim about 8910 questions on 500
images, one metric convention, one checkpoint, one preprocessing. This report recomputes everything
from the per-question records (never from job return values), pairs configurations that differ in
exactly one factor (method at one budget, quantization, preprocessing, model/checkpoint, decoding
length; or two ingested answer files), and for each pair gives the gap with a paired image-cluster
bootstrap interval, a paired image-cluster permutation p-value (primary, Holm-adjusted over the
report), McNemar's exact test, Miller's clustered SE, the minimum detectable effect, and one sentence
in plain words. It re-scores the same predictions under every convention the papers mix (accuracy
vs F1, mean-of-split vs pooled F1, LLaVA rule vs exact match, 8910 vs 9000 questions) and says
whether the sign of the gap depends on the convention, and it puts the papers' numbers
(`prune_eval.analysis.published`) next to ours.

It works on a half-finished or partly failed sweep: cells that are missing, failed, partial, busy or
fail verification are listed with the reason and left out; two cells with different question sets
are reported "not comparable", never compared. No torch: it reads files with `prune_eval.analysis.cellfiles`.

Outputs in SWEEP_DIR/report/: report.md, report.html (self-contained, figures embedded), cells.csv
and gaps.csv (fractions 0-1, one row per cell / per comparison and convention), table.tex, *.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from prune_eval.analysis import cellfiles, metrics, published, stats
from prune_eval.errors import PruneEvalError
from prune_eval.execution.records import atomic_write_bytes

ALPHA = 0.05
REPORT_DIR = "report"
N_RESAMPLES = 10_000
CONVENTION_RESAMPLES = 2_000  # at most, for the sensitivity rows: their intervals are context, not tests
# (key, label, parsing rule, metric): the same predictions scored as each source scores them
CONVENTIONS = (
    ("mean_f1/llava", "mean F1 over splits, LLaVA rule (the papers)", "llava", "mean_f1"),
    ("pooled_f1/llava", "pooled F1, LLaVA rule", "llava", "pooled_f1"),
    ("mean_accuracy/llava", "mean accuracy over splits, LLaVA rule", "llava", "mean_accuracy"),
    ("mean_f1/exact", "mean F1 over splits, exact match", "exact", "mean_f1"),
    ("pooled_f1/exact", "pooled F1, exact match (lmms-eval's pope)", "exact", "pooled_f1"),
    ("pooled_accuracy/exact", "pooled accuracy, exact match (lmms-eval's pope_accuracy)", "exact", "pooled_accuracy"),
)
DISPLAY = {"visionzip": "VisionZip", "sparsevlm": "SparseVLM"}
METHOD_ORDER = ("vanilla", "visionzip", "sparsevlm", "random")
REFERENCE_RANK = {"vanilla": 3, "random": 2, "sparsevlm": 1}  # higher = compared against (B side)
QUANT_ORDER = ("fp16", "bf16", "fp32", "int8", "nf4")  # earlier = reference (B side)
FACTOR_WORDS = {"method": "method", "quant": "quantization", "preprocess": "preprocessing",
                "model": "model/checkpoint", "eval": "decoding length", "answers": "answer file",
                "explicit": "asked with --pair"}


# ----------------------------------------------------------------------------------------------
# Cells -> scored cells -> configurations
@dataclass(frozen=True)
class Scored:
    """A verified cell with what every comparison needs: counts per image and split, per rule."""

    data: cellfiles.CellData
    info: dict  # describe(summary)
    seed: int | None
    splits: tuple
    clusters: np.ndarray  # (C,) image names, sorted
    counts: dict  # rule -> (C, S, 6)
    fingerprint: str  # sha256 over (key, image, label): equal = the same questions


@dataclass(frozen=True)
class Entry:
    name: str
    status: str  # cellfiles.STATUSES, or "excluded" (complete but failed verification)
    note: str
    cell: Scored | None


@dataclass(frozen=True)
class Config:
    """Cells that differ only in seed."""

    id: str
    factors: dict  # factor -> value; two configs are paired when they differ in one factor
    cells: tuple  # Scored, sorted by seed
    label: str
    info: dict
    departures: int = 0  # factors that differ from the report's most common values


def _budget(params: dict, summary: dict):
    for key in ("budget_label", "budget", "visual_tokens"):
        if isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            return params[key]
    budget = (summary.get("config") or {}).get("budget")
    return budget if isinstance(budget, (int, float)) else None


def describe(summary: dict) -> dict:
    """Readable fields of a cell from its summary; tolerant of missing keys (older or ingested)."""
    exp = summary.get("experiment") or {}
    ingested = "ingested" in summary or "ingested" in exp
    method = exp.get("method") or summary.get("method") or {}
    params = method.get("params") or {}
    model, data = exp.get("model") or {}, exp.get("data") or {}
    splits = data.get("splits") or []
    return {
        "ingested": ingested,
        "method": str(summary.get("cell")) if ingested else str(method.get("name", "?")),
        "version": params.get("version"),
        "code_version": method.get("version"),
        "params": params,
        "budget": None if ingested else _budget(params, summary),
        "model": ", ".join((summary.get("ingested") or {}).get("model_ids") or []) or "?" if ingested else str(model.get("name", "?")),
        "checkpoint": model.get("checkpoint") or model.get("source") or "",
        "tokenization": model.get("tokenization") or "",
        "quant": "?" if ingested else str((exp.get("quant") or {}).get("name", "?")),
        "preprocess": "?" if ingested else str(exp.get("preprocess", "?")),
        "data": f"{data.get('name', '?')} {data.get('version', '?')}" + ("" if len(splits) in (0, 3) else " " + "+".join(splits)),
        "max_new_tokens": exp.get("max_new_tokens"),
        "compute": summary.get("compute"),
    }


def factors_of(summary: dict) -> dict:
    """The factors that define a configuration: the experiment without its seed."""
    exp = summary.get("experiment") or {}
    if "ingested" in summary or "ingested" in exp:
        return {"answers": str(summary.get("cell")), "data": exp.get("data") or summary.get("data")}
    return {"model": exp.get("model"), "quant": exp.get("quant"), "preprocess": exp.get("preprocess"),
            "data": exp.get("data"), "method": exp.get("method") or summary.get("method"),
            "eval": {"max_new_tokens": exp.get("max_new_tokens")}}


def score(cell: cellfiles.CellData) -> Scored:
    splits = tuple(sorted(set(cell.split)))
    clusters = np.unique(cell.image.astype(str))
    counts = {rule: metrics.cluster_counts(cell.label, cell.pred[rule], cell.split, cell.image, splits, clusters)
              for rule in metrics.PARSE_RULES}
    text = "\n".join(f"{k}\t{i}\t{lab}" for k, i, lab in zip(cell.keys, cell.image, cell.label))
    seed = (cell.summary.get("experiment") or {}).get("seed")
    return Scored(cell, describe(cell.summary), seed if isinstance(seed, int) else None, splits, clusters,
                  counts, hashlib.sha256(text.encode()).hexdigest())


def inventory(sweep_dir: Path) -> list[Entry]:
    """Every cell the sweep asked for (plan.json) or holds, with its status and, if usable, its data."""
    if not sweep_dir.is_dir():
        raise PruneEvalError(f"sweep directory not found: {sweep_dir}")
    planned: list[str] = []
    try:
        planned = sorted(json.loads((sweep_dir / "plan.json").read_text())["cells"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PruneEvalError(f"{sweep_dir / 'plan.json'} is unreadable ({e}); fix or remove it") from None
    markers = (cellfiles.SUMMARY, cellfiles.CELL_FILE, cellfiles.ERROR, "records")
    found = sorted(p.name for p in sweep_dir.iterdir()
                   if p.is_dir() and p.name != REPORT_DIR and any((p / m).exists() for m in markers))
    names = sorted(set(planned) | set(found))
    if not names:
        raise PruneEvalError(f"{sweep_dir} holds no cells (no plan.json and no sub-directory with "
                             "summary.json, cell.json, error.json or records/)")
    entries = []
    for name in names:
        path = sweep_dir / name
        status = cellfiles.cell_status(path)
        if status != "complete":
            note = {"failed": cellfiles.error_message(path), "busy": "being computed by another process",
                    "missing": "requested in plan.json, nothing written yet" if name in planned else "nothing usable"}.get(status, "")
            if status == "partial":
                note = "records so far, no summary.json (unfinished or killed)"
                if (path / cellfiles.SUMMARY).exists():
                    note = "summary.json is unreadable or not marked complete"
            entries.append(Entry(name, status, note, None))
            continue
        loaded = cellfiles.load_cell(path)
        if isinstance(loaded, str):
            entries.append(Entry(name, "excluded", f"not used: {loaded}", None))
        else:
            entries.append(Entry(name, "complete", "", score(loaded)))
    return entries


def _method_rank(name: str) -> int:
    return METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)


def _base_label(info: dict) -> str:
    if info["ingested"]:
        return info["method"]
    label = DISPLAY.get(info["method"], info["method"])
    if info["version"]:
        label += f" {info['version']}"
    if info["method"] != "vanilla" and info["budget"] is not None:
        label += f" @{info['budget']}"
    return label


LABEL_FACTORS = ("model", "checkpoint", "tokenization", "quant", "preprocess", "data", "max_new_tokens")


def _factor_text(key: str, value) -> str:
    return {"max_new_tokens": f"max {value} tokens", "tokenization": f"tokenization {value}"}.get(key, str(value))


def common_values(infos: Sequence[dict]) -> dict:
    """For each factor that varies, its most common value: labels name only departures from it."""
    out = {}
    for key in LABEL_FACTORS:
        values = [str(i[key]) for i in infos]
        if len(set(values)) > 1:
            out[key] = max(sorted(set(values)), key=values.count)
    return out


def build_configs(cells: Sequence[Scored]) -> list[Config]:
    """Group cells that differ only in seed; order and label the groups. A label is the method,
    version and budget, plus any factor that departs from the most common value (`common_values`)."""
    groups: dict[str, list[Scored]] = {}
    for cell in cells:
        groups.setdefault(json.dumps(factors_of(cell.data.summary), sort_keys=True, default=str), []).append(cell)
    defaults = common_values([g[0].info for g in groups.values() if not g[0].info["ingested"]])

    def sort_key(group):
        i = group[0].info
        departures = sum(str(i[k]) != str(v) for k, v in defaults.items())
        return (i["ingested"], departures, i["model"], i["quant"], i["preprocess"], i["data"], _method_rank(i["method"]),
                i["method"], str(i["version"]), i["budget"] or 0, group[0].data.name)

    configs = []
    for n, group in enumerate(sorted(groups.values(), key=sort_key), start=1):
        group.sort(key=lambda c: (c.seed is None, c.seed or 0))
        info = group[0].info
        departing = [] if info["ingested"] else [k for k in defaults if str(info[k]) != str(defaults[k])]
        if "model" in departing and "checkpoint" in departing:  # another model has another checkpoint
            departing.remove("checkpoint")
        extra = [_factor_text(k, info[k]) for k in departing]
        label = " · ".join([_base_label(info), *extra])
        configs.append(Config(f"C{n}", factors_of(group[0].data.summary), tuple(group), label, info, len(extra)))
    seen: dict[str, int] = {}
    for c in configs:
        seen[c.label] = seen.get(c.label, 0) + 1
    return [replace(c, label=f"{c.label} [{c.id}]") if seen[c.label] > 1 else c for c in configs]


# ----------------------------------------------------------------------------------------------
# Per configuration: seeds, interval, every metric, the paper's value
@dataclass(frozen=True)
class ConfigStats:
    seeds: stats.SeedSummary
    interval: stats.SeedIntervalResult | None  # None with fewer than 2 images: nothing to resample
    means: dict  # rule -> metrics.summarize(...) averaged over the seeds used
    left_out: tuple  # names of seed cells whose questions differ from the first seed's
    paper: published.Published | None


def _mean_dicts(dicts: Sequence[dict]):
    first = dicts[0]
    if isinstance(first, dict):
        return {k: _mean_dicts([d[k] for d in dicts]) for k in first}
    return float(np.mean(dicts))


def config_stats(config: Config, *, n_resamples: int, seed: int) -> ConfigStats:
    first = config.cells[0]
    used = [c for c in config.cells if c.fingerprint == first.fingerprint]
    left_out = tuple(c.data.name for c in config.cells if c.fingerprint != first.fingerprint)
    key = {id(c): (c.seed if c.seed is not None else k) for k, c in enumerate(used)}
    values = {key[id(c)]: float(metrics.mean_f1(c.counts["llava"].sum(0))) for c in used}
    predictions = {key[id(c)]: c.data.pred["llava"] for c in used}
    seeds = stats.seed_summary(values, predictions)
    if config.info["ingested"]:
        seeds = replace(seeds, finding=f"one answer file ({seeds.n_questions} questions): seed variation not measured")
    interval = None if len(first.clusters) < 2 else stats.seed_and_question_interval(
        [c.counts["llava"] for c in used], metric=metrics.mean_f1, n_resamples=n_resamples, rng=seed)
    means = {rule: _mean_dicts([metrics.summarize(c.counts[rule].sum(0), c.splits) for c in used])
             for rule in metrics.PARSE_RULES}
    info = config.info
    paper = None if info["ingested"] else published.lookup(info["model"], info["method"], info["version"],
                                                           info["budget"], info["params"])
    return ConfigStats(seeds, interval, means, left_out, paper)


# ----------------------------------------------------------------------------------------------
# Pairs of configurations that differ in one factor
@dataclass(frozen=True)
class Pair:
    a: Config
    b: Config
    factor: str
    group: int  # display order: 0 explicit, 1 VisionZip vs SparseVLM, 2 other methods, 3 vs vanilla, ...
    cell_a: Scored
    cell_b: Scored
    seed_note: str
    detail: str = ""  # for the model factor, which of its keys differ (checkpoint, tokenization, ...)

    @property
    def differs_in(self) -> str:
        word = FACTOR_WORDS.get(self.factor, self.factor)
        return f"{word}: {self.detail}" if self.detail else word


def _detail(x, y) -> str:
    """Keys of two factor values (dicts) that differ; '' for plain values."""
    if not isinstance(x, dict) or not isinstance(y, dict):
        return ""
    return ", ".join(sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)))


def _seed_text(seeds: Sequence) -> str:
    return ", ".join(str(s) for s in seeds)


def choose_cells(a: Config, b: Config) -> tuple[Scored, Scored, str]:
    """The test runs on one cell per side: the first seed both have, said explicitly."""
    if a.info["ingested"] or b.info["ingested"] or a.cells[0].seed is None or b.cells[0].seed is None:
        return a.cells[0], b.cells[0], "one answer file each" if a.info["ingested"] and b.info["ingested"] else ""
    by_a, by_b = {c.seed: c for c in a.cells}, {c.seed: c for c in b.cells}
    common = sorted(set(by_a) & set(by_b))
    if common:
        s = common[0]
        note = f"seed {s}" + (f", the first of the common seeds {_seed_text(common)}" if len(common) > 1 else "")
        return by_a[s], by_b[s], note
    return a.cells[0], b.cells[0], f"seed {a.cells[0].seed} of A vs seed {b.cells[0].seed} of B: no common seed"


def _orient(x: Config, y: Config, factor: str) -> tuple[Config, Config]:
    """(A, B) with B the reference: vanilla/random/SparseVLM for methods, fp16 for quant, pad, ..."""
    def rank(c: Config):
        i = c.info
        if factor == "method":
            return (REFERENCE_RANK.get(i["method"], 0), str(i["version"] or ""))
        if factor == "quant":
            return (-QUANT_ORDER.index(i["quant"]) if i["quant"] in QUANT_ORDER else -len(QUANT_ORDER),)
        if factor == "preprocess":
            return (i["preprocess"] == "pad",)
        if factor == "eval":
            return (i["max_new_tokens"] or 0,)
        return (0,)
    rx, ry = rank(x), rank(y)
    if rx != ry:
        return (x, y) if rx < ry else (y, x)
    return (y, x) if x.label < y.label else (x, y)


def _group(a: Config, b: Config, factor: str) -> int:
    if factor != "method":
        return {"quant": 5, "preprocess": 6, "model": 7, "eval": 8, "answers": 9}.get(factor, 10)
    names = {a.info["method"], b.info["method"]}
    if names == {"visionzip", "sparsevlm"}:
        return 1
    return 3 if "vanilla" in names else 4 if "random" in names else 2


def find_pairs(configs: Sequence[Config], explicit: Sequence[tuple[Scored, Scored]] = ()) -> list[Pair]:
    """All pairs that differ in exactly one factor (methods: at the same budget, or against vanilla)."""
    pairs = []
    for i, x in enumerate(configs):
        for y in configs[i + 1:]:
            if x.info["ingested"] != y.info["ingested"]:
                continue
            keys = set(x.factors) | set(y.factors)
            differ = sorted(k for k in keys if x.factors.get(k) != y.factors.get(k))
            if len(differ) != 1 or differ[0] == "data":
                continue
            factor = differ[0]
            if factor == "method" and x.info["budget"] != y.info["budget"] and "vanilla" not in (x.info["method"], y.info["method"]):
                continue
            a, b = _orient(x, y, factor)
            cell_a, cell_b, note = choose_cells(a, b)
            detail = _detail(x.factors[factor], y.factors[factor]) if factor == "model" else ""
            pairs.append(Pair(a, b, factor, _group(a, b, factor), cell_a, cell_b, note, detail))
    by_name = {c.data.name: cfg for cfg in configs for c in cfg.cells}
    done = {frozenset((p.cell_a.data.name, p.cell_b.data.name)) for p in pairs}
    for cell_a, cell_b in explicit:
        if frozenset((cell_a.data.name, cell_b.data.name)) in done:
            continue
        a, b = by_name[cell_a.data.name], by_name[cell_b.data.name]
        note = "" if cell_a.seed is None and cell_b.seed is None else f"seed {cell_a.seed} of A, seed {cell_b.seed} of B"
        pairs.append(Pair(a, b, "explicit", 0, cell_a, cell_b, note))
    return sorted(pairs, key=lambda p: (p.group, p.a.departures + p.b.departures, p.a.info["budget"] or 0, p.a.id, p.b.id))


# ----------------------------------------------------------------------------------------------
# Comparisons
@dataclass(frozen=True)
class Gap:
    """metric(A) - metric(B) under one convention, with its 95% paired cluster-bootstrap interval."""

    key: str
    label: str
    data: str
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    pair: Pair
    problem: str | None  # set when the two cells cannot be compared; nothing else is then
    n_questions: int = 0
    n_images: int = 0
    identical: bool = False
    bootstrap: stats.BootstrapResult | None = None
    permutation: stats.PermutationResult | None = None
    mcnemar: stats.McNemarResult | None = None
    accuracy: stats.PairedDifference | None = None  # pooled accuracy, Miller's clustered SE
    mde: float | None = None  # for mean F1, from the bootstrap SE
    conventions: tuple = ()  # Gap, ...
    seed_gaps: tuple = ()  # ((seed, gap), ...) when the configurations have several common seeds
    paper_gap: float | None = None  # points
    holm_p: float | None = None
    reject: bool = False
    verdict: str = ""


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


def _bootstrap_gap(a: np.ndarray, b: np.ndarray, metric, *, n_resamples: int, seed: int) -> stats.BootstrapResult:
    return stats.paired_cluster_bootstrap(a, b, metric=metric, n_resamples=n_resamples, rng=seed)


def _data_label(cell: Scored) -> str:
    return f"{cell.info['data']}, {len(cell.data.keys)} q"


def _data_version_gaps(pair: Pair, configs: Sequence[Config], *, n_resamples: int, seed: int) -> list[Gap]:
    """The primary gap on the other question files where both configurations were also run."""
    if pair.factor in ("answers", "explicit"):
        return []
    out = []
    for other_a in configs:
        if other_a is pair.a or {k for k in set(other_a.factors) | set(pair.a.factors)
                                 if other_a.factors.get(k) != pair.a.factors.get(k)} != {"data"}:
            continue
        wanted = {**pair.b.factors, "data": other_a.factors["data"]}
        other_b = next((c for c in configs if c.factors == wanted), None)
        if other_b is None:
            continue
        ca, cb, _ = choose_cells(other_a, other_b)
        if question_mismatch(ca, cb):
            continue
        boot = _bootstrap_gap(ca.counts["llava"], cb.counts["llava"], metrics.mean_f1, n_resamples=n_resamples, seed=seed)
        out.append(Gap("mean_f1/llava", CONVENTIONS[0][1], _data_label(ca), boot.estimate,
                       boot.confidence_interval.low, boot.confidence_interval.high))
    return out


def _seed_gaps(pair: Pair) -> tuple:
    if pair.factor == "explicit":
        return ()
    by_a, by_b = {c.seed: c for c in pair.a.cells}, {c.seed: c for c in pair.b.cells}
    common = sorted(s for s in set(by_a) & set(by_b) if s is not None)
    if len(common) < 2:
        return ()
    gaps = tuple((s, float(metrics.mean_f1(by_a[s].counts["llava"].sum(0)) - metrics.mean_f1(by_b[s].counts["llava"].sum(0))))
                 for s in common if not question_mismatch(by_a[s], by_b[s]))
    return gaps if len({round(g, 12) for _, g in gaps}) > 1 else ()


def compare(pair: Pair, configs: Sequence[Config], config_stats_by_id: dict, *, n_resamples: int, seed: int) -> Comparison:
    """Every statistic of one pair; each resampling call gets a fresh rng from `seed` (reproducible,
    independent of the order of comparisons). Inputs stats.py rejects make the pair "not comparable"
    with stats' message, so one odd cell cannot stop the report."""
    try:
        return _compare(pair, configs, config_stats_by_id, n_resamples=n_resamples, seed=seed)
    except ValueError as e:
        return Comparison(pair, f"cannot be tested: {e}")


def _compare(pair: Pair, configs: Sequence[Config], config_stats_by_id: dict, *, n_resamples: int, seed: int) -> Comparison:
    a, b = pair.cell_a, pair.cell_b
    problem = question_mismatch(a, b)
    if problem is None and len(a.clusters) < 2:
        problem = f"only {len(a.clusters)} image(s): nothing to resample"
    if problem:
        return Comparison(pair, problem)
    ca, cb = a.counts["llava"], b.counts["llava"]
    boot = _bootstrap_gap(ca, cb, metrics.mean_f1, n_resamples=n_resamples, seed=seed)
    perm = stats.paired_cluster_permutation_test(ca, cb, metric=metrics.mean_f1, n_resamples=n_resamples, rng=seed)
    correct_a, correct_b = a.data.pred["llava"] == a.data.label, b.data.pred["llava"] == b.data.label
    gaps = [Gap(CONVENTIONS[0][0], CONVENTIONS[0][1], _data_label(a), boot.estimate, boot.confidence_interval.low,
                boot.confidence_interval.high)]
    n_sensitivity = min(n_resamples, CONVENTION_RESAMPLES)
    for key, label, rule, name in CONVENTIONS[1:]:
        other = _bootstrap_gap(a.counts[rule], b.counts[rule], metrics.metric_function(name, a.splits),
                               n_resamples=n_sensitivity, seed=seed)
        gaps.append(Gap(key, label, _data_label(a), other.estimate, other.confidence_interval.low,
                        other.confidence_interval.high))
    gaps += _data_version_gaps(pair, configs, n_resamples=n_sensitivity, seed=seed)
    pa, pb = config_stats_by_id[pair.a.id].paper, config_stats_by_id[pair.b.id].paper
    return Comparison(
        pair, None, n_questions=len(a.data.keys), n_images=len(a.clusters),
        identical=bool(all(np.array_equal(a.data.pred[r], b.data.pred[r]) for r in metrics.PARSE_RULES)),
        bootstrap=boot, permutation=perm, mcnemar=stats.mcnemar_exact(correct_a, correct_b),
        accuracy=stats.paired_difference(correct_a.astype(float), correct_b.astype(float), a.data.image),
        mde=stats.minimum_detectable_effect(boot.standard_error), conventions=tuple(gaps),
        seed_gaps=_seed_gaps(pair),
        paper_gap=round(pa.value - pb.value, 2) if pa and pb and pair.factor == "method" and not (
            published.setup_differences(pair.a.info) or published.setup_differences(pair.b.info)) else None,
    )


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p: float) -> str:
    """'p < 0.001' or 'p = 0.002'."""
    return f"p {fmt_p(p)}" if p < 0.001 else f"p = {fmt_p(p)}"


def pts(x: float, sign: bool = False) -> str:
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def verdict(c: Comparison, family: int) -> str:
    """One sentence: the gap, its interval, the Holm-adjusted p, and what that means."""
    a, b = c.pair.a.label, c.pair.b.label
    if c.problem:
        return f"not comparable: {c.problem}; no test was run."
    if c.identical:
        return f"{a} and {b} gave identical predictions on all {c.n_questions} questions: no difference to test."
    g, ci = c.bootstrap.estimate, c.bootstrap.confidence_interval
    if abs(g) < 1e-12:
        head = f"{a}'s mean F1 equals {b}'s"
    else:
        head = f"{a}'s mean F1 is {abs(100 * g):.2f} points {'higher' if g > 0 else 'lower'} than {b}'s"
    p_text = p_phrase(c.holm_p) + (f" after Holm over {family} comparisons" if family > 1 else "")
    excludes_zero = ci.low > 0 or ci.high < 0
    if c.reject:
        tail = "a real difference at this sample size."
    elif abs(g) < c.mde and not excludes_zero:
        tail = f"the gap is smaller than the {100 * c.mde:.2f}-point minimum detectable effect: not distinguishable from noise."
    else:
        tail = ("not significant" + (" after Holm" if family > 1 else "")
                + f" (uncorrected permutation {p_phrase(c.permutation.p_value)}, minimum detectable effect "
                + f"{100 * c.mde:.2f} points)" + ("; the interval excludes 0, so the gap is suggestive" if excludes_zero else "")
                + ": not established at this sample size.")
    return f"{head} (95% CI {pts(ci.low)} to {pts(ci.high)}; {p_text}): {tail}"


def finish(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm over the report's family (the primary p of every comparable pair), then the verdicts."""
    tested = [i for i, c in enumerate(comparisons) if c.problem is None]
    if tested:
        holm = stats.holm([comparisons[i].permutation.p_value for i in tested], alpha=ALPHA)
        for i, p, r in zip(tested, holm.p_values, holm.reject):
            comparisons[i] = replace(comparisons[i], holm_p=float(p), reject=bool(r))
    return [replace(c, verdict=verdict(c, len(tested))) for c in comparisons]


def sign_line(c: Comparison) -> str:
    """Does the sign of the gap depend on the convention?"""
    primary = np.sign(round(c.conventions[0].estimate, 12))
    flips = [g for g in c.conventions[1:] if np.sign(round(g.estimate, 12)) != primary]
    if not flips:
        return "The sign of the gap is the same under every convention shown."
    names = "; ".join(f"{g.label} ({g.data})" + (" — and its 95% CI excludes 0" if g.low > 0 or g.high < 0 else "")
                      for g in flips)
    return f"The sign flips under: {names}."


# ----------------------------------------------------------------------------------------------
# The whole analysis
@dataclass(frozen=True)
class Analysis:
    sweep_dir: Path
    entries: tuple
    configs: tuple
    config_stats: dict  # Config.id -> ConfigStats
    comparisons: tuple
    n_resamples: int
    seed: int
    common: dict  # factor -> the value configurations have unless their label says otherwise


def analyse(sweep_dir: Path, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
            pairs: Sequence[tuple[str, str]] = ()) -> Analysis:
    entries = inventory(Path(sweep_dir))
    cells = [e.cell for e in entries if e.cell is not None]
    configs = build_configs(cells)
    by_name = {c.data.name: c for c in cells}
    explicit = []
    for name_a, name_b in pairs:
        for name in (name_a, name_b):
            if name not in by_name:
                entry = next((e for e in entries if e.name == name), None)
                why = f"it is {entry.status}: {entry.note}" if entry else "no such cell"
                raise PruneEvalError(f"--pair {name_a} {name_b}: cell '{name}' cannot be used ({why})")
        explicit.append((by_name[name_a], by_name[name_b]))
    cstats = {c.id: config_stats(c, n_resamples=n_resamples, seed=seed) for c in configs}
    comparisons = [compare(p, configs, cstats, n_resamples=n_resamples, seed=seed) for p in find_pairs(configs, explicit)]
    common = common_values([c.info for c in configs if not c.info["ingested"]])
    return Analysis(Path(sweep_dir), tuple(entries), tuple(configs), cstats, tuple(finish(comparisons)), n_resamples,
                    seed, common)


# ----------------------------------------------------------------------------------------------
# Writing
def write_report(sweep_dir: Path, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 pairs: Sequence[tuple[str, str]] = (), figures: bool = True) -> Path:
    """Analyse the sweep and write SWEEP_DIR/report/; returns the path of report.md."""
    from prune_eval.analysis import render
    analysis = analyse(Path(sweep_dir), n_resamples=n_resamples, seed=seed, pairs=pairs)
    out = Path(sweep_dir) / REPORT_DIR
    files = render.render_all(analysis, figures=figures)
    for stale in out.glob("*.png") if out.is_dir() else ():
        if stale.name not in files:
            stale.unlink(missing_ok=True)  # a report written at the same time may have removed it
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prune_eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (outputs/<name>) or a folder of ingested cells")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help=f"bootstrap and permutation resamples (default {N_RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("CELL_A", "CELL_B"),
                        help="also compare these two cells (any two cells over the same questions); repeatable")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures (faster)")
    args = parser.parse_args(argv)
    try:
        if args.resamples < 100:
            raise PruneEvalError(f"--resamples={args.resamples}; use at least 100 (default {N_RESAMPLES})")
        path = write_report(args.sweep_dir, n_resamples=args.resamples, seed=args.seed,
                            pairs=[tuple(p) for p in args.pair], figures=not args.no_figures)
    except PruneEvalError as e:
        print(f"prune_eval.report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
