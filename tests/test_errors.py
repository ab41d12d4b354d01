"""Bad input -> one line naming the value and what is allowed, exit 2, before any model is loaded."""

from __future__ import annotations

import json

import pytest
from conftest import POPE, REPO, run_cli

CASES = {
    "unknown method": (["experiment=demo", "method=vanila"], ["unknown method 'vanila'", "did you mean 'vanilla'", "choices:"]),
    "unknown model": (["model=llava-1.5-7", "experiment=demo"], ["unknown model 'llava-1.5-7'", "did you mean 'llava-1.5-7b'", "tiny"]),
    "unknown quant in a sweep": (["-m", "experiment=demo", "quant=fp32,fp61"], ["unknown quant 'fp61'", "did you mean", "nf4"]),
    "unknown key": (["experiment=demo", "budgte=64"], ["unknown key 'budgte'", "did you mean 'budget'"]),
    "unknown method option": (["experiment=demo", "method.dominant=3"], ["unknown key 'method.dominant'", "vanilla"]),
    "budget above visual tokens": (["experiment=demo", "budget=1000"], ["budget=1000 is larger than the 576 visual tokens", "allowed: 1..576"]),
    "budget above visual tokens in a sweep": (["-m", "experiment=demo", "budget=64,1000"], ["budget=1000 is larger than the 576", "nothing was launched"]),
    "weights not cached": (["model=llava-1.5-7b", "data=pope-synthetic", "device=cpu"], ["weights for llava-hf/llava-1.5-7b-hf are not in the Hugging Face cache", "prune_eval.assets weights"]),
    "weights path missing": (["model=llava-1.5-7b", "model.path=/nonexistent/llava", "data=pope-synthetic"], ["model.path=/nonexistent/llava does not exist"]),
    "question files missing": (["experiment=demo", "data=pope", "data.question_dir=/nonexistent/pope"], ["missing POPE question file(s): /nonexistent/pope/coco_pope_adversarial.json"]),
    "images missing": (["experiment=demo", "data=pope", f"data.question_dir={POPE}/llava-1.5", "data.image_dir=/nonexistent/coco"], ["500 of 500 POPE images missing", "/nonexistent/coco/COCO_val2014_"]),
    "version mismatch": (["experiment=demo", "data=pope", f"data.question_dir={POPE}/latest", "data.image_dir=/tmp"], ["data.version=llava-1.5 but the question files", "POPE 'latest'"]),
    "bad split": (["experiment=demo", "data.splits=[random,easy]"], ["unknown POPE split(s) easy", "allowed: adversarial, popular, random"]),
    "negative seed": (["experiment=demo", "seed=-1"], ["seed=-1; must be a non-negative whole number"]),
    # found by the bad-input campaign (tests/test_bad_input.py), here through the real CLI
    "eval number not a number": (["experiment=demo", "eval.batch_size=abc"], ["eval.batch_size=abc; allowed: a whole number >= 1"]),
    "eval flag not a boolean": (["experiment=demo", "eval.stop_when_decided=no"], ["eval.stop_when_decided=no; allowed: true, false"]),
    "interpolation that does not resolve": (["experiment=demo", "budget=${oc.env:PRUNE_EVAL_NOT_SET}"],
                                            ["config key budget=${oc.env:PRUNE_EVAL_NOT_SET} cannot be used", "PRUNE_EVAL_NOT_SET"]),
    "splits not a list in a sweep": (["-m", "experiment=demo", "data.splits=random"], ["data.splits=random; must be a list", "nothing was launched"]),
    "glob sweep with a bad budget": (["-m", "experiment=demo", "method=glob(vani*)", "budget=0"], ["budget=0; must be a positive whole number", "nothing was launched"]),
}


# Cases that are several independent problems at once: one line each (missing inputs are all said at once).
LINES = {"question files missing": 2,  # the question files, and the images (counted from POPE's shipped list)
         "version mismatch": 2}  # the question files' version, and the images


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case: str, tmp_path) -> None:
    args, expected = CASES[case]
    result = run_cli(args, tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == LINES.get(case, 1) and all(line.startswith("prune_eval: error: ") for line in lines), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("records")), "nothing may run"


def test_malformed_answer_file_is_rejected(tmp_path) -> None:
    answers = tmp_path / "answers.jsonl"
    good = [json.dumps({"question_id": i, "text": "Yes"}) for i in range(1, 5)]
    answers.write_text("\n".join(good) + '\n{"question_id": 5, "text": "Ye\n')
    result = run_cli(["--questions", str(POPE / "llava-1.5" / "llava_pope_test.jsonl"), "--labels", str(POPE / "llava-1.5"),
                      "--answers", str(answers), "--name", "x", "--out", str(tmp_path / "out")], tmp_path, module="prune_eval.ingest")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "answers.jsonl:5: not valid JSON" in result.stderr


@pytest.mark.parametrize(
    "answers, message",
    [
        ([{"question_id": 1, "text": "Yes"}, {"question_id": 1, "text": "No"}], "question_id 1 answered twice"),
        ([{"question_id": 99999999, "text": "Yes"}], "question_id 99999999 is not a question"),
        ([{"question_id": 1, "text": "Yes"}], "answers 1 of 8910 questions; missing e.g. adversarial/2"),
        ([{"question_id": 1, "text": 5}], "'text' must be a string"),
        ([{"question_id": 1, "text": "\ud800"}], "unpaired surrogate, which is not text and cannot be stored exactly"),
    ],
)
def test_answer_file_content_errors(answers, message, tmp_path) -> None:
    from prune_eval.errors import PruneEvalError
    from prune_eval.analysis.ingest import ingest

    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    with pytest.raises(PruneEvalError, match=message):
        ingest(POPE / "llava-1.5" / "llava_pope_test.jsonl", POPE / "llava-1.5", path, name="x", out=tmp_path / "out")
