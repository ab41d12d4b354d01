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

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from prune_eval.errors import PruneEvalError


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

    Each layer's buffer is allocated once with room for `reserve` more tokens than its first
    update, so decoding writes in place instead of re-concatenating the whole cache every step.
    `meta[l]` describes layer l's cached keys. Layers that hold the same tokens share one TokenMeta
    object, so masks are built once per layer group, not once per layer.
    """

    n_layers: int
    reserve: int = 0
    buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    meta: list[TokenMeta | None] = field(default_factory=list)
    position_shift: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buffers = [None] * self.n_layers
        self.length = [0] * self.n_layers
        self.meta = [None] * self.n_layers
        self.position_shift = [None] * self.n_layers

    @torch.compiler.disable  # bookkeeping stays eager when the decoder layers are compiled
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by the decoder layer's attention: append and return this layer's full K/V."""
        start, new = self.length[layer_idx], key.shape[-2]
        buffer = self.buffers[layer_idx]
        if buffer is None or buffer[0].shape[-2] < start + new:
            capacity = start + new + self.reserve
            grown = tuple(torch.empty(*t.shape[:-2], capacity, t.shape[-1], dtype=t.dtype, device=t.device) for t in (key, value))
            if buffer is not None:
                grown[0][..., :start, :] = buffer[0][..., :start, :]
                grown[1][..., :start, :] = buffer[1][..., :start, :]
            buffer = self.buffers[layer_idx] = grown
        buffer[0][..., start : start + new, :] = key
        buffer[1][..., start : start + new, :] = value
        self.length[layer_idx] = start + new
        return self.key_states(layer_idx), self.value_states(layer_idx)

    def key_states(self, layer_idx: int) -> torch.Tensor:
        """(B, H_kv, L, D) post-RoPE keys of a layer."""
        return self.buffers[layer_idx][0][..., : self.length[layer_idx], :]

    def value_states(self, layer_idx: int) -> torch.Tensor:
        """(B, H_kv, L, D) values of a layer."""
        return self.buffers[layer_idx][1][..., : self.length[layer_idx], :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length[layer_idx]

    def lengths(self) -> list[int]:
        return list(self.length)


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


RECOMPILE_LIMIT = 64  # compiled variants per frame (LanguageModel.compiled); each is a kind of call, not a layer


@dataclass
class LanguageModel:
    """The parts of LLaVA's LLM we drive: embeddings, decoder layers, final norm, rotary, lm_head."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    cache_kwarg: str = ""  # the decoder layers' name for the KV cache argument; "" = found from the first layer

    def __post_init__(self) -> None:
        if not self.cache_kwarg:
            self.cache_kwarg = cache_argument(self.layers[0])

    @classmethod
    def from_llava(cls, model: nn.Module) -> "LanguageModel":
        lm = model.model.language_model
        return cls(lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb, model.lm_head)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def compiled(self, backend: str | Callable = "inductor") -> "LanguageModel":
        """The same model with each decoder layer under torch.compile (dynamic shapes).

        Inductor fuses the element-wise work around the matrix products (RMSNorm, rotary, SiLU,
        residuals), a third of the prefill time on an H100 in eager mode. The KV cache update stays
        eager (a graph break). Every layer runs the same code (LlamaDecoderLayer.forward), so its
        compiled graphs are shared by all layers: compiled once, not once per layer. What would
        otherwise tell the layers apart is `self_attn.layer_idx`, an int attribute that dynamo
        treats as a constant and guards on (each layer a recompile, and past
        `torch._dynamo.config.recompile_limit`, 8, the remaining layers ran uncompiled);
        `allow_unspec_int_on_nn_module` makes such ints graph inputs instead (set process-wide: this
        is the only compiled code prune_eval runs). What remains are variants per kind of call,
        not per layer: a mask or none, one query or many, one row or many (dynamo specializes
        sizes 0 and 1), and equal sizes it guards on ("duck sizing"); for the first kinds of call
        it meets, dynamo also compiles layer 0 on its own (a first value is a constant until it
        changes, then the index is a graph input for every layer after); with the nested frames
        transformers adds (GradientCheckpointingLayer.__call__, a deprecation wrapper), they can
        exceed 8 per frame, so the limit is raised to RECOMPILE_LIMIT, deliberately.
        tests/test_compile.py checks that every layer call runs through compiled graphs.
        `backend` is torch.compile's (tests use a counting one).
        """
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        layers = nn.ModuleList([torch.compile(layer, dynamic=True, backend=backend) for layer in self.layers])
        return LanguageModel(self.embed_tokens, layers, self.norm, self.rotary_emb, self.lm_head, self.cache_kwarg)


def cache_argument(layer: nn.Module) -> str:
    """The keyword under which this transformers version's decoder layer takes the KV cache.

    transformers 5.17 (the GPU image's) knows only `past_key_values`; 5.24 renamed it `cache` and
    warns on every layer call that `past_key_values` "will be removed in version 5.40.0"
    (`@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")` on LlamaDecoderLayer.forward).
    The signature (through the decorator's functools.wraps) says which one the installed version
    has, so neither version warns and none silently drops the cache into **kwargs. Raises
    PruneEvalError for a layer that takes neither.
    """
    parameters = inspect.signature(type(layer).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise PruneEvalError(f"{type(layer).__name__}.forward takes neither `cache` nor `past_key_values`; "
                         "this transformers version is not supported (see pyproject.toml)")


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
    hidden, _, meta = forward_layers(lm, hidden, positions, meta, cache, decoding=decoding, hook=hook)
    return lm.norm(hidden), meta


def forward_layers(
    lm: LanguageModel,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    meta: TokenMeta,
    cache: KVCache,
    *,
    decoding: bool,
    hook: LayerHook | None = None,
    layers: range | None = None,
) -> tuple[torch.Tensor, torch.Tensor, TokenMeta]:
    """hidden (B, Q, D) through `layers` (default: all), appending to their caches; no final norm.

    Returns the raw hidden states after the last of `layers`, with their positions and meta (changed
    when a hook pruned). Running a range lets a caller stop after one layer and continue later,
    e.g. the fast path prefills an image's tokens up to the first pruning layer only.
    """
    # Built once per distinct set of tokens, not once per layer. Looked up by object identity, with
    # the objects kept alive here: keyed by id() alone, a TokenMeta freed after a hook pruned could
    # hand its id to the next one and fetch a stale mask of another shape (seen as a torch.compile
    # shape error on the GPU; in eager it would be an SDPA error or, shapes permitting, a wrong mask).
    appended: list[tuple[TokenMeta, TokenMeta, TokenMeta]] = []  # (cached, new, cached + new)
    masks: list[tuple[TokenMeta, TokenMeta, torch.Tensor | None]] = []  # (keys, queries, mask)
    rotary: list[tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]] = []  # (position shift, (cos, sin))
    for layer_idx in layers if layers is not None else range(lm.n_layers):
        layer = lm.layers[layer_idx]
        previous = cache.meta[layer_idx]
        if previous is None:
            keys_meta = meta
        else:
            keys_meta = next((both for old, new, both in appended if old is previous and new is meta), None)
            if keys_meta is None:  # layers holding the same tokens share one TokenMeta
                keys_meta = previous.cat(meta)
                appended.append((previous, meta, keys_meta))
        cache.meta[layer_idx] = keys_meta
        built = [m for k, q, m in masks if k is keys_meta and q is meta]  # the mask may be None: a list, not next()
        if built:
            mask = built[0]
        else:
            plain = keys_meta is meta and bool((meta.segment == meta.segment[:, :1]).all()) and bool((meta.segment >= 0).all())
            # one segment, no padding, no earlier keys: plain causal attention, which SDPA runs as
            # flash attention when given no mask at all
            mask = None if plain else attention_mask(meta, keys_meta)
            masks.append((keys_meta, meta, mask))
        shift = cache.position_shift[layer_idx] if decoding else None
        cos_sin = next((cs for s, cs in rotary if s is shift), None)
        if cos_sin is None:  # one (cos, sin) per distinct position set
            cos_sin = lm.rotary_emb(hidden, positions if shift is None else positions - shift)
            rotary.append((shift, cos_sin))
        if hook is not None:
            hook.before(layer_idx, hidden, positions, meta)
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=positions,
            use_cache=True,
            **{lm.cache_kwarg: cache},
        )
        if hook is not None:
            changed = hook.after(layer_idx, hidden, positions, meta, cache)
            if changed is not None:
                hidden, positions, meta = changed
                rotary.clear()
    return hidden, positions, meta


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE helper: (x1, x2) -> (-x2, x1) over the last dimension's halves."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_probabilities(
    lm: LanguageModel, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """A layer's post-softmax attention for chosen query tokens: (B, H, Q, K) in the model dtype.

    hidden (B, Q, D): the layer's INPUT hidden states of the query tokens (before input_layernorm);
    positions (B, Q) their RoPE positions; keys (B, H_kv, K, D_h) the layer's post-RoPE cached keys;
    visible (B, Q, K) bool. Softmax rows are independent, so computing only the rows a method needs
    gives the probabilities of the full L x L matrix, while the layer's own output comes from SDPA.
    """
    attention = lm.layers[layer_idx].self_attn
    x = lm.layers[layer_idx].input_layernorm(hidden)
    queries = attention.q_proj(x).view(*x.shape[:2], -1, attention.head_dim).transpose(1, 2)  # (B, H, Q, Dh)
    cos, sin = lm.rotary_emb(x, positions)  # (B, Q, Dh)
    queries = queries * cos[:, None] + rotate_half(queries) * sin[:, None]
    if keys.shape[1] != queries.shape[1]:  # grouped-query attention
        keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    return eager_probabilities(queries, keys, visible[:, None], attention.scaling)


def eager_probabilities(queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """queries (..., Q, D), keys (..., K, D), visible (..., Q, K) bool (broadcast) -> (..., Q, K).

    The eager recipe of SparseVLM's official code (docs/sparsevlm-official.md §3.1): logits
    q k^T * scaling in the model dtype, softmax in fp32 over the visible keys, back to the model dtype.
    """
    logits = (queries @ keys.transpose(-1, -2)) * scaling
    logits = logits.float().masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).to(queries.dtype)


@contextmanager
def attention_kernels() -> Iterator[None]:
    """SDPA backends for our masked attention: flash, memory-efficient, math; not cuDNN.

    With an explicit mask torch picks cuDNN's SDPA on Hopper, which builds a new execution plan for
    every new shape: 5.4 ms of CPU per call, 55% of the fast path's CPU time, measured on an H100
    (torch 2.11, benchmarks/profile_fast.py, 2026-11-24). Shapes change with every batch here.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name) for name in ATTENTION_BACKENDS]):
        yield


ATTENTION_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # allowed by attention_kernels; recorded with each part


def greedy_tokens(lm: LanguageModel, last_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token ids, logits) from the final hidden states (..., D)."""
    logits = lm.lm_head(last_hidden).float()
    return logits.argmax(-1), logits


def check_finite(logits: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """Raise if a row that is still decoding has NaN or infinite logits.

    argmax over NaN logits returns token 0 or the NaN's index: an answer nobody computed, which
    would be scored like any other. logits (..., V); active (...) bool, None = every row (padding and
    finished rows are not looked at). One reduction and one sync per decoding step, where the loop
    reads the next tokens anyway.
    """
    finite = torch.isfinite(logits.amax(-1))  # (...,) False for a NaN, +inf, or nothing but -inf
    if active is not None:
        finite |= ~active.to(finite.device)
    if not bool(finite.all()):
        raise PruneEvalError(
            f"the model produced NaN/inf logits for {int((~finite).sum())} of {finite.numel()} question(s) being decoded; "
            "greedy decoding would pick an arbitrary token. The weights or activations overflowed or are corrupt: "
            "check the checkpoint, or use quant=bf16 or fp32 instead of fp16"
        )


StopCheck = Callable[[list[int]], bool]
