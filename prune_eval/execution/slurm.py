"""`launch=slurm`: cells packed into array tasks (resident workers), submitted through submitit, watched.

Submission is hydra-submitit-launcher's (submitit job arrays, `sbatch --array=0-N%P`); each array
task runs a list of cells one after another with one resident model per model group
(prune_eval.execution.worker.run_task), packed by prune_eval.execution.schedule
(`launch.cells_per_task`). The waiting is ours (watch_slurm): squeue and the cells' own files,
never pickled job results (without sacct, submitit never notices a SIGKILLed task).
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prune_eval.errors import PruneEvalError
from prune_eval.execution.checks import COMMAND_TIMEOUT_S, check_cells_per_task, check_slurm_launch, slurm_params
from prune_eval.execution.schedule import CellJob, pack_tasks, task_count
from prune_eval.analysis.cellfiles import is_locked
from prune_eval.execution.watching import RUNNING_STATES, Launched, Progress, conclude, is_complete, started_by

log = logging.getLogger("prune_eval")

SQUEUE_OUTAGE_S = 1800  # give up watching when squeue has failed for this long

# squeue %T states after which a task never runs again (unless requeued: see lost_after_s).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
})


class SlurmQueryError(RuntimeError):
    pass


# Pending reasons that no waiting resolves: the task is cancelled and its cell reported.
HOPELESS_REASONS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                              "InvalidAccount", "InvalidQOS", "QOSJobLimit", "AssocMaxJobsLimit"})
ORDINARY_REASONS = frozenset({"None", "Priority", "Resources", "BeginTime", "JobArrayTaskLimit", "Dependency", ""})


@dataclass(frozen=True)
class TaskState:
    state: str  # squeue %T: PENDING, RUNNING, COMPLETED, FAILED, ...
    reason: str = ""  # squeue %r: why it is pending (or how it ended)


def squeue_states(array_ids: Sequence[str], run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict[str, TaskState]:
    """{task id: state} for the tasks of these jobs, finished ones included while the controller
    remembers them (MinJobAge). A job the controller forgot is simply absent."""
    states: dict[str, TaskState] = {}
    for array_id in array_ids:
        try:
            out = run(["squeue", "-h", "-r", "--states=all", "-j", array_id, "-o", "%i|%T|%r"],
                      capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlurmQueryError(f"squeue: {e}") from None
        if out.returncode != 0:
            if "invalid job id" in out.stderr.lower():
                continue  # purged from the controller's memory
            raise SlurmQueryError(f"squeue exited {out.returncode}: {out.stderr.strip()[:300]}")
        for line in out.stdout.splitlines():
            cols = line.strip().split("|")
            if len(cols) >= 2:
                states[cols[0]] = TaskState(cols[1].split()[0] if cols[1].strip() else "UNKNOWN", cols[2] if len(cols) > 2 else "")
    return states


def scancel(job_ids: Sequence[str], run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    try:
        run(["scancel", *job_ids], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("scancel %s: %s", " ".join(job_ids), e)


def watch_slurm(jobs: list[Launched], *, poll_s: float, lost_after_s: float, progress: Progress,
                squeue: Callable[[Sequence[str]], dict[str, TaskState]] = squeue_states,
                cancel: Callable[[Sequence[str]], None] = scancel,
                clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                gpus_per_task: int = 1) -> list[str]:
    """Poll squeue and the cell directories until every job is over; returns each cell's outcome.
    `jobs` are cells; the cells packed into one task share its job id.

    A job is over when its cell is complete, or when its task is no longer active in squeue and
    either its cell wrote a new error.json or `lost_after_s` seconds (and two polls) have passed:
    the grace period covers requeues (PREEMPTED / NODE_FAIL / REQUEUED -> PENDING). squeue is read
    before the cells, so a task that left the queue had written its files before we looked. A task
    pending for a reason that never clears (PartitionConfig, InvalidAccount, ...) is cancelled.
    """
    array_ids = sorted({job.job_id.split("_")[0] for job in jobs})
    poll_s = min(max(float(poll_s), 0.2), 120.0)
    outage_since: float | None = None
    hopeless_since: dict[str, float] = {}
    while True:
        try:
            states: dict[str, TaskState] | None = squeue(array_ids)
            outage_since = None
        except SlurmQueryError as e:
            outage_since = outage_since if outage_since is not None else clock()
            if clock() - outage_since > SQUEUE_OUTAGE_S:
                raise RuntimeError(f"squeue has failed for {SQUEUE_OUTAGE_S}s ({e}); stopped watching, the jobs may still run") from None
            log.warning("%s (retrying)", e)
            states = None
        now = clock()
        reasons: dict[str, int] = {}
        for job in jobs:
            if job.outcome is not None:
                continue
            if is_complete(job.cell_dir):
                job.outcome = "complete"
                continue
            if states is None:
                continue
            task = states.get(job.job_id)
            if task is not None and task.state not in FINAL_STATES:
                job.state, job.gone_polls, job.gone_since = task.state, 0, None
                if job.new_error() and not is_locked(job.cell_dir):  # the task went on to its next cell
                    job.outcome = "failed"
                    continue
                if task.state == "PENDING" and task.reason not in ORDINARY_REASONS:
                    reasons[task.reason] = reasons.get(task.reason, 0) + 1
                if task.state == "PENDING" and task.reason in HOPELESS_REASONS:
                    if now - hopeless_since.setdefault(job.job_id, now) >= lost_after_s:
                        cancel([job.job_id])
                        job.outcome = conclude(job, f"SLURM cannot start task {job.job_id} (pending, reason {task.reason}), so it was cancelled")
                continue
            job.gone_polls += 1
            job.gone_since = job.gone_since if job.gone_since is not None else now
            if job.new_error():
                job.outcome = "failed"
            elif job.gone_polls >= 2 and now - job.gone_since >= lost_after_s:
                how = f"ended ({task.state})" if task else "left the queue"
                reached = "" if started_by(job.cell_dir, job.job_id) else " (it had not started this cell, one of the cells packed into it)"
                job.outcome = conclude(job, f"SLURM task {job.job_id} {how} before the cell finished{reached} (killed, out of memory or cancelled?)")
        if states is not None:
            progress.gpus = max(1, gpus_per_task * len({t for t, st in states.items() if st.state == "RUNNING"}))
        running = running_cells(jobs)
        progress.update(jobs, "".join(f"  ({n} pending: {r})" for r, n in sorted(reasons.items())), running=lambda j: id(j) in running)
        if all(job.outcome is not None for job in jobs):
            return [job.outcome for job in jobs]
        sleep(poll_s)


def running_cells(jobs: Sequence[Launched]) -> set[int]:
    """ids of the cells a running task is at: the one it holds locked, else its first unfinished one
    (a task runs its cells one after another)."""
    by_task: dict[str, list[Launched]] = {}
    for job in jobs:
        if job.outcome is None and job.state in RUNNING_STATES:
            by_task.setdefault(job.job_id, []).append(job)
    running: set[int] = set()
    for cells in by_task.values():
        locked = [c for c in cells if is_locked(c.cell_dir)]
        running |= {id(c) for c in (locked or cells[:1])}
    return running


def launch_slurm(launcher, cells: Sequence[CellJob], params: dict, out: Callable[[str], None] | None = None, *,
                 checked: bool = False) -> list[str]:
    """Pack the cells into tasks, submit them as SLURM job arrays through submitit (as
    hydra-submitit-launcher does) and watch them with watch_slurm; returns each cell's outcome.
    `checked`: the launcher's check_before_launch passed a moment ago (else the checks run here)."""
    from hydra.core.singleton import Singleton

    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    out = out or (lambda line: print(line, flush=True))
    if not checked:
        check_slurm_launch(launcher.config, params)
    params = slurm_params(params)
    poll_s, progress_s = params.pop("poll_s"), params.pop("progress_s")
    lost_after_s, max_array_size = params.pop("lost_after_s"), int(params.pop("max_array_size"))
    cells_per_task = check_cells_per_task(params.pop("cells_per_task"))

    folder = Path(str(params.pop("submitit_folder"))).absolute()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=int(params.pop("max_num_timeout")))
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})

    tasks = pack_tasks(cells, task_count(cells, cells_per_task, int(params.get("array_parallelism") or 1)))
    state = Singleton.get_state()
    jobs: list[Launched] = []
    for start in range(0, len(tasks), max(1, max_array_size)):
        chunk = tasks[start:start + max(1, max_array_size)]
        watched = [[Launched(Path(c.cell_dir), n_questions=c.n_questions, cost=c.cost) for c in task] for task in chunk]  # error.json before submission
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr; we say it once
                submitted = executor.map_array(launcher, [[c.to_json() for c in task] for task in chunk], [state] * len(chunk))
        except (FailedJobError, FailedSubmissionError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = next((line for line in reversed(lines) if "error" in line.lower()), lines[0])
            if not jobs:
                raise PruneEvalError(f"sbatch refused the job array, nothing was submitted: {first}") from None
            raise RuntimeError(f"sbatch refused a job array after {len(jobs)} cell(s) were submitted: {first}") from None
        for task_cells, sub in zip(watched, submitted):
            for job in task_cells:
                job.job_id, job.log = str(sub.job_id), Path(sub.paths.stderr)
                jobs.append(job)
    arrays = sorted({j.job_id.split("_")[0] for j in jobs}, key=lambda s: int(s) if s.isdigit() else 0)
    packing = "one cell per task" if len(tasks) == len(jobs) else f"in {len(tasks)} task(s) of up to {max(map(len, tasks))} cells, one resident model each"
    out(f"submitted {len(jobs)} cell(s) as SLURM job {', '.join(arrays)}, {packing} (at most {params.get('array_parallelism')} "
        f"tasks at once); logs: {str(folder).replace('%j', '<job id>')}")
    try:
        return watch_slurm(jobs, poll_s=poll_s, lost_after_s=lost_after_s, progress=Progress(f"slurm {','.join(arrays)}", progress_s, out),
                           gpus_per_task=int(params.get("gpus_per_node") or 1))
    except KeyboardInterrupt:
        out(f"interrupted: SLURM job {', '.join(arrays)} keeps running (stop it with `scancel {' '.join(arrays)}`); "
            "rerun the same command to collect finished cells and launch the rest")
        raise
