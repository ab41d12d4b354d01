"""`python -m prune_eval [-m] key=value ...`: one cell, or a sweep of cells with -m.

`--help` prints prune_eval's usage (prune_eval.usage); Hydra's generic help is `--hydra-help`.
Before Hydra starts, the command line is checked (unknown group choices and keys get "did you mean"
and the choices; group options are fitted to the swept choices that have them; keys that decide
where results go are not swept) and, for a single run, the cell is validated and its inputs looked
at; a sweep is validated by the prune_eval sweeper for every job before any job is launched. User
errors print one line per problem (`prune_eval: error: ...`) and exit 2; a failed cell exits 1.
This process imports neither torch nor transformers before the command line is known to be good
(workers started early for launch=local-gpus import them, and touch no GPU until a job is theirs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prune_eval.config import CONF_DIR, GROUPS, check_overrides, check_quant_backend, explain_composition_error, group_choices, input_problems, plan_cell
from prune_eval.errors import PruneEvalError, error_text
from prune_eval.overrides import applicable_jobs, check_output_overrides, force_add_partial_options

INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc")
MULTIRUN_FLAGS = ("-m", "--multirun")
HELP_FLAGS = ("--help", "-h")


def _cell_name_resolver(*, _root_: DictConfig) -> str:
    """${pe_cell:} in hydra.run.dir / hydra.sweep.subdir: the cell's stable directory name.

    Never raises: an invalid config gets a placeholder name here and its one-line error from the
    validation that runs before (sweeper, preflight) or inside the job.
    """
    try:
        return plan_cell(_root_).name
    except Exception:
        return "invalid-config"


OmegaConf.register_new_resolver("pe_cell", _cell_name_resolver, replace=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    from prune_eval.execution.cell import run_cell

    hydra_cfg = HydraConfig.get()
    status = run_cell(cfg, Path(hydra_cfg.runtime.output_dir))
    if hydra_cfg.mode.name == "RUN":
        print(f"cell {status}: {hydra_cfg.runtime.output_dir}")
        if status != "complete":
            sys.exit(1)
    return status


def preflight(arguments: list[str]) -> list[str]:
    """Everything checkable before Hydra runs: overrides compose for every job; a single run's cell
    is also validated and its inputs looked at (a sweep's cells are, by the prune_eval sweeper).
    Returns the command line for Hydra (see overrides.force_add_partial_options)."""
    if any(a in INFO_FLAGS or a.startswith("--cfg") for a in arguments):
        return arguments
    check_overrides(arguments)
    check_output_overrides(arguments)
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in arguments if not a.startswith("-")]

    def compose_job(job_overrides: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=job_overrides, return_hydra_config=True)

    multirun = any(a in MULTIRUN_FLAGS for a in arguments)
    expanded = _expand_globs(overrides) if multirun else overrides
    if expanded is None:
        return arguments  # a glob over one of Hydra's own groups: the sweeper composes and checks every job
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(expanded), None)[0] if multirun else [overrides]
    jobs = applicable_jobs(jobs, compose_job).jobs
    # A sweep's jobs are composed, validated and checked for scattered output directories by the
    # prune_eval sweeper, all at once (plan_jobs); composing each here too cost ~0.3 s a job. The
    # first is composed here because what the jobs share is composed by Hydra before the sweeper
    # runs, and its errors would be Hydra's traceback.
    for job in jobs[:1] if multirun else jobs:
        try:
            cfg = compose_job(list(job))
        except Exception as e:  # Hydra composition errors -> one line
            raise explain_composition_error(e, list(job), compose_job) from None
    if multirun:
        return force_add_partial_options(arguments)
    model_problems, data_problems = input_problems(cfg)  # all of them at once, one line each
    problems = model_problems + data_problems
    if not model_problems:  # without its weights a cell cannot be planned (its shapes come from them)
        try:
            plan_cell(cfg)
            check_quant_backend(cfg)
        except PruneEvalError as e:
            problems.append(str(e))
    if problems:
        raise PruneEvalError("\n".join(problems))
    return arguments


def _expand_globs(overrides: list[str]) -> list[str] | None:
    """`method=glob(*zip)` -> `method=visionzip` (as Hydra's sweeper expands it, over the group's
    choices); None when a glob names a group that is not prune_eval's (Hydra's own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    out = []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if override.value_type != ValueType.GLOB_CHOICE_SWEEP:
            out.append(text)
            continue
        group = override.get_key_element()
        if group not in GROUPS:
            return None
        names = override.value().filter(group_choices(group))
        if not names:
            raise PruneEvalError(f"{text} matches no {group} choice; choices: {', '.join(group_choices(group))}")
        out.append(f"{group}={','.join(names)}")
    return out


def prestart_from_command_line(arguments: list[str]) -> None:
    """`-m ... launch=local-gpus`: start the GPU workers now, before the command line is checked and
    the sweep planned, so that their imports of torch and transformers (5.4-8.7 s on the H200
    machine, BENCHMARKS.md) begin as early as they can; the launcher's own prestart, after Hydra has
    composed the launch config, keeps them or corrects the GPU set (prune_eval.execution.local).
    A guess from the command line: launch.* overrides given there (not +launch.* or ++launch.*),
    launch/local-gpus.yaml's values otherwise; nothing when it cannot tell (a swept or malformed
    launch.* value, no GPU) or nothing will run (--cfg, --info, ...). The
    workers import and wait, touching no GPU; if the command line or a job is refused they are
    ended (atexit) like any worker the sweep does not take."""
    if not any(a in MULTIRUN_FLAGS for a in arguments) or "launch=local-gpus" not in arguments:
        return
    if any(a in INFO_FLAGS or a.startswith("--cfg") for a in arguments):
        return  # nothing will run
    from prune_eval.config import LAUNCH_DIR
    from prune_eval.execution.checks import gpu_pool
    from prune_eval.execution.local import prestart_for

    settings = OmegaConf.to_container(OmegaConf.load(LAUNCH_DIR / "local-gpus.yaml")["launch"])
    given = [a for a in arguments if a.startswith("launch.")]
    if given:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import ValueType

        try:
            parsed = OverridesParser.create().parse_overrides(given)
        except Exception:
            return  # preflight says what is wrong with it
        for override in parsed:
            if override.value_type != ValueType.ELEMENT:
                return
            settings[override.key_or_group.removeprefix("launch.")] = override.value()
    try:
        pool = gpu_pool(settings["gpus"], skip_busy=bool(settings["skip_busy"]), busy_memory_mib=float(settings["busy_memory_mib"]),
                        torch_count=lambda: 0)
    except (PruneEvalError, KeyError, TypeError, ValueError):
        return  # the launcher's check after planning gives the error
    try:
        prestart_for(pool)
    except OSError:
        return  # no temporary file or process now: the launcher starts its workers itself, and says why if it cannot


def main() -> None:
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        from prune_eval.usage import usage

        print(usage())
        return
    prestart_from_command_line(sys.argv[1:])
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
    except PruneEvalError as e:
        print(error_text(e), file=sys.stderr)
        sys.exit(2)
    run()


def leave(code: int) -> None:
    """End the process without the interpreter's teardown of the modules a sweep imported (torch &
    co: seconds of garbage collection at exit): atexit handlers run (they end workers started for a sweep that did not take
    them), logs and output are flushed, and every result file is already written atomically."""
    import atexit
    import logging
    import os

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:  # sys.exit(n) from the CLI, Hydra or the sweeper
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        leave(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
    leave(0)
