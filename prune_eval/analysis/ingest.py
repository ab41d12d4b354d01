"""`python -m prune_eval.ingest`: an answer file from any code -> a prune_eval cell.

So that results of the official VisionZip/SparseVLM scripts, lmms-eval or a re-implementation get
the same records, metrics and paired statistics as our own cells. The answer file is LLaVA's format
(JSON lines with `question_id` and `text`, e.g. model_vqa_loader's output) for either
- LLaVA's `llava_pope_test.jsonl` (ids = POPE id + 0 / 10000000 / 20000000 for adversarial /
  random / popular; labels joined by id from the POPE files in --labels and checked against image
  and text), or
- POPE's own `coco_pope_<split>.json` files (--questions is their folder); answers then name their
  split with a `category` field, or the whole file is one split (--split).
Every question must be answered exactly once; anything else is an error naming the line.

Metadata (`--model llava-1.5-7b --method sparsevlm --version v1.5 --budget 64 [--quant fp16]
[--preprocess pad]`, validated against conf/'s choices by prune_eval.analysis.choices) go into the
cell's experiment, so the report matches the answers with the published numbers and with our own cells
of the same configuration, and puts them into the reconciliation. `--pope-version` names the POPE
question-file version (detected from checksums by default).

The answer's `text` is stored byte for byte as `raw_answer` and both parsing rules read exactly that
text, as their originals do: LLaVA's eval_pope.py applies its rule to the answer file's `text` without
stripping it (so "No\n" is a *yes* there, and here), lmms-eval lower-cases and strips the generated
text itself. Nothing is cleaned up on the way in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prune_eval.analysis import choices, metrics
from prune_eval.execution import records
from prune_eval.analysis.cellfiles import CELL_FILE, SUMMARY
from prune_eval.data import pope
from prune_eval.errors import PruneEvalError
from prune_eval.provenance import environment


def load_answers(path: Path) -> list[dict]:
    if not path.is_file():
        raise PruneEvalError(f"answer file not found: {path}")
    return pope.read_jsonl(path, ("question_id", "text"))


def detect_version(label_dir: Path, splits: tuple[str, ...]) -> str:
    pope.check_files_exist(label_dir, splits, None)
    version, checksums = pope.identify_version(label_dir, splits)
    if version is None:
        raise PruneEvalError(f"the POPE files in {label_dir} match no known version (sha256 {checksums}); pass --pope-version and --allow-unknown-version")
    return version


def match_answers(answers: list[dict], questions: list[pope.Question], *, llava_ids: bool, split: str | None, path: Path) -> list[tuple[pope.Question, dict]]:
    """Pair every question with exactly one answer, by id (never by line order)."""
    by_key = {q.key: q for q in questions}
    matched: dict[str, tuple[pope.Question, dict]] = {}
    for line, answer in enumerate(answers, start=1):
        qid = pope.question_id(answer["question_id"], f"{path}:{line}")
        if llava_ids:
            category = next((s for s, off in sorted(pope.LLAVA_ID_OFFSET.items(), key=lambda x: -x[1]) if qid > off), None)
            key = f"{category}/{qid - pope.LLAVA_ID_OFFSET[category]}" if category else None
        else:
            answer_split = answer.get("category", split)
            if answer_split is None:
                raise PruneEvalError(f"{path}:{line}: no 'category' field and no --split; POPE ids repeat across splits, so the split must be named")
            key = f"{answer_split}/{qid}"
        if key not in by_key:
            raise PruneEvalError(f"{path}:{line}: question_id {qid} is not a question of the given question file(s)")
        if key in matched:
            raise PruneEvalError(f"{path}:{line}: question_id {qid} answered twice")
        question = by_key[key]
        prompt = answer.get("prompt")
        if prompt is not None and not str(prompt).startswith(question.question):
            raise PruneEvalError(f"{path}:{line}: answer's prompt {(str(prompt).splitlines() or [''])[0]!r} is not question {key} {question.question!r}")
        if not isinstance(answer["text"], str):
            raise PruneEvalError(f"{path}:{line}: 'text' must be a string, got {type(answer['text']).__name__}")
        try:
            answer["text"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate written as a \udXXX escape: no UTF-8 file can store it
            raise PruneEvalError(f"{path}:{line}: 'text' {json.dumps(answer['text'])[:60]} holds an unpaired surrogate, "
                                 "which is not text and cannot be stored exactly") from None
        matched[key] = (question, answer)
    missing = [q.key for q in questions if q.key not in matched]
    if missing:
        raise PruneEvalError(f"{path} answers {len(matched)} of {len(questions)} questions; missing e.g. {missing[0]}")
    return [matched[q.key] for q in questions]


def metadata_fields(metadata: dict | None) -> dict:
    """The experiment fields an answer file's metadata (choices.check_metadata) gives it."""
    metadata = metadata or {}
    fields: dict = {}
    if metadata.get("model"):
        fields["model"] = {"name": metadata["model"]}
    if metadata.get("method"):
        params = {k: metadata[k] for k in ("version", "budget") if metadata.get(k) is not None}
        fields["method"] = {"name": metadata["method"], "version": None, "params": params}
    if metadata.get("quant"):
        fields["quant"] = {"name": metadata["quant"]}
    if metadata.get("preprocess"):
        fields["preprocess"] = metadata["preprocess"]
    return fields


