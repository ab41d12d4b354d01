"""The whole analysis of a sweep directory, as one immutable `Analysis` that the renderer only says.

inventory (configs.inventory) -> configurations -> per-configuration statistics -> pairs ->
comparisons -> the declared Holm family and the verdicts (compare.finish) -> agreement with vanilla
and the compression-sensitive subset (agreement) -> the reconciliation with the published numbers
(reconcile). No torch, no files written: prune_eval.analysis.report writes what
prune_eval.analysis.render makes of this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prune_eval.analysis import agreement, compare, configs, reconcile
from prune_eval.analysis import pairs as pairing
from prune_eval.errors import PruneEvalError

N_RESAMPLES = 10_000


@dataclass(frozen=True)
class Analysis:
    sweep_dir: Path
    entries: tuple
    configs: tuple
    config_stats: dict  # Config.id -> ConfigStats
    comparisons: tuple
    n_resamples: int
    seed: int
    common: dict  # factor -> the value configurations have unless their label says otherwise
    plan: configs.Plan
    family: compare.Family
    reconciliations: tuple = ()
    agreements: dict | None = None  # cell name -> agreement.Agreement
    subsets: dict | None = None  # cell name -> agreement.Subset
    floors: dict | None = None  # Config.id -> reconcile.Floor (numerics-only partners), when measured


def declared_family(plan: configs.Plan, primary: Sequence[str]) -> compare.Family:
    if primary:
        unknown = sorted(set(primary) - set(pairing.FACTORS))
        if unknown:
            raise PruneEvalError(f"--primary {unknown[0]}: unknown factor; choices: {', '.join(pairing.FACTORS)}")
        return compare.Family(frozenset(primary), "--primary")
    if plan.found and plan.swept:
        return compare.Family(frozenset(plan.swept), "plan.json")
    return compare.Family(compare.DEFAULT_PRIMARY, "default")


def analyse(sweep_dir: Path, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
            pairs: Sequence[tuple[str, str]] = (), primary: Sequence[str] = ()) -> Analysis:
    """Everything the report says about SWEEP_DIR. `pairs`: explicit --pair cells; `primary`: the
    factors that form the Holm family (default: those swept on the command line, from plan.json)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise PruneEvalError(f"sweep directory not found: {sweep_dir}")
    plan = configs.read_plan(sweep_dir)
    family = declared_family(plan, primary)
    entries = configs.inventory(sweep_dir, plan)
    cells = [e.cell for e in entries if e.cell is not None]
    found = configs.build_configs(cells)
    by_name = {c.name: c for c in cells}
    explicit = []
    for name_a, name_b in pairs:
        for name in (name_a, name_b):
            if name not in by_name:
                entry = next((e for e in entries if e.name == name), None)
                why = f"it is {entry.status}: {entry.note}" if entry else "no such cell"
                raise PruneEvalError(f"--pair {name_a} {name_b}: cell '{name}' cannot be used ({why})")
        explicit.append((by_name[name_a], by_name[name_b]))
    stats_by_id = {c.id: configs.config_stats(c, plan, n_resamples=n_resamples, seed=seed) for c in found}
    comparisons = [compare.compare(p, found, stats_by_id, n_resamples=n_resamples, seed=seed)
                   for p in pairing.find_pairs(found, explicit)]
    comparisons, family = compare.finish(comparisons, family, n_resamples=n_resamples)
    subsets = agreement.subsets(found, n_resamples=n_resamples, seed=seed)
    comparisons = [replace(c, subset=agreement.subset_gaps(c, subsets, n_resamples=n_resamples, seed=seed)) for c in comparisons]
    floors = {c.id: f for c in found if (f := reconcile.numerics_floor(c, comparisons)) is not None}
    return Analysis(
        sweep_dir, tuple(entries), tuple(found), stats_by_id, tuple(comparisons), n_resamples, seed,
        configs.common_values([c.info for c in found if not c.info["ingested"]]), plan, family,
        tuple(reconcile.reconciliations(comparisons, found, stats_by_id, n_resamples=n_resamples, seed=seed)),
        agreement.agreements(found, n_resamples=n_resamples, seed=seed), subsets, floors)
