"""SparseVLM (Zhang et al.) v1, v1.5 and v2 as one method with a version switch.

Specification, with file:line references into Gumpest/SparseVLMs: docs/sparsevlm-official.md
(v1 = commit 91fb6d9, v1.5 = branch v1.5 = main with USE_VERSION=1_0, v2 = main with USE_VERSION=2_0).
In short, per (image, question), in prefill only:
- Raters (once, from the input embeddings): text tokens after the image whose mean, over visual
  tokens, of softmax_over_text(visual . text) is strictly above the mean of those values.
- At each pruning layer l, from l's post-softmax attention (post-RoPE q, k, causal): the raters' rows,
  mean over heads, visual columns, mean over raters -> one score per visual token; keep the top k
  (v1.5/v2: k from a fixed list per budget; v1: k = int(rank(P) * scale + bias), P the head-mean
  rater->visual attention, and no pruning when rank(P) equals the visual count), k <= n_visual - 1.
  v2 first divides the attention by the RoPE "gravity" of an all-ones query/key pair and keeps only
  the 14 heads with the most rater->visual mass.
- Recycling (v1, v1.5): of the deleted tokens, the int(0.3 n) + 1 best-scored are clustered by DPC-kNN
  into int(n_rec / 10) + 1 groups of the pruning layer's output hidden states; each group's mean is
  placed after the kept visual tokens, before the text; merged tokens take part in later layers.
- Positions: v1/v1.5 re-number 0..N'-1 after each pruning and decode every layer at its own cache
  length; v2 keeps the original positions. Layers up to l keep their full KV cache.
Only the raters' attention rows are computed (with the layer output itself from SDPA); the scores
are mathematically those of the official full eager matrix.

"Budget" is SparseVLM's nominal 32-layer average, not the tokens entering the LLM (all 576 do);
every record carries the visual-token count of each layer, from which the summary derives the
official "equal tokens" figure and the true average each layer processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prune_eval.errors import PruneEvalError
from prune_eval.methods import Method, ModelGeometry, register
from prune_eval.models.llm import KVCache, LanguageModel, LayerHook, TokenMeta

OFFICIAL_LAYERS = 32  # LLaVA-1.5-7B (Vicuna-7B); the official code uses these absolute indices


@dataclass(frozen=True)
class Version:
    source: str
    layers: tuple[int, ...]
    schedules: dict[int, tuple[int, ...]] = field(default_factory=dict)  # budget -> top-k per pruning layer
    rank_rule: bool = False
    recycling: bool = True
    compact_positions: bool = True
    gravity: bool = False
    priority_heads: int | None = None


VERSIONS = {
    "v1": Version("91fb6d9 'init sparsevlm' (2024-10)", (2, 6, 15, 19), rank_rule=True),
    "v1.5": Version(
        "branch v1.5 734d900 (ICML 2025) = main USE_VERSION=1_0; the 96 list exists in main only",
        (2, 6, 15),
        {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    ),
    "v2": Version(
        "main 26a5f48 USE_VERSION=2_0 (SparseVLM+)",
        (2, 6, 15),
        {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
        recycling=False,
        compact_positions=False,
        gravity=True,
        priority_heads=14,
    ),
}
# v1's (scale, bias) per budget, from the official scripts/README at 91fb6d9. Only 128 is POPE's own
# setting; there are no official POPE values for 64 or 192, so those default to the README's
# TextVQA (64) and MME / code-default (192) settings. The achieved equivalent tokens are recorded.
V1_SCALE_BIAS = {
    128: (9.0, 6.0, "POPE: scripts/v1_5/eval/pope.sh @ 91fb6d9"),
    192: (13.5, 0.0, "MME / code default: scripts/v1_5/eval/mme.sh @ 91fb6d9 (no official POPE value)"),
    64: (0.8, 0.0, "TextVQA: scripts/v1_5/eval/textvqa.sh @ 91fb6d9 (no official POPE value)"),
}
LAYER_RULES = ("auto", "official", "scaled")


# ---------------------------------------------------------------- pure token-selection functions
def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """visual (nV, d), text (T, d) input embeddings -> rater positions within the text (R,).

    softmax over text of the raw dot products, mean over visual tokens, strictly above the mean.
    """
    relation = (visual @ text.T).float().softmax(dim=-1).to(visual.dtype)  # (nV, T)
    share = relation.mean(dim=0)  # (T,)
    return (share > share.mean()).nonzero()[:, 0]


def rater_attention(queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """queries (H, R, D), keys (H, S, D) post-RoPE, visible (R, S) bool -> probabilities (H, R, S).

    As the official eager path: logits q k^T * scale in the model dtype, softmax (fp32 inside), back
    to the model dtype. Rows are independent, so computing only the rater rows changes nothing.
    """
    logits = (queries @ keys.transpose(-1, -2)) * scaling  # (H, R, S)
    logits = logits.float().masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).to(queries.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def gravity_divisor(cos_rows: torch.Tensor, sin_rows: torch.Tensor, cos_cols: torch.Tensor, sin_cols: torch.Tensor) -> torch.Tensor:
    """v2's divisor W (R, S): RoPE-rotated all-ones query . all-ones key / sqrt(D), in cos's dtype.

    Equals (2/sqrt(D)) sum_j cos((p_r - p_c) theta_j): it depends on the distance only.
    """
    ones = torch.ones_like(cos_rows)
    q = ones * cos_rows + rotate_half(ones) * sin_rows  # (R, D)
    k = torch.ones_like(cos_cols) * cos_cols + rotate_half(torch.ones_like(cos_cols)) * sin_cols  # (S, D)
    return (q @ k.T) / math.sqrt(cos_rows.shape[-1])


def priority_heads(attention: torch.Tensor, visual: torch.Tensor, n_heads: int) -> torch.Tensor:
    """attention (H, R, S), visual column indices (nV,) -> the n_heads heads with most rater->visual mass."""
    mass = attention[:, :, visual].sum(dim=(1, 2))  # (H,)
    return mass.topk(n_heads).indices


def visual_scores(attention: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """attention (H, R, S) -> (nV,): mean over heads, visual columns, mean over raters."""
    return attention.mean(dim=0)[:, visual].mean(dim=0)


def v1_keep_count(attention: torch.Tensor, visual: torch.Tensor, scale: float, bias: float) -> tuple[int | None, int]:
    """v1's rule: (k, rank) with k = min(int(rank * scale + bias), nV - 1); k None = no pruning here."""
    relation = attention.mean(dim=0)[:, visual]  # (R, nV)
    rank = int(torch.linalg.matrix_rank(relation.float()))
    n_visual = visual.shape[0]
    if rank == n_visual:
        return None, rank
    return min(int(rank * scale + bias), n_visual - 1), rank


