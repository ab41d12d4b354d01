"""Run one cell: lock, resume from its records, evaluate what is missing, write the summary.

A cell's directory is its identity (prune_eval.config.cell_name), so rerunning a sweep finds every
cell again. Only questions without a verified record are evaluated; parts are written atomically
every `eval.part_size` answers, so a killed job loses at most one part. A failure is written to
`error.json` and the cell returns "failed" instead of raising, so the other cells of the sweep go on.
A second process that finds the cell locked leaves it alone ("busy"). `model.json` keeps what the
model load found out (dtype, quantized modules, commit), so a run killed after its last part but
before summary.json still gets a complete summary from the rerun, which loads no model.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prune_eval.execution import faults, records
from prune_eval.analysis import metrics
from prune_eval.analysis.cellfiles import CELL_FILE, ERROR, LOCK, SUMMARY, STATUSES, cell_status, is_locked, read_summary  # noqa: F401
from prune_eval.analysis.compute import summarize_compute
from prune_eval.config import CellSpec, plan_cell
from prune_eval.data import load_dataset
from prune_eval.data.pope import Question
from prune_eval.execution.engine import Answer, EvalSettings, evaluate_reference
from prune_eval.execution.fast import evaluate_fast
from prune_eval.models.llm import attention_kernels
from prune_eval.errors import PruneEvalError
from prune_eval.provenance import environment

log = logging.getLogger("prune_eval")
MODEL_INFO = "model.json"  # what the last run that loaded the model found out about it (for the summary)
LOCK_TRIES, LOCK_RETRY_S = 20, 0.025  # a busy cell is one still locked after half a second



@contextmanager
def cell_lock(cell_dir: Path) -> Iterator[bool]:
    """An exclusive flock on the cell; yields False if another process holds it. The kernel drops
    the lock when its holder dies, even by SIGKILL, so there are no stale locks.

    Status probes (cellfiles.is_locked: the report, another sweep's status table) take the lock for
    a few microseconds; retrying for half a second keeps a probe from passing for a computing process
    and leaving the cell undone as "busy". A real holder keeps the lock for the whole cell.
    """
    cell_dir.mkdir(parents=True, exist_ok=True)
    with open(cell_dir / LOCK, "a+") as handle:
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    yield False
                    return
                time.sleep(LOCK_RETRY_S)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        handle.flush()
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


class PartWriter:
    """Buffers records and writes a part every `part_size` of them."""

    def __init__(self, cell_dir: Path, part_size: int, progress=None) -> None:
        self.cell_dir, self.part_size, self.progress = cell_dir, part_size, progress
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
            records.write_part(self.cell_dir, self.buffer)
            self.buffer = []


def quarantine_bad_parts(cell_records: records.CellRecords) -> None:
    """Move unverifiable parts aside (kept for inspection); their questions are answered again."""
    for path, reason in cell_records.bad_parts:
        target = path.with_name(path.name + f".bad-{int(time.time())}")
        path.rename(target)
        log.warning("record part failed verification and was moved to %s: %s", target.name, reason)


def check_existing(cell_dir: Path, spec: CellSpec, questions: list[Question]) -> set[str]:
    """Keys already answered, after checking that the records belong to this experiment."""
    cell_file = cell_dir / CELL_FILE
    if cell_file.exists():
        previous = json.loads(cell_file.read_text())
        if previous.get("experiment") != json.loads(json.dumps(spec.experiment, default=str)):
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


def evaluate_missing(cfg: DictConfig, spec: CellSpec, cell_dir: Path, dataset, answered: set[str]) -> dict:
    """Load the model and answer the questions not yet `answered`; returns the model info."""
    from tqdm import tqdm

    from prune_eval.models import loading
    from prune_eval.models.quant import check_backend, precision_of

    precision = precision_of(cfg.quant)
    device = loading.resolve_device(str(cfg.device))
    check_backend(precision, device, (spec.geometry.text_hidden, spec.geometry.text_intermediate))
    torch.manual_seed(int(cfg.seed))
    bundle = loading.load(cfg.model, dtype=precision.dtype, device=device, quantization_config=precision.quantization_config)
    bundle.info["quantization"] = {"name": precision.name, "scope": cfg.quant.get("scope"), "skipped_modules": precision.skipped_modules,
                                   "n_quantized_modules": len(bundle.info["quantized_modules"])}
    records.atomic_write_json(cell_dir / MODEL_INFO, bundle.info)  # for the summary, should this run die before it
    faults.checkpoint("load")
    settings = EvalSettings.from_config(cfg.eval)
    if settings.compile:
        bundle.lm = bundle.lm.compiled()
    progress = tqdm(total=len(dataset.questions) - len(answered), desc=spec.name[:40], unit="q", mininterval=5, disable=None)
    writer = PartWriter(cell_dir, int(cfg.eval.part_size), progress)
    evaluate = evaluate_fast if settings.fast else evaluate_reference
    with attention_kernels():
        evaluate(
            bundle, spec.method, spec.params, dataset.questions, dataset.load_image,
            preprocess=str(cfg.preprocess.name), settings=settings, seed=int(cfg.seed), on_answers=writer.add,
            answered=frozenset(answered),
        )
    writer.flush()
    progress.close()
    return bundle.info


def read_model_info(cell_dir: Path) -> dict | None:
    """What the last run that loaded the model recorded about it (model.json), if readable."""
    try:
        info = json.loads((cell_dir / MODEL_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def write_summary(cfg: DictConfig, spec: CellSpec, cell_dir: Path, dataset, model_info: dict | None, started: float) -> dict:
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
        "config": OmegaConf.to_container(cfg, resolve=True),
        "method": {"name": spec.method.name, "version": spec.method.version, "params": spec.params,
                   "uses_seed": spec.method.uses_seed, "text_dependent": spec.method.text_dependent},
        "data": dataset.provenance,
        "model": model_info or previous.get("model") or read_model_info(cell_dir),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "metrics": metrics.record_metrics(verified.records, list(cfg.data.splits)),
        "compute": summarize_compute(verified.records, hidden=spec.geometry.text_hidden, intermediate=spec.geometry.text_intermediate),
        "n_questions": len(verified.records),
        "records": [{"file": p.name, "sha256": records.sha256_file(p)} for p in records.part_paths(cell_dir)],
        "environment": environment(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
    }
    records.atomic_write_json(cell_dir / SUMMARY, summary)
    return summary


def run_cell(cfg: DictConfig, cell_dir: Path) -> str:
    """Evaluate one cell to completion (resuming); returns its status, never raises for cell errors."""
    cell_dir = Path(cell_dir)
    started = time.time()
    with cell_lock(cell_dir) as acquired:
        if not acquired:
            log.warning("cell %s is being computed by another process; left alone", cell_dir)
            return "busy"
        if read_summary(cell_dir) is not None:
            log.info("cell %s is complete; skipped", cell_dir.name)
            return "complete"
        try:
            spec = plan_cell(cfg)
            dataset = load_dataset(cfg.data)
            dataset.check_images()
            answered = check_existing(cell_dir, spec, dataset.questions)
            remaining = len(dataset.questions) - len(answered)
            log.info("cell %s: %d of %d questions to answer", spec.name, remaining, len(dataset.questions))
            model_info = evaluate_missing(cfg, spec, cell_dir, dataset, answered) if remaining else None
            summary = write_summary(cfg, spec, cell_dir, dataset, model_info, started)
        except Exception as e:  # a failing cell records its error; the sweep goes on
            message = str(e) if isinstance(e, PruneEvalError) else f"{type(e).__name__}: {e}"
            log.error("cell %s failed: %s", cell_dir.name, message)
            try:
                records.atomic_write_json(cell_dir / ERROR, {"message": message, "type": type(e).__name__,
                                                             "traceback": traceback.format_exc(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            except PruneEvalError as write_error:  # e.g. the disk is still full: the log keeps the message
                log.error("cell %s: error.json not written: %s", cell_dir.name, write_error)
            return "failed"
        (cell_dir / ERROR).unlink(missing_ok=True)
        log.info("cell %s complete: mean F1 %.4f (llava rule)", spec.name, summary["metrics"]["llava"]["mean_f1"])
        return "complete"
