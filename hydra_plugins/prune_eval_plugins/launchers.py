"""Launchers for `launch=local`, `launch=local-gpus` and `launch=slurm` (the YAMLs in launch/ select them).

All three run cells in resident workers that keep a loaded model between cells
(prune_eval.execution.worker); they differ in where the workers are: this process, one process per
local GPU, or SLURM array tasks. They reuse hydra-submitit-launcher's callable (the launcher itself
is pickled with the Hydra context and run in the worker's process); SLURM submission is theirs too
(submitit job arrays, `sbatch --array=0-N%P`). The waiting is ours: the submitting process watches
the cells' own files and the queue, never pickled job results. Logic: prune_eval.execution.local,
prune_eval.execution.slurm.

Hydra's plugin scanner executes this module before registering it in sys.modules: no
`from __future__ import annotations` here (dataclasses), and no heavy imports at module level.
"""

from dataclasses import dataclass
from typing import Any, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

_HERE = "hydra_plugins.prune_eval_plugins.launchers"


@dataclass
class LocalConf:
    _target_: str = f"{_HERE}.LocalLauncher"
    # a progress line at least this often (seconds), and whenever a cell finishes
    progress_s: float = 30.0


@dataclass
class LocalGpusConf:
    _target_: str = f"{_HERE}.LocalGpusLauncher"
    # GPU ids to use, one resident worker per GPU: a list ([0, 1] or GPU UUIDs) or "all"
    # (CUDA_VISIBLE_DEVICES, else nvidia-smi, else torch.cuda.device_count())
    gpus: Any = "all"
    # never start a worker on a GPU that another process is using (per nvidia-smi)
    skip_busy: bool = True
    # a GPU is in use when nvidia-smi reports more memory used than this (MiB)
    busy_memory_mib: int = 1024
    # at most this many seconds between looks at the workers (they also wake the launcher up)
    poll_s: float = 1.0
    # a progress line at least this often (seconds), and whenever a count changes
    progress_s: float = 30.0


@dataclass
class SlurmConf(SlurmQueueConf):
    _target_: str = f"{_HERE}.PruneEvalSlurmLauncher"
    # cells run one after another by each array task (one resident model): a number, or "auto"
    # (as many tasks as array_parallelism allows, none with less work than its start-up)
    cells_per_task: Any = "auto"
    # requeues after reaching the time limit (preemptions always requeue); cells resume from records
    max_num_timeout: int = 3
    # seconds between checks of squeue and the cell directories (1..120)
    poll_s: float = 15.0
    # a progress line at least this often (seconds), and whenever a count changes
    progress_s: float = 60.0
    # a task out of the queue whose cell is unfinished counts as died after this long (seconds);
    # the grace covers requeues (PREEMPTED / NODE_FAIL -> PENDING)
    lost_after_s: float = 60.0
    # tasks per sbatch array (SLURM's MaxArraySize is 1001 by default); more tasks -> more arrays
    max_array_size: int = 1000


ConfigStore.instance().store(group="hydra/launcher", name="prune_eval_local", node=LocalConf, provider="prune_eval")
ConfigStore.instance().store(group="hydra/launcher", name="prune_eval_local_gpus", node=LocalGpusConf, provider="prune_eval")
ConfigStore.instance().store(group="hydra/launcher", name="prune_eval_slurm", node=SlurmConf, provider="prune_eval")


class _CellLauncher(BaseSubmititLauncher):
    """Shared by all three: the callable a SLURM task runs, and Hydra's `launch` entry point."""

    def __call__(self, cells: List[dict], singleton_state: dict) -> List[str]:
        from prune_eval.execution.worker import run_task

        return run_task(self, cells, singleton_state)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Preempted or at the time limit: submitit requeues this same call; the cells resume."""
        from prune_eval.execution.worker import requeue

        return requeue(self, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[str]:
        """Hydra's entry point; prune_eval's sweeper calls launch_cells with the cells it planned."""
        from prune_eval.execution.sweep import cell_jobs_of

        return self.launch_cells(cell_jobs_of(self, job_overrides))

    def launch_cells(self, cells: Sequence[Any]) -> Sequence[str]:
        raise NotImplementedError

    def check_before_launch(self) -> None:
        """Raise PruneEvalError for launcher input that would fail; prune_eval's sweeper calls this
        before it writes plan.json, so a refused launch leaves no trace. launch=local has nothing
        beyond the checks every launcher shares (execution.sweep.check_launcher)."""


class LocalLauncher(_CellLauncher):
    _EXECUTOR = "local"

    def launch_cells(self, cells: Sequence[Any]) -> Sequence[str]:
        from prune_eval.execution.local import launch_local

        return launch_local(self, cells, **self.params)


class LocalGpusLauncher(_CellLauncher):
    _EXECUTOR = "local"
    checked_pool: list[str] | None = None  # the GPUs check_before_launch found; launch_cells, moments later, uses them

    def launch_cells(self, cells: Sequence[Any]) -> Sequence[str]:
        from prune_eval.execution.local import launch_local_gpus

        return launch_local_gpus(self, cells, pool=self.checked_pool, **self.params)

    def prestart(self) -> None:
        """Start the workers before the sweep is planned (prune_eval.execution.local.prestart_workers)."""
        from prune_eval.execution.local import prestart_workers

        prestart_workers(self)

    def discard_prestarted(self) -> None:
        """End the workers started before planning (the sweep has no cell left to run)."""
        from prune_eval.execution.local import discard_prestarted

        discard_prestarted()

    def check_before_launch(self) -> None:
        from prune_eval.execution.checks import check_local_gpus_launch

        self.checked_pool = check_local_gpus_launch(self.config, **self.params)


class PruneEvalSlurmLauncher(_CellLauncher):
    _EXECUTOR = "slurm"
    checked = False  # check_before_launch passed: launch_cells, moments later, does not ask sinfo again

    def launch_cells(self, cells: Sequence[Any]) -> Sequence[str]:
        from prune_eval.execution.slurm import launch_slurm

        return launch_slurm(self, cells, self.params, checked=self.checked)

    def check_before_launch(self) -> None:
        from prune_eval.execution.checks import check_slurm_launch

        check_slurm_launch(self.config, self.params)
        self.checked = True
