"""Launching cells on local GPUs or on SLURM, and watching them through the cells' own files.

The launcher plugins (hydra_plugins/prune_eval_plugins/launchers.py, chosen with `launch=local-gpus`
or `launch=slurm`) are thin; the logic is here. Three parts:

- **Checks before anything starts** (`check_launch_overrides`, `gpu_pool`, `check_slurm`): a bad
  GPU id, no GPU at all, a missing `sbatch` or an unknown partition is one PruneEvalError, which the
  sweeper prints as `prune_eval: error: ...` (exit 2).
- **The worker side** (`run_cell_job`): what runs in the cell's own process (a local subprocess
  pinned to one GPU, or a SLURM array task): compose the job's config, run it, and append start/end
  events (job id, GPU, host, time) to `<cell>/launches.jsonl`.
- **Waiting** (`launch_local_gpus`, `launch_slurm`): never on pickled job results. A job is over
  when its cell has `summary.json`, or when its process (local) / its task (SLURM: gone from
  `squeue`, or in a final state in `squeue --states=all`) has ended. How it ended is read from the
  cell directory: complete, failed (a new `error.json`), busy (another process holds the cell), or
  died (none of these: killed, out of memory, cancelled); a died cell gets an `error.json` naming
  the job and its log, so the status table says what happened and a rerun resumes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_eval.errors import PruneEvalError, did_you_mean, unknown_choice

log = logging.getLogger("prune_eval")

EVENTS = "launches.jsonl"  # per cell: one line per start / end / requeue of a job that ran it
ERROR_FILE = "error.json"  # prune_eval.analysis.cellfiles.ERROR
LOCAL_JOB_ENV = "PRUNE_EVAL_LOCAL_JOB"
COMMAND_TIMEOUT_S = 60  # SLURM clients retry for a minute when the controller is unreachable
SQUEUE_OUTAGE_S = 1800  # give up watching when squeue has failed for this long

# squeue %T states after which a task never runs again (unless requeued: see lost_after_s).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"})


# --------------------------------------------------------------------------------------------
# Checks before launching
# --------------------------------------------------------------------------------------------

def check_launch_overrides(task_overrides: Sequence[str]) -> None:
    """`launch.gpus=0,1` is a Hydra sweep (two jobs), not a list; launcher settings are shared by
    every cell, so a sweep over them is a mistake worth one clear line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides([str(o) for o in task_overrides]):
        key = override.get_key_element().lstrip("+~")
        if key.startswith("launch.") and override.is_sweep_override():
            raise PruneEvalError(
                f"{override.input_line} sweeps over a launcher setting, which all cells share; "
                f"for a list write {key}=[{override.input_line.split('=', 1)[1].strip('[]')}]"
            )


@dataclass(frozen=True)
class GpuInfo:
    index: str
    uuid: str
    memory_used_mib: float | None


def parse_gpu_query(text: str) -> list[GpuInfo]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,memory.used --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 3 or not cols[0].isdigit():
            continue
        try:
            memory = float(cols[2])
        except ValueError:  # "[N/A]" on some devices
            memory = None
        gpus.append(GpuInfo(cols[0], cols[1], memory))
    return gpus


