"""Launchers for `launch=local-gpus` and `launch=slurm` (the YAMLs in launch/ select them).

Both reuse hydra-submitit-launcher's callable (the launcher itself is pickled with the Hydra
context and run in the cell's process); SLURM submission is theirs too (submitit job arrays,
`sbatch --array=0-N%P`). The waiting is ours: the submitting process watches the cells' own files
and the queue, never pickled job results. Logic: prune_eval.execution.launching.

Hydra's plugin scanner executes this module before registering it in sys.modules: no
`from __future__ import annotations` here (dataclasses), and no heavy imports at module level.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

_HERE = "hydra_plugins.prune_eval_plugins.launchers"


@dataclass
class LocalGpusConf:
    _target_: str = f"{_HERE}.LocalGpusLauncher"
    # GPU ids to use, one cell per GPU at a time: a list ([0, 1] or GPU UUIDs) or "all"
    # (CUDA_VISIBLE_DEVICES, else nvidia-smi, else torch.cuda.device_count())
    gpus: Any = "all"
    # never start a cell on a GPU that another process is using (per nvidia-smi)
    skip_busy: bool = True
    # a GPU is in use when nvidia-smi reports more memory used than this (MiB)
    busy_memory_mib: int = 1024
    # seconds between checks for finished cells and free GPUs
    poll_s: float = 1.0
    # a progress line at least this often (seconds), and whenever a count changes
    progress_s: float = 30.0


@dataclass
class SlurmConf(SlurmQueueConf):
    _target_: str = f"{_HERE}.PruneEvalSlurmLauncher"
    # requeues after reaching the time limit (preemptions always requeue); cells resume from records
    max_num_timeout: int = 3
    # seconds between checks of squeue and the cell directories (1..120)
    poll_s: float = 15.0
    # a progress line at least this often (seconds), and whenever a count changes
    progress_s: float = 60.0
    # a task out of the queue whose cell is unfinished counts as died after this long (seconds);
    # the grace covers requeues (PREEMPTED / NODE_FAIL -> PENDING)
    lost_after_s: float = 60.0
    # cells per sbatch array (SLURM's MaxArraySize is 1001 by default); more cells -> more arrays
    max_array_size: int = 1000


ConfigStore.instance().store(group="hydra/launcher", name="prune_eval_local_gpus", node=LocalGpusConf, provider="prune_eval")
ConfigStore.instance().store(group="hydra/launcher", name="prune_eval_slurm", node=SlurmConf, provider="prune_eval")


class _CellLauncher(BaseSubmititLauncher):
    """Shared by both: the callable run in each cell's process, and Hydra's `launch` entry point."""

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict, cell_dir: str = "") -> str:
        from prune_eval.execution.launching import run_cell_job

        return run_cell_job(self, sweep_overrides, job_num, singleton_state, cell_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Preempted or at the time limit: submitit requeues this same call; the cell resumes."""
        from prune_eval.execution.launching import requeue

        return requeue(self, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[str]:
        """Hydra's entry point; prune_eval's sweeper calls launch_cells with the cell dirs it planned."""
        from prune_eval.execution.launching import cell_dirs_of

        return self.launch_cells(job_overrides, cell_dirs_of(self, job_overrides))

    def launch_cells(self, job_overrides: Sequence[Sequence[str]], cell_dirs: Sequence[Path]) -> Sequence[str]:
        raise NotImplementedError

    def check_before_launch(self) -> None:
        """Raise PruneEvalError for launcher input that would fail; prune_eval's sweeper calls this
        before it writes plan.json, so a refused launch leaves no trace."""
        raise NotImplementedError


class LocalGpusLauncher(_CellLauncher):
    _EXECUTOR = "local"

    def launch_cells(self, job_overrides: Sequence[Sequence[str]], cell_dirs: Sequence[Path]) -> Sequence[str]:
        from prune_eval.execution.launching import launch_local_gpus

        return launch_local_gpus(self, job_overrides, cell_dirs, **self.params)

    def check_before_launch(self) -> None:
        from prune_eval.execution.launching import check_local_gpus_launch

        check_local_gpus_launch(self.config, **self.params)


class PruneEvalSlurmLauncher(_CellLauncher):
    _EXECUTOR = "slurm"

    def launch_cells(self, job_overrides: Sequence[Sequence[str]], cell_dirs: Sequence[Path]) -> Sequence[str]:
        from prune_eval.execution.launching import launch_slurm

        return launch_slurm(self, job_overrides, cell_dirs, self.params)

    def check_before_launch(self) -> None:
        from prune_eval.execution.launching import check_slurm_launch

        check_slurm_launch(self.config, self.params)
