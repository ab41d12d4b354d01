"""POPE metrics from per-question predictions, under every convention the papers use.

Pure numpy: no torch, no files. Everything is computed from confusion counts so that the statistics
(`prune_eval.analysis.stats`) can recompute any metric on a resampled set of images by summing per-image
counts, which is exact and vectorised.

Conventions (facts: ../shared/notes/pope.md):
- Parsing rules, each applied to the raw answer text exactly as stored (`raw_answer`), byte for byte
  as its original applies it. `llava` is LLaVA's llava/eval/eval_pope.py: the text before the first
  '.', commas dropped, split on ' ' (a space only, no stripping: "No\n" is one word "No\n", so a
  *yes*); "no" if 'No', 'not' or 'no' is among the words, else "yes" (empty or garbage counts as
  yes). `exact` is lmms-eval's lmms_eval/tasks/pope/utils.py: `text.lower().strip()` (Python's
  str.strip: every Unicode whitespace, not zero-width spaces) must equal "yes" or "no"; anything
  else is "other", wrong for accuracy and ignored by precision and recall.
- Aggregation. The papers' POPE number is the mean over splits of per-split F1 (`mean_f1`);
  lmms-eval's `pope` task pools all questions into one F1 (`pooled_f1`); some reproductions report
  accuracy.
- Yes-ratio, two quantities under one name. `yes_ratio` (per split) and `pooled_yes_ratio` (all
  questions) are the share of PREDICTIONS that are "yes": LLaVA's eval_pope.py "yes ratio", a
  property of the model (a low one means it says "no" too often). `label_yes_ratio` is the share of
  LABELS that are "yes": what lmms-eval's pope task reports as `yes_ratio` (0.5 on balanced POPE
  whatever the model answers, ../shared/notes/pope.md). The report names them apart.

Confusion counts have a trailing axis of length 6 in the order of `COUNT_FIELDS`:
TP, FP, TN, FN, then label-yes/pred-other and label-no/pred-other (non-zero only under `exact`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PARSE_RULES = ("llava", "exact")
COUNT_FIELDS = ("tp", "fp", "tn", "fn", "other_yes", "other_no")
TP, FP, TN, FN, OTHER_YES, OTHER_NO = range(6)


def parse_llava(text: str) -> str:
    """LLaVA's eval_pope.py rule on the raw text: 'yes' or 'no' (never 'other'). No stripping: LLaVA
    applies it to the answer file's text as stored (model_vqa_loader strips before writing it)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_exact(text: str) -> str:
    """lmms-eval's rule (pope_process_results: `results[0].lower().strip()`): 'yes', 'no', or 'other'
    when the lower-cased, stripped answer is not exactly one of them."""
    answer = text.lower().strip()
    return answer if answer in ("yes", "no") else "other"


PARSERS: dict[str, Callable[[str], str]] = {"llava": parse_llava, "exact": parse_exact}


def parse(text: str, rule: str) -> str:
    if rule not in PARSERS:
        raise ValueError(f"unknown parsing rule '{rule}'; choices: {', '.join(PARSE_RULES)}")
    return PARSERS[rule](text)


