"""Our own pass over the Llama decoder layers of LLaVA: explicit masks, positions and KV cache.

Why not `model.generate`: pruning inside the LLM (SparseVLM) removes tokens between layers, leaves
layers with KV caches of different lengths and, depending on the version, re-numbers positions per
layer; sharing an image prefix packs several questions into one row. All of that is a question of
which key each query may see and which rotary position it has. This module states both explicitly
and calls the checkpoint's own decoder layers (SDPA, any quantization) for the arithmetic.

Every token carries two integers next to its hidden state:
- `slot`: its place in the row's order of creation (prompt tokens left to right, then generated
  tokens). Causality is `slot_key <= slot_query`; pruning keeps slots, so order survives gathering.
- `segment`: -1 padding, 0 the shared prefix (system prompt + image), s > 0 the tokens of question s
  in that row. A query sees keys of segment 0 and of its own segment, never another question's.
A plain batch has one question per row (segment 1 after the prefix); a packed row has many. Padding
queries see only themselves, which keeps SDPA free of fully masked rows (NaN) and touches nothing else.

Positions (RoPE) are separate from slots: callers pass them for prefill; during decoding, the
position of a new token at layer l is its base position minus `position_shift[l]`, which is how
SparseVLM v1/v1.5 give every layer group its own, compacted position count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TokenMeta:
    """Per-token bookkeeping for one layer's keys or one step's queries: (B, L) long tensors."""

    slot: torch.Tensor
    segment: torch.Tensor

    def cat(self, other: "TokenMeta") -> "TokenMeta":
        return TokenMeta(torch.cat([self.slot, other.slot], 1), torch.cat([self.segment, other.segment], 1))

    def gather(self, index: torch.Tensor) -> "TokenMeta":
        return TokenMeta(self.slot.gather(1, index), self.segment.gather(1, index))


def attention_mask(queries: TokenMeta, keys: TokenMeta) -> torch.Tensor:
    """(B, 1, Q, K) bool: which keys each query may attend to."""
    q_slot, q_seg = queries.slot[:, :, None], queries.segment[:, :, None]  # (B, Q, 1)
    k_slot, k_seg = keys.slot[:, None, :], keys.segment[:, None, :]  # (B, 1, K)
    visible = (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg)) & (k_slot <= q_slot)
    visible |= k_slot == q_slot  # padding queries see themselves only
    return visible[:, None]


@dataclass
class KVCache:
    """Keys/values per layer with independent lengths; duck-types HF's `Cache.update`.

    `meta[l]` describes layer l's cached keys. Layers that hold the same tokens share one TokenMeta
    object, so masks are built once per layer group, not once per layer.
    """

    n_layers: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    meta: list[TokenMeta | None] = field(default_factory=list)
    position_shift: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = [None] * self.n_layers
        self.values = [None] * self.n_layers
        self.meta = [None] * self.n_layers
        self.position_shift = [None] * self.n_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by the decoder layer's attention: append and return this layer's full K/V."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys[layer_idx] is None else self.keys[layer_idx].shape[-2]

    def lengths(self) -> list[int]:
        return [self.get_seq_length(i) for i in range(self.n_layers)]


class LayerHook:
    """Called around decoder layers during prefill (SparseVLM prunes here); default: nothing.

    `after` may return a new (hidden, positions, meta) for the following layers, e.g. gathered to the
    kept tokens; it may also set `cache.position_shift[l]` for later layers' decoding positions.
    """

    def before(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta) -> None:
        pass

    def after(
        self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor, TokenMeta] | None:
        return None


@dataclass
class LanguageModel:
    """The parts of LLaVA's LLM we drive: embeddings, decoder layers, final norm, rotary, lm_head."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module

    @classmethod
    def from_llava(cls, model: nn.Module) -> "LanguageModel":
        lm = model.model.language_model
        return cls(lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb, model.lm_head)

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def run_layers(
    lm: LanguageModel,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    meta: TokenMeta,
    cache: KVCache,
    *,
    decoding: bool,
    hook: LayerHook | None = None,
) -> tuple[torch.Tensor, TokenMeta]:
    """hidden (B, Q, D) of new tokens through every layer, appending them to the cache.

    Returns the normed last hidden states (B, Q', D) and the meta of the tokens that came out (Q' < Q
    when a hook pruned during prefill).
    """
    masks: dict[tuple[int, int], torch.Tensor] = {}
    rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    appended: dict[int, TokenMeta] = {}
    for layer_idx, layer in enumerate(lm.layers):
        previous = cache.meta[layer_idx]
        if previous is None:
            keys_meta = meta
        else:
            if id(previous) not in appended:
                appended[id(previous)] = previous.cat(meta)
            keys_meta = appended[id(previous)]
        cache.meta[layer_idx] = keys_meta
        if (id(keys_meta), id(meta)) not in masks:
            masks[(id(keys_meta), id(meta))] = attention_mask(meta, keys_meta)
        shift = cache.position_shift[layer_idx] if decoding else None
        if id(shift) not in rotary:  # one (cos, sin) per distinct position set
            rotary[id(shift)] = lm.rotary_emb(hidden, positions if shift is None else positions - shift)
        if hook is not None:
            hook.before(layer_idx, hidden, positions, meta)
        hidden = layer(
            hidden,
            attention_mask=masks[(id(keys_meta), id(meta))],
            position_embeddings=rotary[id(shift)],
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        if hook is not None:
            changed = hook.after(layer_idx, hidden, positions, meta, cache)
            if changed is not None:
                hidden, positions, meta = changed
                rotary.clear()
    return lm.norm(hidden), meta


def greedy_tokens(lm: LanguageModel, last_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token ids, logits) from the final hidden states (..., D)."""
    logits = lm.lm_head(last_hidden).float()
    return logits.argmax(-1), logits


StopCheck = Callable[[list[int]], bool]
