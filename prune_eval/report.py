"""`python -m prune_eval.report SWEEP_DIR`: the variance report (prune_eval.analysis.report)."""

from prune_eval.analysis.report import main

if __name__ == "__main__":
    main()
