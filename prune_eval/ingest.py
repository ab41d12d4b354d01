"""`python -m prune_eval.ingest ...`: an answer file from any code -> a cell (prune_eval.analysis.ingest)."""

from prune_eval.analysis.ingest import main

if __name__ == "__main__":
    main()
