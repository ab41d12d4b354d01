"""Compute accounting for every method: what "64 tokens" means in work done.

VisionZip's 64 is 64 visual tokens entering the LLM; SparseVLM's 64 is an average over the 32
decoder layers while layers 0-2 still see all 576. Every record carries the visual-token count each
decoder layer processed in prefill (`visual_tokens_per_layer`) and the prompt length, from which
this module derives, per cell:
- `entering`: visual tokens entering the LLM;
- `input_seen`: the true average number of visual tokens per layer (what each layer processes);
- `official_equal_tokens`: SparseVLM's logged figure, which counts each layer's OUTPUT
  (docs/sparsevlm-official.md section 7; main logs int() of it);
- `prefill_tflops`: the official log's per-layer estimate 4 n d^2 + 2 n^2 d + 3 n d m summed over
  layers, n being the layer's input length over all tokens (d hidden, m MLP width).
Pure numpy: the report uses it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def output_counts(visual_per_layer: Sequence[int]) -> list[int]:
    """Visual tokens in each layer's output: layer l's output is layer l + 1's input; the last
    layer does not prune."""
    return list(visual_per_layer[1:]) + [visual_per_layer[-1]]


def official_equal_tokens(visual_per_layer: Sequence[int]) -> float:
    return sum(output_counts(visual_per_layer)) / len(visual_per_layer)


def prefill_flops(visual_per_layer: Sequence[int], prompt_tokens: int, hidden: int, intermediate: int) -> float:
    """The official SparseVLM log's FLOPs estimate for one prefill (input-length convention)."""
    counts = np.asarray(visual_per_layer, dtype=np.float64)
    n = prompt_tokens - (counts[0] - counts)  # sequence length entering each layer
    return float(np.sum(4 * n * hidden**2 + 2 * n**2 * hidden + 3 * n * hidden * intermediate))


def summarize_compute(records: Sequence[dict], *, hidden: int | None, intermediate: int | None) -> dict | None:
    """Per-cell averages over questions; None when the records carry no per-layer counts (ingested)."""
    rows = [r for r in records if r.get("visual_tokens_per_layer")]
    if not rows:
        return None
    per_layer = np.array([r["visual_tokens_per_layer"] for r in rows], dtype=np.float64)  # (Q, L)
    official = np.array([official_equal_tokens(r["visual_tokens_per_layer"]) for r in rows])
    summary = {
        "n_layers": int(per_layer.shape[1]),
        "entering": float(per_layer[:, 0].mean()),
        "input_seen": float(per_layer.mean()),
        "official_equal_tokens": float(official.mean()),
        "official_equal_tokens_int": int(official.mean()),
        "per_layer_mean": [round(float(x), 3) for x in per_layer.mean(axis=0)],
    }
    if hidden and intermediate:
        flops = [prefill_flops(r["visual_tokens_per_layer"], r["prompt_tokens"], hidden, intermediate) for r in rows]
        summary["prefill_tflops_per_question"] = float(np.mean(flops)) / 1e12
    return summary
