"""Watching launched cells through their own files, and the sweep's progress line.

The submitting process never trusts job results: a cell is complete when it has summary.json;
when its job is over (a local worker exited, a SLURM task left the queue) the cell is *failed* if it
wrote a new error.json, *busy* if another process still holds it, and otherwise *died*: killed, out
of memory, cancelled. A died cell gets an error.json naming the job and its log, so the status table
says what happened and a rerun resumes it.

The progress line counts cells and, from the record parts' footers (each part is read once, from
its end), the questions answered since the sweep started: questions per second per GPU, and an ETA
from the estimated cost of the work left (prune_eval.execution.schedule) at the rate seen recently.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prune_eval.execution import records
from prune_eval.execution.worker import ERROR_FILE, write_cell_error

RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"})
RATE_WINDOW_S = 120.0  # the rate behind q/s and the ETA: answers over the last two minutes


def _error_signature(cell_dir: Path) -> tuple | None:
    try:
        st = (Path(cell_dir) / ERROR_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class Launched:
    """One cell's job as the submitting process sees it."""

    cell_dir: Path
    job_id: str = ""
    log: Path | None = None
    state: str = "PENDING"  # last scheduler state seen: PENDING, RUNNING, ...
    outcome: str | None = None  # complete | failed | died | busy, once the job is over
    error_before: tuple | None = field(default=None, repr=False)  # error.json at submission
    gone_polls: int = 0
    gone_since: float | None = None
    n_questions: int = 0  # for the progress line (0: unknown)
    cost: float = 0.0  # estimated GPU-seconds (prune_eval.execution.schedule)

    def __post_init__(self) -> None:
        self.cell_dir = Path(self.cell_dir)
        self.error_before = _error_signature(self.cell_dir)

    def new_error(self) -> bool:
        sig = _error_signature(self.cell_dir)
        return sig is not None and sig != self.error_before


def is_complete(cell_dir: Path) -> bool:
    from prune_eval.analysis.cellfiles import read_summary

    return read_summary(cell_dir) is not None


def started_by(cell_dir: Path, job_id: str) -> bool:
    """Whether job `job_id` ever started this cell (launches.jsonl)."""
    from prune_eval.execution.events import read_events

    return any(e.get("event") == "start" and e.get("job_id") == job_id for e in read_events(cell_dir))


def conclude(job: Launched, how: str) -> str:
    """How a job that is over left its cell; `how` (how the job ended) goes into a died cell's error."""
    from prune_eval.analysis.cellfiles import is_locked

    if is_complete(job.cell_dir):
        return "complete"
    if job.new_error():
        return "failed"
    if is_locked(job.cell_dir):
        return "busy"  # another process computes it (e.g. a job of an earlier sweep)
    where = f"; log: {job.log}" if job.log else ""
    write_cell_error(job.cell_dir, f"{how}{where}", "JobDied", _log_tail(job.log))
    job.error_before = _error_signature(job.cell_dir)
    return "died"


def _log_tail(path: Path | None, lines: int = 40) -> str:
    texts = []
    for p in [path, path.with_name(path.name.replace("log.err", "log.out"))] if path else []:
        try:
            texts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        except OSError:
            pass
    return "\n".join(dict.fromkeys(texts))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class AnswerCounter:
    """Questions answered per cell, from the footers of its record parts (not verified: for progress
    only). A part never changes once it exists (atomic rename), so each is read once."""

    def __init__(self) -> None:
        self.counts: dict[Path, int] = {}

    def part_count(self, path: Path) -> int:
        if path not in self.counts:
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    f.seek(max(0, f.tell() - 512))
                    footer = json.loads(f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1])["_footer"]
                self.counts[path] = int(footer["count"])
            except (OSError, ValueError, KeyError, TypeError):
                self.counts[path] = 0
        return self.counts[path]

    def answered(self, cell_dir: Path) -> int:
        return sum(self.part_count(p) for p in records.part_paths(cell_dir))


class Progress:
    """A line like `cells: 3 complete, 2 running, 1 failed, 4 pending; 5021/8910 questions, 210 q/s
    per GPU (2 GPUs), ETA 1m10s` when a count changes, and at least every `every_s` seconds."""

    ORDER = ("complete", "running", "failed", "died", "busy", "pending")

    def __init__(self, label: str, every_s: float, out: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, gpus: int = 1) -> None:
        self.label, self.every_s, self.clock, self.gpus = label, every_s, clock, gpus
        self.out = out or (lambda line: print(line, flush=True))
        self.started = clock()
        self.last: tuple | None = None
        self.last_time = -float("inf")
        self.counter = AnswerCounter()
        self.baseline: dict[Path, int] = {}  # answered when the sweep started watching the cell
        self.history: deque[tuple[float, int, float]] = deque()  # (time, questions, cost) answered since the start

    def status(self, job: Launched, running: Callable[[Launched], bool] | None) -> str:
        if job.outcome:
            return job.outcome
        is_running = running(job) if running is not None else job.state in RUNNING_STATES
        return "running" if is_running else "pending"

    def work_line(self, jobs: Sequence[Launched], now: float) -> str:
        """'5021/8910 questions, 210 q/s per GPU (2 GPUs), ETA 1m10s' (rate and ETA once measurable)."""
        total = sum(j.n_questions for j in jobs)
        if not total:
            return ""
        answered = new = 0
        new_cost = left_cost = 0.0
        for job in jobs:
            n = job.n_questions if job.outcome == "complete" or is_complete(job.cell_dir) else min(self.counter.answered(job.cell_dir), job.n_questions)
            before = self.baseline.setdefault(job.cell_dir, n)
            answered += n
            new += max(0, n - before)
            per_question = job.cost / job.n_questions if job.n_questions else 0.0
            new_cost += max(0, n - before) * per_question
            if job.outcome in (None, "complete"):
                left_cost += (job.n_questions - n) * per_question
        self.history.append((now, new, new_cost))
        while len(self.history) > 2 and now - self.history[1][0] >= RATE_WINDOW_S:
            self.history.popleft()
        text = f"{answered}/{total} questions"
        (t0, q0, c0) = self.history[0]
        if now - t0 > 0 and new > q0:
            rate = (new - q0) / (now - t0)
            text += f", {rate / max(1, self.gpus):.1f} q/s per GPU ({self.gpus} GPU{'s' if self.gpus != 1 else ''})"
            cost_rate = (new_cost - c0) / (now - t0)
            if cost_rate > 0 and left_cost > 0:
                text += f", ETA {duration(left_cost / cost_rate)}"
        return text

    def update(self, jobs: Sequence[Launched], extra: str = "", running: Callable[[Launched], bool] | None = None) -> None:
        counts = dict.fromkeys(self.ORDER, 0)
        for job in jobs:
            key = self.status(job, running)
            counts[key] = counts.get(key, 0) + 1
        shown = {k: n for k, n in counts.items() if n or k in ("complete", "running", "failed", "pending")}
        key = (tuple(counts.items()), extra)
        now = self.clock()
        if not self.history:  # where each cell stood when watching began: the rate counts new answers only
            self.work_line(jobs, now)
        if key != self.last or now - self.last_time >= self.every_s:
            work = self.work_line(jobs, now)
            body = ", ".join(f"{n} {k}" for k, n in shown.items())
            self.out(f"cells: {body}{'; ' + work if work else ''}  [{self.label}, {duration(now - self.started)}]{extra}")
            self.last, self.last_time = key, now
