"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024), as its official code prunes.

Read from pkunlp-icler/FastV @ d165972: the ECCV implementation in LlamaModel.forward of
`src/transformers/src/transformers/models/llama/modeling_llama.py` (the `USE_FAST_V and
FASTV_INPLACE` branch), its KV-cache variants `fastv_forward` in
`src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py` and
`src/FastV/lmms-eval/fastv_kvcache.py`, and the scripts `src/FastV/inference/eval/*.sh`.

- Layer. At `idx == AGG_LAYER` (K) the loop reads `layer_outputs[1]`, the attention weights the
  previous iteration returned, i.e. those of layer K-1 (0-based); from layer K on every layer sees
  the pruned sequence. K therefore counts the layers that see every visual token, and the scores
  come from the K-th layer (index K-1). The llava-hf fork asks for attentions only at
  `layer_idx == FASTV_k - 1` and prunes at `layer_idx == FASTV_k`; fastv_kvcache.py does the same
  (`layer_idx == K - 1` / `== K`). K > 0 is asserted ("K should be larger than 0").
- Default K = 2: the scripts sweep `Ks=(2)` (`eval_aokvqa_latency_fastv_inplace.sh`,
  `eval_ocrvqa_fastv_token_mask.sh`), the README's rows are "K=2", and it is the paper's title.
  For the FastV rows of VisionZip's and SparseVLM's tables (64/128/192) we found no K stated
  (not in their repositories, nor in the issue threads); VisionZip issue #22 (maintainer): the
  token counts are averages over all decoder layers and some rows follow SparseVLM's; the
  reproduction in Gumpest/SparseVLMs issue #12 ran fastv_kvcache.py with K=2.
- Score. `torch.mean(attention, dim=1)[0][-1][SYS : SYS + 576]`: the attention of the LAST query
  row (in prefill: the last prompt token, the ':' of 'ASSISTANT:') to each image token, averaged
  over heads (batch element 0 only: batch size 1).
- Kept tokens. `.topk(ATTENTION_RANK)`; ATTENTION_RANK (`--fast-v-attention-rank`) is the number
  of image tokens KEPT (the scripts' comment "rank equals to (1-R)*N_Image_Tokens": the paper's R is
  the share dropped). The llava-hf fork keeps round(576 * (1 - fastv_r)), fastv_kvcache.py
  int(576 * ratio). Here the budget names the count kept (`kept_tokens`).
- Layout and positions. `keep_indexs = cat(arange(SYS), SYS + top, arange(SYS + 576, L))`, sorted:
  the system prompt and every text token stay, only image tokens are candidates, and the kept ones
  keep their sequence order. `position_ids = keep_indexs`: kept tokens keep their ORIGINAL
  positions (no re-numbering; confirms ../shared/notes/hf-llava.md).
