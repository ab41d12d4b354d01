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

Two pieces of plumbing call the same rules: SparseVLMHook, row by row, for the reference path
(the obviously-correct baseline), and SparseVLMPruner, over all questions of a batch at once, for
the fast path's question blocks (prune_eval.models.blocks); the batched functions are tested
against the per-row ones.

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
from prune_eval.methods import Method, ModelGeometry, map_layers, register
from prune_eval.models.blocks import PruningView, QuestionInputs, VisualSelection
from prune_eval.models.llm import KVCache, LanguageModel, LayerHook, TokenMeta, attention_probabilities, rotate_half

OFFICIAL_HEADS = 32  # LLaVA-1.5-7B (Vicuna-7B) attention heads per layer, for which the priority-head counts were set


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


# ---------------------------------------------------------------- pure token-selection functions
def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """visual (nV, d), text (T, d) input embeddings -> rater positions within the text (R,).

    softmax over text of the raw dot products, mean over visual tokens, strictly above the mean.
    """
    relation = (visual @ text.T).float().softmax(dim=-1).to(visual.dtype)  # (nV, T)
    share = relation.mean(dim=0)  # (T,)
    return (share > share.mean()).nonzero()[:, 0]


def gravity_divisor(cos_rows: torch.Tensor, sin_rows: torch.Tensor, cos_cols: torch.Tensor, sin_cols: torch.Tensor) -> torch.Tensor:
    """v2's divisor W (..., R, S): RoPE-rotated all-ones query . all-ones key / sqrt(D), in cos's dtype.

    Equals (2/sqrt(D)) sum_j cos((p_r - p_c) theta_j): it depends on the distance only.
    """
    ones = torch.ones_like(cos_rows)
    q = ones * cos_rows + rotate_half(ones) * sin_rows  # (..., R, D)
    k = torch.ones_like(cos_cols) * cos_cols + rotate_half(torch.ones_like(cos_cols)) * sin_cols  # (..., S, D)
    return (q @ k.transpose(-1, -2)) / math.sqrt(cos_rows.shape[-1])


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


def recycling_counts(n_deleted: int) -> tuple[int, int]:
    """(tokens recycled, clusters) when n_deleted visual tokens are deleted: int(0.3 n_deleted) + 1 of
    them by score, merged into int(n_rec / 10) + 1 clusters (docs/sparsevlm-official.md)."""
    n_recycled = int(n_deleted * 0.3) + 1
    return n_recycled, int(n_recycled / 10) + 1


