"""`<cell>/launches.jsonl`: which job ran a cell, where and when, and what its computing cost.

One JSON line per event, appended (small appends are atomic on local file systems): `start` and
`end` (a worker took the cell / finished with a status), `requeue` (SLURM preemption or time
limit), `computed` (a shard answered: questions, seconds of computing, of model loading and of
compiling charged to it). The summary sums the `computed` lines into its `timing`; `prune_eval`
never needs these files to be complete, they are provenance.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("prune_eval")

EVENTS = "launches.jsonl"
LOCAL_JOB_ENV = "PRUNE_EVAL_LOCAL_JOB"  # a local worker's id (local-<n>), set by the local-gpus launcher


def current_job_id() -> str:
    """The SLURM array task (job_task), the SLURM job, the local worker's id, or pid<N>."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get(LOCAL_JOB_ENV) or f"pid{os.getpid()}"


def write_event(cell_dir: Path, event: str, **fields: Any) -> None:
    """Append one event to <cell>/launches.jsonl; never raises (provenance must not fail a cell)."""
    record = {
        "event": event, "time": time.time(), "iso_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "job_id": current_job_id(), "host": socket.gethostname(), "pid": os.getpid(),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
        **fields,
    }
    try:
        Path(cell_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cell_dir) / EVENTS, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as e:
        log.warning("could not write %s: %s", Path(cell_dir) / EVENTS, e)


def read_events(cell_dir: Path) -> list[dict]:
    """The cell's events; a line cut short by a kill is skipped."""
    try:
        lines = (Path(cell_dir) / EVENTS).read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def timing(cell_dir: Path) -> dict:
    """The summary's `timing`: sums over the cell's `computed` events (every worker and every resumed
    run that answered some of its questions)."""
    computed = [e for e in read_events(cell_dir) if e.get("event") == "computed"]

    def total(key: str) -> float:
        return round(sum(float(e.get(key) or 0) for e in computed), 3)

    return {
        "compute_s": total("compute_s"),  # answering questions, compile time excluded
        "compile_s": total("compile_s"),  # torch.compile work that happened while answering them
        "load_s": total("load_s"),  # model loads charged to this cell (a resident worker loads once per model)
        "loads": sum(1 for e in computed if e.get("load_s")),
        "questions_computed": int(sum(int(e.get("questions") or 0) for e in computed)),
        "workers": sorted({str(e.get("job_id")) for e in computed}),
    }
