"""Bad-input campaign: feed it anything; every case ends in one clean line or a correct result.

Property-based (hypothesis, derandomized so CI sees the same cases every run): fuzzed overrides for
every config group and plain key (checked in-process with the CLI's own preflight), fuzzed and
truncated question files, answer files for the ingest command, record parts and summaries for the
report, and image files. An outcome is
- a clean error: a PruneEvalError whose message is one line (what the CLI prints, exit 2) and names
  the bad key, value, file or line;
- a correct result: the input is valid by an independent check here, and what came out is right
  (the question file's rows, the ingested answers' parsed predictions, the verified records);
- a failure: anything else (another exception, a multi-line message, something invalid accepted).
Each test prints its counts; failures must be 0. NaN logits and a full disk: tests/test_integrity.py.
"""

from __future__ import annotations

import io
import json
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import POPE

from prune_eval.execution import records
from prune_eval.analysis import cellfiles, metrics, report
from prune_eval.config import GROUPS, MAX_NEW_TOKENS, group_choices
from prune_eval.data import pope
from prune_eval.errors import PruneEvalError

def fuzz(examples: int) -> settings:
    """Derandomized (the same cases on every run and machine), no deadline, no example database."""
    return settings(derandomize=True, deadline=None, database=None, max_examples=examples, suppress_health_check=list(HealthCheck))


class Outcomes(Counter):
    """clean error / correct result / failure counts of one campaign, and the first failures."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.failures = name, []

    def error(self, error: BaseException, *names: object) -> None:
        message = str(error)
        named = any(str(n) and str(n) in message for n in names)
        lines = message.split("\n")  # what a terminal breaks on (str.splitlines also splits on \x1c, \x85, ...)
        one_line = len(lines) == 1 or (re.fullmatch(r"\d+ of \d+ job\(s\) are invalid; nothing was launched:", lines[0] if lines else "")
                                        and all(line.startswith("  ") for line in lines[1:]))  # the sweeper: one line per invalid job
        if isinstance(error, PruneEvalError) and one_line and "\r" not in message and (named or not names):
            self["clean error"] += 1
        else:
            self.fail(f"{type(error).__name__}: {message[:300]!r} (expected to name one of {names})")

    def correct(self) -> None:
        self["correct result"] += 1

    def fail(self, why: str) -> None:
        self["failure"] += 1
        self.failures.append(why)

    def report(self) -> str:
        tried = sum(self.values())
        line = f"{self.name}: {tried} cases, {self['clean error']} clean errors, {self['correct result']} correct results, {self['failure']} failures"
        print("\n" + line)
        assert self["failure"] == 0, line + "\n  " + "\n  ".join(self.failures[:10])
        return line


# ------------------------------------------------------------------------------------------------
# Overrides for every group and plain key, through prune_eval.__main__.preflight
KEYS = {  # key -> the overrides it needs beside experiment=demo
    **{group: [] for group in GROUPS},
    "budget": [], "seed": [], "device": [], "name": [],
    **{f"eval.{k}": [] for k in ("batch_size", "max_new_tokens", "part_size", "batch_images", "batch_tokens",
                                  "fast", "stop_when_decided", "compile")},
    "data.n_images": [], "data.seed": [], "data.splits": [], "data.version": [], "quant.dtype": [], "model.init_seed": [],
    "method.dominant": ["method=visionzip", "budget=64"], "method.contextual": ["method=visionzip", "budget=64"],
    "method.version": ["method=sparsevlm", "budget=64"], "method.layer_rule": ["method=sparsevlm", "budget=64"],
    "method.scale": ["method=sparsevlm", "budget=64", "method.version=v1"],
    "quant.threshold": ["quant=int8"], "quant.scope": ["quant=int8"],
}
WORDS = ["true", "false", "null", "", "''", "abc", "1e3", "0x10", "-0", "1_000", "[]", "[1,2]", "[random]", "[random,random]",
         "[adversarial,popular]", "{a:1}", "${nope}", "${oc.env:PRUNE_EVAL_NOT_SET}", "${budget}", "${seed}", "v1", "v1.5", "v2",
         "1", "2.5", "nan", "inf", "-inf", "llava-1.5", "latest", "cpu", "cuda:0", "cuda:x", "auto", "pad", "crop", "official",
         "scaled", "float16", "fp16", "nf4", "visionzip", "vanila", "tiny", "demo", "pope", "pope-synthetic", "local", "llm", "all",
         "glob(*)", "range(0,3)", "choice(a,b)", "'quoted value'", "a b", "é", "99999999999999999999999"]
VALUES = st.one_of(
    st.sampled_from(WORDS),
    st.integers(-2**70, 2**70).map(str),
    st.integers(-3, 700).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12),
    st.text(max_size=10),  # anything: grammar errors included
)


def parsed(key: str, value: str):
    """Hydra's reading of the override (its grammar), or raises if it cannot parse it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{key}={value}")


