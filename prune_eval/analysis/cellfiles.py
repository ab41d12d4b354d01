"""A cell directory as the analysis side sees it: status, summary and verified records, without torch.

Why a separate module: `prune_eval.execution.cell` runs cells and so imports torch; the report, the metrics and
the statistics must not (ARCHITECTURE.md: "a user can analyse results on a laptop"). Everything here
is the standard library and numpy. `prune_eval.execution.cell` can import its status helpers from here so
there is one definition of what "complete", "failed", "partial", "missing" and "busy" mean.

`load_cell` turns a complete cell into arrays, or into one sentence saying why it cannot be used:
parts that fail their footer check, questions answered twice differently, records that do not match
the summary that was written over them, labels or predictions outside POPE's vocabulary. The report
shows that sentence; it never compares a cell it could not verify.
"""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prune_eval.execution import records
from prune_eval.analysis import metrics
SUMMARY, ERROR, CELL_FILE, LOCK = "summary.json", "error.json", "cell.json", ".lock"
STATUSES = ("complete", "failed", "partial", "missing", "busy")


def is_locked(cell_dir: Path) -> bool:
    """True while a live process holds the cell's flock (the kernel drops it when that process dies)."""
    path = Path(cell_dir) / LOCK
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def read_summary(cell_dir: Path) -> dict | None:
    """The cell's summary if it exists, parses and says the cell is complete; else None."""
    try:
        summary = json.loads((Path(cell_dir) / SUMMARY).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "complete" else None


HANDOVER_S = 0.06  # > prune_eval.execution.cell.LOCK_RETRY_S (0.025 s): a lock handover's longest gap


def cell_status(cell_dir: Path) -> str:
    """One of STATUSES. A complete summary wins; then a held lock, an error file, records so far."""
    cell_dir = Path(cell_dir)
    if read_summary(cell_dir) is not None:
        return "complete"
    if is_locked(cell_dir):
        return "busy"
    if read_summary(cell_dir) is not None:  # finished (summary written, lock released) between the two looks
        return "complete"
    if (cell_dir / ERROR).exists():
        return "failed"
    if records.part_paths(cell_dir):
        # A process finishing a cell changes its lock from shared to exclusive, which is not atomic
        # (flock(2)), and retries every 25 ms when a probe like this one held the lock: for that long the
        # cell can look unlocked and without a summary. Look once more after such a retry.
        time.sleep(HANDOVER_S)
        if read_summary(cell_dir) is not None:
            return "complete"
        return "busy" if is_locked(cell_dir) else "partial"
    return "missing"


def lock_holder(cell_dir: Path) -> str:
    """'pid P on HOST' of the process that last took the cell's lock (prune_eval.execution.cell writes it), or ''."""
    try:
        host, _, pid = (Path(cell_dir) / LOCK).read_text().strip().rpartition(" ")
    except (OSError, UnicodeDecodeError):
        return ""
    return f"pid {pid} on {host}" if host and pid.isdigit() else ""


def error_message(cell_dir: Path) -> str:
    """First line of error.json's message, or why it cannot be read."""
    try:
        return json.loads((Path(cell_dir) / ERROR).read_text())["message"].splitlines()[0]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "(error.json unreadable)"


@dataclass(frozen=True)
class CellData:
    """The verified records of one complete cell as aligned arrays, questions sorted by key."""

    name: str
    path: Path
    summary: dict
    keys: np.ndarray  # (N,) question keys 'split/id', sorted
    split: np.ndarray  # (N,)
    image: np.ndarray  # (N,) the resampling cluster
    label: np.ndarray  # (N,) 'yes' / 'no'
    pred: dict  # parsing rule -> (N,) 'yes' / 'no' / 'other'
    visual_tokens: float | None  # mean over records; None when not recorded (ingested answers)
    numerics: dict | None = None  # part file -> the runtime numerics in its footer (None: not recorded)


# The parts of summary.json the report reads, and what each must be when present (None = absent).
STR_LIST = ("list of strings",)
SUMMARY_SHAPE = {
    "cell": str,
    "experiment": {"method": {"name": str, "params": dict}, "model": dict, "data": {"splits": STR_LIST}, "quant": dict},
    "method": {"name": str, "params": dict},
    "model": dict, "data": dict, "config": dict, "compute": dict, "numerics": dict,
    "ingested": {"model_ids": STR_LIST},
}


def _shape_error(node: dict, shape: dict, where: str = "") -> str | None:
    """Where `node` departs from `shape` (nested dicts, types, STR_LIST), or None."""
    for key, want in shape.items():
        value = node.get(key)
        if value is None:
            continue
        if isinstance(want, dict):
            if not isinstance(value, dict):
                return f"{where}{key} is a {type(value).__name__}, not an object"
            nested = _shape_error(value, want, f"{where}{key}.")
            if nested:
                return nested
        elif want is STR_LIST:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                return f"{where}{key} is not a list of strings"
        elif not isinstance(value, want):
            return f"{where}{key} is a {type(value).__name__}, not a {want.__name__}"
    return None


def _check_summary_matches(cell_dir: Path, summary: dict, n_records: int) -> str | None:
    """Records must be the ones the summary was written over (same count, same part checksums)."""
    if summary.get("n_questions") not in (None, n_records):
        return f"summary.json says {json.dumps(summary['n_questions'])[:40]} questions but the records hold {n_records}"
    listed = summary.get("records")
    if not isinstance(listed, list):
        return "summary.json lists no record parts ('records' is missing or not a list)"
    malformed = [entry for entry in listed if not (isinstance(entry, dict) and isinstance(entry.get("file"), str))]
    if malformed:
        return f"summary.json has {len(malformed)} malformed entry(ies) in 'records', e.g. {str(malformed[0])[:80]}"
    on_disk = {p.name: p for p in records.part_paths(cell_dir)}
    named = {entry["file"]: entry.get("sha256") for entry in listed}
    if set(named) != set(on_disk):
        extra, gone = sorted(set(on_disk) - set(named)), sorted(set(named) - set(on_disk))
        return f"record parts differ from those listed in summary.json (extra: {extra or 'none'}; missing: {gone or 'none'})"
    for file, digest in named.items():
        if digest and records.sha256_file(on_disk[file]) != digest:
            return f"{file} changed after summary.json was written (sha256 differs)"
    return None


def load_cell(cell_dir: Path) -> CellData | str:
    """Verified arrays of a complete cell, or one sentence saying why the cell is not used."""
    cell_dir = Path(cell_dir)
    summary = read_summary(cell_dir)
    if summary is None:
        return "no complete summary.json"
    read = records.read_records(cell_dir)
    if read.bad_parts:
        path, reason = read.bad_parts[0]
        more = f" (and {len(read.bad_parts) - 1} more part(s))" if len(read.bad_parts) > 1 else ""
        return f"part {Path(path).name} failed verification: {reason.removeprefix(str(path) + ': ')}{more}"
    if read.conflicts:
        return f"{len(read.conflicts)} question(s) answered twice with different records, e.g. {read.conflicts[0]}"
    if not read.records:
        return "no records"
    mismatch = _check_summary_matches(cell_dir, summary, len(read.records))
    if mismatch:
        return mismatch
    malformed = _shape_error(summary, SUMMARY_SHAPE)
    if malformed:
        return f"summary.json is malformed: {malformed}"
    rows = sorted(read.records, key=lambda r: r["key"])
    label = np.array([r["label"] for r in rows], dtype=object)
    pred = {rule: np.array([r[f"pred_{rule}"] for r in rows], dtype=object) for rule in metrics.PARSE_RULES}
    try:
        for rule in metrics.PARSE_RULES:
            metrics.confusion_index(label, pred[rule])
    except ValueError as e:
        return f"malformed records: {e}"
    for rule in metrics.PARSE_RULES:
        wrong = [r["key"] for r in rows if not isinstance(r["raw_answer"], str) or metrics.parse(r["raw_answer"], rule) != r[f"pred_{rule}"]]
        if wrong:
            return f"malformed records: pred_{rule} does not follow from raw_answer for {len(wrong)} question(s), e.g. {wrong[0]}"
    tokens = [r["visual_tokens"] for r in rows if isinstance(r.get("visual_tokens"), (int, float))]
    return CellData(
        name=cell_dir.name,
        path=cell_dir,
        summary=summary,
        keys=np.array([r["key"] for r in rows], dtype=object),
        split=np.array([r["split"] for r in rows], dtype=object),
        image=np.array([str(r["image"]) for r in rows], dtype=object),
        label=label,
        pred=pred,
        visual_tokens=float(np.mean(tokens)) if tokens else None,
        numerics=read.numerics,
    )
