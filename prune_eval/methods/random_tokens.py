"""Random pruning: `budget` patch tokens drawn uniformly without replacement, kept in raster order.

The baseline any method must beat, and the one method whose output really depends on the seed, which
is what the report's seed statistics need to see. The draw for an image depends only on (seed,
image), not on batching or on which questions were already answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prune_eval.methods import Method, ModelGeometry, drop_cls, register
from prune_eval.models.vision import VisionOutputs


def random_indices(n_patches: int, keep: int, seeds: Sequence[int]) -> torch.Tensor:
    """(B, keep) patch indices (0-based, CLS excluded), ascending, one independent draw per seed."""
    draws = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        draws.append(torch.randperm(n_patches, generator=generator)[:keep].sort().values)
    return torch.stack(draws)


def select(vision: VisionOutputs, params: dict[str, Any], seeds: Sequence[int]) -> torch.Tensor:
    patches = drop_cls(vision)  # (B, P, Dv)
    index = random_indices(patches.shape[1], params["visual_tokens"], seeds).to(patches.device)
    return patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))  # (B, K, Dv)


def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    return {"visual_tokens": budget}


RANDOM = register(Method(name="random", version="1", resolve=resolve, select=select, uses_seed=True))