def validate(args: list[str]) -> None:
    """What happens before anything runs: the CLI's preflight, and for a sweep (-m) the prune_eval
    sweeper's validation of every job (sweep.plan_jobs), with Hydra's own config loader."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from prune_eval.execution import sweep
    from prune_eval.__main__ import preflight
    from prune_eval.config import CONF_DIR, explain_composition_error

    preflight(args)
    if "-m" not in args:
        return
    overrides = [a for a in args if a != "-m"]
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    try:
        jobs = BasicSweeper.split_arguments(OverridesParser.create(config_loader=loader).parse_overrides(overrides), None)[0]
    except Exception as e:  # as the sweeper would meet it: Hydra's own one-line-or-not error
        raise explain_composition_error(e, overrides, lambda o: None) from None

    def compose_job(job: list[str]):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=job)

    sweep.plan_jobs(jobs, compose_job)


def allowed(key: str, value) -> bool | None:
    """An independent statement of what each key accepts (None: not judged here)."""
    def whole(v, low, high=None):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v <= high)

    if isinstance(value, str) and "${" in value:
        return None  # an interpolation: judged by what it resolves to
    if key in GROUPS:
        return isinstance(value, str) and value in group_choices(key)
    checks = {
        "budget": lambda v: whole(v, 1, 576), "seed": lambda v: whole(v, 0, 2**63 - 1), "model.init_seed": lambda v: whole(v, 0),
        "data.n_images": lambda v: whole(v, 1), "data.seed": lambda v: whole(v, 0), "data.version": lambda v: str(v) == "1",
        "data.splits": lambda v: isinstance(v, list) and 0 < len(v) == len(set(map(str, v))) and all(s in pope.SPLITS for s in v),
        "eval.max_new_tokens": lambda v: whole(v, 1, MAX_NEW_TOKENS), "quant.dtype": lambda v: v == "float32",
    }
    checks.update({f"eval.{k}": (lambda v: whole(v, 1)) for k in ("batch_size", "part_size", "batch_images", "batch_tokens")})
    checks.update({f"eval.{k}": (lambda v: isinstance(v, bool)) for k in ("fast", "stop_when_decided", "compile")})
    return checks[key](value) if key in checks else None


def test_fuzzed_overrides_for_every_group_and_key() -> None:
    outcomes = Outcomes("overrides (preflight and the sweeper's validation, in-process)")

    @fuzz(160)  # each case composes the config twice (~0.2 s on CI's 2 cores); every key several times
    @given(key=st.sampled_from(sorted(KEYS)), value=VALUES, multirun=st.booleans())
    def case(key: str, value: str, multirun: bool) -> None:
        override = f"{key}={value}"
        args = (["-m"] if multirun else []) + ["experiment=demo", *KEYS[key], override]
        try:
            validate(args)
        except Exception as e:
            outcomes.error(e, key.split(".")[-1], value, override)
            return
        try:
            seen = parsed(key, value)
        except Exception:
            outcomes.fail(f"{override}: accepted, but Hydra cannot parse it")
            return
        values = [seen.value()] if not seen.is_sweep_override() else None
        if values is None:  # range(...), glob(...), a,b: every job was validated above
            outcomes.correct()
        elif allowed(key, values[0]) is False:
            outcomes.fail(f"{' '.join(args)}: accepted although {values[0]!r} is not allowed for {key}")
        else:
            outcomes.correct()

    case()
    outcomes.report()


# ------------------------------------------------------------------------------------------------
# Question files: fuzzed rows, junk lines, truncation
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ROW = st.fixed_dictionaries({
    "question_id": st.one_of(st.integers(1, 12), st.integers(1, 12).map(str), JUNK),
    "image": st.one_of(st.sampled_from(["COCO_a.jpg", "COCO_b.jpg"]), JUNK),
    "text": st.one_of(st.sampled_from(["Is there a cat in the image?", "Is there a dog in the image?"]), JUNK),
    "label": st.one_of(st.sampled_from(["yes", "no", "Yes", " no "]), JUNK),
})
LINE = st.one_of(
    ROW.map(lambda r: json.dumps(r).encode()),
    st.tuples(ROW, st.sampled_from(["question_id", "image", "text", "label"])).map(lambda t: json.dumps({k: v for k, v in t[0].items() if k != t[1]}).encode()),
    st.binary(max_size=12),
    st.text(max_size=12).map(str.encode),
    st.just(b""),
)
CLEAN_ROW = st.fixed_dictionaries({"question_id": st.integers(1, 10**6), "image": st.sampled_from(["COCO_a.jpg", "COCO_b.jpg"]),
                                   "text": st.text(min_size=1, max_size=10), "label": st.sampled_from(["yes", "no"])})


def expected_questions(data: bytes) -> list[tuple] | None:
    """The questions a valid POPE file holds, parsed independently; None if the file is invalid."""
    out, seen = [], set()
    for raw in data.split(b"\n"):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(row, dict) or not {"question_id", "image", "text", "label"} <= set(row):
            return None
        qid = row["question_id"]
        if isinstance(qid, str) and qid.strip().lstrip("-").isdigit():
            qid = int(qid)
        if not isinstance(qid, int) or isinstance(qid, bool) or qid in seen:
            return None
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no") or not isinstance(row["text"], str) or not isinstance(row["image"], str):
            return None
        seen.add(qid)
        out.append(("random", qid, row["image"], row["text"], label))
    return out


def check_question_file(outcomes: Outcomes, folder: Path, data: bytes) -> None:
    path = pope.pope_file(folder, "random")
    path.write_bytes(data)
    expected = expected_questions(data)
    try:
        questions, _ = pope.load_pope(folder, version="llava-1.5", splits=("random",), allow_unknown_version=True)
    except Exception as e:
        if expected is not None:
            outcomes.fail(f"valid file rejected: {e}")
        else:
            outcomes.error(e, path)
        return
    got = [(q.split, q.question_id, q.image, q.question, q.label) for q in questions]
    if expected is None or got != expected:
        outcomes.fail(f"{data[:200]!r}: loaded {got[:3]} but expected {expected if expected is None else expected[:3]}")
    else:
        outcomes.correct()


def test_fuzzed_and_truncated_question_files(tmp_path) -> None:
    outcomes = Outcomes("question files (fuzzed rows and lines, truncated)")

    @fuzz(250)
    @given(lines=st.lists(LINE, max_size=6), clean=st.lists(CLEAN_ROW, max_size=4), cut=st.none() | st.integers(0, 400))
    def fuzzed(lines, clean, cut) -> None:
        data = b"\n".join([*(json.dumps(r).encode() for r in clean), *lines]) + b"\n"
        check_question_file(outcomes, tmp_path, data if cut is None else data[:cut])

    full = (POPE / "llava-1.5" / "coco_pope_random.json").read_bytes()

    @fuzz(40)
    @given(cut=st.integers(0, len(full)))
    def truncated(cut) -> None:
        check_question_file(outcomes, tmp_path, full[:cut])
        if cut < len(full):  # without allow_unknown_version a truncated file is never taken for POPE
            try:
                pope.load_pope(tmp_path, version="llava-1.5", splits=("random",))
                outcomes.fail(f"a file truncated at byte {cut} passed as POPE llava-1.5")
            except Exception as e:
                outcomes.error(e, "not a known POPE version")

    fuzzed()
    truncated()
    outcomes.report()


@pytest.mark.parametrize("case", ["llava file vs latest labels", "latest files as llava-1.5", "llava file truncated"])
def test_label_files_from_another_pope_version(case, tmp_path) -> None:
    """LLaVA's question file joined with labels of another POPE version is an error, never a zip."""
    llava = POPE / "llava-1.5" / "llava_pope_test.jsonl"
    if case == "llava file vs latest labels":
        call, expected = dict(question_dir=POPE / "latest", version="latest", llava_question_file=llava), "different POPE versions"
    elif case == "latest files as llava-1.5":
        call, expected = dict(question_dir=POPE / "latest", version="llava-1.5"), "are POPE 'latest'"
    else:
        short = tmp_path / "llava_pope_test.jsonl"
        short.write_bytes(b"".join(llava.read_bytes().splitlines(keepends=True)[:-10]))
        call, expected = dict(question_dir=POPE / "llava-1.5", version="llava-1.5", llava_question_file=short), "lacks 10 labelled POPE question(s)"
    with pytest.raises(PruneEvalError, match=re.escape(expected)) as raised:
        pope.load_pope(**call)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------------
