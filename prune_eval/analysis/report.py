"""`python -m prune_eval.report SWEEP_DIR`: what a sweep's records say, with error bars and verdicts.

Why: "VisionZip beats SparseVLM by 1.9 points at 64 tokens" is a claim about 8910 questions on 500
images, one metric convention, one checkpoint, one preprocessing and one algorithm version. This
report recomputes everything from the per-question records (never from job return values) and
answers first the question a reader brings: why does the measured gap differ from the published
one? (prune_eval.analysis.reconcile: version, budget meaning, metric convention, setup, sampling
noise, numerical floor.) Then the evidence: every pair of configurations that differ in one factor
with a paired image-cluster bootstrap interval, a permutation p-value (Holm-adjusted over the
declared family), McNemar, Miller's clustered SE, the minimum detectable effect, the gap under every
convention, over seeds, on the compression-sensitive subset; agreement with vanilla; the papers'
numbers next to ours as a reproduction test.

It works on a half-finished or partly failed sweep: cells that are missing, failed, partial, busy or
fail verification are listed with the reason and left out; two cells with different question sets
are reported "not comparable", never compared. No torch.

Modules: configs (cells -> configurations), pairs, compare (statistics, family, verdicts), agreement,
reconcile, wording (every generated sentence), analyse (all of it -> Analysis), render (-> files),
plots. This module only writes the files and parses the command line.

Outputs in SWEEP_DIR/report/: report.md, report.html (self-contained, figures embedded), cells.csv
and gaps.csv (fractions 0-1, one row per cell / per comparison and convention), table.tex, *.png.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from prune_eval.analysis import configs, render
from prune_eval.analysis.analyse import N_RESAMPLES, Analysis, analyse  # noqa: F401  (the report's public API)
from prune_eval.analysis.compare import sign_line  # noqa: F401
from prune_eval.analysis.configs import REPORT_DIR
from prune_eval.analysis.pairs import FACTORS
from prune_eval.errors import PruneEvalError
from prune_eval.execution.records import atomic_write_bytes


def inventory(sweep_dir: Path) -> list[configs.Entry]:
    """Every cell the sweep asked for (plan.json) or holds, with its status and, if usable, its data."""
    return configs.inventory(Path(sweep_dir), configs.read_plan(Path(sweep_dir)))


def write_report(sweep_dir: Path, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 pairs: Sequence[tuple[str, str]] = (), primary: Sequence[str] = (), figures: bool = True) -> Path:
    """Analyse the sweep and write SWEEP_DIR/report/; returns the path of report.md."""
    analysis = analyse(Path(sweep_dir), n_resamples=n_resamples, seed=seed, pairs=pairs, primary=primary)
    out = Path(sweep_dir) / REPORT_DIR
    files = render.render_all(analysis, figures=figures)
    for stale in out.glob("*.png") if out.is_dir() else ():
        if stale.name not in files:
            stale.unlink(missing_ok=True)  # a report written at the same time may have removed it
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prune_eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (outputs/<name>) or a folder of ingested cells")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help=f"bootstrap and permutation resamples (default {N_RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("CELL_A", "CELL_B"),
                        help="also compare these two cells (any two cells over the same questions); repeatable")
    parser.add_argument("--primary", action="append", default=[], metavar="FACTOR",
                        help=f"a factor whose comparisons form the Holm family (repeatable; default: the factors swept "
                             f"on the command line, from plan.json); choices: {', '.join(FACTORS)}")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures (faster)")
    args = parser.parse_args(argv)
    try:
        if args.resamples < 100:
            raise PruneEvalError(f"--resamples={args.resamples}; use at least 100 (default {N_RESAMPLES})")
        path = write_report(args.sweep_dir, n_resamples=args.resamples, seed=args.seed, pairs=[tuple(p) for p in args.pair],
                            primary=args.primary, figures=not args.no_figures)
    except PruneEvalError as e:
        print(f"prune_eval.report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
