"""`launch=local` (this process) and `launch=local-gpus` (one resident worker process per GPU).

Both run cells through the same worker code (prune_eval.execution.worker) with a resident model:
a model is loaded (and compiled) once per worker and model group, not once per cell.

`launch=local` runs the cells in this process, a model group's cells back to back, longest first.

`launch=local-gpus` starts one worker per free GPU (`CUDA_VISIBLE_DEVICES=<id>`) and is their
scheduler (`Dispatcher`): an idle worker gets the longest pending cell of the model it already
holds, else the longest pending cell; when no cell is pending, it helps the running cell with the
most work per worker, answering its free shards (prune_eval.execution.cell: several processes may
share a cell, shard by shard), so that the sweep's end is not one GPU finishing its last large cell
while the others wait. A GPU that another process uses (nvidia-smi) gets no worker until it is free.
A worker that dies is replaced if work is left; the cell it was answering alone gets an error.json
naming the worker and its log (died), and a rerun resumes it.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prune_eval.execution.checks import GpuInfo, busy_gpus, check_local_gpus_launch, query_gpus
from prune_eval.execution.events import LOCAL_JOB_ENV
from prune_eval.execution.schedule import CellJob, longest_first, order_for_one_worker
from prune_eval.execution.watching import AnswerCounter, Launched, Progress, _error_signature, conclude
from prune_eval.execution.worker import PRESTART, PRESTART_LOG_ENV, WORKER_FD

log = logging.getLogger("prune_eval")


def _printer(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------------- launch=local

def launch_local(launcher, jobs: Sequence[CellJob], *, progress_s: float = 30.0, out: Callable[[str], None] | None = None) -> list[str]:
    """Run the cells in this process, one resident model per model group; returns each cell's outcome."""
    from hydra.core.utils import configure_log

    from prune_eval.execution.worker import run_cell_job, setup_process

    out = out or _printer
    setup_process(None)
    watched = {job.name: Launched(Path(job.cell_dir), job_id="local", n_questions=job.n_questions, cost=job.cost) for job in jobs}
    progress = Progress("local", progress_s, out)
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    for job in order_for_one_worker(jobs):
        watched[job.name].state = "RUNNING"
        progress.update(list(watched.values()))
        status = run_cell_job(launcher, job)
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
        watched[job.name].outcome = conclude(watched[job.name], "the cell's run ended without a result") if status == "shared" else status
    progress.update(list(watched.values()))
    return [watched[job.name].outcome or "missing" for job in jobs]


# ----------------------------------------------------------------------------------- launch=local-gpus

class WorkerHandle(Protocol):
    """A worker process as the dispatcher drives it (tests use fakes)."""

    def send(self, job: CellJob) -> None: ...
    def replies(self) -> list[dict]: ...
    def exit_code(self) -> int | None: ...
    def stop(self) -> None: ...
    def interrupt(self) -> None: ...
    def fileno(self) -> int | None: ...


class ProcessWorker:
    """`python -m prune_eval.execution.worker <pickle>` on one GPU: cells over stdin, replies over a pipe.

    `pickle_path=None` starts it before the sweep is planned (`--prestart`: it imports torch and
    transformers, then waits, writing to a temporary log); `adopt` gives it the sweep's pickle, its
    log and its job id, after which it is a worker like any other.
    """

    def __init__(self, pickle_path: Path | None, log_path: Path, gpu: str, job_id: str | None) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1", **{WORKER_FD: str(write_fd)})
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # ids as nvidia-smi numbers them
        if job_id is not None:
            env[LOCAL_JOB_ENV] = job_id
        if pickle_path is None:
            env[PRESTART_LOG_ENV] = str(log_path)
        with open(log_path, "ab") as logf:
            self.process = subprocess.Popen([sys.executable, "-u", "-m", "prune_eval.execution.worker", str(pickle_path or PRESTART)],
                                            stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT, env=env, pass_fds=(write_fd,))
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.read_fd, self.buffer = read_fd, b""
        self.early_log = log_path if pickle_path is None else None

    def adopt(self, pickle_path: Path, log_path: Path, job_id: str) -> "ProcessWorker":
        """A prestarted worker joins the sweep (its output so far moves to `log_path`)."""
        self.send_line({"adopt": {"pickle": str(pickle_path), "log": str(log_path), "job_id": job_id}})
        self.early_log = None  # the worker moves it
        return self

    def send(self, job: CellJob) -> None:
        self.send_line(job.to_json())

    def send_line(self, message: dict) -> None:
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; exit_code() says so at the next poll

    def replies(self) -> list[dict]:
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                break
            if not chunk:
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.read_fd)

    def fileno(self) -> int | None:
        return self.read_fd

    def discard(self) -> None:
        """End a prestarted worker the sweep did not need (it holds no GPU memory and no cell)."""
        self.process.kill()
        self.wait(5)
        if self.early_log is not None:
            self.early_log.unlink(missing_ok=True)


