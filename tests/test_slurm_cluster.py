"""The one-node SLURM cluster of scripts/slurm-local.sh, exercised for real.

Needs the Debian packages slurmctld slurmd slurm-client munge (and slurmdbd mariadb-server for
the accounting test) and root; skips without them unless PRUNE_EVAL_REQUIRE_SLURM(_ACCOUNTING)
is set. Every test is bounded by pytest-timeout and every command by a subprocess timeout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# Plain module beside this file (pytest puts tests/ on sys.path); the fixtures are module-scoped.
from slurm_fixtures import (  # noqa: F401  (fixtures are used by name)
    SCRIPT,
    SlurmCluster,
    slurm_cluster,
    slurm_cluster_accounting,
)

pytestmark = pytest.mark.slurm


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -eu\n" + body)
    path.chmod(0o755)
    return path


def _wait_path(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout}s")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_cluster_is_up_and_private(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("sinfo", "-h", "-o", "%P|%T|%c").stdout.split()
    assert out == [f"{slurm_cluster.partition}*|idle|{len(os.sched_getaffinity(0))}"]
    # Its own config in its own state dir; the machine's /etc/slurm is never used.
    assert Path(slurm_cluster.slurm_conf).is_relative_to(slurm_cluster.state_dir)
    conf = Path(slurm_cluster.slurm_conf).read_text()
    assert f"AuthInfo=socket={slurm_cluster.state_dir}/run/munge.socket" in conf

    status = slurm_cluster.run("bash", str(SCRIPT), "status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    again = slurm_cluster.run("bash", str(SCRIPT), "start", timeout=90)
    assert "already running" in again.stdout
    env_out = slurm_cluster.run("bash", str(SCRIPT), "env").stdout
    assert f"export SLURM_CONF={slurm_cluster.slurm_conf}" in env_out.splitlines()
    print(f"slurm-local.sh start took {slurm_cluster.start_seconds:.1f}s")


@pytest.mark.timeout(120)
def test_array_job_writes_all_outputs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = _write_script(
        tmp_path / "job.sh",
        'echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $(uname -n | cut -d. -f1)" '
        '> "$OUT_DIR/task_${SLURM_ARRAY_TASK_ID}.txt"\n'
        'echo "stdout of task $SLURM_ARRAY_TASK_ID"\n',
    )
    job = slurm_cluster.sbatch(
        "--array=0-3",
        "--mem=64M",
        "--time=2",
        f"--output={tmp_path}/slurm-%A_%a.out",
        f"--export=ALL,OUT_DIR={out_dir}",
        str(script),
    )
    states = slurm_cluster.wait_until_done(job, n_tasks=4, timeout=90)
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(4)}

    host = os.uname().nodename.split(".")[0]
    for i in range(4):
        assert (out_dir / f"task_{i}.txt").read_text().split() == [job, str(i), host]
        assert (tmp_path / f"slurm-{job}_{i}.out").read_text() == f"stdout of task {i}\n"
    # Finished tasks leave the active queue.
    assert slurm_cluster.active_task_ids(job) == set()


@pytest.mark.timeout(120)
def test_scancel_of_one_running_array_task(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # Each task records the pid of its sleep (exec keeps the pid), so we can see it die.
    script = _write_script(
        tmp_path / "sleeper.sh",
        'echo $$ > "$PID_DIR/pid_${SLURM_ARRAY_TASK_ID}"\nexec sleep 600\n',
    )
    job = slurm_cluster.sbatch(
        "--array=0-1",
        "--mem=64M",
        "--time=5",
        "--output=/dev/null",
        f"--export=ALL,PID_DIR={tmp_path}",
        str(script),
    )
    t0, t1 = f"{job}_0", f"{job}_1"
    try:
        slurm_cluster.wait_for(
            job,
            lambda s: s.get(t0) == "RUNNING" and s.get(t1) == "RUNNING",
            timeout=60,
            what="both tasks running",
        )
        pid_file = {i: tmp_path / f"pid_{i}" for i in (0, 1)}
        _wait_path(lambda: all(p.exists() and p.read_text().strip() for p in pid_file.values()), 30, "pid files")
        pid = {i: int(p.read_text()) for i, p in pid_file.items()}
        assert _pid_alive(pid[0]) and _pid_alive(pid[1])

        slurm_cluster.run("scancel", t0)
        states = slurm_cluster.wait_for(
            job, lambda s: s.get(t0) == "CANCELLED", timeout=30, what=f"{t0} CANCELLED"
        )
        assert states[t1] == "RUNNING"
        _wait_path(lambda: not _pid_alive(pid[0]), 30, f"task 0's process {pid[0]} gone")
        assert _pid_alive(pid[1])
        # Plain squeue (no --states=all) no longer lists the cancelled task.
        assert slurm_cluster.active_task_ids(job) == {t1}

        slurm_cluster.run("scancel", job)
        states = slurm_cluster.wait_until_done(job, n_tasks=2, timeout=30)
        assert states == {t0: "CANCELLED", t1: "CANCELLED"}
        _wait_path(lambda: not _pid_alive(pid[1]), 30, f"task 1's process {pid[1]} gone")
    finally:
        slurm_cluster.run("scancel", job, check=False)


@pytest.mark.timeout(120)
def test_sigkilled_task_is_seen_without_sacct(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Catch 2 without slurmdbd: sacct is unavailable, but squeue --states=all shows FAILED."""
    script = _write_script(
        tmp_path / "killed.sh",
        'sleep 1\nif [ "$SLURM_ARRAY_TASK_ID" = 1 ]; then kill -KILL $$; fi\necho ok\n',
    )
    job = slurm_cluster.sbatch("--array=0-1", "--mem=64M", "--time=2", "--output=/dev/null", str(script))
    states = slurm_cluster.wait_until_done(job, n_tasks=2, timeout=60)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "FAILED"}
    sacct = slurm_cluster.run("sacct", "-j", job, check=False)
    assert sacct.returncode != 0  # catch 1: "Slurm accounting storage is disabled"


@pytest.mark.timeout(120)
def test_sacct_and_submitit_see_sigkilled_task_with_accounting(
    slurm_cluster_accounting: SlurmCluster, tmp_path: Path
) -> None:
    """Catch 2 fixed by --accounting: sacct reports FAILED and submitit raises promptly."""
    submitit = pytest.importorskip("submitit")
    cluster = slurm_cluster_accounting

    def task(i: int) -> int:  # local, so cloudpickle ships it by value to the job
        import os
        import signal
        import time

        time.sleep(0.5)
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return i * 10

    with cluster.activated():
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        executor.update_parameters(
            timeout_min=2, slurm_partition=cluster.partition, mem_gb=0.1, cpus_per_task=1
        )
        jobs = executor.map_array(task, [0, 1])
        assert jobs[0].result() == 0
        with pytest.raises(submitit.core.utils.UncompletedJobError, match="FAILED"):
            jobs[1].result()

    array_id = jobs[0].job_id.split("_")[0]

    def sacct_states() -> dict[str, str]:
        out = cluster.run("sacct", "-X", "-n", "-P", "-j", array_id, "-o", "JobID,State").stdout
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)

    _wait_path(lambda: len(sacct_states()) == 2, 30, "sacct records of both tasks")
    assert sacct_states() == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "FAILED"}