def top_k_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (within the visual segment) of the k best scores, in sequence order."""
    return scores.topk(k).indices.sort().values


def recycling_candidates(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Deleted positions to recycle, best score first, and the cluster count.

    n_rec = int(0.3 n_deleted) + 1 of the deleted tokens by score; clusters = int(n_rec / 10) + 1.
    """
    deleted = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    deleted[keep] = False
    deleted_positions = deleted.nonzero()[:, 0]
    n_recycled = int(deleted_positions.shape[0] * 0.3) + 1
    best = scores[deleted_positions].topk(n_recycled).indices
    return deleted_positions[best], int(n_recycled / 10) + 1


def dpc_knn_merge(x: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> torch.Tensor:
    """DPC-kNN clustering and merge (official utils.py cluster_and_merge) of x (N, C) -> (n_clusters, C).

    distance = L2 / sqrt(C); density = exp(-mean of the k smallest squared distances, k = n_clusters,
    self included) + noise; delta = distance to the nearest denser token (the global maximum distance
    for the densest); centres = top n_clusters of delta * density; every token joins its nearest
    centre (centres join themselves); a cluster becomes the weighted mean sum x / (count + 1e-6).
    """
    n, channels = x.shape
    distance = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / channels**0.5  # (N, N)
    nearest = distance.topk(n_clusters, dim=-1, largest=False).values  # (N, k)
    density = (-(nearest**2).mean(dim=-1)).exp() + noise  # (N,)
    denser = (density[None, :] > density[:, None]).to(x.dtype)  # (N, N): j denser than i
    delta = (distance * denser + distance.max() * (1 - denser)).min(dim=-1).values  # (N,)
    centres = (delta * density).topk(n_clusters).indices  # (c,)
    cluster = distance[centres].argmin(dim=0)  # (N,)
    cluster[centres] = torch.arange(n_clusters, device=x.device)
    counts = torch.zeros(n_clusters, 1, dtype=x.dtype, device=x.device).index_add_(0, cluster, torch.ones(n, 1, dtype=x.dtype, device=x.device))
    weights = 1.0 / (counts + 1e-6)  # (c, 1)
    return torch.zeros(n_clusters, channels, dtype=x.dtype, device=x.device).index_add_(0, cluster, x * weights[cluster])


# ---------------------------------------------------------------- configuration
def scaled_layers(layers: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """The layer rule for models other than the 32-layer LLM: floor(l * n_layers / 32)."""
    return tuple(l * n_layers // OFFICIAL_LAYERS for l in layers)


def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    version_name = str(params.get("version", "v1.5"))
    if version_name not in VERSIONS:
        raise PruneEvalError(f"unknown SparseVLM version '{version_name}'; choices: {', '.join(VERSIONS)}")
    version = VERSIONS[version_name]
    rule = params.get("layer_rule", "auto")
    if rule not in LAYER_RULES:
        raise PruneEvalError(f"method.layer_rule={rule}; choices: {', '.join(LAYER_RULES)}")
    if rule == "auto":
        rule = "official" if geometry.text_layers > max(version.layers) else "scaled"
    layers = version.layers if rule == "official" else scaled_layers(version.layers, geometry.text_layers)
    if max(layers) >= geometry.text_layers or any(b <= a for a, b in zip(layers, layers[1:])):
        raise PruneEvalError(
            f"SparseVLM {version_name} prunes after layers {list(version.layers)}; with the {rule} rule on a "
            f"{geometry.text_layers}-layer LLM that is {list(layers)}, which is not usable; use a model with more layers"
            + ("" if rule == "scaled" else " or method.layer_rule=scaled")
        )
    resolved: dict[str, Any] = {"version": version_name, "source": version.source, "budget": budget,
                                "layer_rule": rule, "layers": list(layers), "visual_tokens": geometry.n_patches,
                                "recycling": version.recycling, "positions": "compacted" if version.compact_positions else "original"}
    if version.rank_rule:
        scale, bias = params.get("scale"), params.get("bias")
        if scale is None or bias is None:
            if budget not in V1_SCALE_BIAS:
                raise PruneEvalError(f"SparseVLM v1 has no (scale, bias) for budget={budget}; defaults exist for {', '.join(map(str, sorted(V1_SCALE_BIAS)))}, or set method.scale and method.bias")
            default_scale, default_bias, source = V1_SCALE_BIAS[budget]
            scale = default_scale if scale is None else scale
            bias = default_bias if bias is None else bias
        else:
            source = "user"
        for key, value in (("scale", scale), ("bias", bias)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) == float("inf"):
                raise PruneEvalError(f"method.{key}={value}; must be a finite number (SparseVLM v1: k = rank x scale + bias)")
        resolved.update(scale=float(scale), bias=float(bias), scale_bias_source=source, max_batch_size=1)
    else:
        unused = [k for k in ("scale", "bias") if params.get(k) is not None]
        if unused:
            raise PruneEvalError(f"method.{unused[0]}={params[unused[0]]} is used by SparseVLM v1 only, not {version_name}; unset it or set method.version=v1")
        if budget not in version.schedules:
            raise PruneEvalError(f"SparseVLM {version_name} has no schedule for budget={budget}; available budgets: {', '.join(map(str, sorted(version.schedules)))}")
        resolved["schedule"] = list(version.schedules[budget])
    if version.priority_heads:
        heads = version.priority_heads if geometry.text_heads >= version.priority_heads else max(1, round(geometry.text_heads * version.priority_heads / OFFICIAL_LAYERS))
        resolved["priority_heads"] = heads
    return resolved


# ---------------------------------------------------------------- model plumbing
@dataclass
class RowDecision:
    """What pruning did to one row at one layer (kept/recycled visual positions, merged features)."""

    keep: torch.Tensor | None  # None: the layer left the row unchanged (v1, full rank)
    merged: torch.Tensor | None = None


class SparseVLMHook(LayerHook):
    """Prunes rows [pad | prefix | visual | text] after the configured layers of the prefill.

    Rows are independent; all rows of a batch must keep the same number of visual tokens (v1.5 and
    v2's fixed schedules guarantee it; v1 runs one row at a time). `replay` reuses earlier decisions
    instead of scoring, which the tests use to recompute a pruned prefix without a cache.
    """

    def __init__(self, params: dict[str, Any], lm: LanguageModel, seeds: Sequence[int], prefix_len: int, n_visual: int,
                 replay: list[dict[int, RowDecision]] | None = None) -> None:
        self.params, self.lm, self.prefix_len = params, lm, prefix_len
        self.version = VERSIONS[params["version"]]
        self.layers = list(params["layers"])
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.n_visual = [n_visual] * len(seeds)
        self.raters: list[torch.Tensor] = []
        self.decisions: list[dict[int, RowDecision]] = replay or [{} for _ in seeds]
        self.replaying = replay is not None
        self.visual_per_layer: list[list[int]] = [[] for _ in seeds]
        self.rank: list[dict[int, int]] = [{} for _ in seeds]
        self.layer_input: torch.Tensor | None = None
        self.prompt_valid: torch.Tensor | None = None

    # row layout helpers
    def _start(self, meta: TokenMeta, row: int) -> int:
        """Index of the first visual token of a row (after its left padding and the prefix)."""
        return int((meta.segment[row] < 0).sum()) + self.prefix_len

    def before(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta) -> None:
        for row in range(hidden.shape[0]):
            self.visual_per_layer[row].append(self.n_visual[row])
        if layer_idx == 0:
            self.prompt_valid = (meta.segment >= 0).sum(dim=1, keepdim=True)
            if not self.replaying:
                self.raters = [self._raters(hidden, meta, row) for row in range(hidden.shape[0])]
        if layer_idx in self.layers and not self.replaying:
            self.layer_input = self.lm.layers[layer_idx].input_layernorm(hidden)

    def _raters(self, hidden: torch.Tensor, meta: TokenMeta, row: int) -> torch.Tensor:
        start = self._start(meta, row)
        visual = hidden[row, start : start + self.n_visual[row]]
        text = hidden[row, start + self.n_visual[row] :]
        raters = select_raters(visual, text)
        if raters.numel() == 0:
            raise PruneEvalError("SparseVLM found no rater among the text tokens after the image; it needs text (the question) after the image")
        return raters

    def _scores(self, layer_idx: int, row: int, positions: torch.Tensor, meta: TokenMeta, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual scores (nV,) of a row at a pruning layer, and the raters' head-mean attention."""
        attention_module = self.lm.layers[layer_idx].self_attn
        start, n_visual = self._start(meta, row), self.n_visual[row]
        rows = start + n_visual + self.raters[row]  # absolute rater indices
        x = self.layer_input[row, rows]  # (R, d)
        head_dim = attention_module.head_dim
        queries = attention_module.q_proj(x).view(rows.shape[0], -1, head_dim).transpose(0, 1)  # (H, R, D)
        cos, sin = self.lm.rotary_emb(x, positions[row : row + 1, rows])  # (1, R, D)
        queries = queries * cos + rotate_half(queries) * sin
        keys = cache.key_states(layer_idx)[row]  # (Hkv, S, D), post-RoPE
        keys = keys.repeat_interleave(queries.shape[0] // keys.shape[0], dim=0)  # (H, S, D)
        visible = (meta.slot[row][None, :] <= meta.slot[row][rows][:, None]) & (meta.segment[row][None, :] >= 0)
        attention = rater_attention(queries, keys, visible, attention_module.scaling)  # (H, R, S)
        visual = torch.arange(start, start + n_visual, device=x.device)
        if self.version.gravity:
            cos_all, sin_all = self.lm.rotary_emb(x, positions[row : row + 1])
            attention = attention / gravity_divisor(cos[0], sin[0], cos_all[0], sin_all[0])
            attention = attention[priority_heads(attention, visual, self.params["priority_heads"])]
        return visual_scores(attention, visual), attention

    def _decide(self, layer_idx: int, row: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, cache: KVCache) -> RowDecision:
        scores, attention = self._scores(layer_idx, row, positions, meta, cache)
        visual = torch.arange(scores.shape[0], device=scores.device) + self._start(meta, row)
        if self.version.rank_rule:
            k, self.rank[row][layer_idx] = v1_keep_count(attention, visual, self.params["scale"], self.params["bias"])
            if k is None:
                return RowDecision(keep=None)
        else:
            k = min(self.params["schedule"][self.layers.index(layer_idx)], scores.shape[0] - 1)
        keep = top_k_keep(scores, k)
        if not self.version.recycling or keep.shape[0] == scores.shape[0]:
            return RowDecision(keep)
        candidates, n_clusters = recycling_candidates(scores, keep)
        noise = (torch.rand(candidates.shape[0], generator=self.generators[row]) * 1e-6).to(hidden.dtype).to(hidden.device)
        merged = dpc_knn_merge(hidden[row, self._start(meta, row) + candidates], n_clusters, noise)
        return RowDecision(keep, merged)

    def after(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, cache: KVCache):
        if layer_idx not in self.layers:
            return None
        if cache.get_seq_length(layer_idx) != hidden.shape[1]:
            raise RuntimeError("SparseVLM prunes during a prefill from an empty cache only")
        if not self.replaying:
            for row in range(hidden.shape[0]):
                self.decisions[row][layer_idx] = self._decide(layer_idx, row, hidden, positions, meta, cache)
        decisions = [self.decisions[row][layer_idx] for row in range(hidden.shape[0])]
        if all(d.keep is None for d in decisions):
            return None
        return self._rebuild(layer_idx, hidden, positions, meta, cache, decisions)

    def _rebuild(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, cache: KVCache, decisions: list[RowDecision]):
        """[pad | prefix | kept visual | merged | text] per row, left-padded to a common width."""
        rows, row_positions, row_segments = [], [], []
        for row, decision in enumerate(decisions):
            start, n_visual = self._start(meta, row), self.n_visual[row]
            valid_from = start - self.prefix_len
            keep = torch.arange(n_visual, device=hidden.device) if decision.keep is None else decision.keep
            index = torch.cat([torch.arange(valid_from, start, device=hidden.device), start + keep,
                               torch.arange(start + n_visual, hidden.shape[1], device=hidden.device)])
            n_merged = 0 if decision.merged is None else decision.merged.shape[0]
            split = start - valid_from + keep.shape[0]
            pieces = [hidden[row, index[:split]]] + ([decision.merged] if n_merged else []) + [hidden[row, index[split:]]]
            rows.append(torch.cat(pieces))
            original = positions[row, index]
            row_positions.append(torch.cat([original[:split], original[split - 1 : split].expand(n_merged), original[split:]]))
            row_segments.append(torch.cat([meta.segment[row, index[:split]], meta.segment[row, start : start + 1].expand(n_merged), meta.segment[row, index[split:]]]))
            self.n_visual[row] = keep.shape[0] + n_merged
        width = max(r.shape[0] for r in rows)
        new_hidden = hidden.new_zeros(len(rows), width, hidden.shape[-1])
        segment = torch.full((len(rows), width), -1, dtype=torch.long, device=hidden.device)
        new_positions = torch.zeros(len(rows), width, dtype=positions.dtype, device=hidden.device)
        for row, (values, pos, seg) in enumerate(zip(rows, row_positions, row_segments)):
            new_hidden[row, width - values.shape[0] :] = values
            segment[row, width - values.shape[0] :] = seg
            new_positions[row, width - values.shape[0] :] = pos
        if self.version.compact_positions:
            new_positions = ((segment >= 0).long().cumsum(1) - 1).clamp(min=0)
            shift = self.prompt_valid - (segment >= 0).sum(dim=1, keepdim=True)  # decode at each layer's own length
            for later in range(layer_idx + 1, self.lm.n_layers):
                cache.position_shift[later] = shift
        slot = torch.arange(width, device=hidden.device).expand(len(rows), width)
        return new_hidden, new_positions, TokenMeta(slot, segment)


def make_hook(params: dict[str, Any], bundle, seeds: Sequence[int], prefix_len: int, n_visual: int) -> SparseVLMHook:
    return SparseVLMHook(params, bundle.lm, seeds, prefix_len, n_visual)


SPARSEVLM = register(
    Method(
        name="sparsevlm",
        version="1",
        resolve=resolve,
        select=lambda vision, params, seeds: vision.hidden[:, 1:],
        make_hook=make_hook,
        uses_seed=lambda params: bool(params["recycling"]),  # v1/v1.5's DPC-kNN density noise; v2 draws nothing
        text_dependent=True,
    )
)