def confusion_index(label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Index into COUNT_FIELDS for each (label, pred) pair of 'yes'/'no'/'other' strings."""
    label = np.asarray(label, dtype=object)
    pred = np.asarray(pred, dtype=object)
    bad_labels = set(np.unique(label)) - {"yes", "no"}
    if bad_labels:
        raise ValueError(f"labels must be 'yes' or 'no', got {sorted(map(str, bad_labels))}")
    bad_preds = set(np.unique(pred)) - {"yes", "no", "other"}
    if bad_preds:
        raise ValueError(f"predictions must be 'yes', 'no' or 'other', got {sorted(map(str, bad_preds))}")
    is_yes = label == "yes"
    index = np.empty(len(label), dtype=np.int64)
    index[is_yes & (pred == "yes")] = TP
    index[~is_yes & (pred == "yes")] = FP
    index[~is_yes & (pred == "no")] = TN
    index[is_yes & (pred == "no")] = FN
    index[is_yes & (pred == "other")] = OTHER_YES
    index[~is_yes & (pred == "other")] = OTHER_NO
    return index


def confusion_counts(
    label: Sequence[str], pred: Sequence[str], split: Sequence[str], splits: Sequence[str]
) -> np.ndarray:
    """Counts per split: (S, 6) in the order of `splits`."""
    index = confusion_index(np.asarray(label), np.asarray(pred))
    split = np.asarray(split, dtype=object)
    counts = np.zeros((len(splits), len(COUNT_FIELDS)), dtype=np.int64)
    for s, name in enumerate(splits):
        counts[s] = np.bincount(index[split == name], minlength=len(COUNT_FIELDS))
    return counts


def cluster_counts(
    label: Sequence[str],
    pred: Sequence[str],
    split: Sequence[str],
    cluster: Sequence[str],
    splits: Sequence[str],
    clusters: Sequence[str],
) -> np.ndarray:
    """Counts per cluster (image) and split: (C, S, 6), clusters in the order of `clusters`."""
    index = confusion_index(np.asarray(label), np.asarray(pred))
    split_pos = {name: s for s, name in enumerate(splits)}
    cluster_pos = {name: c for c, name in enumerate(clusters)}
    s = np.array([split_pos[x] for x in split], dtype=np.int64)
    c = np.array([cluster_pos[x] for x in cluster], dtype=np.int64)
    counts = np.zeros((len(clusters), len(splits), len(COUNT_FIELDS)), dtype=np.int64)
    np.add.at(counts, (c, s, index), 1)
    return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (lmms-eval's convention; LLaVA's script would crash)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


# Per-split metrics: counts (..., 6) -> (...).
def accuracy(counts: np.ndarray) -> np.ndarray:
    return _ratio(counts[..., TP] + counts[..., TN], counts.sum(-1))


def precision(counts: np.ndarray) -> np.ndarray:
    return _ratio(counts[..., TP], counts[..., TP] + counts[..., FP])


def recall(counts: np.ndarray) -> np.ndarray:
    return _ratio(counts[..., TP], counts[..., TP] + counts[..., FN])


def f1(counts: np.ndarray) -> np.ndarray:
    p, r = precision(counts), recall(counts)
    return _ratio(2 * p * r, p + r)


def yes_ratio(counts: np.ndarray) -> np.ndarray:
    """Share of predictions that are 'yes' (LLaVA's yes ratio)."""
    return _ratio(counts[..., TP] + counts[..., FP], counts.sum(-1))


def label_yes_ratio(counts: np.ndarray) -> np.ndarray:
    """Share of LABELS that are 'yes': lmms-eval's pope `yes_ratio` (not a property of the model)."""
    return _ratio(counts[..., TP] + counts[..., FN] + counts[..., OTHER_YES], counts.sum(-1))


SPLIT_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": accuracy,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "yes_ratio": yes_ratio,
    "label_yes_ratio": label_yes_ratio,
}


# Aggregates over splits: counts (..., S, 6) -> (...).
def mean_f1(counts: np.ndarray) -> np.ndarray:
    """The papers' "POPE" number: mean over splits of per-split F1 (LLaVA's eval_pope.py)."""
    return f1(counts).mean(-1)


def pooled_f1(counts: np.ndarray) -> np.ndarray:
    """lmms-eval's `pope` F1: one F1 over all questions of all splits."""
    return f1(counts.sum(-2))


def mean_accuracy(counts: np.ndarray) -> np.ndarray:
    return accuracy(counts).mean(-1)


def pooled_accuracy(counts: np.ndarray) -> np.ndarray:
    return accuracy(counts.sum(-2))


def pooled_yes_ratio(counts: np.ndarray) -> np.ndarray:
    """Share of all questions (every split) answered 'yes'."""
    return yes_ratio(counts.sum(-2))


def pooled_label_yes_ratio(counts: np.ndarray) -> np.ndarray:
    """Share of all questions whose label is 'yes' (lmms-eval's `yes_ratio`)."""
    return label_yes_ratio(counts.sum(-2))


AGGREGATE_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean_f1": mean_f1,
    "pooled_f1": pooled_f1,
    "mean_accuracy": mean_accuracy,
    "pooled_accuracy": pooled_accuracy,
    "pooled_yes_ratio": pooled_yes_ratio,
    "label_yes_ratio": pooled_label_yes_ratio,
}


def split_metric(name: str, split_index: int) -> Callable[[np.ndarray], np.ndarray]:
    """A per-split metric as an aggregate-shaped function: counts (..., S, 6) -> (...)."""
    fn = SPLIT_METRICS[name]
    return lambda counts: fn(counts[..., split_index, :])


def metric_function(name: str, splits: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    """Resolve 'mean_f1', 'pooled_accuracy', 'f1/random', 'accuracy/adversarial', ... to a function
    of counts (..., S, 6), where the S axis follows `splits`."""
    if name in AGGREGATE_METRICS:
        return AGGREGATE_METRICS[name]
    base, _, split = name.partition("/")
    if base in SPLIT_METRICS and split in splits:
        return split_metric(base, list(splits).index(split))
    choices = list(AGGREGATE_METRICS) + [f"{m}/{s}" for m in SPLIT_METRICS for s in splits]
    raise ValueError(f"unknown metric '{name}'; choices: {', '.join(choices)}")


def summarize(counts: np.ndarray, splits: Sequence[str]) -> dict:
    """Every metric of one cell under one parsing rule, as plain floats (for summary.json)."""
    per_split = {
        split: {
            **{field: int(counts[s, i]) for i, field in enumerate(COUNT_FIELDS)},
            "n": int(counts[s].sum()),
            **{name: float(fn(counts[s])) for name, fn in SPLIT_METRICS.items()},
        }
        for s, split in enumerate(splits)
    }
    aggregates = {name: float(fn(counts)) for name, fn in AGGREGATE_METRICS.items()}
    return {"splits": per_split, **aggregates, "n": int(counts.sum())}


def record_metrics(records: Sequence[dict], splits: Sequence[str]) -> dict:
    """Every metric of a cell's records under each parsing rule: {rule: summarize(...)}."""
    out = {}
    for rule in PARSE_RULES:
        counts = confusion_counts([r["label"] for r in records], [r[f"pred_{rule}"] for r in records], [r["split"] for r in records], splits)
        out[rule] = summarize(counts, splits)
    return out
