"""Both parsing rules behave byte for byte as their originals, on the raw text as produced and stored.

The originals, restated here independently of prune_eval.analysis.metrics:
- LLaVA, llava/eval/eval_pope.py (haotian-liu/LLaVA): applied to each answer file line's `text` as
  stored, with no stripping: keep the text before the first '.', drop ',', split on ' ', and answer
  'no' if one of the words is exactly 'No', 'not' or 'no', else 'yes'.
- lmms-eval, lmms_eval/tasks/pope/utils.py (pope_process_results): `pred = results[0].lower().strip()`,
  correct iff it equals the label; precision/recall count only 'yes'/'no' predictions.
- LLaVA's answer files come from llava/eval/model_vqa_loader.py:
  `tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import POPE, REFERENCE_ANSWERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_eval.execution import records
from prune_eval.analysis import cellfiles, metrics
from prune_eval.analysis.ingest import answer_record, ingest
from prune_eval.data.pope import Question


def eval_pope_rule(text: str) -> str:
    """eval_pope.py, restated: first sentence, no commas, words separated by single spaces."""
    first_sentence = text.partition(".")[0]
    words = set(first_sentence.replace(",", "").split(" "))
    return "no" if words & {"No", "not", "no"} else "yes"


def lmms_eval_rule(text: str) -> str:
    """pope_process_results, restated: the prediction is the lower-cased, stripped text; only
    'yes' and 'no' take part in precision and recall ('other' here)."""
    prediction = text.lower().strip()
    return {"yes": "yes", "no": "no"}.get(prediction, "other")


# Every kind of space a decoder or an editor can leave around an answer: ASCII whitespace, newlines
# of every convention, non-breaking, en/em/ideographic spaces, and the zero-width characters that
# Python's str.strip() does not remove.
SPACES = [" ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2002", "\u2003", "\u2028",
          "\u2029", "\u3000", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
WORDS = ["Yes", "No", "yes", "no", "YES", "NO", "yEs", "nO", "not", "Not", "NOT", "none", "Nope", "There", "is", "a",
         "an", "in", "the", "image", "dog", "no.", "No,", "Yes,", "Ｙｅｓ", "Ｎｏ", "ｎｏ", "ｙｅｓ", "Ｎｏｔ", "İs", "ß", ""]
PUNCTUATION = [".", ",", "!", "?", ";", ":", "...", "．", "，", "。", "'", '"', "-", "(", ")"]
PIECES = st.sampled_from(SPACES) | st.sampled_from(WORDS) | st.sampled_from(PUNCTUATION)
ANSWERS = (
    st.lists(PIECES, max_size=12).map("".join)  # words, spaces and punctuation in any mix
    | st.builds(lambda lead, core, tail: lead + core + tail,
                st.lists(st.sampled_from(SPACES), max_size=3).map("".join),
                st.sampled_from(["Yes", "No", "yes", "no", "Yes.", "No.", "No, there is not.", "Yes, there is a dog.", "",
                                 "There is no dog in the image.", "Not really", "no"]),
                st.lists(st.sampled_from(SPACES), max_size=3).map("".join))
    | st.lists(st.sampled_from(WORDS[:20]), min_size=30, max_size=120).map(" ".join)  # long sentences
    | st.text(max_size=40)  # anything at all
)


@settings(max_examples=1000, deadline=None)
@given(ANSWERS)
def test_llava_rule_is_eval_pope_byte_for_byte(text: str) -> None:
    assert metrics.parse_llava(text) == eval_pope_rule(text)
    assert metrics.parse(text, "llava") == eval_pope_rule(text)


@settings(max_examples=1000, deadline=None)
@given(ANSWERS)
def test_exact_rule_is_lmms_eval_byte_for_byte(text: str) -> None:
    assert metrics.parse_exact(text) == lmms_eval_rule(text)
    assert metrics.parse(text, "exact") == lmms_eval_rule(text)


def test_the_cases_that_tell_the_rules_apart() -> None:
    """Fixed witnesses of what the original rules do with whitespace (each was once got wrong)."""
    assert eval_pope_rule("No\n") == metrics.parse_llava("No\n") == "yes"  # "No\n" is not the word "No"
    assert eval_pope_rule("\nNo") == metrics.parse_llava("\nNo") == "yes"
    assert eval_pope_rule(" No") == metrics.parse_llava(" No") == "no"  # split(' ') gives '', 'No'
    assert eval_pope_rule("No.\n") == metrics.parse_llava("No.\n") == "no"  # the first sentence is "No"
    assert eval_pope_rule("No\tthere is") == metrics.parse_llava("No\tthere is") == "yes"
    assert lmms_eval_rule("No\n") == metrics.parse_exact("No\n") == "no"
    assert lmms_eval_rule("\u200bno") == metrics.parse_exact("\u200bno") == "other"  # zero-width space is not whitespace
    assert lmms_eval_rule("\xa0Yes\u3000") == metrics.parse_exact("\xa0Yes\u3000") == "yes"
    assert lmms_eval_rule("Ｙｅｓ") == metrics.parse_exact("Ｙｅｓ") == "other"  # full-width letters stay full-width


QUESTION = Question("random", 7, "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "no",
                    "Is there a dog in the image?\nAnswer the question using a single word or phrase.")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANSWERS)
def test_an_ingested_answer_is_stored_exactly_and_parsed_as_stored(text: str) -> None:
    """Through a record part on disk and back: the text is unchanged, both predictions are the
    originals' on that text, and the report's check (pred follows from raw_answer) accepts it."""
    with tempfile.TemporaryDirectory() as folder:
        records.write_part(Path(folder), [answer_record(QUESTION, text)])
        (stored,) = records.read_records(Path(folder)).records
    assert stored["raw_answer"] == text
    assert stored["pred_llava"] == eval_pope_rule(text) and stored["pred_exact"] == lmms_eval_rule(text)
    for rule in metrics.PARSE_RULES:
        assert metrics.parse(stored["raw_answer"], rule) == stored[f"pred_{rule}"]


@settings(max_examples=200, deadline=None)
@given(ANSWERS)
def test_our_cells_store_the_text_llava_writes_and_parse_it_as_stored(text: str) -> None:
    """A cell's record holds the decoded answer as model_vqa_loader writes it (stripped) and parses
    exactly that text; the parse is the originals' on the stored text."""
    from prune_eval.execution.cell import answer_record as cell_record
    from prune_eval.execution.engine import Answer, Generation

    written_by_llava = text.strip()
    record = cell_record(Answer(QUESTION, Generation([], written_by_llava, "eos"), 576))
    assert record["raw_answer"] == written_by_llava
    assert record["pred_llava"] == eval_pope_rule(written_by_llava) and record["pred_exact"] == lmms_eval_rule(written_by_llava)