# Answer files for the ingest command
LABELS = {split: [(qid, f"COCO_{split}_{(qid - 1) // 2}.jpg", f"Is there a {obj} in the image?", label)
                  for qid, (obj, label) in enumerate([("cat", "yes"), ("dog", "no"), ("car", "yes"), ("cup", "no")], start=1)]
          for split in ("popular", "random")}


def write_labels(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for split, rows in LABELS.items():
        pope.pope_file(folder, split).write_text("".join(json.dumps({"question_id": q, "image": i, "text": t, "label": lab}) + "\n"
                                                         for q, i, t, lab in rows))
    return folder


ANSWER = st.fixed_dictionaries(
    {"question_id": st.one_of(st.integers(1, 4), st.integers(1, 4).map(str), JUNK),
     "text": st.one_of(st.sampled_from(["Yes", "No", "yes.", "No, there is not.", "", "Maybe"]), JUNK),
     "category": st.one_of(st.sampled_from(["popular", "random"]), JUNK)},
    optional={"prompt": st.one_of(st.sampled_from(["Is there a cat in the image?", "What?", ""]), JUNK)},
)


def expected_ingest(answers: list) -> dict | None:
    """{key: text} if the answers name every question exactly once, validly; else None."""
    by_key = {}
    questions = {f"{s}/{q}": t for s, rows in LABELS.items() for q, _, t, _ in rows}
    for a in answers:
        if not isinstance(a, dict) or "question_id" not in a or "text" not in a:
            return None
        qid = a["question_id"]
        if isinstance(qid, str) and qid.strip().lstrip("-").isdigit():
            qid = int(qid)
        if not isinstance(qid, int) or isinstance(qid, bool):
            return None
        key = f"{a.get('category')}/{qid}"
        if key not in questions or key in by_key or not isinstance(a["text"], str):
            return None
        if a.get("prompt") is not None and not str(a["prompt"]).startswith(questions[key]):
            return None
        by_key[key] = a["text"]
    return by_key if len(by_key) == len(questions) else None


def test_fuzzed_answer_files_for_ingest(tmp_path) -> None:
    from prune_eval.analysis.ingest import ingest

    labels = write_labels(tmp_path / "pope")
    outcomes = Outcomes("answer files (ingest)")
    counter = iter(range(10**6))
    valid_answers = [{"question_id": q, "text": "Yes" if q % 2 else "No", "category": s} for s, rows in LABELS.items() for q, *_ in rows]

    @fuzz(150)
    @given(answers=st.lists(ANSWER, max_size=9), drop=st.sets(st.integers(0, 7), max_size=2), texts=st.lists(st.text(max_size=12), min_size=8, max_size=8),
           junk=st.lists(st.binary(max_size=8), max_size=1), cut=st.none() | st.integers(0, 300))
    def case(answers, drop, texts, junk, cut) -> None:
        rows = [{**a, "text": t} for i, (a, t) in enumerate(zip(valid_answers, texts)) if i not in drop] + answers
        data = "".join(json.dumps(a) + "\n" for a in rows).encode() + b"".join(j + b"\n" for j in junk)
        if cut is not None:
            data = data[:cut]
        path = tmp_path / f"answers-{next(counter)}.jsonl"
        path.write_bytes(data)
        try:
            expected = expected_ingest([json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()])
        except (ValueError, UnicodeDecodeError):
            expected = None
        try:
            cell = ingest(labels, labels, path, name=path.stem, out=tmp_path / "out", version="llava-1.5", splits=("popular", "random"),
                          allow_unknown_version=True)
        except Exception as e:
            if expected is not None:
                outcomes.fail(f"valid answers rejected: {e}")
            else:
                outcomes.error(e, path)
            return
        loaded = cellfiles.load_cell(cell)
        if expected is None or isinstance(loaded, str):
            outcomes.fail(f"{data[:200]!r}: ingested ({loaded if isinstance(loaded, str) else 'verified'}) but expected an error")
            return
        got = dict(zip(loaded.keys, loaded.pred["llava"]))
        want = {k: metrics.parse_llava(t) for k, t in expected.items()}  # the text as stored, not stripped (eval_pope.py)
        outcomes.correct() if got == want else outcomes.fail(f"predictions {got} != {want}")

    case()
    outcomes.report()


# ------------------------------------------------------------------------------------------------
# Record parts and summaries, as the report reads them
def good_records(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        answer = ["Yes", "No", "Yes."][i % 3]
        rows.append({"schema_version": 1, "key": f"random/{i + 1}", "split": "random", "question_id": i + 1, "image": f"im{i // 2}.jpg",
                     "label": ["yes", "no"][i % 2], "question": "Is there a cat?", "raw_answer": answer, "pred_llava": metrics.parse_llava(answer),
                     "pred_exact": metrics.parse_exact(answer), "visual_tokens": 64, "new_tokens": 2, "stop_reason": "eos"})
    return rows


def write_cell(folder: Path, parts: list[bytes], summary: dict | None = None) -> Path:
    cell = folder / "cell"
    (cell / "records").mkdir(parents=True)
    for i, data in enumerate(parts):
        (cell / "records" / f"part-{i:05d}.jsonl").write_bytes(data)
    listed = [{"file": p.name, "sha256": records.sha256_file(p)} for p in records.part_paths(cell)]
    base = {"status": "complete", "schema_version": 1, "cell": "cell", "n_questions": None, "records": listed,
            "experiment": {"method": {"name": "vanilla", "params": {}}, "seed": 0}}
    (cell / "summary.json").write_text(json.dumps(base if summary is None else {**base, **summary}))
    return cell


def check_cell(outcomes: Outcomes, folder: Path, expect_usable: bool | None) -> None:
    """load_cell and the report's inventory and analysis never raise on whatever the cell holds."""
    try:
        loaded = cellfiles.load_cell(folder / "cell")
        entries = report.inventory(folder)
        report.analyse(folder, n_resamples=100)
    except Exception as e:
        outcomes.fail(f"{type(e).__name__}: {e}")
        return
    (entry,) = entries
    usable = not isinstance(loaded, str)
    if expect_usable is not None and usable != expect_usable:
        outcomes.fail(f"usable={usable}, expected {expect_usable}: {loaded if isinstance(loaded, str) else 'loaded'}")
    elif usable:
        outcomes.correct() if entry.status == "complete" else outcomes.fail(f"loaded but reported {entry.status}")
    else:
        outcomes.error(PruneEvalError(entry.note))  # the report's one-line reason for leaving the cell out


MUTATION = st.tuples(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate line", "swap lines"]),
                     st.integers(0, 10**6), st.binary(min_size=1, max_size=4))


def mutate(data: bytes, mutation) -> bytes:
    kind, at, junk = mutation
    at %= max(len(data), 1)
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (junk[0] or 1)]) + data[at + 1:]
    if kind == "delete":
        return data[:at] + data[at + len(junk):]
    if kind == "insert":
        return data[:at] + junk + data[at:]
    if kind == "truncate":
        return data[:at]
    lines = data.splitlines(keepends=True)
    i = at % len(lines)
    if kind == "duplicate line":
        return b"".join(lines[: i + 1] + lines[i:])
    j = (i + 1) % len(lines)
    lines[i], lines[j] = lines[j], lines[i]
    return b"".join(lines)