def query_gpus() -> list[GpuInfo] | None:
    """The GPUs nvidia-smi reports, or None when nvidia-smi is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,uuid,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_query(out)


def _torch_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def visible_gpus(env: Mapping[str, str], query: Callable[[], list[GpuInfo] | None],
                 torch_count: Callable[[], int] = _torch_device_count) -> tuple[list[str], str]:
    """GPU ids this process may hand out, and where they came from (for error messages).

    CUDA_VISIBLE_DEVICES first (a scheduler or the user restricted us), then nvidia-smi's indexes,
    then torch's device count.
    """
    if "CUDA_VISIBLE_DEVICES" in env:
        value = env["CUDA_VISIBLE_DEVICES"]
        ids = [x.strip() for x in value.split(",") if x.strip() and x.strip() != "-1"]
        return ids, f"CUDA_VISIBLE_DEVICES={value!r}"
    gpus = query()
    if gpus:
        return [g.index for g in gpus], "nvidia-smi"
    count = torch_count()
    if count:
        return [str(i) for i in range(count)], "torch.cuda.device_count()"
    return [], "CUDA_VISIBLE_DEVICES is unset, nvidia-smi " + ("lists no GPU" if gpus == [] else "is not available") + ", torch sees no CUDA device"


def memory_used(gpu: str, gpus: list[GpuInfo] | None) -> float | None:
    """MiB used on `gpu` (an nvidia-smi index or UUID) or None when unknown."""
    for g in gpus or []:
        if gpu in (g.index, g.uuid):
            return g.memory_used_mib
    return None


def busy_gpus(ids: Sequence[str], gpus: list[GpuInfo] | None, busy_memory_mib: float) -> dict[str, float]:
    """{id: MiB used} for the ids whose memory another process is using."""
    used = {i: memory_used(i, gpus) for i in ids}
    return {i: m for i, m in used.items() if m is not None and m > busy_memory_mib}


def gpu_pool(requested: Any, *, skip_busy: bool = True, busy_memory_mib: float = 1024,
             env: Mapping[str, str] | None = None, query: Callable[[], list[GpuInfo] | None] = query_gpus,
             torch_count: Callable[[], int] = _torch_device_count) -> list[str]:
    """The GPU ids (strings, as CUDA_VISIBLE_DEVICES takes them) that launch=local-gpus may use.

    `requested` is launch.gpus: "all", a list of ids ([0, 1] or GPU UUIDs) or "0,1". Raises one
    PruneEvalError for no GPU, an unknown or repeated id, or every requested GPU busy.
    """
    env = os.environ if env is None else env
    smi = query()
    known, source = visible_gpus(env, lambda: smi, torch_count)
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "all"):
        if not known:
            raise PruneEvalError(f"launch=local-gpus found no GPU ({source}); use launch=local on a machine without GPUs")
        ids = known
    else:
        items = requested.split(",") if isinstance(requested, str) else requested if isinstance(requested, Sequence) else [requested]
        ids = [str(x).strip() for x in items if str(x).strip()]
        if not ids:
            raise PruneEvalError("launch.gpus is empty; give GPU ids (launch.gpus=[0,1]) or launch.gpus=all")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise PruneEvalError(f"launch.gpus lists GPU {repeated[0]} twice; each GPU runs one cell at a time")
        if not known:
            raise PruneEvalError(f"launch.gpus={requested}: no GPU found on this machine ({source})")
        for i in ids:
            if i not in known and not any(i == g.uuid for g in smi or []):
                raise PruneEvalError(f"unknown GPU id '{i}' in launch.gpus{did_you_mean(i, known)}; GPUs here ({source}): {', '.join(known)}")
    if skip_busy:
        busy = busy_gpus(ids, smi, busy_memory_mib)
        if len(busy) == len(ids):
            used = ", ".join(f"{i} ({m:.0f} MiB used)" for i, m in busy.items())
            raise PruneEvalError(
                f"every GPU in launch.gpus is in use by another process: {used}; free one, pick others with "
                f"launch.gpus=[...], or set launch.skip_busy=false (busy = more than launch.busy_memory_mib={busy_memory_mib:g} MiB used)"
            )
    return ids


def _sinfo(args: list[str], run: Callable[..., subprocess.CompletedProcess]) -> str:
    try:
        out = run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PruneEvalError(f"`sinfo` did not answer within {COMMAND_TIMEOUT_S}s; is the SLURM controller reachable "
                             f"(SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')})?") from None
    if out.returncode != 0:
        first = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[0]
        raise PruneEvalError(f"`sinfo` failed, so nothing was submitted: {first}")
    return out.stdout


def slurm_partitions(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[list[str], str | None]:
    """Partitions `sinfo` lists, and the default one (marked '*')."""
    names = [p.strip() for p in _sinfo(["-o", "%P"], run).split() if p.strip()]
    default = next((p.rstrip("*") for p in names if p.endswith("*")), None)
    return sorted({p.rstrip("*") for p in names}), default


def parse_time_limit_min(text: str) -> float | None:
    """Minutes of a SLURM time limit ('1-02:00:00', '2:00:00', '30:00', '30'); None = no limit."""
    text = text.strip()
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [float(x) for x in rest.split(":")]
    h, m, sec = ([0.0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0.0, parts[0], 0.0)
    return (float(days) if days else 0.0) * 1440 + h * 60 + m + sec / 60


def gres_gpus(gres: str) -> int:
    """GPUs in a node's gres string: 'gpu:4', 'gpu:a100:8(S:0-1),shard:8' -> 4, 8; '(null)' -> 0."""
    total = 0
    for item in gres.split(","):
        item = item.split("(")[0].strip()
        if item.startswith("gpu:"):
            count = item.rsplit(":", 1)[-1]
            total += int(count) if count.isdigit() else 0
    return total


