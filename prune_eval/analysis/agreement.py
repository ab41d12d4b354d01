"""Which answers change: agreement with the unpruned model, and the compression-sensitive subset.

- Agreement with vanilla (EffiVLM-Bench's "loyalty", arXiv 2506.00479): for every cell that has a
  vanilla cell on the same questions (same model, quantization, preprocessing, data, numerics and
  decoding length), the share of its answers equal to vanilla's, and the two kinds of change:
  right -> wrong (vanilla right, pruned wrong) and wrong -> right. Under LLaVA's rule; accuracy(cell)
  - accuracy(vanilla) = (wrong -> right) - (right -> wrong) exactly.
- Compression-sensitive subset (VTC-Bench, Liao et al., arXiv 2510.07143): the questions vanilla
  answers correctly and the `downsample` baseline at the same budget answers wrongly. Each method's
  accuracy there, and each gap, on that subset with its own interval. By construction vanilla scores
  100% and downsample 0% on it.

Intervals resample images with all their questions (`stats.cluster_share_interval`,
`stats.paired_cluster_bootstrap`). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prune_eval.analysis import metrics, stats
from prune_eval.analysis.compare import CONVENTION_RESAMPLES, Comparison, Gap
from prune_eval.analysis.configs import Config, Scored, coarse_factors

SUBSET_LABEL = "compression-sensitive subset (VTC-Bench: vanilla right, downsample at this budget wrong)"


@dataclass(frozen=True)
class Agreement:
    cell: str
    vanilla_cell: str
    n_questions: int
    n_images: int
    equal: stats.ShareResult  # answers equal to vanilla's
    right_to_wrong: stats.ShareResult  # vanilla right, this cell wrong
    wrong_to_right: stats.ShareResult  # vanilla wrong, this cell right


@dataclass(frozen=True)
class Subset:
    """The compression-sensitive questions of one (vanilla cell, downsample cell) and a cell's score there."""

    cell: str
    vanilla_cell: str
    downsample_cell: str
    mask: np.ndarray  # (N,) bool over the cell's questions (sorted keys)
    n_questions: int
    n_images: int
    accuracy: stats.ShareResult | None  # None when the subset is empty


def _partner(config: Config, configs: Sequence[Config], method: str, *, budget=None) -> Config | None:
    """The configuration that differs from `config` only in being `method` (at `budget` if given)."""
    for other in configs:
        if other is config or other.info["method"] != method or other.info["ingested"] != config.info["ingested"]:
            continue
        if budget is not None and other.info["budget"] != budget:
            continue
        if config.info["ingested"]:
            if not (config.info["metadata"] and other.info["metadata"]):
                continue
            mine, theirs = coarse_factors(config.info), coarse_factors(other.info)
            if all(mine[k] == theirs[k] for k in mine if k != "method"):
                return other
        elif all(other.factors.get(k) == config.factors.get(k) for k in set(config.factors) | set(other.factors) if k != "method"):
            return other
    return None


def _cell_for(partner: Config, cell: Scored) -> Scored | None:
    """The partner's cell with the same seed (or its only cell), over the same questions."""
    match = next((c for c in partner.cells if c.seed == cell.seed), partner.cells[0] if partner.once or len(partner.cells) == 1 else None)
    return match if match is not None and match.fingerprint == cell.fingerprint else None


def agreements(configs: Sequence[Config], *, n_resamples: int, seed: int) -> dict[str, Agreement]:
    """Cell name -> its agreement with vanilla, for every non-vanilla cell that has a vanilla partner."""
    out = {}
    for config in configs:
        if config.info["method"] == "vanilla":
            continue
        vanilla = _partner(config, configs, "vanilla")
        if vanilla is None:
            continue
        for cell in config.cells:
            v = _cell_for(vanilla, cell)
            if v is None or len(cell.clusters) < 2:
                continue
            label = cell.data.label
            mine, theirs = cell.data.pred["llava"], v.data.pred["llava"]
            right, v_right = mine == label, theirs == label
            share = lambda hits: stats.cluster_share_interval(hits, cell.data.image, n_resamples=min(n_resamples, CONVENTION_RESAMPLES), rng=seed)  # noqa: E731
            out[cell.name] = Agreement(cell.name, v.name, len(label), len(cell.clusters), share(mine == theirs),
                                       share(v_right & ~right), share(~v_right & right))
    return out


def subsets(configs: Sequence[Config], *, n_resamples: int, seed: int) -> dict[str, Subset]:
    """Cell name -> its score on the compression-sensitive subset of its vanilla and downsample partners."""
    out = {}
    for config in configs:
        if config.info["method"] == "vanilla" or config.info["budget"] is None:
            continue
        vanilla = _partner(config, configs, "vanilla")
        downsample = config if config.info["method"] == "downsample" else _partner(config, configs, "downsample", budget=config.info["budget"])
        if vanilla is None or downsample is None:
            continue
        for cell in config.cells:
            v, d = _cell_for(vanilla, cell), _cell_for(downsample, cell)
            if v is None or d is None:
                continue
            label = cell.data.label
            mask = (v.data.pred["llava"] == label) & (d.data.pred["llava"] != label)
            images = cell.data.image[mask]
            accuracy = None
            if mask.sum() and len(set(images)) >= 2:
                accuracy = stats.cluster_share_interval(cell.data.pred["llava"][mask] == label[mask], images,
                                                        n_resamples=min(n_resamples, CONVENTION_RESAMPLES), rng=seed)
            out[cell.name] = Subset(cell.name, v.name, d.name, mask, int(mask.sum()), len(set(images)), accuracy)
    return out


def _subset_counts(cell: Scored, mask: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    d = cell.data
    return metrics.cluster_counts(d.label[mask], d.pred["llava"][mask], d.split[mask], d.image[mask], cell.splits, clusters)


def subset_gaps(c: Comparison, found: dict[str, Subset], *, n_resamples: int, seed: int) -> tuple:
    """A comparison's gap on the compression-sensitive subset, when both cells use the same one."""
    if c.problem is not None:
        return ()
    sa, sb = found.get(c.pair.cell_a.name), found.get(c.pair.cell_b.name)
    if sa is None or sb is None or (sa.vanilla_cell, sa.downsample_cell) != (sb.vanilla_cell, sb.downsample_cell) or sa.n_images < 2:
        return ()
    clusters = np.unique(c.pair.cell_a.data.image[sa.mask].astype(str))
    a, b = _subset_counts(c.pair.cell_a, sa.mask, clusters), _subset_counts(c.pair.cell_b, sa.mask, clusters)
    data = f"subset, {sa.n_questions} q / {sa.n_images} images"
    out = []
    for key, label, metric in (("subset/pooled_accuracy", "accuracy on the " + SUBSET_LABEL, metrics.pooled_accuracy),
                               ("subset/mean_f1", "mean F1 on the " + SUBSET_LABEL, metrics.mean_f1)):
        boot = stats.paired_cluster_bootstrap(a, b, metric=metric, n_resamples=min(n_resamples, CONVENTION_RESAMPLES), rng=seed)
        out.append(Gap(key, label, data, boot.estimate, boot.confidence_interval.low, boot.confidence_interval.high,
                       float(metric(a.sum(0))), float(metric(b.sum(0)))))
    return tuple(out)
