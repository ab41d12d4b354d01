"""Which worker runs which cell, in what order: cost estimates, model groups, SLURM task packing.

Pure functions of the plan (no files, no processes), so the policies are tested directly.

- **Cost.** A cell's estimated compute in GPU-seconds on one H100/H200 with the fast path, from the
  full-POPE measurements in BENCHMARKS.md (8910 questions, LLaVA-1.5-7B shapes): vanilla 14 s,
  VisionZip@64 7 s (an image-level method costs 0.4 + 0.6 x its share of the 576 visual tokens of
  vanilla), SparseVLM@64 70 s (a question-dependent method: no shared image prefix, ~5x vanilla),
  the reference path ~10x the fast path (133 s for vanilla). Scaled by the LLM's size
  (layers x hidden^2 against the 7B's 32 x 4096^2). Rough, and only ever compared with itself:
  it orders cells longest-first and balances SLURM tasks.
- **Groups.** Cells with the same `CellSpec.model_key` (checkpoint, quantization, device) can share
  one loaded and compiled model; a worker runs a group's cells back to back (resident.py).
- **Packing** (SLURM): cells into array tasks, longest first onto the least-loaded task, a task
  that already holds the cell's model preferred over one that would load another
  (`LOAD_AND_COMPILE_S` of extra work). `launch.cells_per_task=auto` uses as many tasks as
  `launch.array_parallelism` allows, but no more than the sweep's total work divided by what a task
  spends getting ready (`STARTUP_S` + one load and compile): a task should compute at least that long.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prune_eval.specs import CellSpec, DataSpec

# Seconds per question on the fast path at 7B size (BENCHMARKS.md, full POPE, H100/H200).
VANILLA_S_PER_QUESTION = 14.0 / 8910
TEXT_DEPENDENT_FACTOR = 5.0  # SparseVLM@64 70 s vs vanilla 14 s (question-dependent: one row per question)
REFERENCE_FACTOR = 10.0  # the reference path (eval.fast=false): vanilla 133 s vs 14 s
LOAD_AND_COMPILE_S = 25.0  # one 13 GB load from the page cache (~2.5 s) and one compile (~20 s), at 7B size
STARTUP_S = 10.0  # a new worker process: Python, torch and transformers imported, Hydra's config composed
SIZE_7B = 32 * 4096**2


@dataclass(frozen=True)
class CellJob:
    """One cell as launchers and workers see it (picklable, JSON-able)."""

    name: str
    overrides: tuple[str, ...]  # the job's Hydra overrides, sweep directory included
    cell_dir: str  # absolute
    job_num: int
    model_key: str  # cells with the same key share a loaded model
    cost: float  # estimated GPU-seconds (see the module doc)
    n_questions: int
    shards: int  # how many workers could answer it at once (eval.shard_images)
    ready_s: float = 0.0  # estimated seconds before a new worker computes it: start, load, compile

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CellJob":
        return cls(**{**data, "overrides": tuple(data["overrides"])})


@functools.lru_cache(maxsize=64)
def workload(data: DataSpec) -> tuple[int, int]:
    """(questions, images) of a data set; read once per distinct data config."""
    from prune_eval.data import load_dataset

    questions = load_dataset(data).questions
    return len(questions), len({q.image for q in questions})


def model_scale(spec: CellSpec) -> float:
    return spec.geometry.text_layers * spec.geometry.text_hidden**2 / SIZE_7B


def seconds_per_question(spec: CellSpec) -> float:
    """Estimated GPU-seconds per question for this cell (see the module doc)."""
    if spec.method.impl.text_dependent:
        factor = TEXT_DEPENDENT_FACTOR
    else:
        share = float(spec.params.get("visual_tokens", spec.geometry.n_patches)) / spec.geometry.n_patches
        factor = 0.4 + 0.6 * share
    if spec.eval.fast is False:
        factor *= REFERENCE_FACTOR
    return VANILLA_S_PER_QUESTION * factor * model_scale(spec)


def cell_job(spec: CellSpec, overrides: Sequence[str], cell_dir: Path, job_num: int) -> CellJob:
    n_questions, n_images = workload(spec.data)
    return CellJob(
        name=spec.name, overrides=tuple(map(str, overrides)), cell_dir=str(Path(cell_dir).absolute()), job_num=job_num,
        model_key=spec.model_key, cost=n_questions * seconds_per_question(spec), n_questions=n_questions,
        shards=max(1, math.ceil(n_images / spec.eval.shard_images)), ready_s=STARTUP_S + LOAD_AND_COMPILE_S * model_scale(spec),
    )


def order_for_one_worker(jobs: Sequence[CellJob]) -> list[CellJob]:
    """One worker's order: model groups one after another (the costliest group first), each group's
    cells longest first. A group's model is then loaded once."""
    totals: dict[str, float] = {}
    for job in jobs:
        totals[job.model_key] = totals.get(job.model_key, 0.0) + job.cost
    return sorted(jobs, key=lambda j: (-totals[j.model_key], j.model_key, -j.cost, j.name))


def longest_first(jobs: Sequence[CellJob]) -> list[CellJob]:
    return sorted(jobs, key=lambda j: (-j.cost, j.name))


def task_count(jobs: Sequence[CellJob], cells_per_task: int | str, array_parallelism: int) -> int:
    """How many SLURM tasks (see the module doc); `cells_per_task` is launch.cells_per_task."""
    if not jobs:
        return 0
    if cells_per_task != "auto":
        return math.ceil(len(jobs) / int(cells_per_task))
    ready_s = max(j.ready_s for j in jobs)
    by_work = max(1, int(sum(j.cost for j in jobs) // ready_s)) if ready_s > 0 else len(jobs)
    return max(1, min(len(jobs), int(array_parallelism), by_work))


def pack_tasks(jobs: Sequence[CellJob], n_tasks: int) -> list[list[CellJob]]:
    """Cells into `n_tasks` tasks of at most ceil(len/n_tasks) cells each: longest first onto the task
    with the least work, counting the cell's `ready_s` for a task that would load another model.
    Each task's list is in order_for_one_worker's order; empty tasks are dropped."""
    n_tasks = max(1, min(n_tasks, len(jobs)))
    capacity = math.ceil(len(jobs) / n_tasks)
    tasks: list[list[CellJob]] = [[] for _ in range(n_tasks)]
    work = [0.0] * n_tasks
    for job in longest_first(jobs):
        def added(t: int) -> float:
            new_model = job.model_key not in {j.model_key for j in tasks[t]}
            return work[t] + job.cost + (job.ready_s if new_model else 0.0)

        t = min((t for t in range(n_tasks) if len(tasks[t]) < capacity), key=lambda t: (added(t), t))
        work[t] = added(t)
        tasks[t].append(job)
    return [order_for_one_worker(task) for task in tasks if task]

