"""Vanilla LLaVA-1.5: all 576 patch tokens, no pruning (the 85.9 POPE baseline).

The budget does not apply: `method=vanilla budget=64` and `budget=128` resolve to the same cell.
"""

from __future__ import annotations

from typing import Any

from prune_eval.methods import Method, ModelGeometry, drop_cls, register


def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    return {"visual_tokens": geometry.n_patches}


VANILLA = register(
    Method(
        name="vanilla",
        version="1",
        resolve=resolve,
        select=lambda vision, params, generator: drop_cls(vision),
    )
)
