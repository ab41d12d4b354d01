"""Which configurations are compared: every two that differ in exactly one factor.

Factors of our own cells: method (at one budget, or against vanilla), quantization, preprocessing,
model/checkpoint, decoding length, numerics (evaluation path, batch composition, compile). Ingested
answer files: two files with metadata differ in the factor their metadata names (or in "answer
file" when it names the same configuration); a file with metadata and our own cell of the same
configuration form an "implementation" pair (their code vs prune_eval's). `--pair` adds any two cells.

Each pair is tested on one cell per side (`choose_cells`): the first seed both have; a side
computed once (it does not use the seed) serves every seed of the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prune_eval.analysis.configs import Config, Scored, coarse_factors
from prune_eval.analysis.wording import seed_range

REFERENCE_RANK = {"vanilla": 3, "random": 2, "downsample": 2, "sparsevlm": 1}  # higher = compared against (B side)
QUANT_ORDER = ("fp16", "bf16", "fp32", "int8", "nf4")  # earlier = reference (B side)
DTYPES = ("fp16", "bf16", "fp32")  # quantizations that only change the dtype: a numerics comparison
BASELINES = ("vanilla", "random")  # method comparisons against these are diagnostic (outside the Holm family)
FACTOR_WORDS = {"method": "method", "quant": "quantization", "preprocess": "preprocessing",
                "model": "model/checkpoint", "eval": "decoding length", "answers": "answer file",
                "numerics": "numerics", "implementation": "implementation (answer file vs prune_eval)",
                "explicit": "asked with --pair"}
FACTORS = tuple(FACTOR_WORDS)


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

    @property
    def baseline(self) -> bool:
        """A method comparison against vanilla or the random baseline."""
        return self.factor == "method" and bool({self.a.info["method"], self.b.info["method"]} & set(BASELINES))

    @property
    def numerics_only(self) -> bool:
        """Differs only in how the same computation was carried out (the numerical floor)."""
        return self.factor == "numerics" or (self.factor == "quant" and {self.a.info["quant"], self.b.info["quant"]} <= set(DTYPES))


def _detail(x, y) -> str:
    """Keys of two factor values (dicts) that differ; '' for plain values."""
    if not isinstance(x, dict) or not isinstance(y, dict):
        return ""
    return ", ".join(sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)))


def choose_cells(a: Config, b: Config) -> tuple[Scored, Scored, str]:
    """The test runs on one cell per side: the first seed both have, said explicitly."""
    if a.info["ingested"] and b.info["ingested"]:
        return a.cells[0], b.cells[0], "one answer file each"
    if a.info["ingested"] or b.info["ingested"]:
        own = b if a.info["ingested"] else a
        cell = own.cells[0]
        note = "" if cell.seed is None else f"seed {cell.seed} of prune_eval's cell"
        return (a.cells[0], cell, note) if a.info["ingested"] else (cell, b.cells[0], note)
    if a.once and b.once:
        return a.cells[0], b.cells[0], "neither uses the seed"
    if a.once or b.once:
        seeded, once = (b, a) if a.once else (a, b)
        cell = seeded.cells[0]
        note = f"seed {cell.seed} of {'B' if a.once else 'A'}; {'A' if a.once else 'B'} does not use the seed"
        return (once.cells[0], cell, note) if a.once else (cell, once.cells[0], note)
    by_a, by_b = {c.seed: c for c in a.cells}, {c.seed: c for c in b.cells}
    common = sorted(s for s in set(by_a) & set(by_b) if s is not None)
    if common:
        s = common[0]
        note = f"seed {s}" + (f", the first of the common seeds {seed_range(common)}" if len(common) > 1 else "")
        return by_a[s], by_b[s], note
    return a.cells[0], b.cells[0], f"seed {a.cells[0].seed} of A vs seed {b.cells[0].seed} of B: no common seed"


def _orient(x: Config, y: Config, factor: str) -> tuple[Config, Config]:
    """(A, B) with B the reference: vanilla/random/SparseVLM for methods, fp16 for quant, pad, ours for
    an implementation pair, the reference path / smaller batch for numerics."""
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
        if factor == "implementation":
            return (not i["ingested"],)
        if factor == "numerics":
            n = i["numerics"] or {}
            return (n.get("fast") is False, not n.get("compile"), -(n.get("batch_size") or 0), -(n.get("batch_images") or 0))
        return (0,)
    rx, ry = rank(x), rank(y)
    if rx != ry:
        return (x, y) if rx < ry else (y, x)
    return (y, x) if x.label < y.label else (x, y)


def _group(a: Config, b: Config, factor: str) -> int:
    if factor != "method":
        return {"quant": 5, "preprocess": 6, "model": 7, "eval": 8, "numerics": 9, "implementation": 10,
                "answers": 11}.get(factor, 12)
    names = {a.info["method"], b.info["method"]}
    if names == {"visionzip", "sparsevlm"}:
        return 1
    return 3 if "vanilla" in names else 4 if names & {"random", "downsample"} else 2


def pair_factor(x: Config, y: Config) -> str | None:
    """The one factor two configurations differ in, or None when they are not paired automatically."""
    if x.info["ingested"] or y.info["ingested"]:
        if x.info["ingested"] and y.info["ingested"]:
            if not (x.info["metadata"] and y.info["metadata"]):
                return "answers" if x.info["data_id"] == y.info["data_id"] else None
            cx, cy = coarse_factors(x.info), coarse_factors(y.info)
            differ = [k for k in cx if cx[k] != cy[k]]
            factor = "answers" if not differ else differ[0] if len(differ) == 1 and differ[0] != "data" else None
        else:
            ingested, own = (x, y) if x.info["ingested"] else (y, x)
            if not ingested.info["metadata"]:
                return None
            ci, co = coarse_factors(ingested.info), coarse_factors(own.info)
            factor = "implementation" if all(v is None or v == co[k] for k, v in ci.items()) else None
    else:
        keys = set(x.factors) | set(y.factors)
        differ = sorted(k for k in keys if x.factors.get(k) != y.factors.get(k))
        factor = differ[0] if len(differ) == 1 and differ[0] != "data" else None
    if factor == "method" and x.info["budget"] != y.info["budget"] and "vanilla" not in (x.info["method"], y.info["method"]):
        return None
    return factor


def find_pairs(configs: Sequence[Config], explicit: Sequence[tuple[Scored, Scored]] = ()) -> list[Pair]:
    """All pairs that differ in exactly one factor (methods: at the same budget, or against vanilla)."""
    pairs = []
    for i, x in enumerate(configs):
        for y in configs[i + 1:]:
            factor = pair_factor(x, y)
            if factor is None:
                continue
            a, b = _orient(x, y, factor)
            cell_a, cell_b, note = choose_cells(a, b)
            detail = _detail(x.factors.get(factor), y.factors.get(factor)) if factor in ("model", "numerics") else ""
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