def test_fuzzed_record_parts_and_summaries(tmp_path) -> None:
    outcomes = Outcomes("record parts and summaries (read_part, load_cell, report)")
    original = records.encode_part(good_records())
    counter = iter(range(10**6))

    def folder() -> Path:
        path = tmp_path / str(next(counter))
        path.mkdir()
        return path

    @fuzz(120)
    @given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
    def mutated_part(mutations) -> None:
        data = original
        for m in mutations:
            data = mutate(data, m)
        path = tmp_path / "part-00000.jsonl"
        path.write_bytes(data)
        try:
            rows = records.read_part(path)
        except records.BadPart as e:
            outcomes.error(PruneEvalError(str(e).replace("\n", " ")), path)
        except Exception as e:
            outcomes.fail(f"read_part: {type(e).__name__}: {e}")
        else:
            outcomes.correct() if data == original and rows == good_records() else outcomes.fail(f"a changed part verified: {data[:200]!r}")

    FIELD = st.sampled_from(list(records.RECORD_FIELDS))
    JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)

    @fuzz(120)
    @given(edits=st.lists(st.tuples(st.integers(0, 5), FIELD, JSON), max_size=3), raw=st.lists(JSON, max_size=1))
    def footer_valid_part(edits, raw) -> None:
        rows = good_records()
        for i, key, value in edits:
            rows[i] = {**rows[i], key: value}
        cell_folder = folder()
        write_cell(cell_folder, [records.encode_part(rows + raw)])
        pristine = not raw and rows == good_records()
        check_cell(outcomes, cell_folder, True if pristine else None)

    SUMMARY_KEY = st.sampled_from(["status", "n_questions", "records", "experiment", "method", "cell", "config", "compute", "data", "model"])

    @fuzz(80)
    @given(edits=st.dictionaries(SUMMARY_KEY, JSON, max_size=3))
    def fuzzed_summary(edits) -> None:
        cell_folder = folder()
        write_cell(cell_folder, [original], edits)
        check_cell(outcomes, cell_folder, None)

    mutated_part()
    footer_valid_part()
    fuzzed_summary()
    outcomes.report()


