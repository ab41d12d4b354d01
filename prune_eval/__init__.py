"""prune_eval: settle visual-token-pruning comparisons on LLaVA with evidence.

Hydra sweeps over (model, quant, preprocess, data, method, budget, seed) write per-question POPE
records; metrics, statistics and the variance report are derived from those records alone.
"""

__version__ = "0.1.0"
