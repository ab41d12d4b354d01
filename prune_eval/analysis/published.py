"""Published POPE numbers for LLaVA-1.5-7B, with where each one comes from.

Why in the repository: the question prune_eval answers is usually "does our number agree with the
paper's, and does the paper's gap survive our error bars?" The report puts these values next to
ours, so they must be exact, citable and matched to the right algorithm: SparseVLM v1 (the number
VisionZip's table compares against) and v1.5 (the ICML paper) are different algorithms.

Every value is the papers' POPE metric: the mean over the adversarial, popular and random splits of
per-split F1 under LLaVA's parsing rule, x 100 (../shared/notes/pope.md; SparseVLM's eval_pope.py
prints the same). `Source.via` says where each number was read: the project's fact sheets
(../shared/notes/visionzip.md, sparsevlm.md, transcribed from the papers) or, for SparseVLM's own
first table (with its FastV and ToMe rows), the official project page's HTML table
(leofan90/SparseVLMs.github.io index.html, commit 4776f93, 2024-10-13), which matches the VisionZip
table's copies. SparseVLM's ICML version (arXiv v4) re-ran its baselines; its FastV rows are NOT here,
because no stored copy of that table could be read (only v1.5's own rows, from the fact sheet). The
arXiv ids were checked against arXiv listings. The papers evaluate with LLaVA's scripts, which use the
8910-question POPE files LLaVA pins (an inference from the scripts, not a statement in the papers).

"The gap as published" is two values from ONE table (`published_pair`): VisionZip's Table 1 prints
VisionZip 77.0 next to SparseVLM 75.1, and that 75.1 is SparseVLM v1's. The gap for the versions a
user actually ran takes each value from wherever that version is published (`lookup`), which may
be two papers: the reconciliation (prune_eval.analysis.reconcile) walks from one to the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL = "llava-1.5-7b"  # prune_eval's model name for liuhaotian/llava-v1.5-7b and llava-hf's copy
PAPER_MODEL = "llava-1.5-7b-original"  # the layout and tokenizer the papers ran (LLaVA's own code)
# The papers ran LLaVA's evaluation scripts: fp16, pad-to-square preprocessing, the 8910 pinned POPE
# questions (notes/pope.md, notes/visionzip.md). A cell run otherwise is still shown next to the
# paper's value, with the difference named.
PAPER_SETUP = {"quant": "fp16", "preprocess": "pad", "data": "pope llava-1.5"}
ROUNDING = 0.05  # published values have one decimal: +-0.05 of rounding, in points


@dataclass(frozen=True)
class Source:
    key: str
    paper: str
    table: str
    arxiv: str
    via: str  # where the numbers were read: a project fact sheet or an official page (with its commit)
    note: str = ""
    short: str = ""  # for sentences: "VisionZip Table 1"

    def citation(self) -> str:
        return f"{self.paper}, {self.table} (arXiv:{self.arxiv}; read from {self.via})"


@dataclass(frozen=True)
class Published:
    method: str  # prune_eval method name
    version: str | None  # the method's algorithm version (SparseVLM 'v1' / 'v1.5'), None if one
    budget: int | None  # nominal budget; None = any (vanilla keeps all 576 tokens)
    value: float  # mean F1 over the three splits x 100
    source: str  # Source.key
    variant: str = ""  # shown next to the method name
    requires: dict = field(default_factory=dict)  # method params that must hold (flags default True)
    model: str = MODEL


SOURCES = {
    s.key: s
    for s in (
        Source("visionzip-t1", "Yang et al., VisionZip (CVPR 2025)", "Table 1 (LLaVA-1.5-7B)", "2412.04467",
               "notes/visionzip.md",
               "VisionZip issue #22: some baseline rows were copied from the SparseVLM paper; the 192-token "
               "VisionZip value appears as 85.2 in some copies", "VisionZip Table 1"),
        Source("sparsevlm-v1-t1", "Zhang et al., SparseVLM (arXiv v1, 2024-10)", "Table 1 (LLaVA-1.5-7B)", "2410.04417",
               "the official project page leofan90/SparseVLMs.github.io, index.html at commit 4776f93 (2024-10-13)",
               "the FastV rows are disputed in Gumpest/SparseVLMs issue #12 (FastV's official code scored much higher at "
               "a comparable token count); the table does not say what 64/128/192 tokens mean for FastV (tokens kept "
               "after layer K, or an average over the 32 layers)", "SparseVLM v1 Table 1"),
        Source("sparsevlm-v1.5-t1", "Zhang et al., SparseVLM (ICML 2025)", "Table 1 (arXiv v4)", "2410.04417",
               "notes/sparsevlm.md", short="SparseVLM ICML Table 1"),
        Source("sparsevlm-v1.5-t4", "Zhang et al., SparseVLM (ICML 2025)", "Table 4 (token recycling ablation)",
               "2410.04417", "notes/sparsevlm.md", short="SparseVLM ICML Table 4"),
    )
}


def _row(method: str, version: str | None, values: dict, source: str, **kw) -> list[Published]:
    return [Published(method, version, budget, value, source, **kw) for budget, value in values.items()]


TABLE: list[Published] = [
    Published("vanilla", None, None, 85.9, "visionzip-t1", variant="576 tokens"),
    *_row("visionzip", None, {192: 85.3, 128: 83.2, 64: 77.0}, "visionzip-t1"),
    *_row("visionzip", None, {192: 84.9, 128: 83.7, 64: 80.9}, "visionzip-t1", variant="fine-tuned projector",
          model="llava-1.5-7b + VisionZip fine-tuned projector"),
    *_row("sparsevlm", "v1", {192: 83.6, 128: 80.5, 64: 75.1}, "visionzip-t1", variant="2024.10 release"),
    *_row("sparsevlm", "v1.5", {192: 85.3, 128: 85.0, 64: 77.5}, "sparsevlm-v1.5-t1", requires={"recycling": True}),
    *_row("sparsevlm", "v1.5", {96: 81.9}, "sparsevlm-v1.5-t4", requires={"recycling": True}),
    *_row("sparsevlm", "v1.5", {192: 85.2, 128: 83.7, 96: 77.5, 64: 72.8}, "sparsevlm-v1.5-t4",
          variant="without recycling", requires={"recycling": False}),
    *_row("tome", None, {192: 72.4, 128: 62.8, 64: 52.5}, "visionzip-t1"),
    # FastV's budgets in these tables are 32-layer averages (VisionZip issue #22, maintainer; SparseVLMs
    # issues #10/#12): our fastv cell matches them with method.budget_rule=layer_average
    *_row("fastv", None, {192: 64.8, 128: 59.6, 64: 48.0}, "visionzip-t1", requires={"budget_rule": "layer_average"}),
    *_row("pdrop", None, {192: 82.3, 128: 82.3, 64: 55.9}, "visionzip-t1"),
    # SparseVLM's first table: the same values as VisionZip's copies (which took them from it)
    Published("vanilla", None, None, 85.9, "sparsevlm-v1-t1", variant="576 tokens"),
    *_row("sparsevlm", "v1", {192: 83.6, 128: 80.5, 64: 75.1}, "sparsevlm-v1-t1", variant="2024.10 release"),
    *_row("fastv", None, {192: 64.8, 128: 59.6, 64: 48.0}, "sparsevlm-v1-t1", requires={"budget_rule": "layer_average"}),
    *_row("tome", None, {192: 72.4, 128: 62.8, 64: 52.5}, "sparsevlm-v1-t1"),
]


def normalize_version(version: object) -> str | None:
    """'1.5', 'v1.5', 'V1.5' -> 'v1.5'; None stays None."""
    if version in (None, ""):
        return None
    text = str(version).strip().lower()
    return text if text.startswith("v") else f"v{text}"


def base_model(model: str | None) -> str | None:
    """llava-1.5-7b-original (LLaVA's layout) is the same model as llava-1.5-7b (llava-hf's copy)."""
    return model.removesuffix("-original") if isinstance(model, str) else model


def _matches(entry: Published, model: str, method: str, version: object, budget, params: dict) -> bool:
    if base_model(entry.model) != base_model(model) or entry.method != method or normalize_version(entry.version) != normalize_version(version):
        return False
    if entry.budget is not None and entry.budget != budget:
        return False
    return all(params.get(k, True) == v for k, v in entry.requires.items())


def lookup(model: str, method: str, version: object, budget: int | None, params: dict) -> Published | None:
    """The published value for this model, method, algorithm version and budget, if there is one."""
    return next((e for e in TABLE if _matches(e, model, method, version, budget, params)), None)


def sources_of(entry: Published) -> list[str]:
    """Every source that prints this value for this row (the first is `entry.source`)."""
    same = [e.source for e in TABLE if (e.model, e.method, normalize_version(e.version), e.budget, e.variant, e.value)
            == (entry.model, entry.method, normalize_version(entry.version), entry.budget, entry.variant, entry.value)]
    return list(dict.fromkeys([entry.source, *same]))


def published_pair(method_a: str, method_b: str, budget) -> tuple[Published, Published] | None:
    """Both methods' values at this budget from ONE table: the gap as a paper printed it. Plain rows
    only (no fine-tuned or ablation variants); the first source in SOURCES order that has both."""
    for source in SOURCES:
        rows = [e for e in TABLE if e.source == source and not e.variant.startswith(("fine-tuned", "without")) and e.model == MODEL]
        a = next((e for e in rows if e.method == method_a and e.budget in (None, budget)), None)
        b = next((e for e in rows if e.method == method_b and e.budget in (None, budget)), None)
        if a and b and not (a.budget is None and b.budget is None):
            return a, b
    return None


def versions_published(method: str) -> list[str]:
    """The algorithm versions with a published number (e.g. ['v1', 'v1.5'] for sparsevlm)."""
    return sorted({normalize_version(e.version) for e in TABLE if e.method == method and e.version})


def setup_differences(info: dict) -> list[str]:
    """How a cell's setup departs from the papers' (e.g. ['quant int8']); `info` as configs.describe."""
    return [f"{k} {'not recorded' if info.get(k) in ('?', None) else info.get(k)}" for k, v in PAPER_SETUP.items()
            if str(info.get(k)) != v]


def label(entry: Published) -> str:
    version = f" {entry.version}" if entry.version else ""
    variant = f" ({entry.variant})" if entry.variant else ""
    return f"{entry.method}{version}{variant}"