# Workers started before the sweep is planned, by GPU id (a process runs one sweep at a time).
_prestarted: dict[str, ProcessWorker] = {}


def prestart_workers(launcher) -> None:
    """Start one worker per GPU this launch would use, before the sweep is planned (the sweeper
    calls it first), so that their imports overlap the planning; workers started earlier from the
    command line (`prestart_for`) on GPUs this launch would not use are ended. Best effort: a
    launch its checks refuse starts none (the sweeper says why, later); workers the launch does not
    take are discarded when it ends, or when this process exits."""
    from prune_eval.errors import PruneEvalError

    try:
        pool = check_local_gpus_launch(launcher.config, **dict(launcher.params))
    except PruneEvalError:
        return
    prestart_for(pool)


def prestart_for(pool: Sequence[str]) -> None:
    """A waiting worker (`--prestart`) for each GPU id in `pool` that has none; those on other GPUs end."""
    for gpu in [g for g in _prestarted if g not in pool]:
        _prestarted.pop(gpu).discard()
    if not _prestarted:
        atexit.unregister(discard_prestarted)
        atexit.register(discard_prestarted)
    for gpu in pool:
        if gpu not in _prestarted:
            handle, path = tempfile.mkstemp(prefix=f"prune-eval-worker-gpu{gpu}-", suffix=".log")
            os.close(handle)
            _prestarted[gpu] = ProcessWorker(None, Path(path), gpu, None)


def start_worker(pickle_path: Path, log_path: Path, gpu: str, job_id: str) -> ProcessWorker:
    """The worker for `gpu`: the one started while the sweep was planned if it is alive, else a new one."""
    early = _prestarted.pop(gpu, None)
    if early is not None and early.exit_code() is None:
        return early.adopt(pickle_path, log_path, job_id)
    if early is not None:
        early.discard()
    return ProcessWorker(pickle_path, log_path, gpu, job_id)


def discard_prestarted() -> None:
    while _prestarted:
        _prestarted.popitem()[1].discard()


@dataclass
class Slot:
    """A worker and what it is doing."""

    gpu: str
    job_id: str
    log: Path
    handle: WorkerHandle
    ready: bool = False
    cell: str | None = None  # the cell it was sent
    model_key: str | None = None  # the model it holds (or is loading)