@dataclass(frozen=True)
class SlurmRequest:
    """What one cell asks SLURM for (None: not asked)."""

    cpus: int | None = None
    mem_gb: float | None = None
    gpus: int | None = None
    time_min: float | None = None


def check_slurm(partition: str | None, request: SlurmRequest = SlurmRequest(), *,
                which: Callable[[str], str | None] = shutil.which,
                run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Before anything is submitted: sbatch, squeue and sinfo are here, the partition exists, and
    one of its nodes can hold a cell (SLURM would otherwise accept the array and leave it pending
    forever with reason PartitionConfig / PartitionTimeLimit)."""
    for command in ("sbatch", "squeue", "sinfo"):
        if which(command) is None:
            raise PruneEvalError(f"launch=slurm needs `{command}`, which is not on PATH; run the sweep on a SLURM "
                                 "login node, or use launch=local / launch=local-gpus")
    partitions, default = slurm_partitions(run)
    names = [p.strip() for p in str(partition).split(",") if p.strip()] if partition else ([default] if default else [])
    for name in names:
        if name not in partitions:
            raise unknown_choice("SLURM partition (launch.partition)", name, partitions)
    for name in names:
        _check_partition_fits(name, request, _sinfo(["-N", "-p", name, "-o", "%c|%m|%G|%l"], run), several=len(names) > 1)


def _check_partition_fits(name: str, request: SlurmRequest, sinfo_nodes: str, several: bool) -> None:
    nodes = []
    for line in sinfo_nodes.splitlines():
        cols = line.strip().split("|")
        if len(cols) == 4:
            cpus, mem = (int(c.rstrip("+")) if c.rstrip("+").isdigit() else 0 for c in cols[:2])
            nodes.append((cpus, mem, gres_gpus(cols[2]), parse_time_limit_min(cols[3])))
    if not nodes or several:  # nothing to compare with, or SLURM picks among partitions
        return
    limit = nodes[0][3]
    if request.time_min is not None and limit is not None and request.time_min > limit:
        raise PruneEvalError(f"launch.time_min={request.time_min:g} exceeds the {limit:g}-minute limit of partition '{name}'")
    asked = {"cpus": request.cpus, "mem_gb": request.mem_gb, "gpus": request.gpus}
    need = (request.cpus or 0, (request.mem_gb or 0) * 1024, request.gpus or 0)  # CPUs, MB, GPUs
    if any(all(have >= want for have, want in zip(node[:3], need)) for node in nodes):
        return
    for i, (key, unit) in enumerate((("cpus", "CPUs"), ("mem_gb", "MB of memory"), ("gpus", "GPUs"))):
        most = max(node[i] for node in nodes)
        if need[i] > most:
            hint = "; set launch.gpus=null for CPU-only cells" if key == "gpus" and most == 0 else ""
            raise PruneEvalError(f"launch.{key}={asked[key]} is more than any node of partition '{name}' has (at most {most} {unit}){hint}")
    raise PruneEvalError(f"no node of partition '{name}' has launch.cpus={request.cpus}, launch.mem_gb={request.mem_gb} "
                         f"and launch.gpus={request.gpus} at once")


def check_device_for_one_gpu(device: Any) -> None:
    """Each local-gpus cell sees exactly one GPU (cuda:0); device=cuda:1 would fail in every cell."""
    text = str(device)
    if text.startswith("cuda:") and text != "cuda:0":
        raise PruneEvalError(f"device={text} with launch=local-gpus: each cell sees only its own GPU, as cuda:0; use device=auto or device=cuda")


# --------------------------------------------------------------------------------------------
# The worker side: runs in the cell's own process
# --------------------------------------------------------------------------------------------

def current_job_id() -> str:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get(LOCAL_JOB_ENV) or f"pid{os.getpid()}"


def write_event(cell_dir: Path, event: str, **fields: Any) -> None:
    """Append one event to <cell>/launches.jsonl (which job ran the cell, where, when)."""
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
    except OSError as e:  # provenance must never fail a cell
        log.warning("could not write %s: %s", Path(cell_dir) / EVENTS, e)


def read_events(cell_dir: Path) -> list[dict]:
    try:
        lines = (Path(cell_dir) / EVENTS).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def write_cell_error(cell_dir: Path, message: str, error_type: str, details: str = "") -> None:
    """An error.json in the format run_cell writes, for cells that could not write their own."""
    from prune_eval.execution.records import atomic_write_json

    atomic_write_json(Path(cell_dir) / ERROR_FILE, {"message": message, "type": error_type, "traceback": details,
                                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run_cell_job(launcher, overrides: Sequence[str], job_num: int, singleton_state: dict, cell_dir: str | None) -> str:
    """The submitted callable's body, in the cell's process: compose the job's config exactly as the
    sweep did (hydra_context + master config, pickled with the launcher) and run prune_eval's task."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals
    from omegaconf import open_dict

    import prune_eval.__main__  # noqa: F401  (registers ${pe_cell:}, used by hydra.sweep.subdir)

    Singleton.set_state(singleton_state)
    setup_globals()
    cell = Path(cell_dir) if cell_dir else None
    if cell is not None:
        write_event(cell, "start", job_num=job_num)
    try:
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.id = current_job_id()
            config.hydra.job.num = job_num
        ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        status = str(ret.return_value)
    except Exception as e:  # outside run_cell (which records its own errors): record it here
        import traceback

        if cell is not None:
            from prune_eval.analysis.cellfiles import read_summary

            if read_summary(cell) is None:
                write_cell_error(cell, f"{type(e).__name__}: {e}", type(e).__name__, traceback.format_exc())
            write_event(cell, "end", status="error", error=f"{type(e).__name__}: {e}")
        raise
    if cell is not None:
        write_event(cell, "end", status=status)
    return status


def requeue(launcher, *args: Any, **kwargs: Any):
    """submitit calls the callable's checkpoint() when the job is preempted or reaches its time
    limit; returning the same call makes submitit requeue it. Nothing else needs saving: the cell
    resumes from its record parts (at most one part of work is lost)."""
    import submitit

    cell_dir = args[5] if len(args) > 5 else kwargs.get("cell_dir")
    if cell_dir:
        write_event(Path(cell_dir), "requeue")
    return submitit.helpers.DelayedSubmission(launcher, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Watching
# --------------------------------------------------------------------------------------------

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

    def __post_init__(self) -> None:
        self.cell_dir = Path(self.cell_dir)
        self.error_before = _error_signature(self.cell_dir)

    def new_error(self) -> bool:
        sig = _error_signature(self.cell_dir)
        return sig is not None and sig != self.error_before


def is_complete(cell_dir: Path) -> bool:
    from prune_eval.analysis.cellfiles import read_summary

    return read_summary(cell_dir) is not None


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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A line like `cells: 3 complete, 2 running, 1 failed, 4 pending` when a count changes, and
    at least every `every_s` seconds while the sweep runs."""

    ORDER = ("complete", "running", "failed", "died", "busy", "pending")

    def __init__(self, label: str, every_s: float, out: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.every_s, self.clock = label, every_s, clock
        self.out = out or (lambda line: print(line, flush=True))
        self.started = clock()
        self.last: tuple | None = None
        self.last_time = -float("inf")

    def update(self, jobs: Sequence[Launched], extra: str = "") -> None:
        counts = dict.fromkeys(self.ORDER, 0)
        for job in jobs:
            key = job.outcome or ("running" if job.state in RUNNING_STATES else "pending")
            counts[key] = counts.get(key, 0) + 1
        shown = {k: n for k, n in counts.items() if n or k in ("complete", "running", "failed", "pending")}
        key = (tuple(counts.items()), extra)
        now = self.clock()
        if key != self.last or now - self.last_time >= self.every_s:
            body = ", ".join(f"{n} {k}" for k, n in shown.items())
            self.out(f"cells: {body}  [{self.label}, {_duration(now - self.started)}]{extra}")
            self.last, self.last_time = key, now


def sweep_dir_override(sweep_dir: Path) -> str:
    """`hydra.sweep.dir=<absolute>` for the jobs, so a worker's cwd does not matter."""
    text = str(Path(sweep_dir).absolute()).replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")
    return f"hydra.sweep.dir='{text}'"


def cell_dirs_of(launcher, job_overrides: Sequence[Sequence[str]]) -> list[Path]:
    """Each job's cell directory, by composing it (for callers other than prune_eval's sweeper)."""
    dirs = []
    for overrides in job_overrides:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        dirs.append(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
    return dirs


def _job_args(launcher, job_overrides, cell_dirs) -> list[tuple]:
    """Arguments of the submitted callable, one tuple per cell (hydra-submitit-launcher's + cell dir)."""
    from hydra.core.singleton import Singleton

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).absolute()
    state = Singleton.get_state()
    return [
        ([*map(str, overrides), sweep_dir_override(sweep_dir)], "hydra.sweep.dir", idx, f"job_id_for_{idx}", state,
         str(Path(cell).absolute()))
        for idx, (overrides, cell) in enumerate(zip(job_overrides, cell_dirs))
    ]


# ----------------------------------------------- local GPUs

@dataclass
class _Slot:
    job: Launched
    process: subprocess.Popen
    gpu: str


def launch_local_gpus(launcher, job_overrides: Sequence[Sequence[str]], cell_dirs: Sequence[Path], *, gpus: Any = "all",
                      skip_busy: bool = True, busy_memory_mib: float = 1024, poll_s: float = 1.0, progress_s: float = 30.0,
                      query: Callable[[], list[GpuInfo] | None] = query_gpus, out: Callable[[str], None] | None = None) -> list[str]:
    """Run the cells as subprocesses, at most one per GPU at a time; returns each cell's outcome."""
    from submitit.helpers import DelayedSubmission

    out = out or (lambda line: print(line, flush=True))
    check_launch_overrides(launcher.config.hydra.overrides.task)
    check_device_for_one_gpu(launcher.config.get("device"))
    pool = gpu_pool(gpus, skip_busy=skip_busy, busy_memory_mib=busy_memory_mib, query=query)
    folder = Path(str(launcher.config.hydra.sweep.dir)).absolute() / ".submitit" / f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs, pickles = [], []
    for idx, args in enumerate(_job_args(launcher, job_overrides, cell_dirs)):
        path = folder / f"{idx}_submitted.pkl"
        DelayedSubmission(launcher, *args).dump(path)
        jobs.append(Launched(Path(args[-1]), job_id=f"local-{idx}", log=folder / f"{idx}_log.out"))
        pickles.append(path)
    out(f"launching {len(jobs)} cell(s) on GPU(s) {', '.join(pool)}, one cell per GPU; logs: {folder}")
    return run_on_gpus(jobs, pickles, pool, skip_busy=skip_busy, busy_memory_mib=busy_memory_mib, poll_s=poll_s,
                       progress=Progress("local-gpus", progress_s, out), query=query)


def start_local_job(pickle_path: Path, log_path: Path, gpu: str, job_id: str) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, **{LOCAL_JOB_ENV: job_id, "PYTHONUNBUFFERED": "1"})
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # ids as nvidia-smi numbers them
    with open(log_path, "ab") as logf:
        return subprocess.Popen([sys.executable, "-u", "-m", "prune_eval.execution.launching", str(pickle_path)],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def run_on_gpus(jobs: list[Launched], pickles: list[Path], pool: list[str], *, skip_busy: bool, busy_memory_mib: float,
                poll_s: float, progress: Progress, query: Callable[[], list[GpuInfo] | None] = query_gpus,
                start: Callable[[Path, Path, str, str], subprocess.Popen] = start_local_job) -> list[str]:
    """The scheduler: a free GPU (not running one of our cells, not busy with another process's work)
    gets the next pending cell; a cell's process ends -> its GPU is free again."""
    pending = list(range(len(jobs)))
    running: dict[str, _Slot] = {}
    warned: set[str] = set()
    poll_s = min(max(float(poll_s), 0.05), 60.0)
    try:
        while pending or running:
            for gpu, slot in list(running.items()):
                code = slot.process.poll()
                if code is not None:
                    how = f"local job {slot.job.job_id} (GPU {gpu}) exited with {_exit_text(code)} before the cell finished"
                    slot.job.outcome = conclude(slot.job, how)
                    slot.job.state = "DONE"
                    del running[gpu]
            free = [g for g in pool if g not in running]
            if pending and free and skip_busy:
                busy = busy_gpus(free, query(), busy_memory_mib)
                for g in busy.keys() - warned:
                    log.warning("GPU %s is in use by another process (%.0f MiB); no cell starts there while it is", g, busy[g])
                warned |= busy.keys()
                free = [g for g in free if g not in busy]
            while pending and free:
                idx, gpu = pending.pop(0), free.pop(0)
                job = jobs[idx]
                job.error_before = _error_signature(job.cell_dir)
                job.state = "RUNNING"
                running[gpu] = _Slot(job, start(pickles[idx], job.log, gpu, job.job_id), gpu)
            progress.update(jobs, "" if not pending or running else "  (waiting for a GPU that no other process uses)")
            if pending or running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for slot in running.values():
            slot.process.send_signal(signal.SIGINT)
        for slot in running.values():
            try:
                slot.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                slot.process.kill()
        raise
    return [job.outcome or "missing" for job in jobs]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ----------------------------------------------- SLURM

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
                clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Poll squeue and the cell directories until every job is over; returns each cell's outcome.

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
                job.outcome = conclude(job, f"SLURM task {job.job_id} {how} before the cell finished (killed, out of memory or cancelled?)")
        progress.update(jobs, "".join(f"  ({n} pending: {r})" for r, n in sorted(reasons.items())))
        if all(job.outcome is not None for job in jobs):
            return [job.outcome for job in jobs]
        sleep(poll_s)


def launch_slurm(launcher, job_overrides: Sequence[Sequence[str]], cell_dirs: Sequence[Path], params: dict,
                 out: Callable[[str], None] | None = None) -> list[str]:
    """Submit the cells as SLURM job arrays through submitit (as hydra-submitit-launcher does) and
    watch them with watch_slurm; returns each cell's outcome."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    out = out or (lambda line: print(line, flush=True))
    params = dict(params)
    if not params.get("gpus_per_node"):  # launch.gpus=0 means CPU-only, like null
        params["gpus_per_node"] = None
    poll_s, progress_s = params.pop("poll_s"), params.pop("progress_s")
    lost_after_s, max_array_size = params.pop("lost_after_s"), int(params.pop("max_array_size"))
    check_launch_overrides(launcher.config.hydra.overrides.task)
    check_slurm(params.get("partition"), SlurmRequest(cpus=params.get("cpus_per_task"), mem_gb=params.get("mem_gb"),
                                                      gpus=params.get("gpus_per_node"), time_min=params.get("timeout_min")))

    folder = Path(str(params.pop("submitit_folder"))).absolute()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=int(params.pop("max_num_timeout")))
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})

    args = _job_args(launcher, job_overrides, cell_dirs)
    jobs: list[Launched] = []
    for start in range(0, len(args), max(1, max_array_size)):
        chunk = args[start:start + max(1, max_array_size)]
        watched = [Launched(Path(a[-1])) for a in chunk]  # error.json signatures before submission
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr; we say it once
                submitted = executor.map_array(launcher, *zip(*chunk))
        except (FailedJobError, FailedSubmissionError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = next((line for line in reversed(lines) if "error" in line.lower()), lines[0])
            if not jobs:
                raise PruneEvalError(f"sbatch refused the job array, nothing was submitted: {first}") from None
            raise RuntimeError(f"sbatch refused a job array after {len(jobs)} cell(s) were submitted: {first}") from None
        for job, sub in zip(watched, submitted):
            job.job_id, job.log = str(sub.job_id), Path(sub.paths.stderr)
        jobs += watched
    arrays = sorted({j.job_id.split("_")[0] for j in jobs}, key=lambda s: int(s) if s.isdigit() else 0)
    out(f"submitted {len(jobs)} cell(s) as SLURM job {', '.join(arrays)} (at most {params.get('array_parallelism')} "
        f"at once); logs: {str(folder).replace('%j', '<job id>')}")
    try:
        return watch_slurm(jobs, poll_s=poll_s, lost_after_s=lost_after_s, progress=Progress(f"slurm {','.join(arrays)}", progress_s, out))
    except KeyboardInterrupt:
        out(f"interrupted: SLURM job {', '.join(arrays)} keeps running (stop it with `scancel {' '.join(arrays)}`); "
            "rerun the same command to collect finished cells and launch the rest")
        raise


# --------------------------------------------------------------------------------------------
# `python -m prune_eval.execution.launching <pickle>`: a local-gpus worker process
# --------------------------------------------------------------------------------------------

def _local_worker(pickle_path: str) -> None:
    from submitit.helpers import DelayedSubmission

    DelayedSubmission.load(pickle_path).result()


if __name__ == "__main__":
    _local_worker(sys.argv[1])
    # The cell's files are written and fsynced; skip the interpreter's teardown of torch & co
    # (seconds), so the GPU goes to the next cell sooner.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
