"""The worker side: one process runs many cells with one resident model (resident.py).

A worker composes each cell's config exactly as the sweep did (the launcher, pickled with Hydra's
context and master config, carries both), runs prune_eval's task function through Hydra's
`run_job` (the cell's `.hydra/` files and log), and appends start/end events to the cell's
launches.jsonl. Three ways to run one:

- `launch=local`: the sweep's own process, cells one after another (prune_eval.execution.local).
- `launch=local-gpus`: `python -m prune_eval.execution.worker <pickle>`, one process per GPU. It
  reads cells from its stdin, one JSON line each, and answers on the pipe named by
  PRUNE_EVAL_WORKER_FD: `{"ready"}` once imported, `{"started": cell}`, `{"done": cell, "status"}`.
  The launcher decides which cell goes where (`serve`). These processes start as
  `python -m prune_eval.execution.worker --prestart` before the sweep is planned (from the command
  line in prune_eval.__main__, else by the launcher before planning): importing torch and
  transformers' LLaVA takes seconds (5-9 s in BENCHMARKS.md's resident-workers runs), so a worker
  imports them while the sweep is composed and validated, then waits for its first stdin line,
  `{"adopt": {"pickle", "log", "job_id"}}`, and goes on as above; stdin closed before that ends it
  unused.
- `launch=slurm`: an array task with a fixed list of cells (`run_task`). When SLURM preempts the
  task or it reaches its time limit, submitit calls the launcher's checkpoint(), which hands back
  the same call (`requeue`): the requeued task runs its list again, skipping complete cells and
  resuming the partial one from its records.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune_eval.execution.events import LOCAL_JOB_ENV, current_job_id, write_event
from prune_eval.execution.schedule import CellJob

log = logging.getLogger("prune_eval")

WORKER_FD = "PRUNE_EVAL_WORKER_FD"
PRESTART, PRESTART_LOG_ENV = "--prestart", "PRUNE_EVAL_PRESTART_LOG"  # a worker started before the sweep is planned
ERROR_FILE = "error.json"  # prune_eval.analysis.cellfiles.ERROR
_current: dict[str, CellJob | None] = {"job": None}  # the cell being run, for the requeue event


def write_cell_error(cell_dir: Path, message: str, error_type: str, details: str = "") -> None:
    """An error.json in the format run_cell writes, for cells that could not write their own."""
    from prune_eval.execution.records import atomic_write_json

    atomic_write_json(Path(cell_dir) / ERROR_FILE, {"message": message, "type": error_type, "traceback": details,
                                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def setup_process(singleton_state: dict | None) -> None:
    """Hydra's global state as the sweep had it (a fresh worker process), and ${pe_cell:}."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import setup_globals

    import prune_eval.__main__  # noqa: F401  (registers ${pe_cell:}, used by hydra.sweep.subdir)

    if singleton_state is not None:
        Singleton.set_state(singleton_state)
    setup_globals()


