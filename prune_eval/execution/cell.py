"""Run one cell: lock, resume from its records, answer what is missing shard by shard, write the summary.

A cell's directory is its identity (prune_eval.config.cell_name), so rerunning a sweep finds every
cell again. Only questions without a verified record are answered; parts are written atomically
every `eval.part_size` answers, so a killed job loses at most one part. A failure is written to
`error.json` and the cell returns "failed" instead of raising, so the other cells of the sweep go on.
`model.json` keeps what the model load found out (dtype, quantized modules, commit), so a run killed
after its last part but before summary.json still gets a complete summary from the rerun, which
loads no model.

Shards and locks. A cell's questions are answered in shards: the questions of `eval.shard_images`
images at a time (images in order of first appearance). Batches never cross a shard, so the answers
are the same whether one process computes the cell or several share it. Locks are flocks, which the
kernel drops when their holder dies, even by SIGKILL:
- `<cell>/.lock`, exclusive while a process sets the cell up (cell.json, stale temporary files,
  parts that fail verification) and while it writes summary.json; shared while processes answer.
- `<cell>/.shard-<k>.lock`, exclusive while a process answers shard k; its parts are named
  `part-<n>-s<k>.jsonl` (plain `part-<n>.jsonl` when the cell has one shard), so two processes never
  write the same file.
A process that can take neither the exclusive nor a shared cell lock of a set-up cell within a second
leaves the cell alone ("busy"). One that finds every unanswered shard locked has nothing to do ("busy"). After
its shards a process takes the exclusive lock: if it gets it, nobody else is answering, and it
answers whatever is still missing (a helper that died) and writes the summary; if it does not, the
others are still at work and the last of them writes it ("shared").

Numerics: every record part's footer carries the runtime numerics it was computed under
(`runtime_numerics`). A resumed cell refuses, in one line, to add parts computed under other
numerics (another device, dtype, kernel set or library version) unless `eval.allow_mixed_numerics`
is true; summary.json says which numerics produced which parts and whether mixing was allowed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from prune_eval.analysis import metrics
from prune_eval.analysis.cellfiles import CELL_FILE, ERROR, LOCK, SUMMARY, STATUSES, cell_status, is_locked, read_summary  # noqa: F401
from prune_eval.analysis.compute import summarize_compute
from prune_eval.config import plan_cell
from prune_eval.data import Dataset, load_dataset
from prune_eval.data.pope import Question
from prune_eval.errors import PruneEvalError
from prune_eval.execution import events, faults, records
from prune_eval.execution.engine import Answer, EvalSettings, evaluate_reference
from prune_eval.execution.fast import evaluate_fast
from prune_eval.execution.resident import PROCESS_MODELS, ResidentModels, dynamo_compile_seconds
from prune_eval.models.llm import ATTENTION_BACKENDS, attention_kernels
from prune_eval.provenance import environment
from prune_eval.specs import CellSpec

log = logging.getLogger("prune_eval")
MODEL_INFO = "model.json"  # what the last run that loaded the model found out about it (for the summary)
LOCK_TRIES, LOCK_RETRY_S = 20, 0.025  # `take` tries for half a second; `join` twice as long


class CellLock:
    """The cell's `.lock`, taken exclusively or shared, released and taken again.

    Status probes (cellfiles.is_locked: the report, another sweep's status table) take the lock
    exclusively for a few microseconds; retrying for half a second keeps a probe from passing for a
    computing process and leaving the cell undone as "busy". Changing a held lock's mode is not
    atomic (flock(2)), so another process may get in between; callers check what they find after.
    """

    def __init__(self, cell_dir: Path) -> None:
        cell_dir.mkdir(parents=True, exist_ok=True)
        self.cell_dir = cell_dir
        self.handle = open(cell_dir / LOCK, "a+")
        self.mode: int | None = None

    def take(self, mode: int) -> bool:
        for attempt in range(LOCK_TRIES):
            if self.try_take(mode):
                return True
            if attempt < LOCK_TRIES - 1:
                time.sleep(LOCK_RETRY_S)
        return False

    def join(self) -> bool | None:
        """Take the cell alone (True: exclusive) or beside the processes answering it (False: shared);
        None when neither was possible for a second. Each attempt tries both, so a helper joins a
        cell being answered at once; taking the exclusive lock first, with its half second of retries,
        kept it waiting (0.7 s from a worker's last cell to its help on the last one, in BENCHMARKS.md's
        resident-workers runs). A shared lock on a cell without cell.json is let go: nobody set it up,
        the exclusive lock was held by a status probe for a moment (cellfiles.is_locked), and the
        next attempt takes it to set the cell up."""
        for _ in range(2 * LOCK_TRIES):
            if self.try_take(fcntl.LOCK_EX):
                return True
            if self.try_take(fcntl.LOCK_SH):
                if (self.cell_dir / CELL_FILE).exists():
                    return False
                self.release()
            time.sleep(LOCK_RETRY_S)
        return None

    def try_take(self, mode: int) -> bool:
        """One non-blocking attempt; a failed one leaves no lock held (a failed conversion drops the old one)."""
        try:
            fcntl.flock(self.handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self.mode = None
            return False
        self.mode = mode
        if mode == fcntl.LOCK_EX:  # lock_holder() reads who set the cell up last
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.handle.flush()
        return True

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.mode = None

    def close(self) -> None:
        self.handle.close()  # closing drops any lock still held


@contextmanager
def cell_lock(cell_dir: Path, mode: int = fcntl.LOCK_EX) -> Iterator[bool]:
    """The cell's lock held for a block (exclusive by default); yields False if it cannot be taken."""
    lock = CellLock(Path(cell_dir))
    try:
        yield lock.take(mode)
    finally:
        lock.close()


def try_shard_lock(cell_dir: Path, shard: int):
    """An open handle holding shard `shard`'s exclusive lock, or None if another process holds it."""
    handle = open(cell_dir / f".shard-{shard:04d}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def shard_questions(questions: list[Question], images_per_shard: int) -> list[list[Question]]:
    """Questions grouped by image blocks: shard k holds every question about images k*S .. (k+1)*S-1
    (images in order of first appearance), in the data set's order."""
    image_index: dict[str, int] = {}
    for q in questions:
        image_index.setdefault(q.image, len(image_index))
    shards: list[list[Question]] = [[] for _ in range(-(-len(image_index) // images_per_shard))]
    for q in questions:
        shards[image_index[q.image] // images_per_shard].append(q)
    return shards


def answer_record(answer: Answer) -> dict:
    q, g = answer.question, answer.generation
    return {
        "schema_version": records.SCHEMA_VERSION,
        "key": q.key,
        "split": q.split,
        "question_id": q.question_id,
        "image": q.image,
        "label": q.label,
        "question": q.question,
        "raw_answer": g.text,
        "pred_llava": metrics.parse_llava(g.text),
        "pred_exact": metrics.parse_exact(g.text),
        "visual_tokens": answer.visual_tokens,
        "visual_tokens_per_layer": g.visual_per_layer,
        "prompt_tokens": g.prompt_tokens,
        "new_tokens": len(g.token_ids),
        "stop_reason": g.stop_reason,
    }


def runtime_numerics(settings: EvalSettings, device: torch.device, dtype: torch.dtype) -> dict:
    """What actually computes a part, beyond the configured numerics in the cell's identity: the
    evaluation path used, device type and name, dtype, the SDPA kernels allowed
    (models.llm.attention_kernels), compile, torch and transformers versions."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or device.type
    return {"path": "fast" if settings.fast else "reference", "device_type": device.type, "device_name": name,
            "dtype": str(dtype).removeprefix("torch."), "attention_kernels": list(ATTENTION_BACKENDS),
            "compile": bool(settings.compile), "torch": torch.__version__, "transformers": transformers.__version__}


def numerics_difference(here: dict, there: dict | None) -> str:
    """'device_name: NVIDIA A100 here, NVIDIA H100 there; torch: ...' ('' when equal)."""
    if there is None:
        return "not recorded there (written before numerics were recorded)"
    keys = sorted(set(here) | set(there), key=lambda k: (k not in here, k))
    return "; ".join(f"{k}: {here.get(k)} here, {there.get(k)} there" for k in keys if here.get(k) != there.get(k))


def check_numerics(cell_dir: Path, numerics: dict, *, allow_mixed: bool) -> None:
    """Refuse to add parts computed under other runtime numerics than the cell's existing parts."""
    existing = records.read_records(cell_dir).numerics
    other = {name: numerics_difference(numerics, found) for name, found in existing.items() if found != numerics}
    if not other or allow_mixed:
        if other:
            log.warning("cell %s: mixing numerics as allowed by eval.allow_mixed_numerics: %s", cell_dir.name, next(iter(other.values())))
        return
    name, difference = next(iter(sorted(other.items())))
    raise PruneEvalError(f"{cell_dir.name}: {len(other)} record part(s) were computed under other numerics ({name}: {difference}); "
                         "resuming would mix them in one cell: resume where they were computed, remove the cell's records/ to "
                         "recompute it here, or set eval.allow_mixed_numerics=true (recorded in summary.json)")


def numerics_summary(part_numerics: dict[str, dict], configured: dict | None, allow_mixed: bool) -> dict:
    """For summary.json: the configured numerics, each distinct runtime numerics with its parts
    (`part_numerics`: part file name -> its footer's numerics, as CellRecords.numerics)."""
    groups: list[dict] = []
    for name, found in sorted(part_numerics.items()):
        group = next((g for g in groups if g["numerics"] == found), None)
        if group is None:
            groups.append(group := {"numerics": found, "parts": []})
        group["parts"].append(name)
    return {"configured": configured, "runtime": groups, "mixed": len(groups) > 1, "allow_mixed": allow_mixed}


class PartWriter:
    """Buffers records and writes a part every `part_size` of them, each with its runtime numerics
    (the evaluation path actually taken: eval.fast=auto resolved, the device, ...)."""

    def __init__(self, cell_dir: Path, part_size: int, progress=None, *, shard: int | None = None,
                 numerics: dict | None = None) -> None:
        self.cell_dir, self.part_size, self.progress = cell_dir, part_size, progress
        self.shard, self.numerics = shard, numerics
        self.buffer: list[dict] = []

    def add(self, answers: list[Answer]) -> None:
        faults.checkpoint("batch")
        self.buffer.extend(answer_record(a) for a in answers)
        if self.progress is not None:
            self.progress.update(len(answers))
        if len(self.buffer) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            records.write_part(self.cell_dir, self.buffer, self.numerics, shard=self.shard)
            self.buffer = []


class AnsweredKeys:
    """The questions answered so far in a cell, from its record parts; parts never change once
    written, so each is read once."""

    def __init__(self, cell_dir: Path) -> None:
        self.cell_dir = cell_dir
        self.seen: dict[Path, set[str]] = {}

    def refresh(self) -> set[str]:
        for path in records.part_paths(self.cell_dir):
            if path not in self.seen:
                try:
                    self.seen[path] = {r["key"] for r in records.read_part(path)}
                except (records.BadPart, OSError, UnicodeDecodeError, ValueError):
                    self.seen[path] = set()  # its questions count as unanswered; the set-up moves it aside
        return set().union(*self.seen.values()) if self.seen else set()


def quarantine_bad_parts(cell_records: records.CellRecords) -> None:
    """Move unverifiable parts aside (kept for inspection); their questions are answered again."""
    for path, reason in cell_records.bad_parts:
        target = path.with_name(path.name + f".bad-{int(time.time())}")
        path.rename(target)
        log.warning("record part failed verification and was moved to %s: %s", target.name, reason)


def experiment_json(spec: CellSpec) -> dict:
    return json.loads(json.dumps(spec.experiment, default=str))


def check_existing(cell_dir: Path, spec: CellSpec, questions: list[Question]) -> set[str]:
    """Keys already answered, after checking that the records belong to this experiment. Needs the
    exclusive lock (it removes other processes' temporary files and moves bad parts aside)."""
    cell_file = cell_dir / CELL_FILE
    if cell_file.exists():
        previous = json.loads(cell_file.read_text())
        if previous.get("experiment") != experiment_json(spec):
            raise PruneEvalError(f"{cell_dir} holds records of a different experiment (see {cell_file}); use another sweep name")
    else:
        records.atomic_write_json(cell_file, {"name": spec.name, "experiment": spec.experiment})
    records.remove_stale_temporaries(cell_dir)  # left by a killed run; we hold the cell's lock
    records.remove_stale_temporaries(records.records_dir(cell_dir))
    existing = records.read_records(cell_dir)
    quarantine_bad_parts(existing)
    if existing.conflicts:
        raise PruneEvalError(f"{cell_dir}: {len(existing.conflicts)} question(s) answered twice with different records, e.g. {existing.conflicts[0]}")
    unknown = existing.keys - {q.key for q in questions}
    if unknown:
        raise PruneEvalError(f"{cell_dir} has records for {len(unknown)} question(s) not in the data set, e.g. {sorted(unknown)[0]}; the question files changed")
    return existing.keys


def check_cell_file(cell_dir: Path, spec: CellSpec) -> None:
    """A helper's read-only version of check_existing's first test."""
    try:
        previous = json.loads((cell_dir / CELL_FILE).read_text())
    except (OSError, ValueError):
        return
    if previous.get("experiment") != experiment_json(spec):
        raise PruneEvalError(f"{cell_dir} holds records of a different experiment (see {cell_dir / CELL_FILE}); use another sweep name")


@dataclasses.dataclass
class CellWork:
    """What answering a cell's shards needs, and the model once a shard needed it."""

    spec: CellSpec
    cell_dir: Path
    dataset: Dataset
    models: ResidentModels
    answered: AnsweredKeys
    bundle: object | None = None
    settings: EvalSettings | None = None
    numerics: dict | None = None  # the runtime numerics of this process's parts (runtime_numerics)
    load_s: float = 0.0
    progress: object | None = None

    def model(self):
        if self.bundle is None:
            self.bundle, self.load_s = self.models.get(self.spec, compiled=bool(self.spec.eval.compile))
            records.atomic_write_json(self.cell_dir / MODEL_INFO, self.bundle.info)  # for the summary, should this run die before it
            torch.manual_seed(self.spec.seed)
            e = self.spec.eval
            self.settings = EvalSettings(e.batch_size, e.max_new_tokens, e.stop_when_decided, e.fast_on(self.bundle.device.type),
                                         e.batch_images, e.batch_tokens, bool(e.compile))
            self.numerics = runtime_numerics(self.settings, self.bundle.device, self.bundle.dtype)
        return self.bundle


def answer_shards(work: CellWork, shards: list[list[Question]]) -> int:
    """Answer every shard nobody else is answering; returns how many questions this process answered."""
    spec, cell_dir = work.spec, work.cell_dir
    done = 0
    for k, shard in enumerate(shards):
        if {q.key for q in shard} <= work.answered.refresh():
            continue
        handle = try_shard_lock(cell_dir, k)
        if handle is None:
            continue  # another process answers it
        try:
            answered = work.answered.refresh() & {q.key for q in shard}  # it may have finished the shard meanwhile
            if len(answered) == len(shard):
                continue
            bundle = work.model()
            check_numerics(cell_dir, work.numerics, allow_mixed=spec.eval.allow_mixed_numerics)
            compile_before, started = dynamo_compile_seconds(), time.perf_counter()
            # with several shards, several processes may write parts at once: the shard in the name keeps them apart
            writer = PartWriter(cell_dir, spec.eval.part_size, work.progress, shard=k if len(shards) > 1 else None,
                                numerics=work.numerics)
            evaluate = evaluate_fast if work.settings.fast else evaluate_reference
            with attention_kernels():
                evaluate(bundle, spec.method.impl, dict(spec.params), shard, work.dataset.load_image, preprocess=spec.preprocess,
                         settings=work.settings, seed=spec.seed, on_answers=writer.add, answered=frozenset(answered))
            writer.flush()
            compile_s = dynamo_compile_seconds() - compile_before
            if compile_s >= 1:
                log.info("cell %s: torch.compile took %.1f s while answering shard %d (once per worker and kind of call; "
                         "later cells of this worker reuse the compiled graphs)", spec.name, compile_s, k)
            n = len(shard) - len(answered)
            events.write_event(cell_dir, "computed", shard=k, questions=n, compute_s=round(time.perf_counter() - started - compile_s, 3),
                               compile_s=round(compile_s, 3), load_s=round(work.load_s, 3), fast=work.settings.fast,
                               compiled=work.settings.compile, device=str(bundle.device))
            work.load_s = 0.0  # charged once
            done += n
        finally:
            handle.close()
    return done


def read_model_info(cell_dir: Path) -> dict | None:
    """What the last run that loaded the model recorded about it (model.json), if readable."""
    try:
        info = json.loads((cell_dir / MODEL_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def write_summary(spec: CellSpec, cell_dir: Path, dataset: Dataset, model_info: dict | None, started: float, n_shards: int) -> dict:
    verified = records.read_records(cell_dir)
    if verified.bad_parts or verified.conflicts:
        raise PruneEvalError(f"{cell_dir}: records failed verification after writing: {verified.bad_parts or verified.conflicts}")
    wanted = {q.key for q in dataset.questions}
    if verified.keys != wanted:
        raise PruneEvalError(f"{cell_dir}: {len(wanted - verified.keys)} question(s) still unanswered")
    previous = read_summary(cell_dir) or {}
    summary = {
        "status": "complete",
        "schema_version": records.SCHEMA_VERSION,
        "cell": spec.name,
        "experiment": spec.experiment,
        "config": dict(spec.config),
        "method": {"name": spec.method.name, "version": spec.method.version, "params": dict(spec.params),
                   "uses_seed": spec.method.uses_seed, "text_dependent": spec.method.impl.text_dependent},
        "data": dataset.provenance,
        "model": model_info or previous.get("model") or read_model_info(cell_dir),
        "eval": dataclasses.asdict(spec.eval),
        "metrics": metrics.record_metrics(verified.records, list(spec.experiment["data"]["splits"])),
        "raw_answer": records.RAW_ANSWER_DECODED,
        "compute": summarize_compute(verified.records, hidden=spec.geometry.text_hidden, intermediate=spec.geometry.text_intermediate),
        "numerics": numerics_summary(verified.numerics, spec.experiment.get("numerics"), spec.eval.allow_mixed_numerics),
        "timing": {**events.timing(cell_dir), "shards": n_shards},
        "n_questions": len(verified.records),
        "records": [{"file": name, "sha256": digest} for name, digest in verified.sha256.items()],  # as read and verified above
        "environment": environment(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
    }
    records.atomic_write_json(cell_dir / SUMMARY, summary)
    return summary


def record_error(cell_dir: Path, error: Exception) -> None:
    message = str(error) if isinstance(error, PruneEvalError) else f"{type(error).__name__}: {error}"
    log.error("cell %s failed: %s", cell_dir.name, message)
    try:
        records.atomic_write_json(cell_dir / ERROR, {"message": message, "type": type(error).__name__,
                                                     "traceback": traceback.format_exc(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except PruneEvalError as write_error:  # e.g. the disk is still full: the log keeps the message
        log.error("cell %s: error.json not written: %s", cell_dir.name, write_error)


def progress_bar(total: int, name: str):
    """A tqdm bar in the worker's log: live on a terminal, every 30 s in a log file."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=name[:40], unit="q", mininterval=1 if interactive else 30, disable=total == 0,
                file=sys.stderr, dynamic_ncols=interactive)


def run_cell(cfg: DictConfig | CellSpec, cell_dir: Path, models: ResidentModels | None = None) -> str:
    """Answer one cell's missing questions (resuming) and write its summary, sharing the cell with any
    other process answering it. Returns complete | failed | busy (another process holds the cell, or
    every unanswered shard) | shared (this process did its part; another one finishes the cell).
    Never raises for cell errors."""
    cell_dir = Path(cell_dir)
    lock = CellLock(cell_dir)
    try:
        return _run_cell(cfg, cell_dir, PROCESS_MODELS if models is None else models, lock, time.time())
    finally:
        lock.close()


def _run_cell(cfg, cell_dir: Path, models: ResidentModels, lock: CellLock, started: float) -> str:
    owner = lock.join()
    if owner is None:
        log.warning("cell %s is being computed by another process; left alone", cell_dir)
        return "busy"
    if read_summary(cell_dir) is not None:
        log.info("cell %s is complete; skipped", cell_dir.name)
        return "complete"
    progress = None
    try:
        spec = cfg if isinstance(cfg, CellSpec) else plan_cell(cfg)
        dataset = load_dataset(spec.data)
        dataset.check_images()
        shards = shard_questions(dataset.questions, spec.eval.shard_images)
        work = CellWork(spec, cell_dir, dataset, models, AnsweredKeys(cell_dir))
        if owner:
            answered = check_existing(cell_dir, spec, dataset.questions)
            log.info("cell %s: %d of %d questions to answer", spec.name, len(dataset.questions) - len(answered), len(dataset.questions))
            if not lock.take(fcntl.LOCK_SH):  # share the cell while answering; someone got in between
                if read_summary(cell_dir) is not None:
                    return "complete"
                log.warning("cell %s is being computed by another process; left alone", cell_dir)
                return "busy"
        else:
            check_cell_file(cell_dir, spec)
            left = len(dataset.questions) - len(work.answered.refresh())
            log.info("cell %s: another process is answering it; helping with its free shards (%d of %d questions left)",
                     spec.name, left, len(dataset.questions))
        progress = work.progress = progress_bar(len(dataset.questions) - len(work.answered.refresh()), spec.name)
        done = answer_shards(work, shards)
        lock.release()
        if not lock.take(fcntl.LOCK_EX):  # others are still answering: the last of them writes the summary
            if done:
                return "shared"
            log.warning("cell %s is being computed by another process; left alone", cell_dir)
            return "busy"
        if read_summary(cell_dir) is not None:
            return "complete"
        answered = check_existing(cell_dir, spec, dataset.questions)
        if len(answered) < len(dataset.questions):  # shards whose process died, or left to us
            answer_shards(work, shards)
        summary = write_summary(spec, cell_dir, dataset, work.bundle.info if work.bundle is not None else None, started, len(shards))
    except Exception as e:  # a failing cell records its error; the sweep goes on
        record_error(cell_dir, e)
        return "failed"
    finally:
        if progress is not None:
            progress.close()
    (cell_dir / ERROR).unlink(missing_ok=True)
    log.info("cell %s complete: mean F1 %.4f (llava rule)", spec.name, summary["metrics"]["llava"]["mean_f1"])
    return "complete"
