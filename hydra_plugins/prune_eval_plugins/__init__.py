"""Hydra plugins of prune_eval: the sweeper that plans before launching, and the search path for
the `launch/` launcher profiles. Thin adapters; the logic lives in prune_eval.execution.sweep."""
