"""The CLIP vision tower, run once per image, with the extras pruning methods read from it.

LLaVA-1.5 feeds the LLM the output of vision layer -2 (index 22 of CLIP-L's 24). We run the tower's
layers only up to that one (layer 23's output is never used) and, when a method asks, read layer
-2's CLS attention row and keys through a forward pre-hook on its self-attention: the hook sees the
layer-normed input and computes softmax(q_CLS K^T * scale) for the CLS row alone, so the tower keeps
running SDPA instead of materialising 24 full attention matrices in eager mode. This follows the
official VisionZip code's numerics (query scaled before the product, softmax and head sum in the
tower's dtype; dvlab-research/VisionZip visionzip/utils.py CLIPAttention_forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionOutputs:
    """What pruning methods may read about a batch of images (all in the tower's dtype).

    hidden:        (B, 1 + P, Dv) output of the feature layer, CLS first then patches in raster order
    cls_attention: (B, H, 1 + P) post-softmax attention of CLS to every token at the feature layer
    keys:          (B, 1 + P, Dh) that layer's keys (k_proj output incl. bias), averaged over heads
    """

    hidden: torch.Tensor
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None


def feature_layer_index(vision_tower: nn.Module, feature_layer: int) -> int:
    """hidden_states[feature_layer] (HF convention: index 0 = embeddings) -> encoder layer index."""
    n_layers = len(vision_tower.encoder.layers)
    index = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
    if not 1 <= index <= n_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} out of range for a {n_layers}-layer tower")
    return index - 1


def _cls_row_hook(store: dict, need_attention: bool, need_keys: bool):
    """Pre-hook on CLIPAttention: its input is layer_norm1(h); compute only what was asked for."""

    def hook(attention: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, N, D)
        batch, tokens, _ = x.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        keys = attention.k_proj(x).view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, N, dh)
        if need_keys:
            store["keys"] = keys.mean(1)  # (B, N, dh)
        if need_attention:
            query = (attention.q_proj(x[:, :1]) * attention.scale).view(batch, 1, heads, head_dim).transpose(1, 2)
            scores = query @ keys.transpose(-1, -2)  # (B, H, 1, N)
            store["cls_attention"] = scores.softmax(dim=-1)[:, :, 0]  # (B, H, N)

    return hook


@torch.no_grad()
def encode_images(
    vision_tower: nn.Module,
    pixel_values: torch.Tensor,
    *,
    feature_layer: int = -2,
    need_cls_attention: bool = False,
    need_keys: bool = False,
) -> VisionOutputs:
    """Run the tower up to the feature layer; optionally capture that layer's CLS row and keys."""
    last = feature_layer_index(vision_tower, feature_layer)
    hidden = vision_tower.embeddings(pixel_values.to(vision_tower.dtype))
    hidden = vision_tower.pre_layrnorm(hidden)
    store: dict[str, torch.Tensor] = {}
    handle = None
    if need_cls_attention or need_keys:
        attention = vision_tower.encoder.layers[last].self_attn
        handle = attention.register_forward_pre_hook(_cls_row_hook(store, need_cls_attention, need_keys), with_kwargs=True)
    try:
        for layer in vision_tower.encoder.layers[: last + 1]:
            hidden = layer(hidden, None)
    finally:
        if handle is not None:
            handle.remove()
    return VisionOutputs(hidden=hidden, cls_attention=store.get("cls_attention"), keys=store.get("keys"))
