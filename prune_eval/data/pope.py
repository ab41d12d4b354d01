"""POPE question files: both formats, both versions, labels joined by question id.

Formats (facts: ../shared/data/pope/README.md, ../shared/notes/pope.md):
- POPE's own `coco_pope_{adversarial,popular,random}.json`: JSON lines `question_id, image, text,
  label`; ids restart at 1 in every split.
- LLaVA's `llava_pope_test.jsonl`: JSON lines `question_id, image, text, category`, no label; ids are
  POPE ids + 0 / 10000000 / 20000000 for adversarial / random / popular, and `text` already carries
  the answer-format suffix. Labels come from POPE's files, joined by id and checked against image and
  text; LLaVA's own eval zips them by line order, which silently mislabels a mismatched file.

Versions: `llava-1.5` is POPE at commit e3e3926 as pinned by LLaVA-1.5 (8910 questions: random has
2910); `latest` is POPE HEAD 08d957b (9000). Files are identified by checksum, so a version/label
mismatch is an error, not a silently different benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prune_eval.errors import PruneEvalError
from prune_eval.execution.records import sha256_file

SPLITS = ("adversarial", "popular", "random")
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
LLAVA_ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}

# sha256 of the question files of each known POPE version (../shared/data/pope/SHA256SUMS).
KNOWN_VERSIONS: dict[str, dict[str, str]] = {
    "llava-1.5": {
        "adversarial": "1d8f0906a9b50c05640f6f23abfac97523be2a1bed28f7eadc63b811699b2d26",
        "popular": "5b16653023bf4f64d57eb0d168259de6627f5cde7538b85ebed3cc33034aa6cc",
        "random": "c16b65d2df6d70bb0814c8a4375833d39cdb09928fd936d3fc546491efa37f35",
    },
    "latest": {
        "adversarial": "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8",
        "popular": "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753",
        "random": "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994",
    },
}
LLAVA_TEST_FILE_SHA256 = "1d3b41f0dced74b4f361c659787ef673497cfac54a6be7bde00eb405bab03c70"


@dataclass(frozen=True)
class Question:
    """One POPE question. `key` ("split/id") is unique across splits; `prompt` is what the model
    reads after the image (question + answer-format suffix)."""

    split: str
    question_id: int
    image: str
    question: str
    label: str
    prompt: str

    @property
    def key(self) -> str:
        return f"{self.split}/{self.question_id}"


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """JSON lines with the given fields; a malformed line is an error naming file and line."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PruneEvalError(f"{path}:{number}: not UTF-8 text; expected one JSON object per line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PruneEvalError(f"{path}:{number}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            except RecursionError:
                raise PruneEvalError(f"{path}:{number}: JSON nested too deeply; expected one flat JSON object per line") from None
            if not isinstance(row, dict):
                raise PruneEvalError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise PruneEvalError(f"{path}:{number}: missing field(s) {', '.join(missing)}; required: {', '.join(required)}")
            rows.append(row)
    return rows


def question_id(value, where: str) -> int:
    """A question id as POPE and LLaVA write it: a whole number (a string of digits is accepted)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise PruneEvalError(f"{where}: question_id {json.dumps(value)[:40]} is not a whole number")


def text_field(row: dict, key: str, where: str) -> str:
    if not isinstance(row[key], str):
        raise PruneEvalError(f"{where}: '{key}' must be a string, got {json.dumps(row[key])[:40]}")
    return row[key]


def pope_file(question_dir: Path, split: str) -> Path:
    return Path(question_dir) / f"coco_pope_{split}.json"


def identify_version(question_dir: Path, splits: tuple[str, ...] = SPLITS) -> tuple[str | None, dict[str, str]]:
    """(known version or None, {split: sha256}) of the POPE files in `question_dir`."""
    checksums = {split: sha256_file(pope_file(question_dir, split)) for split in splits}
    for version, known in KNOWN_VERSIONS.items():
        if all(known[s] == checksums[s] for s in splits):
            return version, checksums
    return None, checksums


def missing_files(question_dir: Path, splits: tuple[str, ...], llava_question_file: Path | None = None) -> list[str]:
    """The question files (paths) of these splits that are not on disk."""
    missing = [str(pope_file(question_dir, s)) for s in splits if not pope_file(question_dir, s).is_file()]
    if llava_question_file is not None and not Path(llava_question_file).is_file():
        missing.append(str(llava_question_file))
    return missing


def check_files_exist(question_dir: Path, splits: tuple[str, ...], llava_question_file: Path | None) -> None:
    missing = missing_files(question_dir, splits, llava_question_file)
    if missing:
        raise PruneEvalError(
            f"missing POPE question file(s): {', '.join(missing)}; set data.question_dir to a folder with "
            f"coco_pope_{{{','.join(splits)}}}.json (POPE's output/coco/)"
        )


def load_pope_split(question_dir: Path, split: str) -> list[Question]:
    rows = read_jsonl(pope_file(question_dir, split), ("question_id", "image", "text", "label"))
    questions = []
    seen: set[int] = set()
    path = pope_file(question_dir, split)
    for row in rows:
        qid = question_id(row["question_id"], str(path))
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise PruneEvalError(f"{path}: question {qid} has label {row['label']!r}; allowed: yes, no")
        if qid in seen:
            raise PruneEvalError(f"{path}: question_id {qid} appears twice")
        seen.add(qid)
        text = text_field(row, "text", f"{path}: question {qid}")
        image = text_field(row, "image", f"{path}: question {qid}")
        questions.append(Question(split, qid, image, text, label, text + ANSWER_SUFFIX))
    return questions


def join_llava_questions(llava_question_file: Path, labelled: list[Question]) -> list[Question]:
    """Questions in the order and wording of LLaVA's llava_pope_test.jsonl, labels joined by id.

    Every LLaVA question must match a labelled POPE question on split, id, image and text; a POPE
    question LLaVA's file lacks is an error too, so both files describe the same benchmark.
    """
    by_key = {(q.split, q.question_id): q for q in labelled}
    splits = {q.split for q in labelled}
    joined: list[Question] = []
    for row in read_jsonl(Path(llava_question_file), ("question_id", "image", "text", "category")):
        llava_id = question_id(row["question_id"], str(llava_question_file))
        split = row["category"]
        if not isinstance(split, str) or split not in LLAVA_ID_OFFSET:
            raise PruneEvalError(f"{llava_question_file}: category {split!r} of question {llava_id}; allowed: {', '.join(SPLITS)}")
        if split not in splits:
            continue
        qid = llava_id - LLAVA_ID_OFFSET[split]
        pope = by_key.pop((split, qid), None)
        if pope is None:
            raise PruneEvalError(
                f"{llava_question_file}: question {row['question_id']} ({split} {qid}) has no label in the POPE "
                f"files; the question file and the label files are different POPE versions"
            )
        text = text_field(row, "text", f"{llava_question_file}: question {llava_id}")
        if row["image"] != pope.image or not text.startswith(pope.question):
            raise PruneEvalError(
                f"{llava_question_file}: question {llava_id} is {text[:80]!r} on {json.dumps(row['image'])[:80]}, "
                f"but POPE {split} {qid} is {pope.question!r} on {pope.image!r}; the files are different POPE versions"
            )
        joined.append(Question(split, qid, pope.image, pope.question, pope.label, text))
    if by_key:
        example = next(iter(by_key))
        raise PruneEvalError(
            f"{llava_question_file} lacks {len(by_key)} labelled POPE question(s), e.g. {example[0]} {example[1]}; "
            f"the question file and the label files are different POPE versions"
        )
    return joined


def load_pope(
    question_dir: Path,
    *,
    version: str,
    splits: tuple[str, ...] = SPLITS,
    llava_question_file: Path | None = None,
    allow_unknown_version: bool = False,
) -> tuple[list[Question], dict]:
    """Questions of the given splits and a provenance dict (version, checksums, counts) for records."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise PruneEvalError(f"unknown POPE split(s) {', '.join(bad)}; allowed: {', '.join(SPLITS)}")
    if version not in KNOWN_VERSIONS:
        raise PruneEvalError(f"unknown POPE version '{version}'; allowed: {', '.join(KNOWN_VERSIONS)}")
    question_dir = Path(question_dir)
    check_files_exist(question_dir, splits, llava_question_file)
    found, checksums = identify_version(question_dir, splits)
    if found != version and not allow_unknown_version:
        what = f"POPE '{found}'" if found else "not a known POPE version"
        raise PruneEvalError(
            f"data.version={version} but the question files in {question_dir} are {what} "
            f"(sha256 {', '.join(f'{s} {c[:12]}' for s, c in checksums.items())}); "
            f"point data.question_dir at the {version} files or set data.version={found or '...'}"
        )
    questions = [q for split in splits for q in load_pope_split(question_dir, split)]
    provenance = {"format": "pope", "version": version, "question_dir": str(question_dir), "sha256": checksums}
    if llava_question_file is not None:
        questions = join_llava_questions(Path(llava_question_file), questions)
        provenance.update(format="llava", llava_question_file=str(llava_question_file),
                          llava_question_file_sha256=sha256_file(Path(llava_question_file)))
    provenance["counts"] = {s: sum(q.split == s for q in questions) for s in splits}
    return questions, provenance


def check_images(image_dir: Path, questions: list[Question]) -> None:
    """All images present, before any model is loaded: count and an example path otherwise."""
    names = sorted({q.image for q in questions})
    missing = [n for n in names if not (Path(image_dir) / n).is_file()]
    if missing:
        raise PruneEvalError(
            f"{len(missing)} of {len(names)} POPE images missing in data.image_dir={image_dir}, e.g. "
            f"{Path(image_dir) / missing[0]}; get them with `python -m prune_eval.assets pope-images --out DIR`"
        )
