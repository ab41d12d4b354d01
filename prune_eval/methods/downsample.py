"""Downsampling: the image's patch grid average-pooled to the budget's token count (VTC-Bench's baseline).

LLaVA-1.5 feeds the LLM the 24x24 patch grid of vision layer -2 (CLS dropped, raster order). This
method pools that grid to s x s tokens, s = sqrt(budget), before the projector: 24x24 -> 8x8 for
budget=64, 12x12 for 144, 4x4 for 16. Text is never looked at, nothing is drawn at random, and the
work is once per image. The budget must be a square number; any other budget is an error naming
the nearest squares (budget=128 -> 121 or 144).

Pooling windows (torch.nn.functional.adaptive_avg_pool2d, the rule of
aten/src/ATen/native/AdaptivePooling.h start_index / end_index): output row i of s averages input
rows floor(i * 24 / s) .. ceil((i + 1) * 24 / s) - 1, and likewise for columns; each output token
is the plain mean of the patch features in its row window x column window. When s divides 24
(s = 1, 2, 3, 4, 6, 8, 12, 24) the windows are the disjoint 24/s x 24/s blocks (3x3 for 64). When
it does not, windows have two sizes and neighbouring windows share a row or column: for s = 14
(budget=196) the row windows are 0-1, 1-3, 3-5, 5-6, 6-8, 8-10, 10-11, 12-13, 13-15, 15-17,
17-18, 18-20, 20-22, 22-23 (sizes 2 and 3; patches 1, 3, 5, 6, 8, 10, 13, 15, 17, 18, 20, 22 fall
in two windows, and so count twice). tests/test_downsample.py checks this against its own loop.

How this relates to VTC-Bench (Liao et al., "Are We Using the Right Benchmark", arXiv 2510.07143;
Chenfei-Liao/VTC-Bench @ 983e443): VTC-Bench downsamples the *picture*. `scripts/dart.sh` sets
VTC_IMAGE_RATIO = r (1, 2, 3, 4, 5, 10), and `external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py`
(lines 243-265) resizes the PIL image to (w // r, h // r) with bicubic resampling before
Qwen2-VL's processor, whose native-resolution tower then emits about 1/r^2 of the tokens. On
LLaVA-1.5 that would change nothing, because its processor resizes every image to 336 px and the
tower always emits 576 tokens. So here the tower sees the full 336 px image and its output grid is
pooled instead: the same "fewer tokens by lower spatial resolution" baseline, with three
differences a reader should know: feature-space box averaging after the tower instead of bicubic
resampling of pixels before it; an exact square token count (64 = a factor 3 per side, 144 = 2,
36 = 4, 16 = 6) instead of an integer pixel ratio; and LLaVA-1.5 instead of Qwen2-VL / LLaVA-OV.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from prune_eval.errors import PruneEvalError
from prune_eval.methods import Method, ModelGeometry, drop_cls, register


def pool_patch_grid(patches: torch.Tensor, side: int) -> torch.Tensor:
    """patches (B, P, D) in raster order of a square grid -> (B, side * side, D), raster order.

    Adaptive average pooling over the grid (windows in the module docstring), in the input dtype.
    Raises ValueError if P is not a square number.
    """
    batch, n_patches, dim = patches.shape
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"{n_patches} patches do not form a square grid")
    image = patches.transpose(1, 2).reshape(batch, dim, grid, grid)  # (B, D, G, G)
    pooled = F.adaptive_avg_pool2d(image, side)  # (B, D, s, s)
    return pooled.flatten(2).transpose(1, 2)  # (B, s*s, D)


def nearest_squares(budget: int, grid: int) -> list[int]:
    """The square budgets next to `budget` that a grid x grid patch grid allows (at most two)."""
    low = math.isqrt(budget)
    return sorted({min(max(s, 1), grid) ** 2 for s in (low, low + 1)})


def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    grid = math.isqrt(geometry.n_patches)
    side = math.isqrt(budget) if budget >= 1 else 0
    if budget < 1 or side * side != budget or side > grid:
        allowed = " or ".join(f"{n} ({math.isqrt(n)}x{math.isqrt(n)})" for n in nearest_squares(max(budget, 1), grid))
        raise PruneEvalError(
            f"method=downsample pools the {grid}x{grid} patch grid to a square grid, so the budget must be a square number "
            f"up to {grid * grid}; budget={budget} is not; nearest allowed: {allowed}"
        )
    return {"visual_tokens": budget, "grid": [side, side], "patch_grid": [grid, grid], "pooling": "adaptive_avg_pool2d"}


DOWNSAMPLE = register(
    Method(
        name="downsample",
        version="1",
        resolve=resolve,
        select=lambda vision, params, seeds: pool_patch_grid(drop_cls(vision), params["grid"][0]),
    )
)
