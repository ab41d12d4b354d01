"""`launch=slurm` end to end on the one-node test cluster (scripts/slurm-local.sh, no accounting:
nothing here relies on sacct): cells packed into array tasks with one model load per task, a
SIGKILLed and a cancelled task detected and rerun, a packed task killed between its cells, a
preempted cell requeued through submitit's checkpoint and resumed, bad input refused before sbatch.

Every test has a pytest timeout and every command a subprocess timeout, so a lost job fails a test
instead of hanging CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_DEMO, FASTPATH_DEMO, run_cli

# Plain module beside this file; the fixture is module-scoped (one cluster for this module).
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

from prune_eval.execution import records
from prune_eval.execution import events
from prune_eval.analysis.cellfiles import cell_status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

QUESTIONS = 3 * 3 * 6  # FAST_DEMO: 3 images x 3 splits x 6 questions


def slurm_args(cluster: SlurmCluster, **overrides) -> list[str]:
    """launch=slurm sized for the 2-core test node, polling fast."""
    settings = {"partition": cluster.partition, "cpus": 1, "mem_gb": 1, "gpus": "null", "time_min": 10,
                "poll_s": 0.5, "progress_s": 5, "lost_after_s": 3, **overrides}
    return ["launch=slurm", *(f"launch.{k}={v}" for k, v in settings.items())]


def cli_env(cluster: SlurmCluster) -> dict[str, str]:
    # One thread per cell: two cells share the node's two cores (OpenMP spinning otherwise).
    return {**cluster.env, "OMP_NUM_THREADS": "1"}


def cells(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / "cell.json").exists() or (p / "error.json").exists())


def check_records(cell: Path) -> None:
    read = records.read_records(cell)
    assert not read.bad_parts and not read.conflicts, cell
    assert len(read.records) == len(read.keys) == QUESTIONS, (cell, len(read.records))


def sweep_jobs(sweep: Path) -> set[str]:
    """Array job ids the cells of this sweep ran under (from launches.jsonl)."""
    return {e["job_id"].split("_")[0] for c in cells(sweep) for e in events.read_events(c)}


def started(cell: Path) -> list[str]:
    return [e["event"] for e in events.read_events(cell) if e["event"] != "computed"]


@pytest.mark.timeout(420)
def test_slurm_sweep_packs_cells_into_a_task_with_one_model_load_and_a_rerun_submits_nothing(slurm_cluster: SlurmCluster, tmp_path) -> None:
    """Six jobs, four cells (VisionZip has one cell for all seeds); the toy's cells are far
    cheaper than a task's start, so launch.cells_per_task=auto packs them into one task, which
    loads the model once."""
    args = ["-m", *FASTPATH_DEMO, "method=random,visionzip", "budget=64", "seed=0,1,2", *slurm_args(slurm_cluster)]
    result = run_cli(args, tmp_path, env=cli_env(slurm_cluster), timeout=360)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + slurm_cluster.log_tail()
    assert "submitted 4 cell(s) as SLURM job" in result.stdout and "in 1 task(s) of up to 4 cells, one resident model each" in result.stdout
    assert "cells: 4 complete, 0 running, 0 failed, 0 pending" in result.stdout
    assert "visionzip-64 does not use the seed: one computation serves seeds 0–2" in result.stdout
    sweep = tmp_path / "outputs" / "demo"
    found = cells(sweep)
    assert len(found) == 4
    for cell in found:
        assert cell_status(cell) == "complete"
        check_records(cell)
        assert started(cell) == ["start", "end"]
    assert len({events.read_events(c)[0]["job_id"] for c in found}) == 1  # one task ran them all
    assert sum(json.loads((c / "summary.json").read_text())["timing"]["loads"] for c in found) == 1
    (array,) = sweep_jobs(sweep)
    assert set(slurm_cluster.task_states(array).values()) == {"COMPLETED"}
    if importlib.util.find_spec("prune_eval.analysis.report") is not None:
        report = next(line.split("report: ", 1)[1] for line in result.stdout.splitlines() if line.startswith("report: "))
        assert (tmp_path / report).is_file()

    again = run_cli(args, tmp_path, env=cli_env(slurm_cluster), timeout=120)
    assert again.returncode == 0 and "4 were already complete" in again.stdout and "submitted" not in again.stdout


def wait_until(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {process.stdout.read()[-3000:] if process.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def running_cell_with_a_part(sweep: Path) -> Path | None:
    for cell in sweep.glob("*/records"):
        if records.part_paths(cell.parent) and not (cell.parent / "summary.json").exists():
            return cell.parent
    return None


def start_sweep(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prune_eval", *args], cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
        raise AssertionError(f"the sweep did not end within {timeout}s:\n{out[-3000:]}") from None
    return out


@pytest.mark.timeout(420)
def test_killed_and_cancelled_tasks_are_reported_and_a_rerun_completes_them(slurm_cluster: SlurmCluster, tmp_path) -> None:
    """One task is SIGKILLed mid-cell (as the OOM killer would), one is cancelled while pending; the
    sweep notices both without sacct, ends with exit 1, and a rerun submits just those two."""
    sweep = tmp_path / "outputs" / "demo"
    args = ["-m", *FAST_DEMO, "method=random", "budget=64", "seed=0,1,2", *slurm_args(slurm_cluster, array_parallelism=1, cells_per_task=1)]
    process = start_sweep(args, tmp_path, cli_env(slurm_cluster))
    try:
        killed = wait_until(lambda: running_cell_with_a_part(sweep), 120, "a cell wrote a record part", process)
        host, pid = (killed / ".lock").read_text().split()
        os.kill(int(pid), signal.SIGKILL)
        array = events.read_events(killed)[0]["job_id"].split("_")[0]
        pending = wait_until(lambda: [t for t, s in slurm_cluster.task_states(array).items() if s == "PENDING"], 30,
                             "a pending task", process)
        slurm_cluster.run("scancel", sorted(pending)[-1])
        out = finish(process, 240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1, out[-3000:]
    statuses = {c.name: cell_status(c) for c in cells(sweep)}
    assert sorted(statuses.values()) == ["complete", "failed", "failed"], out[-3000:]
    assert "failed: " + killed.name in out and f"SLURM task {array}_" in out
    messages = [json.loads((c / "error.json").read_text()) for c in cells(sweep) if statuses[c.name] == "failed"]
    assert all(m["type"] == "JobDied" and "before the cell finished" in m["message"] for m in messages)
    answered_before = len(records.read_records(killed).records)
    assert 0 < answered_before < QUESTIONS
    if importlib.util.find_spec("prune_eval.analysis.report") is not None:
        assert "report: " in out  # the report is written although cells failed

    rerun = run_cli([a for a in args if not a.startswith("launch.array_parallelism=")] + ["launch.array_parallelism=2"], tmp_path,
                    env=cli_env(slurm_cluster), timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "1 were already complete" in rerun.stdout and "submitted 2 cell(s)" in rerun.stdout
    for cell in cells(sweep):
        assert cell_status(cell) == "complete" and not (cell / "error.json").exists()
        check_records(cell)
    assert len(records.read_records(killed).records) == QUESTIONS  # resumed: only the missing questions were added


@pytest.mark.timeout(420)
def test_a_packed_task_killed_between_cells_leaves_the_finished_complete_and_the_rest_resumable(slurm_cluster: SlurmCluster, tmp_path) -> None:
    """Three cells in one task; the task is SIGKILLed while its second cell is half done: the first
    stays complete, the second and third are reported died (the third never started) and a rerun
    submits just those two, resuming the second from its records."""
    sweep = tmp_path / "outputs" / "demo"
    args = ["-m", *FAST_DEMO, "method=random", "budget=64", "seed=0,1,2", *slurm_args(slurm_cluster, cells_per_task=3)]
    process = start_sweep(args, tmp_path, cli_env(slurm_cluster))
    try:
        def second_cell_half_done():
            done = [c for c in cells(sweep) if cell_status(c) == "complete"] if sweep.is_dir() else []
            return running_cell_with_a_part(sweep) if len(done) == 1 else None

        killed = wait_until(second_cell_half_done, 200, "the task's second cell wrote a record part", process)
        host, pid = (killed / ".lock").read_text().split()
        os.kill(int(pid), signal.SIGKILL)
        out = finish(process, 240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1, out[-3000:]
    assert "in 1 task(s) of up to 3 cells" in out
    statuses = {c.name: cell_status(c) for c in cells(sweep)}
    assert sorted(statuses.values()) == ["complete", "failed", "failed"], out[-3000:]  # the third: an error.json, nothing else
    messages = {c.name: json.loads((c / "error.json").read_text())["message"] for c in cells(sweep) if statuses[c.name] == "failed"}
    assert "before the cell finished (killed" in messages[killed.name]
    assert all("it had not started this cell" in m for n, m in messages.items() if n != killed.name)
    answered_before = len(records.read_records(killed).records)
    assert 0 < answered_before < QUESTIONS

    rerun = run_cli(args, tmp_path, env=cli_env(slurm_cluster), timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "1 were already complete" in rerun.stdout and "submitted 2 cell(s)" in rerun.stdout
    for cell in cells(sweep):
        assert cell_status(cell) == "complete"
        check_records(cell)
    computed = sum(e["questions"] for e in events.read_events(killed) if e["event"] == "computed")
    assert computed == QUESTIONS - answered_before  # resumed: only the missing questions were answered again


@pytest.mark.timeout(300)
def test_a_preempted_cell_is_requeued_by_submitit_and_resumes(slurm_cluster: SlurmCluster, tmp_path) -> None:
    """USR2 is submitit's preemption/timeout signal: our checkpoint() hands the same call back, submitit
    requeues the job (scontrol requeue), and the requeued job finishes the cell from its records."""
    sweep = tmp_path / "outputs" / "demo"
    args = ["-m", *FAST_DEMO, "data.n_images=6", "method=vanilla", "seed=0", *slurm_args(slurm_cluster)]
    process = start_sweep(args, tmp_path, cli_env(slurm_cluster))
    try:
        cell = wait_until(lambda: running_cell_with_a_part(sweep), 120, "a cell wrote a record part", process)
        job = events.read_events(cell)[0]["job_id"]
        slurm_cluster.run("scancel", "--signal=USR2", job)
        # SLURM holds a requeued job back for a while (BeginTime); release it at once.
        slurm_cluster.wait_for(job, lambda s: s.get(job) == "PENDING", 60, "the job requeued")
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        out = finish(process, 200)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, out[-3000:]
    lines = [e for e in events.read_events(cell) if e["event"] != "computed"]
    assert [e["event"] for e in lines] == ["start", "requeue", "start", "end"], lines
    assert lines[2]["restarts"] == 1 and lines[3]["status"] == "complete"
    read = records.read_records(cell)
    assert not read.bad_parts and not read.conflicts and len(read.records) == len(read.keys) == 2 * QUESTIONS


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        ({"partition": "nosuch"}, [], "unknown SLURM partition (launch.partition) 'nosuch' choices: debug"),
        ({"cpus": 64}, [], "launch.cpus=64 is more than any node of partition"),
        ({"gpus": 1}, [], "launch.gpus=1 is more than any node of partition"),
        ({}, ["+hydra.launcher.additional_parameters.begin=garbage"],
         "sbatch refused the job array, nothing was submitted: sbatch: error: Invalid --begin specification"),
    ],
    ids=["partition", "cpus", "gpus", "sbatch-refuses"],
)
def test_bad_slurm_input_is_refused_before_anything_runs(slurm_cluster: SlurmCluster, tmp_path, overrides, extra, message) -> None:
    before = slurm_cluster.run("squeue", "-h", "--states=all", "-o", "%i").stdout.split()
    result = run_cli(["-m", *FAST_DEMO, "method=vanilla", "seed=0,1", *slurm_args(slurm_cluster, **overrides), *extra], tmp_path,
                     env=cli_env(slurm_cluster), timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("prune_eval: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert slurm_cluster.run("squeue", "-h", "--states=all", "-o", "%i").stdout.split() == before  # nothing submitted