- System-prompt arithmetic. SYS is a constant in the official code: 36 in the ECCV scripts
  (`--fast-v-sys-length 36`, conv mode llava_v1), 35 in fastv_kvcache.py (`[35:611]`), 5 in the
  README's llava-hf example. On LLaVA-1.5's vicuna_v1 POPE prompt the image starts at index 35
  (BOS + 34 tokens; docs/sparsevlm-official.md 1.1). We use the real number of tokens before the
  image in each row (left padding + the tokenized prefix), never a constant. (A SYS one too large
  would never drop image token 0 and would offer the '\\n' after the image as a candidate; where the
  scripts' 36 meets a 35-token prefix, that is what they did. Not reproduced.)
- Decoding. The ECCV branch has no KV cache ("KV-Cache not supported"): generate(use_cache=False)
  recomputes everything for each new token and re-selects with that token as the last row. The
  KV-cache variants (README "Support KV Cache"; fastv_forward `use_cache`; fastv_kvcache.py
  `seq_length > 1`) prune once, in prefill: layers < K keep the full KV cache, layers >= K the
  pruned one, and a new token's position is the unpruned count (original numbering). We implement
  the KV-cache variant (the one issue #12 reproduced). Both give the same FIRST generated token,
  which fixes a POPE yes/no; later tokens may differ.

Our implementation: the official code reads eager attention weights (every layer in the ECCV fork,
layer K-1 only in the llava-hf fork). We compute only the one row it reads: the last prompt token's
query at layer K-1 (post-RoPE) against that layer's cached keys, with `llm.attention_probabilities`
(the eager recipe of our transformers: q K^T * head_dim^-0.5 in the model dtype, softmax in fp32,
cast back; the ECCV fork's LlamaAttention divides by math.sqrt(head_dim) instead, which can change
the last bit of a logit), then the head mean in the model dtype (`visual_scores`); the layer outputs
stay SDPA. Each row of a batch is scored on its own last token and its own image tokens. Ties:
torch.topk leaves the order of equal scores unspecified (CUDA), and fp16 head means do tie; we keep
the earlier token (stable sort, `top_r_keep`), so the kept set is a function of the scores.

Two pieces of plumbing call these same functions: FastVHook, on the reference path's rows (one
left-padded row per question), and FastVPruner, over all questions of a batch at once, for the fast
path's question blocks (prune_eval.models.blocks). There an image's [system prompt | 576 visual
tokens] is computed once through layers 0..K-1 (their keys and values do not depend on the question:
causal attention, and nothing is pruned before layer K-1's output), and its questions run packed
over that cache; after layer K-1 each question has its own block [R kept visual tokens | its text]
at the original positions, and the system prompt, kept by FastV, is computed once for all images in
layers K..L-1.

Accounting: all 576 visual tokens enter the LLM; `visual_tokens_per_layer` = [576] x K + [R] x (L - K).
The published FastV rows at 64/128/192 (VisionZip Table 1, from SparseVLM) count averages over the
32 decoder layers (VisionZip issue #22, maintainer), not R: `method.budget_rule=layer_average`
chooses R = round((32 x budget - K x 576) / (32 - K)) instead (64 -> R = 30 at K = 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prune_eval.errors import PruneEvalError
from prune_eval.methods import Method, ModelGeometry, drop_cls, map_layers, register
from prune_eval.models.blocks import PruningView, QuestionInputs, VisualSelection
from prune_eval.models.llm import KVCache, LanguageModel, LayerHook, TokenMeta, attention_mask, attention_probabilities

DEFAULT_K = 2
K_SOURCE = "FastV d165972 scripts src/FastV/inference/eval/*.sh (Ks=(2)), README K=2 rows"
BUDGET_RULES = ("kept", "layer_average")


# ---------------------------------------------------------------- pure token-selection functions
def visual_scores(attention: torch.Tensor, visual_start: torch.Tensor, n_visual: int) -> torch.Tensor:
    """attention (B, H, S) of each row's last token (post-softmax, e.g. llm.attention_probabilities),
    visual_start (B,) -> (B, n_visual): the head mean at each image token (official
    `torch.mean(attention, dim=1)[0][-1][SYS : SYS + 576]`)."""
    mean = attention.mean(dim=1)  # (B, S), in the attention's dtype like the official torch.mean
    columns = visual_start[:, None] + torch.arange(n_visual, device=attention.device)  # (B, nV)
    return mean.gather(1, columns)


def top_r_keep(scores: torch.Tensor, r: int) -> torch.Tensor:
    """scores (B, nV) -> kept positions within the image (B, r), ascending; ties keep the earlier token."""
    order = scores.sort(dim=1, descending=True, stable=True).indices  # (B, nV)
    return order[:, :r].sort(dim=1).values


# ---------------------------------------------------------------- configuration
def resolve(params: dict[str, Any], budget: int, geometry: ModelGeometry) -> dict[str, Any]:
    k = DEFAULT_K if params.get("k") is None else params["k"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise PruneEvalError(f"method.k={k}; FastV's K is the number of layers that see every visual token, a whole number >= 1")
    n_layers, n_patches = geometry.text_layers, geometry.n_patches
    rule, (layer,) = map_layers((k,), n_layers, params.get("layer_rule") or "auto")  # K = 2 was set on the 32-layer LLM
    if not 1 <= layer < n_layers:
        raise PruneEvalError(
            f"FastV K={k} with the {rule} rule is {layer} on a {n_layers}-layer LLM; it must be in 1..{n_layers - 1} "
            f"(layers 0..K-1 see every visual token)" + (" (or use method.layer_rule=scaled)" if rule == "official" else "")
        )
    budget_rule = params.get("budget_rule") or "kept"
    if budget_rule not in BUDGET_RULES:
        raise PruneEvalError(f"method.budget_rule={budget_rule}; choices: {', '.join(BUDGET_RULES)}")
    if budget_rule == "kept":
        kept = budget
        if not 1 <= kept <= n_patches:
            raise PruneEvalError(f"FastV budget={budget} is the number of visual tokens kept from layer K on; it must be in 1..{n_patches}")
    else:
        def kept_for(b: int) -> int:  # R whose (K x N + (L - K) x R) / L is nearest to b
            return round((n_layers * b - layer * n_patches) / (n_layers - layer))

        kept = kept_for(budget)
        if not 1 <= kept <= n_patches:
            lowest = next(b for b in range(1, n_patches + 1) if kept_for(b) >= 1)
            raise PruneEvalError(
                f"FastV budget={budget} as an average over {n_layers} layers with K={layer} (layers 0..{layer - 1} see all {n_patches}) "
                f"would keep {kept} visual tokens; with method.budget_rule=layer_average the budget must be in {lowest}..{n_patches}"
            )
    return {
        "k": layer, "k_requested": k, "k_source": K_SOURCE if k == DEFAULT_K else "user", "layer_rule": rule,
        "layers": [layer - 1],  # scored and pruned after this layer (0-based), like SparseVLM's `layers`
        "budget": budget, "budget_rule": budget_rule, "kept_tokens": kept, "visual_tokens": n_patches,
        "layer_average": (layer * n_patches + (n_layers - layer) * kept) / n_layers, "positions": "original",
        "decoding": "kv-cache (kept set fixed in prefill)",
    }


# ---------------------------------------------------------------- model plumbing
def last_token_index(meta: TokenMeta) -> torch.Tensor:
    """(B,) index of each row's last token that is not padding (the last prompt token in prefill)."""
    index = torch.arange(meta.segment.shape[1], device=meta.segment.device).expand_as(meta.segment)
    return torch.where(meta.segment >= 0, index, -1).amax(dim=1)


class FastVHook(LayerHook):
    """Prunes rows [pad | prefix | visual | text] after layer K-1 of the prefill (the reference path).

    `kept` (B, R) holds each row's kept positions within its image tokens once the prefill has
    passed layer K-1; `replay` supplies them instead of scoring (tests recompute a pruned prefix
    without a cache with it).
    """

    def __init__(self, params: dict[str, Any], lm: LanguageModel, n_rows: int, prefix_len: int, n_visual: int,
                 replay: torch.Tensor | None = None) -> None:
        self.lm, self.prefix_len, self.n_visual = lm, prefix_len, n_visual
        self.layer = params["layers"][0]  # K - 1
        self.keep = min(params["kept_tokens"], n_visual)
        self.kept = replay
        self.replaying = replay is not None
        self.visual_per_layer: list[list[int]] = [[] for _ in range(n_rows)]
        self.query_input: torch.Tensor | None = None

    def before(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta) -> None:
        count = self.n_visual if layer_idx <= self.layer else self.keep
        for row in self.visual_per_layer:
            row.append(count)
        if layer_idx == self.layer and not self.replaying:
            last = last_token_index(meta)[:, None]  # (B, 1)
            self.query_input = hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, 1, d)

    def after(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, cache: KVCache):
        if layer_idx != self.layer:
            return None
        if cache.get_seq_length(layer_idx) != hidden.shape[1]:
            raise RuntimeError("FastV prunes during a prefill from an empty cache only")
        visual_start = (meta.segment < 0).sum(dim=1) + self.prefix_len  # (B,) after the left padding and the prefix
        if not self.replaying:
            last = last_token_index(meta)[:, None]  # (B, 1)
            visible = attention_mask(meta.gather(last), cache.meta[layer_idx])[:, 0]  # (B, 1, S)
            attention = attention_probabilities(self.lm, layer_idx, self.query_input, positions.gather(1, last),
                                                cache.key_states(layer_idx), visible)[:, :, 0]  # (B, H, S)
            self.kept = top_r_keep(visual_scores(attention, visual_start, self.n_visual), self.keep)
        return self.keep_rows(hidden, positions, meta, visual_start, self.kept)

    def keep_rows(self, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, visual_start: torch.Tensor,
                  kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, TokenMeta]:
        """Drop each row's unkept image tokens; everything else, order and positions stay."""
        batch, width, dim = hidden.shape
        keep = torch.ones(batch, width, dtype=torch.bool, device=hidden.device)
        keep.scatter_(1, visual_start[:, None] + torch.arange(self.n_visual, device=hidden.device), False)
        keep.scatter_(1, visual_start[:, None] + kept, True)
        index = keep.nonzero()[:, 1].view(batch, width - self.n_visual + kept.shape[1])  # (B, W'), ascending
        return hidden.gather(1, index[..., None].expand(-1, -1, dim)), positions.gather(1, index), meta.gather(index)

    def kept_sets(self) -> list[dict[int, tuple[list[int], int]]]:
        """Per row: {K-1: (kept image positions, 0 added tokens)}, the format of
        QuestionBlocks.kept_sets (for the tests)."""
        return [{self.layer: (row.tolist(), 0)} for row in self.kept.cpu()]


class FastVPruner:
    """FastV in the fast path's question blocks (prune_eval.models.blocks): FastVHook's decision
    for all questions of a batch at once, with the same functions.

    One pruning layer, K-1: each question's last prompt token (`view.text_length - 1`, its last
    text token) attends over segment 0 and its own text (`view.attention`, image-grouped, one query
    row per question); the head mean at its image's tokens (`visual_scores`) and the R best
    (`top_r_keep`) are computed for all N questions as (N, ...) tensors: no loop over questions, no
    host sync (the blocks' re-packing syncs once). At layer K-1 every question still has all its
    image's visual tokens, so the rows are of equal length. Positions stay original and nothing is
    added after the kept tokens; FastV chooses nothing before layer 0 (`start`).
    """

    compact_positions = False

    def __init__(self, params: dict[str, Any], n_visual: int) -> None:
        self.layers: tuple[int, ...] = (params["layers"][0],)
        self.keep = min(params["kept_tokens"], n_visual)
        self.max_visual = self.keep

    def start(self, inputs: QuestionInputs) -> None:
        pass

    def select(self, view: PruningView) -> VisualSelection:
        attention = view.attention((view.text_length - 1)[:, None])[:, :, 0]  # (N, H, V): the last token's row
        scores = visual_scores(attention, torch.zeros_like(view.text_length), attention.shape[-1])  # (N, V)
        kept = torch.zeros_like(view.visual_valid).scatter_(1, top_r_keep(scores, self.keep), True)
        return VisualSelection(kept)


def make_hook(params: dict[str, Any], bundle, seeds: Sequence[int], prefix_len: int, n_visual: int) -> FastVHook:
    return FastVHook(params, bundle.lm, len(seeds), prefix_len, n_visual)


def make_pruner(params: dict[str, Any], bundle, prefix_len: int, n_visual: int) -> FastVPruner:
    return FastVPruner(params, n_visual)


FASTV = register(
    Method(
        name="fastv",
        version="2",  # 2: scores from llm.attention_probabilities (HF's eager q k^T * scaling), shared with the fast path
        resolve=resolve,
        select=lambda vision, params, seeds: drop_cls(vision),
        make_hook=make_hook,
        make_pruner=make_pruner,
        text_dependent=True,  # the last prompt token (the question's end) chooses the kept tokens
    )
)