def answer_record(question: pope.Question, text: str) -> dict:
    """The record of one ingested answer: `text` exactly as the answer file holds it, parsed as is."""
    return {
        "schema_version": records.SCHEMA_VERSION, "key": question.key, "split": question.split,
        "question_id": question.question_id, "image": question.image, "label": question.label,
        "question": question.question, "raw_answer": text,
        "pred_llava": metrics.parse_llava(text), "pred_exact": metrics.parse_exact(text),
        "visual_tokens": None, "new_tokens": None, "stop_reason": None,
    }


def ingest(questions_path: Path, label_dir: Path, answers_path: Path, *, name: str, out: Path,
           version: str | None = None, split: str | None = None, splits: tuple[str, ...] = pope.SPLITS,
           allow_unknown_version: bool = False, metadata: dict | None = None) -> Path:
    """Write the cell `out/name` from an answer file; returns the cell directory. `version` is the
    POPE question-file version; `metadata` (choices.check_metadata) what produced the answers."""
    llava_format = questions_path.is_file()
    if split is not None:
        splits = (split,)
    version = version or detect_version(label_dir, splits)
    questions, provenance = pope.load_pope(
        label_dir, version=version, splits=splits,
        llava_question_file=questions_path if llava_format else None, allow_unknown_version=allow_unknown_version,
    )
    answers = load_answers(answers_path)
    pairs = match_answers(answers, questions, llava_ids=llava_format, split=split, path=answers_path)
    cell_dir = Path(out) / name
    if (cell_dir / SUMMARY).exists() or records.part_paths(cell_dir):
        raise PruneEvalError(f"{cell_dir} already exists; choose another --name or remove it")
    cell_records = [answer_record(q, a["text"]) for q, a in pairs]
    records.write_part(cell_dir, cell_records)
    model_ids = sorted({str(a.get("model_id")) for _, a in pairs if a.get("model_id")})
    experiment = {"ingested": name, "answers_sha256": records.sha256_file(answers_path),
                  "data": {"name": "pope", "version": version, "splits": list(splits)}, **metadata_fields(metadata)}
    records.atomic_write_json(cell_dir / CELL_FILE, {"name": name, "experiment": experiment})
    records.atomic_write_json(cell_dir / SUMMARY, {
        "status": "complete",
        "schema_version": records.SCHEMA_VERSION,
        "cell": name,
        "experiment": experiment,
        "ingested": {"answers": str(answers_path), "answers_sha256": experiment["answers_sha256"], "model_ids": model_ids,
                     "metadata": {k: v for k, v in (metadata or {}).items() if v is not None}},
        "raw_answer": records.RAW_ANSWER_INGESTED,
        "method": experiment.get("method") or {"name": name, "version": None, "params": {}},
        "data": provenance,
        "metrics": metrics.record_metrics(cell_records, list(splits)),
        "n_questions": len(cell_records),
        "records": [{"file": p.name, "sha256": records.sha256_file(p)} for p in records.part_paths(cell_dir)],
        "environment": environment(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return cell_dir


def format_metrics(summary_metrics: dict) -> str:
    lines = [f"{'rule':6} {'split':12} {'acc':>7} {'prec':>7} {'recall':>7} {'F1':>7} {'yes':>6}"]
    for rule, m in summary_metrics.items():
        for split, s in m["splits"].items():
            lines.append(f"{rule:6} {split:12} {100*s['accuracy']:7.2f} {100*s['precision']:7.2f} {100*s['recall']:7.2f} {100*s['f1']:7.2f} {s['yes_ratio']:6.3f}")
        lines.append(f"{rule:6} {'mean F1':12} {100*m['mean_f1']:7.2f}   (pooled F1 {100*m['pooled_f1']:.2f}, pooled accuracy {100*m['pooled_accuracy']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prune_eval.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, type=Path, help="llava_pope_test.jsonl, or a folder of coco_pope_<split>.json")
    parser.add_argument("--labels", type=Path, help="folder of coco_pope_<split>.json with labels (default: --questions if a folder)")
    parser.add_argument("--answers", required=True, type=Path, help="answer file: JSON lines with question_id and text")
    parser.add_argument("--name", required=True, help="cell name (a folder under --out)")
    parser.add_argument("--out", required=True, type=Path, help="sweep directory to write the cell into")
    parser.add_argument("--pope-version", choices=sorted(pope.KNOWN_VERSIONS), help="POPE question-file version (default: detected from checksums)")
    parser.add_argument("--split", choices=pope.SPLITS, help="the answers cover this split only (POPE-format ids)")
    parser.add_argument("--allow-unknown-version", action="store_true")
    what = parser.add_argument_group("what produced the answers (matches them with published numbers and our own cells)")
    what.add_argument("--model", help="the model, as conf/model names it (e.g. llava-1.5-7b; llava-1.5-7b-original for LLaVA's own layout)")
    what.add_argument("--method", help="the pruning method, as conf/method names it (e.g. visionzip, sparsevlm)")
    what.add_argument("--version", help="the method's algorithm version (sparsevlm: v1, v1.5, v2)")
    what.add_argument("--budget", type=int, help="the visual-token budget (for SparseVLM its nominal 32-layer average)")
    what.add_argument("--quant", help="dtype/quantization, as conf/quant names it (fp16, bf16, int8, ...)")
    what.add_argument("--preprocess", help="image preprocessing, as conf/preprocess names it (pad, crop)")
    args = parser.parse_args(argv)
    try:
        if args.version in pope.KNOWN_VERSIONS:
            raise PruneEvalError(f"--version {args.version} is a POPE question-file version; that is --pope-version now "
                                 "(--version is the method's algorithm version)")
        metadata = choices.check_metadata(model=args.model, method=args.method, version=args.version, budget=args.budget,
                                          quant=args.quant, preprocess=args.preprocess)
        label_dir = args.labels or (args.questions if args.questions.is_dir() else None)
        if label_dir is None:
            raise PruneEvalError("--labels is required with a llava_pope_test.jsonl question file (a folder of coco_pope_<split>.json)")
        if not args.questions.exists():
            raise PruneEvalError(f"question file not found: {args.questions}")
        cell_dir = ingest(args.questions, label_dir, args.answers, name=args.name, out=args.out, version=args.pope_version,
                          split=args.split, allow_unknown_version=args.allow_unknown_version, metadata=metadata)
    except PruneEvalError as e:
        print(f"prune_eval.ingest: error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = json.loads((cell_dir / SUMMARY).read_text())
    print(format_metrics(summary["metrics"]))
    print(f"cell written: {cell_dir}")


if __name__ == "__main__":
    main()
