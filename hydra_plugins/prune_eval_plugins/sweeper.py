"""The prune_eval sweeper: Hydra's basic cartesian product, planned and validated before launch.

Differences from hydra's BasicSweeper: every job's config is composed and validated first (one
message listing every invalid job, nothing launched); jobs resolving to the same cell run once;
complete cells are skipped; the sweep ends with a status table (and the report, where available)
even if cells failed, instead of re-raising the first job exception.
"""


import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

log = logging.getLogger("prune_eval")


@dataclass
class PruneEvalSweeperConf:
    _target_: str = "hydra_plugins.prune_eval_plugins.sweeper.PruneEvalSweeper"
    report: bool = True  # write the variance report when the sweep ends


ConfigStore.instance().store(group="hydra/sweeper", name="prune_eval", node=PruneEvalSweeperConf, provider="prune_eval")


class PruneEvalSweeper(Sweeper):
    def __init__(self, report: bool = True) -> None:
        self.report = report
        self.hydra_context = None
        self.config = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list) -> Any:
        from prune_eval.execution import sweep
        from prune_eval.analysis.cellfiles import cell_status  # torch-free: the sweep process never imports torch
        from prune_eval.errors import PruneEvalError, error_text
        from prune_eval.execution.records import atomic_write_bytes
        from prune_eval.overrides import applicable_jobs, check_output_overrides

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)[0]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        loader = self.hydra_context.config_loader
        compose = lambda overrides: loader.load_sweep_config(self.config, overrides)  # noqa: E731
        if hasattr(self.launcher, "prestart"):  # launch=local-gpus: workers import torch while the jobs are planned
            self.launcher.prestart()
        try:
            check_output_overrides(list(arguments))
            applicable = applicable_jobs(jobs, compose)  # group options where the job's choice has them
            jobs = applicable.jobs
            planned = sweep.plan_jobs(jobs, compose, sweep_dir)
            sweep.check_launcher(self.launcher, self.config)  # before anything is written: a refused launch leaves no trace
        except PruneEvalError as e:
            print(error_text(e), file=sys.stderr)
            sys.exit(2)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config).encode())  # a second sweep may write it too
            sweep.record_plan(sweep_dir, planned)
        except (PruneEvalError, OSError) as e:
            print(error_text(e), file=sys.stderr)
            sys.exit(2)
        todo = [c for c in planned if cell_status(sweep_dir / c.name) != "complete"]
        skipped = len(planned) - len(todo)
        log.info("sweep %s: %d job(s) -> %d cell(s); %d complete, launching %d", sweep_dir, len(jobs), len(planned), skipped, len(todo))
        for note in applicable.notes():
            print(note, flush=True)
        results, launcher_failed = [], False
        if todo:
            try:
                results = sweep.launch(self.launcher, todo, sweep_dir)
            except PruneEvalError as e:  # bad launcher input, found before anything was submitted
                print(error_text(e), file=sys.stderr)
                sys.exit(2)
            except Exception as e:  # a job or the scheduler broke: still print the table and report
                launcher_failed = True
                log.error("launcher failed: %s: %s", type(e).__name__, e)
        elif hasattr(self.launcher, "discard_prestarted"):  # nothing to run: end the early workers now
            self.launcher.discard_prestarted()
        message, all_complete = sweep.describe_outcome(sweep_dir, planned, skipped)
        print(message)
        if self.report:
            sweep.write_report_if_available(sweep_dir)
        if not all_complete or launcher_failed:
            sys.exit(1)
        return results
