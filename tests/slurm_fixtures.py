"""A real one-node SLURM cluster for tests, started with scripts/slurm-local.sh.

Import the fixtures into a test module (they are module-scoped: one cluster per module)::

    from slurm_fixtures import slurm_cluster            # noqa: F401  (pytest fixture)

    @pytest.mark.slurm
    @pytest.mark.timeout(120)
    def test_something(slurm_cluster):
        job = slurm_cluster.sbatch("--array=0-1", "--wrap", "true")
        slurm_cluster.wait_until_done(job, n_tasks=2, timeout=60)

``slurm_cluster.env`` is os.environ plus SLURM_CONF: pass it to anything that calls sbatch
(submitit, hydra-submitit-launcher) or use ``slurm_cluster.activated()`` to set it in-process.

Without the Debian packages the fixtures skip, unless PRUNE_EVAL_REQUIRE_SLURM is set (then
they fail). ``slurm_cluster_accounting`` (slurmdbd + MariaDB, so ``sacct`` works) likewise
skips unless PRUNE_EVAL_REQUIRE_SLURM_ACCOUNTING is set. Every call here has a timeout: a
broken cluster makes a test fail, never hang.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "slurm-local.sh"

APT_BASE = "apt-get update && apt-get install -y slurmctld slurmd slurm-client munge"

# Commands the script needs; daemons are in /usr/sbin, which may be missing from PATH.
_BASE_COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel")
_ACCOUNTING_COMMANDS = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

# Slurm job states after which a job never runs again (squeue %T spelling).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)

START_TIMEOUT_S = 90  # the script's own bound is 60 s; this one covers install-db etc.
STOP_TIMEOUT_S = 90
CMD_TIMEOUT_S = 30


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _skip_or_fail(reason: str, require_var: str) -> None:
    if _flag(require_var):
        pytest.fail(f"{reason} (and {require_var} is set, so this is a failure)", pytrace=False)
    pytest.skip(f"{reason}; set {require_var}=1 to make this a failure")


def missing_commands(accounting: bool = False) -> list[str]:
    names = _BASE_COMMANDS + (_ACCOUNTING_COMMANDS if accounting else ())
    return [n for n in names if shutil.which(n, path=_SEARCH_PATH) is None]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int = 4, start: int = 17000, stop: int = 18000) -> int:
    """First port p in [start, stop) with p..p+n-1 all free on 127.0.0.1.

    Fixed range rather than ephemeral ports: Slurm clients use ephemeral ports themselves.
    """
    for base in range(start, stop - n, n):
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports in {start}..{stop}")


def _run(
    args: list[str], env: Mapping[str, str], timeout: float = CMD_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            args, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{args!r} did not finish within {timeout}s") from e
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args!r} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@dataclass
class SlurmCluster:
    """A running cluster: its state dir, the environment to reach it, and small helpers."""

    state_dir: Path
    env: dict[str, str]
    partition: str
    accounting: bool
    start_seconds: float = 0.0  # how long slurm-local.sh start took

    @property
    def slurm_conf(self) -> str:
        return self.env["SLURM_CONF"]

    def run(self, *args: str, timeout: float = CMD_TIMEOUT_S, check: bool = True):
        """Run a SLURM client command (sbatch, squeue, ...) against this cluster."""
        return _run(list(args), self.env, timeout=timeout, check=check)

    def sbatch(self, *args: str, timeout: float = CMD_TIMEOUT_S) -> str:
        """Submit; return the job id. Adds --parsable and the partition."""
        out = self.run("sbatch", "--parsable", f"--partition={self.partition}", *args, timeout=timeout)
        return out.stdout.strip().split(";")[0]

    def task_states(self, job_id: str) -> dict[str, str]:
        """{'12_0': 'RUNNING', ...} for a job or array, finished tasks included.

        Uses ``squeue --states=all``, which lists finished jobs for MinJobAge seconds (the
        script sets an hour): the sacct-less way to see how a task ended.
        """
        out = self.run("squeue", "-h", "-r", "--states=all", "-j", job_id, "-o", "%i|%T", check=False)
        states = {}
        for line in out.stdout.splitlines():
            if "|" in line:
                task, state = line.strip().split("|", 1)
                states[task] = state
        return states

    def active_task_ids(self, job_id: str) -> set[str]:
        """Tasks plain ``squeue`` still shows (pending, running, completing)."""
        out = self.run("squeue", "-h", "-r", "-j", job_id, "-o", "%i", check=False)
        return {line.strip() for line in out.stdout.splitlines() if line.strip()}

    def wait_for(
        self,
        job_id: str,
        predicate: Callable[[dict[str, str]], bool],
        timeout: float,
        what: str = "condition",
        poll: float = 0.5,
    ) -> dict[str, str]:
        """Poll task_states until predicate(states) is true; fail after timeout seconds."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.task_states(job_id)
            if predicate(states):
                return states
            time.sleep(poll)
        raise AssertionError(
            f"job {job_id}: {what} not reached within {timeout}s; last states {states}\n"
            + self.log_tail()
        )

    def wait_until_done(self, job_id: str, n_tasks: int, timeout: float) -> dict[str, str]:
        """Wait until n_tasks tasks of job_id are in a final state; return their states."""
        return self.wait_for(
            job_id,
            lambda s: len(s) >= n_tasks and all(v in FINAL_STATES for v in s.values()),
            timeout,
            what=f"all {n_tasks} tasks finished",
        )

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            f = self.state_dir / "log" / name
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- tail of {f}\n" + "\n".join(tail))
        return "\n".join(parts)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Set SLURM_CONF in os.environ for in-process callers (submitit, hydra)."""
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = self.slurm_conf
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old


@contextlib.contextmanager
def running_cluster(
    accounting: bool = False, partition: str = "debug", state_dir: Path | None = None
) -> Iterator[SlurmCluster]:
    """Start a private cluster (own state dir and free ports), yield it, stop and purge it.

    Skips (or fails, see module doc) when the packages are missing or we are not root.
    """
    require_var = "PRUNE_EVAL_REQUIRE_SLURM_ACCOUNTING" if accounting else "PRUNE_EVAL_REQUIRE_SLURM"
    missing = missing_commands(accounting)
    if missing:
        apt = f"{APT_BASE} slurmdbd mariadb-server" if accounting else APT_BASE
        _skip_or_fail(f"SLURM commands not installed: {', '.join(missing)} (install: {apt})", require_var)
    if os.geteuid() != 0:
        _skip_or_fail("the local SLURM cluster must be started as root", require_var)

    # Under /tmp, not pytest's tmp_path: munged needs every parent dir world-traversable and
    # pytest's basetemp is 0700; the Unix socket path must also stay short.
    own_dir = state_dir is None
    sdir = Path(tempfile.mkdtemp(prefix="pe-slurm-", dir="/tmp")) if own_dir else state_dir
    base = free_port_block(4)
    env = dict(os.environ)
    env.update(
        PRUNE_EVAL_SLURM_DIR=str(sdir),
        PRUNE_EVAL_SLURM_CTLD_PORT=str(base),
        PRUNE_EVAL_SLURM_SLURMD_PORT=str(base + 1),
        PRUNE_EVAL_SLURM_DBD_PORT=str(base + 2),
        PRUNE_EVAL_SLURM_DB_PORT=str(base + 3),
        PRUNE_EVAL_SLURM_PARTITION=partition,
        SLURM_CONF=str(sdir / "etc" / "slurm.conf"),
    )
    env["PATH"] = _SEARCH_PATH
    # A job's own SLURM_* variables (when pytest itself runs inside a job) would confuse sbatch.
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]

    start_cmd = ["bash", str(SCRIPT), "start"] + (["--accounting"] if accounting else [])
    try:
        t0 = time.monotonic()
        proc = _run(start_cmd, env, timeout=START_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise AssertionError(
                f"slurm-local.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        yield SlurmCluster(
            state_dir=sdir,
            env=env,
            partition=partition,
            accounting=accounting,
            start_seconds=time.monotonic() - t0,
        )
    finally:
        stop_cmd = ["bash", str(SCRIPT), "stop"] + (["--purge"] if own_dir else [])
        stop = _run(stop_cmd, env, timeout=STOP_TIMEOUT_S, check=False)
        if stop.returncode != 0:
            print(f"slurm-local.sh stop failed:\n{stop.stdout}\n{stop.stderr}")


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node cluster without accounting (sacct does not work), for this test module."""
    with running_cluster(accounting=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_cluster_accounting() -> Iterator[SlurmCluster]:
    """A one-node cluster with slurmdbd + MariaDB, so that sacct (and submitit) see job ends."""
    with running_cluster(accounting=True) as cluster:
        yield cluster
