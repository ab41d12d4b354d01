"""Plan a sweep before launching it, launch only what is left, and say how it ended.

Runs in the submitting process (from the prune_eval Hydra sweeper): every job's config is composed
and validated first, so a bad budget or a missing file is reported for all cells at once and no job
starts. Jobs that resolve to the same cell are launched once; complete cells are skipped, so
rerunning a sweep submits only what is unfinished. `plan.json` in the sweep directory remembers every
cell ever requested there, which is how the report lists missing cells.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prune_eval.analysis.cellfiles import cell_status, error_message, lock_holder, read_summary
from prune_eval.config import check_inputs, explain_composition_error, plan_cell
from prune_eval.errors import PruneEvalError
from prune_eval.execution.records import atomic_write_json

log = logging.getLogger("prune_eval")
PLAN, PLAN_LOCK = "plan.json", ".plan.lock"


@dataclass
class PlannedCell:
    name: str
    overrides: list[str]
    aliases: list[list[str]] = field(default_factory=list)  # other job overrides resolving here


def plan_jobs(jobs: Sequence[Sequence[str]], compose: Callable[[list[str]], DictConfig]) -> list[PlannedCell]:
    """Compose and validate every job; dedupe by cell. Raises one PruneEvalError listing all problems."""
    cells: dict[str, PlannedCell] = {}
    problems: list[str] = []
    checked_inputs: set[str] = set()
    for overrides in jobs:
        overrides = list(overrides)
        label = " ".join(overrides) or "(defaults)"
        try:
            try:
                cfg = compose(overrides)
            except Exception as e:  # Hydra composition errors -> one line
                raise explain_composition_error(e, overrides, compose) from None
            spec = plan_cell(cfg)
            inputs_key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.data, resolve=True)], sort_keys=True)
            if inputs_key not in checked_inputs:
                check_inputs(cfg)
                checked_inputs.add(inputs_key)
        except PruneEvalError as e:
            problems.append(f"{label}: {e}")
            continue
        if spec.name in cells:
            cells[spec.name].aliases.append(overrides)
        else:
            cells[spec.name] = PlannedCell(spec.name, overrides)
    if len(problems) == 1:
        raise PruneEvalError(f"{problems[0]} (nothing was launched)")
    if problems:
        raise PruneEvalError(f"{len(problems)} of {len(jobs)} job(s) are invalid; nothing was launched:\n  " + "\n  ".join(problems))
    return list(cells.values())


def record_plan(sweep_dir: Path, planned: list[PlannedCell]) -> None:
    """Merge this sweep's cells into plan.json (cells requested by earlier sweeps stay listed).

    Read, merge and write happen under an flock on `.plan.lock`, so two sweeps started on the same
    directory at once both keep their cells (without it, the later write drops the earlier one's).
    """
    path = Path(sweep_dir) / PLAN
    with open(Path(sweep_dir) / PLAN_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            plan = json.loads(path.read_text()) if path.exists() else {"cells": {}}
            if not isinstance(plan, dict) or not isinstance(plan.get("cells"), dict):
                raise ValueError("no 'cells' object")
        except (OSError, ValueError) as e:
            raise PruneEvalError(f"{path} is unreadable ({e}); fix or remove it (it lists the cells requested so far)") from None
        for cell in planned:
            plan["cells"][cell.name] = {"overrides": cell.overrides, "aliases": cell.aliases}
        atomic_write_json(path, plan)


def launch(launcher, cells: list[PlannedCell], sweep_dir: Path) -> list:
    """Launch the cells. prune_eval's launchers (launch=local-gpus, slurm) watch the cell directories
    instead of job results, so they are given them; Hydra's own launchers get the overrides alone."""
    overrides = [c.overrides for c in cells]
    if hasattr(launcher, "launch_cells"):
        return list(launcher.launch_cells(overrides, [Path(sweep_dir) / c.name for c in cells]))
    return list(launcher.launch(overrides, initial_job_idx=0))


def requested_cells(sweep_dir: Path) -> list[str]:
    path = Path(sweep_dir) / PLAN
    return sorted(json.loads(path.read_text())["cells"]) if path.exists() else []


def status_table(sweep_dir: Path, names: Sequence[str]) -> tuple[dict[str, str], str]:
    """Status of each cell and a printable table (status, mean F1 under LLaVA's rule, cell)."""
    statuses = {name: cell_status(Path(sweep_dir) / name) for name in names}
    lines = [f"{'status':9} {'mean F1':>8}  cell"]
    for name in names:
        summary = read_summary(Path(sweep_dir) / name)
        score = f"{100 * summary['metrics']['llava']['mean_f1']:8.2f}" if summary else f"{'-':>8}"
        lines.append(f"{statuses[name]:9} {score}  {name}")
    return statuses, "\n".join(lines)


def describe_outcome(sweep_dir: Path, planned: list[PlannedCell], skipped: int) -> tuple[str, bool]:
    """The closing message of a sweep and whether every cell is complete."""
    names = [c.name for c in planned]
    statuses, table = status_table(sweep_dir, names)
    counts = {s: sum(v == s for v in statuses.values()) for s in sorted(set(statuses.values()))}
    shared = sum(len(c.aliases) for c in planned)
    head = (
        f"sweep {sweep_dir}: {len(names)} cell(s) "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + (f"; {skipped} were already complete" if skipped else "")
        + (f"; {shared} job(s) shared a cell with an equivalent configuration" if shared else "")
    )
    failed = [n for n, s in statuses.items() if s == "failed"]
    tail = "".join(f"\n  failed: {n}: {error_message(Path(sweep_dir) / n)}" for n in failed)
    busy = [n for n, s in statuses.items() if s == "busy"]
    tail += "".join(f"\n  busy: {n}: being computed by another process ({lock_holder(Path(sweep_dir) / n) or 'unknown'}); "
                    "left alone, rerun this sweep once it has finished" for n in busy)
    footer = f"\nrecords: {sweep_dir}/<cell>/records/  summaries: {sweep_dir}/<cell>/summary.json"
    return head + "\n" + table + tail + footer, all(s == "complete" for s in statuses.values())




def write_report_if_available(sweep_dir: Path) -> None:
    """The variance report (prune_eval.analysis.report) over whatever the sweep directory holds."""
    try:
        from prune_eval.analysis import report
    except ImportError:
        return
    try:
        path = report.write_report(Path(sweep_dir))
        print(f"report: {path}")
    except PruneEvalError as e:
        print(f"report not written: {e}")
    except Exception as e:  # a bug in the report must not hide the sweep's own outcome
        log.exception("report failed")
        print(f"report not written: {type(e).__name__}: {e} (python -m prune_eval.report {sweep_dir} retries)")