@dataclass
class Dispatcher:
    """The local-gpus scheduler (see the module doc). `start(gpu, job_id, log)` starts a worker."""

    jobs: list[CellJob]
    pool: list[str]
    start: Callable[[str, str, Path], WorkerHandle]
    log_dir: Path
    skip_busy: bool = True
    busy_memory_mib: float = 1024
    poll_s: float = 1.0
    progress: Progress | None = None
    query: Callable[[], list[GpuInfo] | None] = query_gpus
    pending: list[CellJob] = field(default_factory=list)
    active: dict[str, set[str]] = field(default_factory=dict)  # cell -> workers answering it
    tried: dict[str, set[str]] = field(default_factory=dict)  # cell -> workers sent to it
    workers: dict[str, Slot] = field(default_factory=dict)  # gpu -> its worker
    failed_starts: dict[str, int] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    started: int = 0
    counter: AnswerCounter = field(default_factory=AnswerCounter)

    def __post_init__(self) -> None:
        self.by_name = {job.name: job for job in self.jobs}
        self.watched = {job.name: Launched(Path(job.cell_dir), n_questions=job.n_questions, cost=job.cost) for job in self.jobs}
        self.pending = longest_first(self.jobs)
        self.poll_s = min(max(float(self.poll_s), 0.05), 60.0)

    # -- the policy --------------------------------------------------------------------------
    def choose(self, slot: Slot) -> CellJob | None:
        """The next cell for an idle worker: its model's longest pending cell, else the longest
        pending cell, else a running cell with free shards (the most work per worker first)."""
        if self.pending:
            same = [j for j in self.pending if j.model_key == slot.model_key]
            return (same or self.pending)[0]
        helpable = [self.by_name[name] for name, ws in self.active.items()
                    if ws and slot.job_id not in self.tried[name] and self.free_shards(name) > 0]
        if not helpable:
            return None
        return max(helpable, key=lambda j: (j.model_key == slot.model_key, self.work_left(j.name) / (len(self.active[j.name]) + 1), j.name))

    def work_left(self, name: str) -> float:
        job = self.by_name[name]
        answered = min(self.counter.answered(Path(job.cell_dir)), job.n_questions) if job.n_questions else 0
        return job.cost * (1 - answered / job.n_questions) if job.n_questions else job.cost

    def free_shards(self, name: str) -> int:
        """Shards of a running cell that nobody answers yet (estimated from its answered share)."""
        job = self.by_name[name]
        left = job.cost and self.work_left(name) / job.cost
        return math.ceil(job.shards * left - 1e-9) - len(self.active.get(name, ())) if left else 0

    def workers_wanted(self) -> int:
        """As many workers as there are shards to answer (of pending cells, or free in running
        ones) next to the busy workers, at most one per GPU: a single large cell starts a worker
        per GPU at once instead of helpers that start late."""
        shares = sum(max(0, self.free_shards(n)) for n, ws in self.active.items() if ws)
        busy = sum(1 for s in self.workers.values() if s.cell is not None)
        return min(len(self.pool), busy + sum(j.shards for j in self.pending) + shares)

    # -- the loop ----------------------------------------------------------------------------
    def send(self, slot: Slot, job: CellJob) -> None:
        if job in self.pending:
            self.pending.remove(job)
        self.active.setdefault(job.name, set()).add(slot.job_id)
        self.tried.setdefault(job.name, set()).add(slot.job_id)
        watched = self.watched[job.name]
        watched.state, watched.job_id, watched.log = "RUNNING", slot.job_id, slot.log
        if len(self.active[job.name]) == 1:
            watched.error_before = _error_signature(watched.cell_dir)
        slot.cell, slot.model_key = job.name, job.model_key
        slot.handle.send(job)

    def finish(self, slot: Slot, name: str, how: str) -> None:
        """A worker is done with a cell (it said so, or it died: `how` says how the job ended). The
        cell's outcome is read from its files once no worker is left on it."""
        self.active.get(name, set()).discard(slot.job_id)
        slot.cell = None
        if self.active.get(name):
            return  # others still answer it; the last one decides
        watched = self.watched[name]
        watched.state = "DONE"
        watched.outcome = conclude(watched, how)

    def poll_workers(self) -> None:
        for gpu, slot in list(self.workers.items()):
            for message in slot.handle.replies():
                if message.get("ready"):
                    slot.ready = True
                elif "done" in message:
                    self.finish(slot, message["done"], f"local worker {slot.job_id} (GPU {gpu}) left the cell unfinished ({message.get('status')})")
            code = slot.handle.exit_code()
            if code is None:
                continue
            if slot.cell is not None:
                self.finish(slot, slot.cell, f"local worker {slot.job_id} (GPU {gpu}) exited with {exit_text(code)} before the cell finished")
            if not slot.ready:
                self.failed_starts[gpu] = self.failed_starts.get(gpu, 0) + 1
                log.error("the worker for GPU %s exited with %s before it was ready; log: %s", gpu, exit_text(code), slot.log)
            close = getattr(slot.handle, "wait", None)
            if close is not None:
                close(1)  # reaped; its pipe closed
            del self.workers[gpu]

    def start_workers(self) -> None:
        free = [g for g in self.pool if g not in self.workers and self.failed_starts.get(g, 0) < 2]
        wanted = self.workers_wanted() - len(self.workers)
        if wanted <= 0 or not free:
            return
        if self.skip_busy:
            busy = busy_gpus(free, self.query(), self.busy_memory_mib)
            for g in busy.keys() - self.warned:
                log.warning("GPU %s is in use by another process (%.0f MiB); no worker starts there while it is", g, busy[g])
            self.warned |= busy.keys()
            free = [g for g in free if g not in busy]
        for gpu in free[:wanted]:
            job_id = f"local-{self.started}"
            self.started += 1
            log_path = self.log_dir / f"{job_id}_gpu{gpu}_log.out"
            self.workers[gpu] = Slot(gpu, job_id, log_path, self.start(gpu, job_id, log_path))

    def assign(self) -> None:
        for slot in self.workers.values():
            if slot.ready and slot.cell is None:
                job = self.choose(slot)
                if job is not None:
                    self.send(slot, job)

    def give_up_without_workers(self) -> None:
        """No worker alive and none can start (every GPU's worker died before it was ready, twice)."""
        for job in list(self.pending):
            watched = self.watched[job.name]
            logs = ", ".join(str(p) for p in sorted(self.log_dir.glob("*_log.out"))) or str(self.log_dir)
            watched.outcome = conclude(watched, f"no local worker could start (see {logs})")
        self.pending.clear()

    def wait(self, timeout: float) -> None:
        fds = [fd for fd in (s.handle.fileno() for s in self.workers.values()) if fd is not None]
        if fds:
            select.select(fds, [], [], timeout)
        else:
            time.sleep(timeout)

    def run(self) -> list[str]:
        try:
            while True:
                self.poll_workers()
                working = any(self.active.values())
                if not self.pending and not working:
                    break
                self.start_workers()
                self.assign()
                if not self.workers and self.pending and all(self.failed_starts.get(g, 0) >= 2 for g in self.pool):
                    self.give_up_without_workers()
                    continue
                if self.progress is not None:
                    self.progress.gpus = max(1, len(self.workers))
                    waiting = self.pending and not self.workers and not working
                    self.progress.update(list(self.watched.values()), "  (waiting for a GPU that no other process uses)" if waiting else "",
                                         running=lambda j: j.outcome is None and j.state == "RUNNING")
                self.wait(self.poll_s)
        except KeyboardInterrupt:
            for slot in self.workers.values():
                slot.handle.interrupt()
            self.close(10)
            raise
        if self.progress is not None:
            self.progress.update(list(self.watched.values()))
        self.close(60)
        return [self.watched[job.name].outcome or "missing" for job in self.jobs]

    def close(self, timeout: float) -> None:
        for slot in self.workers.values():
            slot.handle.stop()
        for slot in self.workers.values():
            wait = getattr(slot.handle, "wait", None)
            if wait is not None:
                wait(timeout)
        self.workers.clear()


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def launch_local_gpus(launcher, jobs: Sequence[CellJob], *, gpus: Any = "all", skip_busy: bool = True, busy_memory_mib: float = 1024,
                      poll_s: float = 1.0, progress_s: float = 30.0, query: Callable[[], list[GpuInfo] | None] = query_gpus,
                      out: Callable[[str], None] | None = None, pool: list[str] | None = None) -> list[str]:
    """One resident worker per free GPU, fed by a Dispatcher; returns each cell's outcome. `pool`: the
    GPUs the launcher's check_before_launch found a moment ago (None: check here)."""
    from hydra.core.singleton import Singleton
    from submitit.helpers import DelayedSubmission

    from prune_eval.execution import worker

    out = out or _printer
    if pool is None:
        pool = check_local_gpus_launch(launcher.config, gpus=gpus, skip_busy=skip_busy, busy_memory_mib=busy_memory_mib, query=query)
    folder = Path(str(launcher.config.hydra.sweep.dir)).absolute() / ".submitit" / f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    pickle_path = folder / "worker.pkl"
    DelayedSubmission(worker.serve, launcher, Singleton.get_state()).dump(pickle_path)
    out(f"launching {len(jobs)} cell(s) on GPU(s) {', '.join(pool)}: one resident worker per GPU (a model is loaded once "
        f"per worker); logs: {folder}")
    dispatcher = Dispatcher(list(jobs), pool, lambda gpu, job_id, log_path: start_worker(pickle_path, log_path, gpu, job_id), folder,
                            skip_busy=skip_busy, busy_memory_mib=busy_memory_mib, poll_s=poll_s,
                            progress=Progress("local-gpus", progress_s, out), query=query)
    try:
        return dispatcher.run()
    finally:
        discard_prestarted()
