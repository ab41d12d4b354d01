"""VisionZip (Yang et al., CVPR 2025), exactly as the official code selects and merges tokens.

Read from dvlab-research/VisionZip @ 3151f6d, visionzip/clip_encoder.py (CLIPVisionTower_VisionZip
.forward), utils.py (CLIPAttention_forward) and main.py (facts: ../shared/notes/visionzip.md):

1. Dominant tokens. The score of patch j is the CLS query's post-softmax attention to j at vision
   layer -2 (index 22 of CLIP-L's 24), summed over heads. The CLS token is KEPT: `dominant` counts it,
   so the top `dominant - 1` patches by score are kept with it (main.py passes `dominant - 1` on).
   They keep their ORIGINAL raster order (a boolean mask + masked_select), CLS first.
2. Contextual tokens. The similarity features are layer -2's KEYS averaged over heads and
   L2-normalised. Of the R = 577 - dominant remaining tokens (original order), targets sit at
   positions arange(0, R, max(1, R // contextual))[:contextual]; every other remaining token goes to
   its most similar target (hard argmax); a contextual token is the target's HIDDEN STATE PLUS the
   mean of its assigned tokens' hidden states (a target with none assigned stays itself).
3. The LLM gets [dominant (CLS first, raster order), contextual (target order)] through the
   projector: exactly `dominant + contextual` = budget tokens, CLS feature included.

The hidden states are layer -2's output, the features LLaVA-1.5 uses. Text is never looked at, so
all of this happens once per image. Budgets 64/128/192 split as 54+10 / 108+20 / 162+30 (README;
paper appendix B.1); other budgets keep the published 5/32 share of contextual tokens, and
`method.dominant` / `method.contextual` override either.
"""

from __future__ import annotations

from typing import Any

import torch

from prune_eval.errors import PruneEvalError
from prune_eval.methods import Method, ModelGeometry, register
from prune_eval.models.vision import VisionOutputs

PUBLISHED_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def dominant_indices(cls_attention: torch.Tensor, dominant: int) -> torch.Tensor:
    """cls_attention (B, H, N) -> kept token indices (B, dominant): 0 (CLS) then the top
    `dominant - 1` patches by head-summed CLS attention, in ascending (raster) order."""
    score = cls_attention[:, :, 1:].sum(dim=1)  # (B, H, N-1) -> (B, N-1), in the input dtype
    top = score.topk(dominant - 1, dim=1).indices + 1  # (B, dominant-1), indices into N
    cls = torch.zeros(top.shape[0], 1, dtype=top.dtype, device=top.device)
    return torch.cat([cls, top], dim=1).sort(dim=1).values


def remaining_indices(n_tokens: int, kept: torch.Tensor) -> torch.Tensor:
    """kept (B, K) -> the other token indices (B, N-K) in original order."""
    mask = torch.ones(kept.shape[0], n_tokens, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, False)
    return mask.nonzero()[:, 1].view(kept.shape[0], n_tokens - kept.shape[1])


