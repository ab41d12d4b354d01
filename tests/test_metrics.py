"""POPE metrics: both parsing rules, every aggregate, and the real llava-v1.5-13b answer file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REFERENCE_ANSWERS

from prune_eval.analysis import metrics
from prune_eval.analysis.ingest import ingest

SPLITS = ["adversarial", "popular", "random"]


def llava_eval_pope_reference(texts: list[str], labels: list[str]) -> dict:
    """LLaVA's llava/eval/eval_pope.py logic, written out independently as loops."""
    preds = []
    for text in texts:
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold))
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return {"f1": 2 * precision * recall / (precision + recall), "accuracy": (tp + tn) / len(gold),
            "precision": precision, "recall": recall, "yes_ratio": preds.count(1) / len(preds)}


@pytest.mark.parametrize(
    "text, llava, exact",
    [
        ("Yes", "yes", "yes"),
        ("No", "no", "no"),
        ("No.", "no", "other"),
        ("yes.", "yes", "other"),
        (" YES ", "yes", "yes"),
        ("There is not a dog.", "no", "other"),
        ("Yes, there is no dog", "no", "other"),
        ("Yes. There is no dog", "yes", "other"),
        ("", "yes", "other"),
        ("Nope", "yes", "other"),
        ("no,", "no", "other"),
        ("No\nthere", "yes", "other"),  # LLaVA splits on ' ' only: 'No\nthere' is one word
    ],
)
def test_parsing_rules(text: str, llava: str, exact: str) -> None:
    assert metrics.parse_llava(text) == llava
    assert metrics.parse_exact(text) == exact


def test_llava_rule_matches_eval_pope_on_random_answers() -> None:
    rng = np.random.default_rng(0)
    vocabulary = ["Yes", "No", "no", "not", "yes", ",", ".", "there", "is", "a", "cat", " ", "No,", "Not"]
    texts = ["".join(rng.choice(vocabulary, size=rng.integers(0, 6))) for _ in range(2000)]
    labels = list(rng.choice(["yes", "no"], size=len(texts)))
    expected = llava_eval_pope_reference(texts, labels)
    counts = metrics.confusion_counts(labels, [metrics.parse_llava(t) for t in texts], ["s"] * len(texts), ["s"])
    for name in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        assert metrics.SPLIT_METRICS[name](counts[0]) == pytest.approx(expected[name], abs=1e-12)


def test_exact_rule_follows_lmms_eval_conventions() -> None:
    """'other' answers are wrong for accuracy and ignored by precision and recall (lmms-eval pope)."""
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    preds = ["yes", "other", "yes", "no", "no", "other"]
    counts = metrics.confusion_counts(labels, preds, ["s"] * 6, ["s"])[0]
    assert metrics.accuracy(counts) == pytest.approx(2 / 6)
    assert metrics.precision(counts) == pytest.approx(1 / 2)  # TP=1, FP=1
    assert metrics.recall(counts) == pytest.approx(1 / 2)  # TP=1, FN=1
    assert metrics.yes_ratio(counts) == pytest.approx(2 / 6)


def test_aggregates_mean_versus_pooled() -> None:
    counts = np.array([[10, 0, 10, 0, 0, 0], [1, 9, 5, 5, 0, 0]])  # split A perfect, split B poor
    assert metrics.mean_f1(counts) == pytest.approx((1.0 + metrics.f1(counts[1])) / 2)
    assert metrics.pooled_f1(counts) == pytest.approx(metrics.f1(counts.sum(0)))
    assert metrics.mean_f1(counts) != pytest.approx(metrics.pooled_f1(counts))
    assert metrics.metric_function("f1/B", ["A", "B"])(counts) == pytest.approx(metrics.f1(counts[1]))
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        metrics.metric_function("f2", ["A", "B"])


def test_cluster_counts_sum_to_split_counts() -> None:
    rng = np.random.default_rng(1)
    n = 300
    labels, preds = rng.choice(["yes", "no"], n), rng.choice(["yes", "no", "other"], n)
    splits, images = rng.choice(SPLITS, n), rng.choice([f"img{i}" for i in range(20)], n)
    per_cluster = metrics.cluster_counts(labels, preds, splits, images, SPLITS, sorted(set(images)))
    assert per_cluster.shape == (len(set(images)), 3, 6)
    np.testing.assert_array_equal(per_cluster.sum(0), metrics.confusion_counts(labels, preds, splits, SPLITS))


def test_reference_answers_give_the_published_scores(pope_dir, tmp_path) -> None:
    """llava-v1.5-13b's real answers: F1 84.46/86.25/87.14, mean 85.95 (LLaVA PR #1199)."""
    cell = ingest(pope_dir / "llava-1.5" / "llava_pope_test.jsonl", pope_dir / "llava-1.5", REFERENCE_ANSWERS,
                  name="llava-v1.5-13b", out=tmp_path)
    summary = json.loads((cell / "summary.json").read_text())
    m = summary["metrics"]["llava"]
    assert summary["n_questions"] == 8910
    assert [round(100 * m["splits"][s]["f1"], 2) for s in SPLITS] == [84.46, 86.25, 87.14]
    assert round(100 * m["mean_f1"], 2) == 85.95
    assert [round(100 * m["splits"][s]["accuracy"], 2) for s in SPLITS] == [85.50, 87.43, 88.01]
    assert [round(m["splits"][s]["yes_ratio"], 3) for s in SPLITS] == [0.433, 0.414, 0.417]
    assert summary["data"]["version"] == "llava-1.5"
    # the same numbers straight from LLaVA's own logic, zipping labels by line order as it does
    answers = [json.loads(line) for line in REFERENCE_ANSWERS.read_text().splitlines()]
    questions = {q["question_id"]: q for q in map(json.loads, (pope_dir / "llava-1.5" / "llava_pope_test.jsonl").read_text().splitlines())}
    for split in SPLITS:
        texts = [a["text"] for a in answers if questions[a["question_id"]]["category"] == split]
        labels = [json.loads(line)["label"] for line in (pope_dir / "llava-1.5" / f"coco_pope_{split}.json").read_text().splitlines()]
        assert m["splits"][split]["f1"] == pytest.approx(llava_eval_pope_reference(texts, labels)["f1"], abs=1e-12)
