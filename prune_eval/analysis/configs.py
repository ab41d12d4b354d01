"""From a sweep directory to configurations: cells found, verified, scored and grouped by seed.

A configuration is the set of cells that differ only in seed. A cell whose experiment has
`"seed": null` (a method that does not use the seed, computed once) is its own configuration and
serves every seed that plan.json maps to it. Ingested answer files are configurations too; with
the metadata given to `prune_eval.ingest` (model, method, version, budget, quant, preprocessing)
they are matched with published numbers and with our own cells.

Pure: numpy and the standard library; files are read through `cellfiles`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from prune_eval.analysis import cellfiles, metrics, published, stats, wording
from prune_eval.errors import PruneEvalError

REPORT_DIR = "report"
DISPLAY = {"visionzip": "VisionZip", "sparsevlm": "SparseVLM", "fastv": "FastV"}
METHOD_ORDER = ("vanilla", "visionzip", "sparsevlm", "fastv", "downsample", "random")
SPLIT_RESAMPLES = 2_000  # at most, for the per-split intervals of the figure


def display(method: str) -> str:
    return DISPLAY.get(method, method)


# ----------------------------------------------------------------------------------------------
# plan.json: what was asked for
# command-line keys -> the report's factors (a key swept with several values makes its factor primary)
OVERRIDE_FACTORS = {"method": "method", "budget": "method", "quant": "quant", "preprocess": "preprocess", "model": "model",
                    "eval.fast": "numerics", "eval.batch_size": "numerics", "eval.batch_images": "numerics",
                    "eval.batch_tokens": "numerics", "eval.compile": "numerics", "eval.max_new_tokens": "eval"}


def factor_of_override(key: str) -> str | None:
    key = key.lstrip("+~")
    if key in OVERRIDE_FACTORS:
        return OVERRIDE_FACTORS[key]
    head = key.split(".")[0]
    return head if head in ("method", "quant", "model", "preprocess") else None


@dataclass(frozen=True)
class Plan:
    """What plan.json says: the cells requested, the seeds each cell serves, the factors swept."""

    found: bool
    cells: tuple = ()
    seeds: dict | None = None  # cell -> tuple of the seeds whose overrides resolve to it
    swept: frozenset = frozenset()  # report factors given several values on the command line(s)


def read_plan(sweep_dir: Path) -> Plan:
    path = Path(sweep_dir) / "plan.json"
    try:
        cells = json.loads(path.read_text())["cells"]
        if not isinstance(cells, dict):
            raise TypeError("'cells' is not an object")
    except FileNotFoundError:
        return Plan(False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PruneEvalError(f"{path} is unreadable ({e}); fix or remove it") from None
    values: dict[str, set] = {}
    seeds: dict[str, tuple] = {}
    for name, entry in cells.items():
        jobs = [entry.get("overrides") or [], *(entry.get("aliases") or [])] if isinstance(entry, dict) else []
        served = set()
        for job in jobs:
            for override in job if isinstance(job, list) else []:
                key, _, value = str(override).partition("=")
                values.setdefault(key.lstrip("+~"), set()).add(value)
                if key.lstrip("+~") == "seed" and re.fullmatch(r"\d+", value):
                    served.add(int(value))
        seeds[name] = tuple(sorted(served))
    swept = frozenset(f for key, v in values.items() if len(v) > 1 and (f := factor_of_override(key)))
    return Plan(True, tuple(sorted(cells)), seeds, swept)


# ----------------------------------------------------------------------------------------------
# Cells
@dataclass(frozen=True)
class Scored:
    """A verified cell with what every comparison needs: counts per image and split, per rule."""

    data: cellfiles.CellData
    info: dict  # describe(summary)
    seed: int | None  # None: ingested, or a cell computed once for every seed
    splits: tuple
    clusters: np.ndarray  # (C,) image names, sorted
    counts: dict  # rule -> (C, S, 6)
    fingerprint: str  # sha256 over (key, image, label): equal = the same questions

    @property
    def name(self) -> str:
        return self.data.name


@dataclass(frozen=True)
class Entry:
    name: str
    status: str  # cellfiles.STATUSES, or "excluded" (complete but failed verification)
    note: str
    cell: Scored | None


def _budget(params: dict, summary: dict):
    for key in ("budget_label", "budget", "visual_tokens"):
        if isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            return params[key]
    budget = (summary.get("config") or {}).get("budget")
    return budget if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None


def _name_of(node) -> str | None:
    return str(node.get("name")) if isinstance(node, dict) and node.get("name") is not None else None


def describe(summary: dict) -> dict:
    """Readable fields of a cell from its summary; tolerant of missing keys (older or ingested)."""
    exp = summary.get("experiment") or {}
    ingested = "ingested" in summary or "ingested" in exp
    metadata = not ingested or isinstance(exp.get("method"), dict)  # ingested with --method ...
    method = (exp.get("method") or summary.get("method") or {}) if metadata else {}
    params = method.get("params") or {}
    model, data = exp.get("model") or {}, exp.get("data") or {}
    splits = data.get("splits") or []
    model_name = _name_of(model)
    if ingested and model_name is None:
        model_name = ", ".join((summary.get("ingested") or {}).get("model_ids") or []) or "?"
    method_name = str(method.get("name", "?")) if metadata else str(summary.get("cell"))
    budget = _budget(params, summary) if metadata and not (ingested and method_name == "vanilla") else None
    return {
        "ingested": ingested,
        "metadata": metadata,
        "cell": str(summary.get("cell")),
        "method": method_name,
        "version": published.normalize_version(params.get("version")) if metadata else None,
        "code_version": method.get("version"),
        "params": params,
        "budget": budget,
        "model": model_name or "?",
        "checkpoint": model.get("checkpoint") or model.get("source") or "",
        "tokenization": model.get("tokenization") or "",
        "quant": _name_of(exp.get("quant")) or "?",
        "preprocess": str(exp.get("preprocess")) if exp.get("preprocess") is not None else "?",
        "data": f"{data.get('name', '?')} {data.get('version', '?')}" + ("" if len(splits) in (0, 3) else " " + "+".join(splits)),
        "data_id": (data.get("name"), data.get("version"), tuple(sorted(splits))),
        "max_new_tokens": exp.get("max_new_tokens"),
        "compute": summary.get("compute"),
        "numerics": exp.get("numerics"),
    }


def factors_of(summary: dict) -> dict:
    """The factors that define a configuration: the experiment without its seed."""
    exp = summary.get("experiment") or {}
    if "ingested" in summary or "ingested" in exp:
        return {"answers": str(summary.get("cell")), "data": exp.get("data") or summary.get("data")}
    return {"model": exp.get("model"), "quant": exp.get("quant"), "preprocess": exp.get("preprocess"),
            "data": exp.get("data"), "method": exp.get("method") or summary.get("method"),
            "eval": {"max_new_tokens": exp.get("max_new_tokens")}, "numerics": exp.get("numerics")}


def coarse_factors(info: dict) -> dict:
    """The factors an ingested answer file can name (None = not given), for matching it with
    published numbers and with our own cells."""
    known = lambda v: None if v in ("?", "", None) else v  # noqa: E731
    method = ("vanilla", None, None) if info["method"] == "vanilla" else (info["method"], info["version"], info["budget"])
    return {"model": known(info["model"]), "quant": known(info["quant"]), "preprocess": known(info["preprocess"]),
            "data": info["data_id"], "method": method}


def score(cell: cellfiles.CellData) -> Scored:
    splits = tuple(sorted(set(cell.split)))
    clusters = np.unique(cell.image.astype(str))
    counts = {rule: metrics.cluster_counts(cell.label, cell.pred[rule], cell.split, cell.image, splits, clusters)
              for rule in metrics.PARSE_RULES}
    text = "\n".join(f"{k}\t{i}\t{lab}" for k, i, lab in zip(cell.keys, cell.image, cell.label))
    seed = (cell.summary.get("experiment") or {}).get("seed")
    return Scored(cell, describe(cell.summary), seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                  splits, clusters, counts, hashlib.sha256(text.encode()).hexdigest())


def inventory(sweep_dir: Path, plan: Plan) -> list[Entry]:
    """Every cell the sweep asked for (plan.json) or holds, with its status and, if usable, its data."""
    if not sweep_dir.is_dir():
        raise PruneEvalError(f"sweep directory not found: {sweep_dir}")
    markers = (cellfiles.SUMMARY, cellfiles.CELL_FILE, cellfiles.ERROR, "records")
    found = sorted(p.name for p in sweep_dir.iterdir()
                   if p.is_dir() and p.name != REPORT_DIR and any((p / m).exists() for m in markers))
    names = sorted(set(plan.cells) | set(found))
    if not names:
        raise PruneEvalError(f"{sweep_dir} holds no cells (no plan.json and no sub-directory with "
                             "summary.json, cell.json, error.json or records/)")
    entries = []
    for name in names:
        path = sweep_dir / name
        status = cellfiles.cell_status(path)
        if status != "complete":
            note = {"failed": cellfiles.error_message(path), "busy": "being computed by another process",
                    "missing": "requested in plan.json, nothing written yet" if name in plan.cells else "nothing usable"}.get(status, "")
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


# ----------------------------------------------------------------------------------------------
# Configurations
@dataclass(frozen=True)
class Config:
    """Cells that differ only in seed."""

    id: str
    factors: dict  # factor -> value; two configs are paired when they differ in one factor
    cells: tuple  # Scored, sorted by seed
    label: str
    info: dict
    departures: int = 0  # factors that differ from the report's most common values

    @property
    def once(self) -> bool:
        """Computed once for every seed (the method does not use the seed)."""
        return not self.info["ingested"] and len(self.cells) == 1 and self.cells[0].seed is None


def base_label(info: dict) -> str:
    label = display(info["method"])
    if info["version"]:
        label += f" {info['version']}"
    if info["method"] != "vanilla" and info["budget"] is not None:
        label += f" @{info['budget']}"
    return label


LABEL_FACTORS = ("model", "checkpoint", "tokenization", "quant", "preprocess", "data", "max_new_tokens", "numerics")


def _factor_text(key: str, value) -> str:
    if key == "numerics" and isinstance(value, dict):
        return numerics_text(value)
    return {"max_new_tokens": f"max {value} tokens", "tokenization": f"tokenization {value}"}.get(key, str(value))


def numerics_text(numerics: dict | None) -> str:
    """{'fast': True, 'batch_images': 64, ...} -> 'fast path, batch_images=64, batch_tokens=32768'."""
    if not isinstance(numerics, dict):
        return "numerics not recorded"
    fast = numerics.get("fast")
    path = {True: "fast path", False: "reference path"}.get(fast, f"path {fast}")
    batch = [f"{key}={numerics[key]}" for key in ("batch_size", "batch_images", "batch_tokens") if key in numerics]
    return ", ".join([path, *batch] + (["compiled"] if numerics.get("compile") else []))


def _comparable_value(info: dict, key: str) -> str:
    return json.dumps(info[key], sort_keys=True, default=str) if key == "numerics" else str(info[key])


def _same(info: dict, key: str, value) -> bool:
    return _comparable_value(info, key) == _comparable_value({key: value}, key)


def common_values(infos: Sequence[dict]) -> dict:
    """For each factor that varies, its most common value: labels name only departures from it."""
    out = {}
    for key in LABEL_FACTORS:
        values = [_comparable_value(i, key) for i in infos]
        if len(set(values)) > 1:
            common = max(sorted(set(values)), key=values.count)
            out[key] = next(i[key] for i in infos if _comparable_value(i, key) == common)
    return out


def common_text(common: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {numerics_text(v) if k == 'numerics' else v}" for k, v in common.items())


def build_configs(cells: Sequence[Scored]) -> list[Config]:
    """Group cells that differ only in seed; order and label the groups. A label is the method,
    version and budget, plus any factor that departs from the most common value (`common_values`)."""
    groups: dict[str, list[Scored]] = {}
    for cell in cells:
        key = factors_of(cell.data.summary)
        if cell.seed is None and not cell.info["ingested"]:
            key = {**key, "computed_once": True}  # a seed-null cell is not grouped with per-seed cells
        groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(cell)
    own = [g[0].info for g in groups.values() if not g[0].info["ingested"]]
    defaults = common_values(own)

    def sort_key(group):
        i = group[0].info
        departures = sum(not _same(i, k, v) for k, v in defaults.items())
        rank = METHOD_ORDER.index(i["method"]) if i["method"] in METHOD_ORDER else len(METHOD_ORDER)
        return (i["ingested"], departures, i["model"], i["quant"], i["preprocess"], i["data"], rank,
                i["method"], str(i["version"]), i["budget"] or 0, group[0].data.name)

    configs = []
    for n, group in enumerate(sorted(groups.values(), key=sort_key), start=1):
        group.sort(key=lambda c: (c.seed is None, c.seed or 0))
        info = group[0].info
        departing = [] if info["ingested"] else [k for k, v in defaults.items() if not _same(info, k, v)]
        if "model" in departing and "checkpoint" in departing:  # another model has another checkpoint
            departing.remove("checkpoint")
        extra = [_factor_text(k, info[k]) for k in departing]
        if info["ingested"]:
            label = info["cell"] + (f" ({base_label(info)})" if info["metadata"] else "")
        else:
            label = " · ".join([base_label(info), *extra])
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
    served_seeds: tuple = ()  # for a configuration computed once: the seeds plan.json maps to it
    split_intervals: dict | None = None  # split -> (low, high) of its F1 (LLaVA rule), None with < 2 images


def _mean_dicts(dicts: Sequence[dict]):
    first = dicts[0]
    if isinstance(first, dict):
        return {k: _mean_dicts([d[k] for d in dicts]) for k in first}
    return float(np.mean(dicts))


def used_cells(config: Config) -> list[Scored]:
    """The seed cells over the first seed's questions (others are left out, and said so)."""
    first = config.cells[0]
    return [c for c in config.cells if c.fingerprint == first.fingerprint]