def run_cell_job(launcher, job: CellJob) -> str:
    """Compose the cell's config as the sweep did and run prune_eval's task on it (Hydra's run_job);
    returns the cell's status. An error outside the cell's own handling is written to its error.json."""
    from hydra.core.utils import JobStatus, run_job
    from omegaconf import open_dict

    cell = Path(job.cell_dir)
    _current["job"] = job
    write_event(cell, "start", job_num=job.job_num)
    try:
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(job.overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.id = current_job_id()
            config.hydra.job.num = job.job_num
        ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        status = str(ret.return_value)
    except Exception as e:  # outside run_cell (which records its own errors): record it here
        from prune_eval.analysis.cellfiles import read_summary

        log.error("cell %s: %s: %s", job.name, type(e).__name__, e)
        if read_summary(cell) is None:
            write_cell_error(cell, f"{type(e).__name__}: {e}", type(e).__name__, traceback.format_exc())
        write_event(cell, "end", status="error", error=f"{type(e).__name__}: {e}")
        return "failed"
    finally:
        _current["job"] = None
    write_event(cell, "end", status=status)
    return status


def run_task(launcher, jobs: Sequence[dict], singleton_state: dict | None) -> list[str]:
    """A SLURM array task: its cells one after another, one resident model per model group."""
    setup_process(singleton_state)
    cells = [CellJob.from_json(j) for j in jobs]
    log.info("task %s: %d cell(s): %s", current_job_id(), len(cells), ", ".join(c.name for c in cells))
    return [run_cell_job(launcher, cell) for cell in cells]


def requeue(launcher, *args: Any, **kwargs: Any):
    """submitit calls the callable's checkpoint() when the task is preempted or reaches its time
    limit; returning the same call makes submitit requeue it. Nothing else needs saving: complete
    cells are skipped and the partial one resumes from its record parts (at most one part is lost)."""
    import submitit

    job = _current["job"]
    if job is not None:
        write_event(Path(job.cell_dir), "requeue")
    return submitit.helpers.DelayedSubmission(launcher, *args, **kwargs)


def serve(launcher, singleton_state: dict | None) -> None:
    """A local-gpus worker: cells from stdin, replies on the PRUNE_EVAL_WORKER_FD pipe, until stdin ends."""
    replies = os.fdopen(int(os.environ[WORKER_FD]), "w", buffering=1)

    def reply(**message: Any) -> None:
        replies.write(json.dumps(message) + "\n")

    setup_process(singleton_state)
    reply(ready=True, pid=os.getpid(), job_id=current_job_id())
    from hydra.core.utils import configure_log

    for line in sys.stdin:
        if not line.strip():
            continue
        job = CellJob.from_json(json.loads(line))
        reply(started=job.name)
        status = run_cell_job(launcher, job)
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
        reply(done=job.name, status=status)


def log_time(now: float | None = None) -> str:
    """Wall-clock time as Hydra's log lines print it (`2026-11-30 23:40:08,219`), so that the
    sweep's, the workers' and the benchmarks' logs line up."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


def warm_imports() -> None:
    """Import what every cell needs (torch, transformers' LLaVA modeling code, prune_eval's cell,
    Hydra's job runner), without touching the GPU: a started but unused worker costs no GPU memory."""
    import hydra.core.utils  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llava.modeling_llava  # noqa: F401

    import prune_eval.execution.cell  # noqa: F401


def await_adoption() -> str | None:
    """A prestarted worker: warm up, then wait for the sweep's `adopt` line; returns its pickle path
    (None when stdin closes first: the sweep did not need this worker). The output so far, written
    to a temporary log, moves to the log the launcher names, so a worker has one log."""
    started = time.perf_counter()
    warm_imports()
    print(f"[{log_time()}] worker started before the sweep was planned: imports took {time.perf_counter() - started:.1f} s", flush=True)
    early_log = os.environ.get(PRESTART_LOG_ENV)
    line = sys.stdin.readline()
    if not line.strip():  # not needed (or the sweep process died): leave no temporary log behind
        if early_log:
            Path(early_log).unlink(missing_ok=True)
        return None
    adopt = json.loads(line)["adopt"]
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(adopt["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if early_log and os.path.exists(early_log):
        with open(early_log, "rb") as early:
            os.write(log_fd, early.read())
        os.unlink(early_log)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.environ[LOCAL_JOB_ENV] = adopt["job_id"]
    return adopt["pickle"]


def main(pickle_path: str | None) -> None:
    from submitit.helpers import DelayedSubmission

    if pickle_path == PRESTART:
        pickle_path = await_adoption()
        if pickle_path is None:
            return
    DelayedSubmission.load(pickle_path).result()


if __name__ == "__main__":
    main(sys.argv[1])
    # The cells' files are written and fsynced; skip the interpreter's teardown of torch & co (seconds).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
