"""Checks before anything is launched: launcher settings, local GPUs, the SLURM cluster.

Each problem is one PruneEvalError naming the bad value and what is allowed, which the sweeper
prints as `prune_eval: error: ...` (exit 2) before any job starts: a launcher setting swept like a
job parameter, no GPU, an unknown or repeated GPU id, every GPU busy, `device=cuda:1` with
per-GPU workers; `sbatch`/`squeue`/`sinfo` missing, an unknown partition, a request no node of the
partition can hold (SLURM would accept it and leave it pending forever), a bad launch.cells_per_task.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prune_eval.errors import PruneEvalError, did_you_mean, unknown_choice

COMMAND_TIMEOUT_S = 60  # SLURM clients retry for a minute when the controller is unreachable

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


def check_cells_per_task(value: Any) -> int | str:
    """launch.cells_per_task: 'auto' or a whole number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PruneEvalError(f"launch.cells_per_task={value}; allowed: auto, or a whole number >= 1 (cells run one after another by each SLURM task)")
    return value


def check_local_gpus_launch(config, *, gpus: Any = "all", skip_busy: bool = True, busy_memory_mib: float = 1024,
                            query: Callable[[], list[GpuInfo] | None] = query_gpus, **_ignored: Any) -> list[str]:
    """Every check launch=local-gpus makes before a cell starts (the sweeper runs it before it writes
    anything, also when no cell is left to run); returns the GPU pool. `config` is the sweep's."""
    check_launch_overrides(config.hydra.overrides.task)
    check_device_for_one_gpu(config.get("device"))
    return gpu_pool(gpus, skip_busy=skip_busy, busy_memory_mib=busy_memory_mib, query=query)


def slurm_params(params: Mapping[str, Any]) -> dict:
    """The launcher's parameters with launch.gpus=0 meaning CPU-only, like null."""
    params = dict(params)
    if not params.get("gpus_per_node"):
        params["gpus_per_node"] = None
    return params


def check_slurm_launch(config, params: Mapping[str, Any]) -> None:
    """Every check launch=slurm makes before submitting (the sweeper runs it before it writes
    anything, also when no cell is left to run). `params` are the launcher's (hydra.launcher.*)."""
    params = slurm_params(params)
    check_launch_overrides(config.hydra.overrides.task)
    check_cells_per_task(params.get("cells_per_task", "auto"))
    check_slurm(params.get("partition"), SlurmRequest(cpus=params.get("cpus_per_task"), mem_gb=params.get("mem_gb"),
                                                      gpus=params.get("gpus_per_node"), time_min=params.get("timeout_min")))
