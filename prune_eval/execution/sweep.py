"""Plan a sweep before launching it, launch only what is left, and say how it ended.

Runs in the submitting process (from the prune_eval Hydra sweeper): every job's config is composed
and validated first, so a bad budget or a missing file is reported for all cells at once and no job
starts. Jobs that resolve to the same cell are launched once; complete cells are skipped, so
rerunning a sweep submits only what is unfinished. `plan.json` in the sweep directory remembers every
cell ever requested there, which is how the report lists missing cells, and which seeds each cell
serves: a method that draws no random numbers (VisionZip, vanilla, SparseVLM v2) has one cell for all
seeds (its experiment's seed is null), listed with every requested seed.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prune_eval.analysis.cellfiles import cell_status, error_message, lock_holder, read_summary
from prune_eval.config import check_quant_backend, config_error, explain_composition_error, input_problems, plan_cell
from prune_eval.errors import PruneEvalError
from prune_eval.execution.records import atomic_write_json
from prune_eval.execution.schedule import CellJob, cell_job
from prune_eval.overrides import output_dir_problem
from prune_eval.specs import CellSpec

log = logging.getLogger("prune_eval")
PLAN, PLAN_LOCK = "plan.json", ".plan.lock"


@dataclass
class PlannedCell:
    name: str
    overrides: list[str]
    aliases: list[list[str]] = field(default_factory=list)  # other job overrides resolving here
    seeds: list[int] = field(default_factory=list)  # the requested seeds this cell serves
    spec: CellSpec | None = field(default=None, repr=False)

    @classmethod
    def of(cls, spec: CellSpec, overrides: list[str]) -> "PlannedCell":
        return cls(spec.name, overrides, seeds=[spec.seed], spec=spec)

    def add_alias(self, overrides: list[str], spec: CellSpec) -> None:
        self.aliases.append(overrides)
        if spec.seed not in self.seeds:
            self.seeds.append(spec.seed)

    @property
    def seed_free(self) -> bool:
        return self.spec is not None and self.spec.seed_free


def plan_jobs(jobs: Sequence[Sequence[str]], compose: Callable[[list[str]], DictConfig], sweep_dir: Path | None = None) -> list[PlannedCell]:
    """Compose and validate every job; dedupe by cell. Raises one PruneEvalError listing all problems.

    Missing inputs (weights, question files, images) are looked for once per distinct (model, data)
    and said once each, however many jobs need them, each with the command that fetches it; a job
    whose weights are missing is not planned further (its cell is defined by the checkpoint's
    config), one whose data is missing still is, so its other mistakes are found now too. Jobs that
    would write outside `sweep_dir` (a swept name, an interpolation of a swept key) are refused first.
    """
    cells: dict[str, PlannedCell] = {}
    problems: list[str] = []
    input_lines: dict[str, None] = {}  # ordered set: each input problem once, however many jobs share it
    inputs_found: dict[str, tuple[list[str], list[str]]] = {}
    backends_checked: set[str] = set()
    dirs: list[tuple[list[str], str]] = []
    for overrides in jobs:
        overrides = list(overrides)
        label = " ".join(overrides) or "(defaults)"
        try:
            try:
                cfg = compose(overrides)
            except Exception as e:  # Hydra composition errors -> one line
                raise explain_composition_error(e, overrides, compose) from None
            if "hydra" in cfg:
                dirs.append((overrides, str(cfg.hydra.sweep.dir)))
            inputs_key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.data, resolve=True)],
                                    sort_keys=True, default=str)
            if inputs_key not in inputs_found:
                inputs_found[inputs_key] = input_problems(cfg)
            model_problems, data_problems = inputs_found[inputs_key]
            input_lines.update(dict.fromkeys(model_problems + data_problems))
            if model_problems:
                continue
            spec = plan_cell(cfg)
            backend_key = json.dumps([inputs_key, OmegaConf.to_container(cfg.quant, resolve=True), str(cfg.device)], sort_keys=True, default=str)
            if backend_key not in backends_checked:
                check_quant_backend(cfg)
                backends_checked.add(backend_key)
        except PruneEvalError as e:
            problems.append(f"{label}: {e}")
            continue
        except OmegaConfBaseException as e:  # an interpolation that does not resolve, met before plan_cell
            problems.append(f"{label}: {config_error(cfg, e)}")
            continue
        if spec.name in cells:
            cells[spec.name].add_alias(overrides, spec)
        else:
            cells[spec.name] = PlannedCell.of(spec, overrides)
    scattered = output_dir_problem([j for j, _ in dirs], [d for _, d in dirs], str(sweep_dir) if sweep_dir else None) if dirs else None
    if scattered:
        raise PruneEvalError(scattered)
    lines = list(input_lines)
    if len(problems) == 1:
        lines.append(f"{problems[0]} (nothing was launched)")
    elif problems:
        lines.append(f"{len(problems)} of {len(jobs)} job(s) are invalid; nothing was launched:\n  " + "\n  ".join(problems))
    if lines:
        raise PruneEvalError("\n".join(lines))
    return list(cells.values())


def record_plan(sweep_dir: Path, planned: list[PlannedCell]) -> None:
    """Merge this sweep's cells into plan.json (cells requested by earlier sweeps stay listed).

    Each cell: `overrides` (the first job that resolved to it), `aliases` (the other jobs),
    `seeds` (every seed requested for it, over all sweeps) and `uses_seed` (false: the method draws
    no random numbers, one computation serves all of `seeds`). Read, merge and write happen under an
    flock on `.plan.lock`, so two sweeps started on the same directory at once both keep their cells
    (without it, the later write drops the earlier one's).
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
            earlier = plan["cells"].get(cell.name) if isinstance(plan["cells"].get(cell.name), dict) else {}
            seeds = sorted({*cell.seeds, *(s for s in earlier.get("seeds", []) if isinstance(s, int))})
            plan["cells"][cell.name] = {"overrides": cell.overrides, "aliases": cell.aliases, "seeds": seeds,
                                        "uses_seed": not cell.seed_free}
        atomic_write_json(path, plan)


def check_launcher(launcher, config: DictConfig) -> None:
    """The launcher's own checks (no sbatch, an unknown partition, no GPU, a sweep over a launcher
    setting), before plan.json or multirun.yaml is written and whether or not any cell is left to run.
    Raises PruneEvalError."""
    from prune_eval.execution.checks import check_launch_overrides

    check_launch_overrides(config.hydra.overrides.task)
    if hasattr(launcher, "check_before_launch"):
        launcher.check_before_launch()


def launch(launcher, cells: list[PlannedCell], sweep_dir: Path) -> list:
    """Launch the cells. prune_eval's launchers (launch=local, local-gpus, slurm) schedule cells by
    model and estimated cost and watch the cell directories instead of job results, so they get
    CellJobs; Hydra's own launchers get the overrides alone."""
    if hasattr(launcher, "launch_cells"):
        return list(launcher.launch_cells(cell_jobs(cells, sweep_dir)))
    return list(launcher.launch([c.overrides for c in cells], initial_job_idx=0))


def sweep_dir_override(sweep_dir: Path) -> str:
    """`hydra.sweep.dir=<absolute>` for the jobs, so a worker's cwd does not matter."""
    text = str(Path(sweep_dir).absolute()).replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")
    return f"hydra.sweep.dir='{text}'"


def cell_jobs(cells: Sequence[PlannedCell], sweep_dir: Path) -> list[CellJob]:
    """What the launchers and workers need of each planned cell."""
    override = sweep_dir_override(sweep_dir)
    return [cell_job(c.spec, [*c.overrides, override], Path(sweep_dir) / c.name, num) for num, c in enumerate(cells)]


def cell_jobs_of(launcher, job_overrides: Sequence[Sequence[str]]) -> list[CellJob]:
    """CellJobs for job overrides that did not come through prune_eval's sweeper (Hydra's launch())."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).absolute()
    planned = []
    for overrides in job_overrides:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        planned.append(PlannedCell.of(plan_cell(cfg), list(map(str, overrides))))
    return cell_jobs(planned, sweep_dir)


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
    tail = "".join(f"\n  {line}" for line in seed_sharing(planned))
    tail += "".join(f"\n  failed: {n}: {error_message(Path(sweep_dir) / n)}" for n in failed)
    busy = [n for n, s in statuses.items() if s == "busy"]
    tail += "".join(f"\n  busy: {n}: being computed by another process ({lock_holder(Path(sweep_dir) / n) or 'unknown'}); "
                    "left alone, rerun this sweep once it has finished" for n in busy)
    footer = f"\nrecords: {sweep_dir}/<cell>/records/  summaries: {sweep_dir}/<cell>/summary.json"
    return head + "\n" + table + tail + footer, all(s == "complete" for s in statuses.values())




def seed_ranges(seeds: Sequence[int]) -> str:
    """'0–4', '0–2, 5, 7–8' (sorted, consecutive seeds as ranges)."""
    ordered, parts = sorted(set(seeds)), []
    start = prev = None
    for seed in ordered + [None]:
        if seed is not None and prev is not None and seed == prev + 1:
            prev = seed
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = seed
    return ", ".join(parts)


def seed_sharing(planned: Sequence[PlannedCell]) -> list[str]:
    """One line per seed-free cell that serves several requested seeds."""
    lines = []
    for cell in planned:
        if cell.seed_free and len(cell.seeds) > 1:
            label = cell.name.split("_")[0]  # method[-version]-tokens
            lines.append(f"{label} does not use the seed: one computation serves seeds {seed_ranges(cell.seeds)} ({cell.name})")
    return lines


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