def target_positions(n_remaining: int, contextual: int, device: torch.device | None = None) -> torch.Tensor:
    """Uniformly spaced target positions within the remaining tokens: (contextual,)."""
    step = max(1, n_remaining // contextual)
    return torch.arange(0, n_remaining, step, device=device)[:contextual]


def contextual_tokens(hidden: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, contextual: int) -> torch.Tensor:
    """hidden (B, N, D), keys (B, N, dk), kept (B, K) -> contextual tokens (B, contextual, D).

    Sums of assigned hidden states accumulate in float32 (the official code's fp16 bmm accumulates
    in fp32 on tensor cores too), then the mean is taken in the input dtype.
    """
    batch, n_tokens, dim = hidden.shape
    rest = remaining_indices(n_tokens, kept)  # (B, R)
    rest_hidden = hidden.gather(1, rest[..., None].expand(-1, -1, dim))  # (B, R, D)
    rest_keys = keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1]))  # (B, R, dk)
    metric = rest_keys / rest_keys.norm(dim=-1, keepdim=True)
    targets = target_positions(rest.shape[1], contextual, hidden.device)  # (C,)
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    others = (~is_target).nonzero()[:, 0]  # (R-C,) in original order
    similarity = metric[:, others] @ metric[:, targets].transpose(1, 2)  # (B, R-C, C)
    assignment = similarity.argmax(dim=2)  # (B, R-C)
    sums = torch.zeros(batch, contextual, dim, dtype=torch.float32, device=hidden.device)
    counts = torch.zeros(batch, contextual, dtype=torch.float32, device=hidden.device)
    for b in range(batch):  # index_add_ sums in order on CPU: reproducible to the bit
        sums[b].index_add_(0, assignment[b], rest_hidden[b, others].float())
        counts[b].index_add_(0, assignment[b], torch.ones(others.shape[0], device=hidden.device))
    mean = sums.to(hidden.dtype) / counts.clamp(min=1)[..., None].to(hidden.dtype)
    return rest_hidden[:, targets] + mean


def visionzip_tokens(vision: VisionOutputs, dominant: int, contextual: int) -> torch.Tensor:
    """The (B, dominant + contextual, Dv) vision features VisionZip hands to the projector."""
    kept = dominant_indices(vision.cls_attention, dominant)
    hidden = vision.hidden
    dominant_features = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
    if contextual == 0:
        return dominant_features
    return torch.cat([dominant_features, contextual_tokens(hidden, vision.keys, kept, contextual)], dim=1)


def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    dominant, contextual = params.get("dominant"), params.get("contextual")
    for key, value in (("dominant", dominant), ("contextual", contextual)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise PruneEvalError(f"method.{key}={value}; must be a whole number of tokens (or unset: the published split)")
    if dominant is None and contextual is not None and not 0 <= contextual < budget:
        raise PruneEvalError(f"method.contextual={contextual}; with budget={budget} it must be in 0..{budget - 1} (the rest are dominant tokens, at least 1)")
    if contextual is None and dominant is not None and not 1 <= dominant <= budget:
        raise PruneEvalError(f"method.dominant={dominant}; with budget={budget} it must be in 1..{budget} (the rest are contextual tokens)")
    if dominant is None and contextual is None:
        if budget in PUBLISHED_SPLITS:
            dominant, contextual = PUBLISHED_SPLITS[budget]
            rule = "published (VisionZip README / paper appendix B.1)"
        else:
            contextual = budget * 5 // 32
            dominant = budget - contextual
            rule = "derived: contextual = floor(5/32 x budget), the published share"
    else:
        dominant = budget - contextual if dominant is None else dominant
        contextual = budget - dominant if contextual is None else contextual
        rule = "user"
    if not isinstance(dominant, int) or dominant < 1:
        raise PruneEvalError(f"method.dominant={dominant}; must be at least 1 (it counts the CLS token)")
    if not isinstance(contextual, int) or contextual < 0:
        raise PruneEvalError(f"method.contextual={contextual}; must be a whole number >= 0")
    if dominant + contextual != budget:
        raise PruneEvalError(f"method.dominant + method.contextual = {dominant} + {contextual} = {dominant + contextual}, but budget={budget}; they must add up to the budget")
    n_tokens = geometry.n_patches + 1
    if dominant > n_tokens or contextual > n_tokens - dominant:
        raise PruneEvalError(f"method.dominant={dominant}, method.contextual={contextual} need more than the {n_tokens} vision tokens (CLS + {geometry.n_patches} patches)")
    return {"visual_tokens": budget, "dominant": dominant, "contextual": contextual, "split_rule": rule, "vision_layer": -2}


VISIONZIP = register(
    Method(
        name="visionzip",
        version="1",
        resolve=resolve,
        select=lambda vision, params, seeds: visionzip_tokens(vision, params["dominant"], params["contextual"]),
        needs_cls_attention=True,
        needs_keys=True,
    )
)
