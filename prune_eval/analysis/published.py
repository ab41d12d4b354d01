"""Published POPE numbers for LLaVA-1.5-7B, with where each one comes from.

Why in the repository: the question prune_eval answers is usually "does our number agree with the
paper's, and does the paper's gap survive our error bars?" The report puts these values next to
ours, so they must be exact, citable and matched to the right algorithm: SparseVLM v1 (the number
VisionZip's table compares against) and v1.5 (the ICML paper) are different algorithms.

Every value is the papers' POPE metric: the mean over the adversarial, popular and random splits of
per-split F1 under LLaVA's parsing rule, x 100 (../shared/notes/pope.md; SparseVLM's eval_pope.py
prints the same). The values were transcribed into the project's fact sheets
(../shared/notes/visionzip.md, sparsevlm.md) from the papers; `from_fact_sheet` says so for each
source, and `note` says what the fact sheet itself warns about. The arXiv ids were checked against
arXiv listings (not part of the fact sheets). The papers evaluate with LLaVA's scripts, which use the
8910-question POPE files LLaVA pins (an inference from the scripts, not a statement in the papers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL = "llava-1.5-7b"  # prune_eval's model name for liuhaotian/llava-v1.5-7b and llava-hf's copy
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
    from_fact_sheet: str  # the project note the number was taken from
    note: str = ""

    def citation(self) -> str:
        return f"{self.paper}, {self.table} (arXiv:{self.arxiv}; via {self.from_fact_sheet})"


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
               "VisionZip value appears as 85.2 in some copies"),
        Source("sparsevlm-v1.5-t1", "Zhang et al., SparseVLM (ICML 2025)", "Table 1 (arXiv v4)", "2410.04417",
               "notes/sparsevlm.md"),
        Source("sparsevlm-v1.5-t4", "Zhang et al., SparseVLM (ICML 2025)", "Table 4 (token recycling ablation)",
               "2410.04417", "notes/sparsevlm.md"),
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
    *_row("fastv", None, {192: 64.8, 128: 59.6, 64: 48.0}, "visionzip-t1"),
    *_row("pdrop", None, {192: 82.3, 128: 82.3, 64: 55.9}, "visionzip-t1"),
]


def normalize_version(version: object) -> str | None:
    """'1.5', 'v1.5', 'V1.5' -> 'v1.5'; None stays None."""
    if version in (None, ""):
        return None
    text = str(version).strip().lower()
    return text if text.startswith("v") else f"v{text}"


def lookup(model: str, method: str, version: object, budget: int | None, params: dict) -> Published | None:
    """The published value for this model, method, algorithm version and budget, if there is one."""
    version = normalize_version(version)
    for entry in TABLE:
        if entry.model != model or entry.method != method or normalize_version(entry.version) != version:
            continue
        if entry.budget is not None and entry.budget != budget:
            continue
        if all(params.get(k, True) == v for k, v in entry.requires.items()):
            return entry
    return None


def setup_differences(info: dict) -> list[str]:
    """How a cell's setup departs from the papers' (e.g. ['quant int8']); `info` as report.describe."""
    return [f"{k} {info.get(k)}" for k, v in PAPER_SETUP.items() if str(info.get(k)) != v]


def label(entry: Published) -> str:
    version = f" {entry.version}" if entry.version else ""
    variant = f" ({entry.variant})" if entry.variant else ""
    return f"{entry.method}{version}{variant}"