# ------------------------------------------------------------------------------------------------
# Image files: random bytes, truncated images, odd modes and sizes
def image_bytes(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# PNG "I;16": 16-bit grayscale (Pillow 13 no longer writes 32-bit "I" as PNG)
FORMATS = {"PNG": ("RGB", "L", "P", "RGBA", "I;16", "1", "LA"), "JPEG": ("RGB", "L", "CMYK"), "GIF": ("P", "L"), "BMP": ("RGB", "L"),
           "TIFF": ("RGB", "I;16", "F", "CMYK")}
IMAGE = st.sampled_from([(f, m) for f, modes in FORMATS.items() for m in modes]).flatmap(
    lambda fm: st.tuples(st.just(fm[0]), st.just(fm[1]), st.tuples(st.integers(1, 500), st.integers(1, 500)), st.integers(0, 99)))


def test_fuzzed_image_files(tmp_path) -> None:
    from prune_eval.data.images import directory_loader, preprocess
    from prune_eval.models import tiny

    processor = tiny.build_image_processor()
    load = directory_loader(tmp_path)
    outcomes = Outcomes("image files (directory loader + pad/crop preprocessing)")

    @fuzz(120)
    @given(image=IMAGE, damage=st.none() | st.tuples(st.sampled_from(["truncate", "flip", "garbage", "empty"]), st.integers(0, 10**6)))
    def case(image, damage) -> None:
        fmt, mode, size, seed = image
        data = image_bytes(mode, size, fmt, seed)
        if damage is not None:
            kind, at = damage
            at %= len(data)
            data = {"truncate": data[:at], "flip": data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:],
                    "garbage": bytes(np.random.default_rng(at).integers(0, 256, 64, dtype=np.uint8)), "empty": b""}[kind]
        (tmp_path / "x.img").write_bytes(data)
        try:
            loaded = load("x.img")
        except Exception as e:
            outcomes.error(e, tmp_path / "x.img")
            return
        if damage is None and loaded.size != size:
            outcomes.fail(f"{fmt} {mode} {size} loaded as {loaded.size}")
            return
        for convention in ("pad", "crop"):
            pixels = preprocess([loaded], convention, processor)
            if pixels.shape != (1, 3, 336, 336) or not bool(np.isfinite(pixels.numpy()).all()):
                outcomes.fail(f"{fmt} {mode} {size} {damage}: pixel values {tuple(pixels.shape)}")
                return
        outcomes.correct()  # a decodable image (possibly damaged in a way no decoder can see) gives valid pixels

    case()
    missing = tmp_path / "nowhere.jpg"
    try:
        load(missing.name)
        outcomes.fail("a missing image loaded")
    except Exception as e:
        outcomes.error(e, missing)
    outcomes.report()