def config_stats(config: Config, plan: Plan, *, n_resamples: int, seed: int) -> ConfigStats:
    first = config.cells[0]
    used = used_cells(config)
    left_out = tuple(c.data.name for c in config.cells if c.fingerprint != first.fingerprint)
    key = {id(c): (c.seed if c.seed is not None else k) for k, c in enumerate(used)}
    values = {key[id(c)]: float(metrics.mean_f1(c.counts["llava"].sum(0))) for c in used}
    predictions = {key[id(c)]: c.data.pred["llava"] for c in used}
    seeds = stats.seed_summary(values, predictions)
    served = tuple(plan.seeds.get(first.name, ())) if plan.seeds and config.once else ()
    if config.info["ingested"]:
        seeds = replace(seeds, finding=f"one answer file ({seeds.n_questions} questions): seed variation not measured")
    elif config.once:
        seeds = replace(seeds, finding=wording.served_seeds(base_label(config.info), served))
    interval, split_intervals = None, None
    if len(first.clusters) >= 2:
        counts = [c.counts["llava"] for c in used]
        interval = stats.seed_and_question_interval(counts, metric=metrics.mean_f1, n_resamples=n_resamples, rng=seed)
        split_intervals = {}
        for split in first.splits:
            res = stats.seed_and_question_interval(counts, metric=metrics.metric_function(f"f1/{split}", first.splits),
                                                   n_resamples=min(n_resamples, SPLIT_RESAMPLES), rng=seed)
            split_intervals[split] = (res.confidence_interval.low, res.confidence_interval.high)
    means = {rule: _mean_dicts([metrics.summarize(c.counts[rule].sum(0), c.splits) for c in used])
             for rule in metrics.PARSE_RULES}
    info = config.info
    paper = None
    if info["metadata"]:
        paper = published.lookup(info["model"], info["method"], info["version"], info["budget"], info["params"])
    return ConfigStats(seeds, interval, means, left_out, paper, served, split_intervals)
