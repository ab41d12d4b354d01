"""Per-question records on disk: the contract between the GPU side and the analysis side.

A cell directory holds
- `records/part-00000.jsonl`, `part-00001.jsonl`, ...: one JSON object per answered question, then a
  footer line `{"_footer": {"count": n, "sha256": ..., "numerics": {...}}}` over the bytes of the record
  lines. Each part is written to a temporary file, fsynced and renamed into place, so a part is either
  complete or absent; the footer makes a truncated or edited part detectable by anyone who reads it.
  `numerics` (schema 2) are the runtime numerics the part was computed under (evaluation path, device,
  dtype, attention kernels, compile, torch and transformers versions: prune_eval.execution.cell), so a
  resumed cell can refuse to mix parts computed differently; ingested parts and schema-1 parts have none.
- `summary.json` (written last, atomically): the resolved config, metrics, versions, checksums; its
  presence means the cell is complete.
- `error.json` when the last attempt failed: message and traceback.
- `model.json`: what the last model load found out (prune_eval.execution.cell), for the summary.
- `.<name>.<random>.tmp`: an atomic write killed before its rename; never read, removed by the next
  run of the cell (under its lock).

Readers never trust a part without its footer, and refuse records whose question appears twice with
different content or fields of the wrong type (FIELD_TYPES). Records carry `schema_version`; readers
accept every version listed in `READABLE_SCHEMAS` (1: no numerics in the footer; 2: footer `numerics`,
records unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_eval.execution import faults
from prune_eval.errors import PruneEvalError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
RECORD_FIELDS = (
    "schema_version",
    "key",
    "split",
    "question_id",
    "image",
    "label",
    "question",
    "raw_answer",
    "pred_llava",
    "pred_exact",
    "visual_tokens",
    "new_tokens",
    "stop_reason",
)
PART_GLOB = "part-*.jsonl"
# Which text `raw_answer` holds (summary.json's "raw_answer"); both parsing rules read exactly this text.
RAW_ANSWER_DECODED = ("the generated tokens decoded with skip_special_tokens and stripped, as LLaVA's "
                      "model_vqa_loader.py writes them to its answer file")
RAW_ANSWER_INGESTED = "the answer file's 'text', byte for byte"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory.

    Whatever happens (a kill, a full disk), `path` holds its old content or the new one, never a
    part of it. A failed write (disk full, no permission) leaves no temporary file behind and is a
    PruneEvalError naming the file. The two halves of `data` are written separately only so that
    prune_eval.execution.faults can kill the process half-way through, as a test; it costs one write call.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    view, half = memoryview(data), len(data) // 2
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(view[:half])
            f.flush()
            faults.checkpoint("mid-write", path)
            f.write(view[half:])
            f.flush()
            os.fsync(f.fileno())
        faults.checkpoint("before-rename", path)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_error(path: Path, error: OSError) -> PruneEvalError:
    return PruneEvalError(f"cannot write {path}: {error.strerror or error}" + (f" (errno {error.errno})" if error.errno else ""))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files of atomic writes that were killed before their rename. Only safe
    where no other process can be writing (a cell's folder while its lock is held)."""
    stale = list(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def encode_part(records: list[dict], numerics: dict | None = None) -> bytes:
    """Record lines and the footer; `numerics` (the part's runtime numerics) go into the footer."""
    body = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()
    footer = {"count": len(records), "sha256": hashlib.sha256(body).hexdigest(), "schema_version": SCHEMA_VERSION}
    if numerics is not None:
        footer["numerics"] = numerics
    return body + (json.dumps({"_footer": footer}, sort_keys=True) + "\n").encode()


def records_dir(cell_dir: Path) -> Path:
    return Path(cell_dir) / "records"


def part_paths(cell_dir: Path) -> list[Path]:
    return sorted(records_dir(cell_dir).glob(PART_GLOB))


def write_part(cell_dir: Path, records: list[dict], numerics: dict | None = None, *, shard: int | None = None) -> Path:
    """Append one part after the existing ones; returns its path. `numerics` (the runtime settings
    the records were computed under) go into the part's footer. Processes answering different shards
    of one cell write at the same time; the shard in the name (`part-00007-s0002.jsonl`) keeps two
    of them from picking the same file."""
    existing = part_paths(cell_dir)
    index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    path = records_dir(cell_dir) / (f"part-{index:05d}.jsonl" if shard is None else f"part-{index:05d}-s{shard:04d}.jsonl")
    atomic_write_bytes(path, encode_part(records, numerics))
    return path


class BadPart(Exception):
    """A record part that fails verification; the message says why."""


def read_part(path: Path) -> list[dict]:
    """The records of one part, or BadPart saying why it cannot be trusted."""
    return read_part_and_footer(path)[0]


def read_part_and_footer(path: Path) -> tuple[list[dict], dict]:
    """The verified records of one part and its footer (`footer.get("numerics")`: None before schema 2)."""
    records, footer, _ = _read_verified(path)
    return records, footer


def _read_verified(path: Path) -> tuple[list[dict], dict, str]:
    """(records, footer, the file's SHA-256 in hex) of a verified part; BadPart if it is not one.

    A cell's set-up, its per-shard numerics check, its helpers' progress and its summary read the
    same parts (about seven full reads of every part per cell), and parsing and checking them is
    most of the cost: a part whose bytes this process has already verified (same SHA-256) is not
    parsed again. The records are shared with that cache: callers must not modify them.
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).digest()
    if digest in _VERIFIED:
        _VERIFIED.move_to_end(digest)
    else:
        _VERIFIED[digest] = _verify_part(path, data)
        if len(_VERIFIED) > VERIFIED_PARTS:
            _VERIFIED.popitem(last=False)
    records, footer = _VERIFIED[digest]
    return list(records), dict(footer), digest.hex()


VERIFIED_PARTS = 256  # parts kept verified in memory (~65k records at eval.part_size=256: a few cells)
_VERIFIED: OrderedDict[bytes, tuple[list[dict], dict]] = OrderedDict()


def _verify_part(path: Path, data: bytes) -> tuple[list[dict], dict]:
    if not data.endswith(b"\n"):
        raise BadPart(f"{path}: truncated (no final newline)")
    lines = data.split(b"\n")[:-1]
    if not lines:
        raise BadPart(f"{path}: empty")
    footer = _json_line(lines[-1])
    footer = footer.get("_footer") if isinstance(footer, dict) else None
    if not isinstance(footer, dict):
        raise BadPart(f"{path}: no footer line (truncated or not written by prune_eval)")
    body = b"".join(line + b"\n" for line in lines[:-1])
    if hashlib.sha256(body).hexdigest() != footer.get("sha256") or len(lines) - 1 != footer.get("count"):
        raise BadPart(f"{path}: checksum mismatch (edited or corrupted after writing)")
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        record = _json_line(line)
        if not isinstance(record, dict):
            raise BadPart(f"{path}:{number}: not a JSON object")
        if record.get("schema_version") not in READABLE_SCHEMAS:
            raise BadPart(f"{path}:{number}: schema_version {record.get('schema_version')!r}; readable: {READABLE_SCHEMAS}")
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise BadPart(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        wrong = [f"{f}={record[f]!r}" for f, types in FIELD_TYPES.items() if not _has_type(record[f], types)]
        if wrong:
            raise BadPart(f"{path}:{number}: wrong type(s) {', '.join(wrong)}")
        records.append(record)
    return records, footer


# What each field must hold (ingested answer files have no token counts or stop reasons).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **{f: (str,) for f in ("key", "split", "image", "label", "question", "raw_answer", "pred_llava", "pred_exact")},
    "question_id": (int,),
    "visual_tokens": (int, type(None)),
    "new_tokens": (int, type(None)),
    "stop_reason": (str, type(None)),
}


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _json_line(line: bytes) -> Any:
    """A parsed line, or None if it is not JSON (also: not UTF-8, nested too deep)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


@dataclass
class CellRecords:
    """All verified records of a cell, plus what could not be used and why."""

    records: list[dict] = field(default_factory=list)
    bad_parts: list[tuple[Path, str]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # keys answered twice, differently
    numerics: dict[str, dict | None] = field(default_factory=dict)  # part file name -> its footer's numerics
    sha256: dict[str, str] = field(default_factory=dict)  # part file name -> SHA-256 of the file (verified parts)

    @property
    def keys(self) -> set[str]:
        return {r["key"] for r in self.records}


def read_records(cell_dir: Path) -> CellRecords:
    """Verified, de-duplicated records of a cell (identical duplicates collapse; others conflict)."""
    result = CellRecords()
    by_key: dict[str, dict] = {}
    for path in part_paths(cell_dir):
        try:
            part, footer, result.sha256[path.name] = _read_verified(path)
        except (BadPart, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            result.bad_parts.append((path, str(e)))
            continue
        numerics = footer.get("numerics")
        result.numerics[path.name] = numerics if isinstance(numerics, dict) else None
        for record in part:
            previous = by_key.get(record["key"])
            if previous is None:
                by_key[record["key"]] = record
            elif previous != record:
                result.conflicts.append(record["key"])
    result.records = list(by_key.values())
    return result
