"""Test-only fault injection: `PRUNE_EVAL_KILL_AT=<point>:<n>` makes the process SIGKILL itself the
n-th time it passes the named point. Unset (always, outside tests), `checkpoint` is one dict lookup.

Why this lives in production code: the reliability campaign (tests/test_kill_campaign.py) has to kill a
sweep exactly where a kill can do harm — after the model is loaded, between two batches, half-way
through writing a record part's temporary file, between that file's fsync and its rename, while
summary.json or the report is written — many times, on a 2-core CI machine. A kill timed from
outside lands in those windows rarely (most of a run's wall time is imports); a named point lands
there every time and costs nothing. The test also kills at random times, for what nobody named.

Points: `load` (model loaded, nothing answered yet), `batch` (a batch answered, not yet buffered),
and for every atomic file write `<kind>-mid-write` (half the temporary file written) and
`<kind>-before-rename` (temporary file complete and fsynced, not yet renamed), where kind is `part`
(records/part-*.jsonl), `report` (files in report/) or the file's stem (`summary`, `plan`, `cell`,
`model`, `error`, `multirun`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_AT = "PRUNE_EVAL_KILL_AT"
_passes: dict[str, int] = {}


def write_kind(path: Path) -> str:
    """What a file is, for naming its write points: 'part', 'report' or the file's stem."""
    path = Path(path)
    if path.name.startswith("part-"):
        return "part"
    if path.parent.name == "report":
        return "report"
    return path.name.split(".")[0]


def checkpoint(point: str, path: Path | None = None) -> None:
    """Die by SIGKILL here if PRUNE_EVAL_KILL_AT names this point and this is its n-th pass.
    With `path`, the point is '<write_kind(path)>-<point>'."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    if path is not None:
        point = f"{write_kind(path)}-{point}"
    target, _, nth = spec.partition(":")
    if point != target:
        return
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