def recycling_candidates(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Deleted positions to recycle, best score first, and the cluster count (recycling_counts)."""
    deleted = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    deleted[keep] = False
    deleted_positions = deleted.nonzero()[:, 0]
    n_recycled, n_clusters = recycling_counts(deleted_positions.shape[0])
    best = scores[deleted_positions].topk(n_recycled).indices
    return deleted_positions[best], n_clusters


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


# ---------------------------------------------------------------- the same, over the questions of a batch
# Each function below equals its per-row counterpart above applied row by row (tests/test_sparsevlm.py
# checks them against each other); rows of different lengths are padded and carry a validity mask.
DPC_CHUNK_ELEMENTS = 2**29  # bound on the (rows, N, N, C) difference tensor of DPC-kNN distances


def select_raters_batched(visual: torch.Tensor, text: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """visual (G, nV, d) per image, text (G, Q, T, d) its questions' text, valid (G, Q, T) -> raters (G, Q, T) bool.

    select_raters for every question: softmax over the question's own text tokens of the raw dot
    products, mean over the image's visual tokens, strictly above the mean over its text tokens.
    """
    g, q, t, d = text.shape
    logits = (visual @ text.reshape(g, q * t, d).transpose(1, 2)).view(g, -1, q, t)  # (G, nV, Q, T)
    relation = logits.float().masked_fill(~valid[:, None], float("-inf")).softmax(dim=-1).to(visual.dtype)
    share = relation.mean(dim=1)  # (G, Q, T); padding: 0 (a question without text: NaN, never valid)
    share = torch.where(valid, share, torch.zeros_like(share))
    mean = (share.float().sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)).to(share.dtype)  # (G, Q)
    return (share > mean[..., None]) & valid


def masked_rater_mean(relation: torch.Tensor, rater_valid: torch.Tensor) -> torch.Tensor:
    """relation (N, R, V) head-mean attention of the rater rows -> (N, V): mean over each row's raters."""
    summed = torch.where(rater_valid[..., None], relation, torch.zeros_like(relation)).float().sum(dim=1)
    return (summed / rater_valid.sum(dim=1, keepdim=True)).to(relation.dtype)


def priority_heads_batched(attention: torch.Tensor, rater_valid: torch.Tensor, visual_valid: torch.Tensor, n_heads: int) -> torch.Tensor:
    """attention (N, H, R, V) -> (N, n_heads): per row, the heads with most rater->visual mass (priority_heads)."""
    valid = (rater_valid[:, :, None] & visual_valid[:, None, :])[:, None]  # (N, 1, R, V)
    mass = torch.where(valid, attention, torch.zeros_like(attention)).sum(dim=(2, 3))  # (N, H)
    return mass.topk(n_heads).indices


def ranks_batched(relation: torch.Tensor, rater_valid: torch.Tensor, visual_valid: torch.Tensor) -> torch.Tensor:
    """v1's matrix_rank(P.float()) per row: relation (N, R, V) with padded rows/columns -> (N,) long.

    Padding is zeroed, which changes no singular value but the matrix shape; the tolerance is
    therefore passed explicitly as torch's default for each row's own shape: eps * max(R_n, V_n)
    times the largest singular value.
    """
    valid = rater_valid[:, :, None] & visual_valid[:, None, :]
    matrix = torch.where(valid, relation, torch.zeros_like(relation)).float()
    sizes = torch.maximum(rater_valid.sum(dim=1), visual_valid.sum(dim=1)).float()
    return torch.linalg.matrix_rank(matrix, rtol=torch.finfo(torch.float32).eps * sizes)


def top_k_kept(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (n, nV) -> (n, nV) bool: each row's k best (top_k_keep for rows of equal length and k)."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def recycling_candidates_batched(scores: torch.Tensor, kept: torch.Tensor, n_kept: int) -> tuple[torch.Tensor, int]:
    """recycling_candidates for rows of equal length that all keep n_kept: (n, nV) -> ((n, n_rec), clusters)."""
    n_deleted = scores.shape[1] - n_kept
    deleted = torch.argsort(kept.to(torch.uint8), dim=1, stable=True)[:, :n_deleted]  # ascending positions
    n_recycled, n_clusters = recycling_counts(n_deleted)
    best = scores.gather(1, deleted).topk(n_recycled, dim=1).indices
    return deleted.gather(1, best), n_clusters


def dpc_knn_merge_batched(x: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> torch.Tensor:
    """dpc_knn_merge of every row: x (B, N, C), noise (B, N) -> (B, n_clusters, C).

    The pairwise difference tensor (rows, N, N, C) is formed as in the official code (no matmul
    expansion, which would change the distances' rounding); rows are processed in chunks that keep
    it below DPC_CHUNK_ELEMENTS elements.
    """
    b, n, channels = x.shape
    out = x.new_empty(b, n_clusters, channels)
    step = max(1, DPC_CHUNK_ELEMENTS // max(n * n * channels, 1))
    for start in range(0, b, step):
        out[start : start + step] = _dpc_knn_chunk(x[start : start + step], n_clusters, noise[start : start + step])
    return out


def _dpc_knn_chunk(x: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> torch.Tensor:
    b, n, channels = x.shape
    distance = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1) / channels**0.5  # (B, N, N)
    nearest = distance.topk(n_clusters, dim=-1, largest=False).values  # (B, N, k)
    density = (-(nearest**2).mean(dim=-1)).exp() + noise  # (B, N)
    denser = (density[:, None, :] > density[:, :, None]).to(x.dtype)  # (B, N, N): j denser than i
    delta = (distance * denser + distance.amax(dim=(1, 2), keepdim=True) * (1 - denser)).min(dim=-1).values
    centres = (delta * density).topk(n_clusters, dim=-1).indices  # (B, c)
    cluster = distance.gather(1, centres[:, :, None].expand(b, n_clusters, n)).argmin(dim=1)  # (B, N)
    cluster.scatter_(1, centres, torch.arange(n_clusters, device=x.device).expand(b, n_clusters))
    flat = (torch.arange(b, device=x.device)[:, None] * n_clusters + cluster).reshape(-1)  # (B*N,) row-major
    counts = torch.zeros(b * n_clusters, 1, dtype=x.dtype, device=x.device).index_add_(0, flat, torch.ones(b * n, 1, dtype=x.dtype, device=x.device))
    weights = 1.0 / (counts + 1e-6)  # (B*c, 1)
    merged = torch.zeros(b * n_clusters, channels, dtype=x.dtype, device=x.device).index_add_(0, flat, x.reshape(b * n, channels) * weights[flat])
    return merged.view(b, n_clusters, channels)


def noise_stream(seeds: Sequence[int], length: int) -> torch.Tensor:
    """(N, length) float32: for each row, its generator's first `length` draws of torch.rand * 1e-6.

    The per-row hook draws `torch.rand(n_rec, generator)` at each recycling layer; a CPU generator
    fills uniforms one after the other, so consecutive draws are consecutive slices of this stream
    (tests/test_sparsevlm.py checks that on the installed torch).
    """
    if not seeds:
        return torch.zeros(0, length)
    return torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * 1e-6


# ---------------------------------------------------------------- configuration
def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    version_name = str(params.get("version", "v1.5"))
    if version_name not in VERSIONS:
        raise PruneEvalError(f"unknown SparseVLM version '{version_name}'; choices: {', '.join(VERSIONS)}")
    version = VERSIONS[version_name]
    rule, layers = map_layers(version.layers, geometry.text_layers, params.get("layer_rule", "auto"))
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
        heads = version.priority_heads if geometry.text_heads >= version.priority_heads else max(1, round(geometry.text_heads * version.priority_heads / OFFICIAL_HEADS))
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
            self.layer_input = hidden

    def _raters(self, hidden: torch.Tensor, meta: TokenMeta, row: int) -> torch.Tensor:
        start = self._start(meta, row)
        visual = hidden[row, start : start + self.n_visual[row]]
        text = hidden[row, start + self.n_visual[row] :]
        raters = select_raters(visual, text)
        if raters.numel() == 0:
            raise PruneEvalError("SparseVLM found no rater among the text tokens after the image; it needs text (the question) after the image")
        return raters

    def _scores(self, layer_idx: int, row: int, positions: torch.Tensor, meta: TokenMeta, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual scores (nV,) of a row at a pruning layer, and the raters' attention (H, R, S)."""
        start, n_visual = self._start(meta, row), self.n_visual[row]
        rows = start + n_visual + self.raters[row]  # absolute rater indices
        visible = (meta.slot[row][None, :] <= meta.slot[row][rows][:, None]) & (meta.segment[row][None, :] >= 0)
        attention = attention_probabilities(self.lm, layer_idx, self.layer_input[row : row + 1, rows], positions[row : row + 1, rows],
                                            cache.key_states(layer_idx)[row : row + 1], visible[None])[0]  # (H, R, S)
        visual = torch.arange(start, start + n_visual, device=attention.device)
        if self.version.gravity:
            x = self.layer_input[row : row + 1]
            cos, sin = self.lm.rotary_emb(x, positions[row : row + 1, rows])
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

    def kept_sets(self) -> list[dict[int, tuple[list[int], int]]]:
        """Per row: pruning layer -> (kept visual tokens, as indices into that layer's visual tokens,
        and the number of merged tokens placed after them); a layer that left the row unchanged
        (v1, full rank) keeps all. The format of QuestionBlocks.kept_sets, for the tests."""
        out: list[dict[int, tuple[list[int], int]]] = []
        for row, decisions in enumerate(self.decisions):
            out.append({})
            for layer_idx, decision in decisions.items():
                keep = list(range(self.visual_per_layer[row][layer_idx])) if decision.keep is None else decision.keep.tolist()
                out[row][layer_idx] = (keep, 0 if decision.merged is None else decision.merged.shape[0])
        return out

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


class SparseVLMPruner:
    """SparseVLM in the fast path's question blocks (prune_eval.models.blocks): the decisions of
    SparseVLMHook, for all questions of a batch at once.

    Raters come from the input embeddings of each question and its image. At each pruning layer the
    raters' attention over the question's visual tokens gives the scores (v2: gravity-corrected,
    priority heads), top-k keeps (v1: k from each question's rank), and recycling merges the best
    deleted tokens (DPC-kNN, noise from each question's own generator, drawn as the per-row hook
    draws it). Questions with equal (visual count, k) are processed as one tensor: all of them for
    v1.5 and v2, whose counts do not depend on the question; v1 forms one group per distinct count.
    """

    def __init__(self, params: dict[str, Any], lm: LanguageModel, prefix_len: int, n_visual: int) -> None:
        self.params, self.lm = params, lm
        self.version = VERSIONS[params["version"]]
        self.layers: tuple[int, ...] = tuple(params["layers"])
        self.compact_positions = self.version.compact_positions
        self.n_image_visual = n_visual
        self.max_visual = n_visual if self.version.rank_rule else kept_after(params["schedule"][0], n_visual, self.version.recycling)
        self.rater_rows: torch.Tensor | None = None  # (N, R) indices into each question's text
        self.rater_valid: torch.Tensor | None = None  # (N, R)
        self.noise: torch.Tensor | None = None  # (N, draws) in the model dtype
        self.noise_used: torch.Tensor | None = None  # (N,) CPU: draws consumed so far

    def start(self, inputs: QuestionInputs) -> None:
        raters = select_raters_batched(inputs.visual, inputs.text, inputs.text_valid)[inputs.image, inputs.slot]  # (N, T)
        counts = raters.sum(dim=1)
        fewest, n_raters = torch.stack([counts.min(), counts.max()]).tolist()  # one sync per batch
        if fewest == 0:
            raise PruneEvalError("SparseVLM found no rater among the text tokens after the image; it needs text (the question) after the image")
        self.rater_rows = torch.argsort((~raters).to(torch.uint8), dim=1, stable=True)[:, :n_raters]  # ascending
        self.rater_valid = torch.arange(n_raters, device=raters.device) < counts[:, None]
        if self.version.recycling:  # at most recycling_counts(nV)[0] draws per pruning layer (nV never grows)
            stream = noise_stream(inputs.seeds, len(self.layers) * recycling_counts(self.n_image_visual)[0])
            self.noise = stream.to(inputs.visual.dtype).to(inputs.visual.device)
            self.noise_used = torch.zeros(len(inputs.seeds), dtype=torch.long)

    def select(self, view: PruningView) -> VisualSelection:
        step = self.layers.index(view.layer_idx)
        attention = view.attention(self.rater_rows)  # (N, H, R, V)
        rater_valid, visual_valid = self.rater_valid, view.visual_valid
        if self.version.gravity:
            x = attention.new_empty(0)
            cos_rows, sin_rows = self.lm.rotary_emb(x, view.text_positions(self.rater_rows))  # (N, R, D)
            cos_cols, sin_cols = self.lm.rotary_emb(x, view.visual_positions())  # (N, V, D)
            attention = attention / gravity_divisor(cos_rows, sin_rows, cos_cols, sin_cols)[:, None]
            heads = priority_heads_batched(attention, rater_valid, visual_valid, self.params["priority_heads"])
            attention = attention.gather(1, heads[:, :, None, None].expand(-1, -1, *attention.shape[2:]))
        relation = attention.mean(dim=1)  # (N, R, V)
        scores = masked_rater_mean(relation, rater_valid)  # (N, V)
        n_visual = torch.tensor(view.n_visual)
        if self.version.rank_rule:
            rank = ranks_batched(relation, rater_valid, visual_valid).cpu()  # one sync
            k = torch.minimum((rank.double() * self.params["scale"] + self.params["bias"]).trunc().long(), n_visual - 1).clamp(min=0)
            k = torch.where(rank == n_visual, n_visual, k)  # full rank: this layer leaves the question unchanged
        else:
            k = torch.clamp(n_visual - 1, max=self.params["schedule"][step])
        kept = torch.zeros_like(scores, dtype=torch.bool)
        groups, group_of = torch.unique(torch.stack([n_visual, k], dim=1), dim=0, return_inverse=True)  # CPU, no sync
        merged: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index, (count, keep) in enumerate(groups.tolist()):
            members_cpu = (group_of == index).nonzero()[:, 0]
            members = members_cpu.to(scores.device)
            if keep == count:  # unchanged (v1, full rank): no recycling, no draw
                kept[members, :count] = True
                continue
            group_scores = scores[members, :count]
            group_kept = top_k_kept(group_scores, keep)
            kept[members, :count] = group_kept
            if self.version.recycling:
                candidates, n_clusters = recycling_candidates_batched(group_scores, group_kept, keep)
                merged.append((members_cpu, dpc_knn_merge_batched(view.visual_features(members, candidates), n_clusters,
                                                              self._draw(members_cpu, candidates.shape[1]))))
        if not merged:
            return VisualSelection(kept)
        n_extra = torch.zeros(view.n_questions, dtype=torch.long)
        extra = scores.new_zeros(view.n_questions, max(m.shape[1] for _, m in merged), merged[0][1].shape[-1])
        for members, tokens in merged:
            extra[members.to(extra.device), : tokens.shape[1]] = tokens
            n_extra[members] = tokens.shape[1]
        return VisualSelection(kept, extra, n_extra.tolist())

    def _draw(self, members: torch.Tensor, n: int) -> torch.Tensor:
        """(len(members), n): the next n noise draws of each of these questions' generators."""
        columns = self.noise_used[members][:, None] + torch.arange(n)
        self.noise_used[members] += n
        return self.noise[members.to(self.noise.device)[:, None], columns.to(self.noise.device)]


def kept_after(k: int, n_visual: int, recycling: bool) -> int:
    """Visual tokens after a fixed-k pruning of n_visual: k, plus the merged clusters if recycling."""
    k = min(k, n_visual - 1)
    return k + (recycling_counts(n_visual - k)[1] if recycling else 0)


def make_pruner(params: dict[str, Any], bundle, prefix_len: int, n_visual: int) -> SparseVLMPruner:
    return SparseVLMPruner(params, bundle.lm, prefix_len, n_visual)


def make_hook(params: dict[str, Any], bundle, seeds: Sequence[int], prefix_len: int, n_visual: int) -> SparseVLMHook:
    return SparseVLMHook(params, bundle.lm, seeds, prefix_len, n_visual)


SPARSEVLM = register(
    Method(
        name="sparsevlm",
        version="1",
        resolve=resolve,
        select=lambda vision, params, seeds: vision.hidden[:, 1:],
        make_hook=make_hook,
        make_pruner=make_pruner,
        uses_seed=lambda params: bool(params["recycling"]),  # v1/v1.5's DPC-kNN density noise; v2 draws nothing
        text_dependent=True,
    )
)