def test_decoded_text_is_model_vqa_loaders_answer_text() -> None:
    from transformers import AutoTokenizer

    from prune_eval.execution.engine import decoded_text
    from prune_eval.models.loading import TOY_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TOY_DIR))
    for text in ["Yes", " No.", "No\n", "\tyes there is\n\n"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert decoded_text(tokenizer, ids) == tokenizer.batch_decode([ids], skip_special_tokens=True)[0].strip()


def eval_pope_scores(answers: list[dict], label_file: Path) -> dict:
    """eval_pope.py's numbers for one category: its rule, its zip of answers with the label file's
    lines, its TP/FP/TN/FN and F1 (precision and recall as it computes them)."""
    labels = [json.loads(line)["label"] for line in label_file.read_text().splitlines() if line.strip()]
    preds = [eval_pope_rule(a["text"]) for a in answers]
    tp = sum(p == "yes" and lab == "yes" for p, lab in zip(preds, labels))
    fp = sum(p == "yes" and lab == "no" for p, lab in zip(preds, labels))
    tn = sum(p == "no" and lab == "no" for p, lab in zip(preds, labels))
    fn = sum(p == "no" and lab == "yes" for p, lab in zip(preds, labels))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall), "accuracy": (tp + tn) / (tp + tn + fp + fn)}


def test_ingesting_answers_with_a_trailing_newline_scores_as_eval_pope(tmp_path) -> None:
    """The real LLaVA-1.5-13B answers, each with a trailing newline ("No\\n" is a yes under LLaVA's
    rule): the ingested cell's LLaVA-rule scores are eval_pope.py's, the stored text keeps the newline,
    and the cell passes the report's verification."""
    question_file = POPE / "llava-1.5" / "llava_pope_test.jsonl"
    answers = [json.loads(line) for line in REFERENCE_ANSWERS.read_text().splitlines() if line.strip()]
    for answer in answers:
        answer["text"] += "\n"
    path = tmp_path / "answers-newline.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    cell = ingest(question_file, POPE / "llava-1.5", path, name="newline", out=tmp_path / "out")

    category = {q["question_id"]: q["category"] for q in map(json.loads, question_file.read_text().splitlines())}
    summary = json.loads((cell / "summary.json").read_text())
    for split in ("adversarial", "popular", "random"):
        expected = eval_pope_scores([a for a in answers if category[a["question_id"]] == split], POPE / "llava-1.5" / f"coco_pope_{split}.json")
        got = summary["metrics"]["llava"]["splits"][split]
        assert {k: got[k] for k in ("tp", "fp", "tn", "fn")} == {k: expected[k] for k in ("tp", "fp", "tn", "fn")}
        for key in ("precision", "recall", "f1", "accuracy"):
            assert abs(got[key] - expected[key]) < 1e-12, (split, key)
    assert summary["metrics"]["llava"]["splits"]["random"]["tn"] == 0  # every "No\n" became a yes, as in eval_pope.py
    stored = {r["question_id"] + {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}[r["split"]]: r["raw_answer"]
              for r in records.read_records(cell).records}
    assert all(stored[a["question_id"]] == a["text"] for a in answers)
    assert summary["raw_answer"] == records.RAW_ANSWER_INGESTED
    assert not isinstance(cellfiles.load_cell(cell), str)
    # lmms-eval's exact match strips: its score is the untouched file's
    untouched = ingest(question_file, POPE / "llava-1.5", REFERENCE_ANSWERS, name="untouched", out=tmp_path / "out")
    untouched_summary = json.loads((untouched / "summary.json").read_text())
    assert summary["metrics"]["exact"] == untouched_summary["metrics"]["exact"]
