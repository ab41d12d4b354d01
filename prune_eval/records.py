"""Per-question records on disk: the contract between the GPU side and the analysis side.

A cell directory holds
- `records/part-00000.jsonl`, `part-00001.jsonl`, ...: one JSON object per answered question, then a
  footer line `{"_footer": {"count": n, "sha256": ...}}` over the bytes of the record lines. Each part
  is written to a temporary file, fsynced and renamed into place, so a part is either complete or
  absent; the footer makes a truncated or edited part detectable by anyone who reads it.
- `summary.json` (written last, atomically): the resolved config, metrics, versions, checksums; its
  presence means the cell is complete.
- `error.json` when the last attempt failed: message and traceback.

Readers never trust a part without its footer, and refuse records whose question appears twice with
different content. Records carry `schema_version`; readers accept every version listed in
`READABLE_SCHEMAS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
READABLE_SCHEMAS = (1,)
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def encode_part(records: list[dict]) -> bytes:
    body = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()
    footer = {"_footer": {"count": len(records), "sha256": hashlib.sha256(body).hexdigest(), "schema_version": SCHEMA_VERSION}}
    return body + (json.dumps(footer) + "\n").encode()


def records_dir(cell_dir: Path) -> Path:
    return Path(cell_dir) / "records"


def part_paths(cell_dir: Path) -> list[Path]:
    return sorted(records_dir(cell_dir).glob(PART_GLOB))


def write_part(cell_dir: Path, records: list[dict]) -> Path:
    """Append one part after the existing ones; returns its path."""
    existing = part_paths(cell_dir)
    index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    path = records_dir(cell_dir) / f"part-{index:05d}.jsonl"
    atomic_write_bytes(path, encode_part(records))
    return path


class BadPart(Exception):
    """A record part that fails verification; the message says why."""


def read_part(path: Path) -> list[dict]:
    data = Path(path).read_bytes()
    if not data.endswith(b"\n"):
        raise BadPart(f"{path}: truncated (no final newline)")
    lines = data.split(b"\n")[:-1]
    if not lines:
        raise BadPart(f"{path}: empty")
    try:
        footer = json.loads(lines[-1])["_footer"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadPart(f"{path}: no footer line (truncated or not written by prune_eval)") from None
    body = b"".join(line + b"\n" for line in lines[:-1])
    if hashlib.sha256(body).hexdigest() != footer.get("sha256") or len(lines) - 1 != footer.get("count"):
        raise BadPart(f"{path}: checksum mismatch (edited or corrupted after writing)")
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        record = json.loads(line)
        if record.get("schema_version") not in READABLE_SCHEMAS:
            raise BadPart(f"{path}:{number}: schema_version {record.get('schema_version')!r}; readable: {READABLE_SCHEMAS}")
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise BadPart(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        records.append(record)
    return records


@dataclass
class CellRecords:
    """All verified records of a cell, plus what could not be used and why."""

    records: list[dict] = field(default_factory=list)
    bad_parts: list[tuple[Path, str]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # keys answered twice, differently

    @property
    def keys(self) -> set[str]:
        return {r["key"] for r in self.records}


def read_records(cell_dir: Path) -> CellRecords:
    """Verified, de-duplicated records of a cell (identical duplicates collapse; others conflict)."""
    result = CellRecords()
    by_key: dict[str, dict] = {}
    for path in part_paths(cell_dir):
        try:
            part = read_part(path)
        except (BadPart, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            result.bad_parts.append((path, str(e)))
            continue
        for record in part:
            previous = by_key.get(record["key"])
            if previous is None:
                by_key[record["key"]] = record
            elif previous != record:
                result.conflicts.append(record["key"])
    result.records = list(by_key.values())
    return result
