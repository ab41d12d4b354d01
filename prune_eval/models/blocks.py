"""Question blocks: the layout in which the fast path runs pruning that depends on the question.

With causal attention the tokens before the question (system prompt + image) have the same hidden
states, keys and values for every question of an image in every layer up to and including the
first layer whose output a question-dependent method changes (SparseVLM: its first pruning layer,
2 on LLaVA-1.5-7B; FastV: layer K-1, 0-based, whose last-prompt-token attention decides what
layers K.. keep). The fast path (prune_eval.execution.fast.generate_question_blocks) therefore
1. prefills each image's [system prompt | visual tokens] once, up to and including that layer;
2. runs all the image's questions, packed in one row, over that cache (segment masks, as for
   vanilla) up to the same layer;
3. from that layer's output on, gives every question its own block in the same packed row:
   [its kept visual tokens | tokens the method adds (SparseVLM's merged tokens) | its text].
   The system prompt precedes the image, is kept by every method and keeps its positions
   (0..P-1 whether a version re-numbers the rest or not), so its keys/values are identical for all
   questions in every layer: they are computed once and written into each image's cache, and the
   blocks attend to them as the shared segment 0.
For FastV (one pruning layer) this means: each image's [system prompt | 576 visual tokens] runs
through layers 0..K-1 once, its questions packed over it; in layers K..L-1 each question has its
block [R kept visual tokens | its text] at the original positions, and the system prompt runs
once for all images. SparseVLM re-packs the blocks again at each later pruning layer.
A question's tokens see segment 0 and their own block only, so each question computes what it
computes alone in a row [system prompt | visual | text]: the same operations, up to floating-point
rounding of differently shaped products (tests/test_fast.py, tests/test_fastv.py: answers, logits
within 1e-5 and kept sets equal to the reference path's on the CPU in fp32).

This module holds step 3's layout and the hook that maintains it between pruning layers. What to
keep is the method's decision, made in tensors over all questions of a batch at once
(`QuestionPruner`); the hook builds the per-question view it needs (attention probabilities of
chosen query tokens over the question's own visual tokens, their hidden states) and re-packs the
rows. The hook syncs with the host once per pruning layer (the new block lengths), never per
question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prune_eval.models.llm import KVCache, LanguageModel, LayerHook, TokenMeta, attention_mask, attention_probabilities

PROBABILITY_CHUNK_BYTES = 2**30  # bound on the fp32 attention logits computed at once (split by image)


@dataclass
class QuestionInputs:
    """What a pruner sees before layer 0: the G images and the N questions of a batch.

    Questions are numbered 0..N-1 image by image (the order of `seeds`); `image[n]` and `slot[n]`
    place question n in the (G, Q) grid of the image-grouped tensors.
    """

    visual: torch.Tensor  # (G, V, D) input embeddings of each image's visual tokens
    text: torch.Tensor  # (G, Q, T, D) input embeddings of each question's text after the image, zero-padded
    text_valid: torch.Tensor  # (G, Q, T) bool
    image: torch.Tensor  # (N,) long
    slot: torch.Tensor  # (N,) long
    seeds: list[int]  # (N,) one per question, from its image and prompt (engine.row_seed)


@dataclass
class VisualSelection:
    """A pruner's decision at one layer, for every question of the batch."""

    kept: torch.Tensor  # (N, V) bool over each question's current visual tokens (order kept)
    extra: torch.Tensor | None = None  # (N, M, D) hidden states placed right after the kept tokens
    n_extra: list[int] | None = None  # per question, how many rows of `extra` are real


class QuestionPruner(Protocol):
    """A question-dependent pruning method in the fast path's question blocks.

    `layers`: the pruning layers, ascending; the questions of an image share everything up to and
    including `layers[0]`. `compact_positions`: after a pruning the tokens of a question are
    re-numbered 0..N'-1 and decoding uses each layer's own length (SparseVLM v1, v1.5), or keep
    their original positions (SparseVLM v2). `max_visual`: the most visual tokens a question can
    carry after `layers[0]` (plans batch sizes). `start` runs before layer 0 (SparseVLM picks its
    raters there); `select` decides at each pruning layer. A pruner prunes visual tokens only: the
    system prompt before the image and the question's text are kept, the prompt at positions
    0..P-1, which is what lets the prompt's keys/values be shared by all questions in every layer.
    """

    layers: tuple[int, ...]
    compact_positions: bool
    max_visual: int

    def start(self, inputs: QuestionInputs) -> None: ...

    def select(self, view: "PruningView") -> VisualSelection: ...


def ragged(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (N,) on the device, total = their sum (known on the host) -> (owner (E,), index (E,)).

    Entry e belongs to question owner[e] and is its index[e]-th: repeat_interleave with the output
    size given, so no host sync.
    """
    owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(total, device=counts.device) - starts[owner]


class PruningView:
    """One pruning layer seen per question (N questions; V = the most visual tokens any has now).

    `n_visual` (host list) and `visual_valid` (N, V) give each question's current visual tokens,
    `text_length` (N,) its number of text tokens (e.g. FastV's last prompt token is
    `text_length - 1`); `attention`, `visual_features` and the position accessors read the layer.
    """

    def __init__(self, blocks: "QuestionBlocks", layer_idx: int, layer_input: torch.Tensor, hidden: torch.Tensor,
                 positions: torch.Tensor, meta: TokenMeta, cache: KVCache) -> None:
        self.blocks, self.layer_idx = blocks, layer_idx
        self.layer_input, self.hidden, self.positions, self.meta, self.cache = layer_input, hidden, positions, meta, cache
        self.n_visual: list[int] = list(blocks.n_visual)
        self.text_length: torch.Tensor = blocks.text_length_t  # (N,) long
        self.visual_valid = torch.arange(max(self.n_visual), device=hidden.device) < blocks.n_visual_t[:, None]  # (N, V)

    @property
    def n_questions(self) -> int:
        return len(self.n_visual)

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, R): indices into each question's text tokens -> (N, H, R, V) probabilities.

        The layer's post-softmax attention (llm.attention_probabilities) of those text tokens, over
        every key they see (segment 0 and their own block, causal), restricted to the question's
        own visual tokens in their current order. Entries for padding rows or for columns beyond a
        question's count are finite and meaningless: mask them. Computed image-grouped (queries of
        all questions of an image against the image's keys), in chunks of images that bound memory.
        """
        b = self.blocks
        r = rows.shape[1]
        grid = torch.zeros(b.n_images, b.n_slots, r, dtype=torch.long, device=rows.device)
        grid[b.image, b.slot] = b.text_row.gather(1, rows)
        grid = grid.view(b.n_images, b.n_slots * r)  # (G, Q*R) rows of the packed row
        x = self.layer_input.gather(1, grid[..., None].expand(-1, -1, self.layer_input.shape[-1]))
        query_positions = self.positions.gather(1, grid)
        query_meta = self.meta.gather(grid)
        keys = self.cache.key_states(self.layer_idx)  # (G, Hkv, K, Dh)
        key_meta = self.cache.meta[self.layer_idx]
        visual_keys = self._visual_keys()  # (N, V)
        heads = b.lm.layers[self.layer_idx].self_attn.config.num_attention_heads
        per_image = heads * b.n_slots * r * keys.shape[2] * 4 * 3  # fp32 logits, softmax, result
        step = max(1, PROBABILITY_CHUNK_BYTES // per_image)
        out = []
        for g0 in range(0, b.n_images, step):
            g1 = min(g0 + step, b.n_images)
            visible = attention_mask(TokenMeta(query_meta.slot[g0:g1], query_meta.segment[g0:g1]),
                                     TokenMeta(key_meta.slot[g0:g1], key_meta.segment[g0:g1]))[:, 0]
            probs = attention_probabilities(b.lm, self.layer_idx, x[g0:g1], query_positions[g0:g1], keys[g0:g1], visible)
            probs = probs.view(g1 - g0, heads, b.n_slots, r, -1)  # (g, H, Q, R, K)
            n0, n1 = b.first_question[g0], b.first_question[g1]
            mine = probs[b.image[n0:n1] - g0, :, b.slot[n0:n1]]  # (n, H, R, K)
            out.append(mine.gather(3, visual_keys[n0:n1, None, None, :].expand(-1, heads, r, -1)))
        return torch.cat(out)

    def text_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, R) -> (N, R) RoPE positions of those text tokens at this layer."""
        b = self.blocks
        return self.positions[b.image[:, None], b.text_row.gather(1, rows)]

    def visual_positions(self) -> torch.Tensor:
        """(N, V) RoPE positions of each question's visual tokens at this layer."""
        b = self.blocks
        if b.visual_row is None:
            return b.image_positions[b.image[:, None], b.prefix_len + torch.arange(max(self.n_visual), device=b.image.device)]
        return self.positions[b.image[:, None], b.visual_row[:, : max(self.n_visual)]]

    def visual_features(self, questions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """questions (n,), index (n, M) into their visual tokens -> (n, M, D) output hidden states."""
        return self.blocks.visual_output(self.hidden, questions[:, None].expand_as(index), index)

    def _visual_keys(self) -> torch.Tensor:
        b = self.blocks
        v = max(self.n_visual)
        if b.visual_row is None:
            return (b.prefix_len + torch.arange(v, device=b.image.device)).expand(self.n_questions, v)
        return b.key_offset + b.visual_row[:, :v]


class QuestionBlocks(LayerHook):
    """Keeps the packed question rows through the layers of a prefill and prunes at `pruner.layers`.

    Starts on rows that hold the questions' text only, over a cache whose first `image_tokens`
    entries are the images' [system prompt | visual tokens] (segment 0), with `image_hidden`
    (G, S, D) the images' hidden states after `pruner.layers[0]`. At every pruning layer the rows
    become [block of question 1 | block of question 2 | ...]; the caches of the later layers must
    already hold the system prompt (segment 0, `prefix_len` tokens).
    """

    def __init__(self, lm: LanguageModel, pruner: QuestionPruner, *, prefix_len: int, image_hidden: torch.Tensor,
                 image_positions: torch.Tensor, text_lengths: torch.Tensor, text_rows_width: int) -> None:
        device = image_hidden.device
        self.lm, self.pruner, self.prefix_len = lm, pruner, prefix_len
        self.image_hidden, self.image_positions = image_hidden, image_positions  # (G, S, D), (G, S)
        self.n_images, self.n_slots = text_lengths.shape
        self.image_tokens = image_hidden.shape[1]
        self.n_image_visual = self.image_tokens - prefix_len
        present = text_lengths > 0  # (G, Q) on the CPU
        image_cpu, slot_cpu = present.nonzero(as_tuple=True)  # image by image, questions in order
        self.first_question = [0] + torch.cumsum(present.sum(1), 0).tolist()  # (G + 1) question ranges per image
        self.image_cpu = image_cpu
        self.image, self.slot = image_cpu.to(device), slot_cpu.to(device)
        lengths = text_lengths[image_cpu, slot_cpu]  # (N,)
        self.text_length: list[int] = lengths.tolist()
        self.text_length_t = lengths.to(device)
        starts = (torch.cumsum(text_lengths, 1) - text_lengths)[image_cpu, slot_cpu].to(device)
        t = max(self.text_length)
        self.text_valid = torch.arange(t, device=device) < self.text_length_t[:, None]  # (N, T)
        self.text_row = (starts[:, None] + torch.arange(t, device=device)).clamp(max=text_rows_width - 1)
        self.n_visual: list[int] = [self.n_image_visual] * len(self.text_length)
        self.n_visual_t = torch.full((len(self.text_length),), self.n_image_visual, device=device)
        self.visual_row: torch.Tensor | None = None  # (N, V) row index; None while the visual tokens are the images'
        self.key_offset = self.image_tokens  # cache entries before the packed row
        self.max_slot = self.image_tokens + text_rows_width  # every slot so far is below this
        self.layer_input: torch.Tensor | None = None
        self.visual_per_layer: list[list[int]] = []  # per layer, per question: visual tokens it processed
        self.processed: list[tuple[int, int, int]] = []  # per layer: rows, row width, keys per row
        self.kept: dict[int, tuple[torch.Tensor, list[int]]] = {}  # layer -> (kept (N, V), n_extra), for kept_sets

    def start(self, text_embeddings: torch.Tensor, visual: torch.Tensor, seeds: list[int]) -> None:
        """text_embeddings (G, W, D) of the packed text rows, visual (G, V, D): the pruner's inputs."""
        grid = torch.zeros(self.n_images, self.n_slots, self.text_row.shape[1], dtype=torch.long, device=visual.device)
        grid[self.image, self.slot] = self.text_row
        valid = torch.zeros(grid.shape, dtype=torch.bool, device=visual.device)
        valid[self.image, self.slot] = self.text_valid
        text = text_embeddings.gather(1, grid.view(self.n_images, -1, 1).expand(-1, -1, text_embeddings.shape[-1]))
        text = text.view(*grid.shape, -1) * valid[..., None]
        self.pruner.start(QuestionInputs(visual, text, valid, self.image, self.slot, list(seeds)))

    def before(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta) -> None:
        self.visual_per_layer.append(list(self.n_visual))
        self.processed.append((hidden.shape[0], hidden.shape[1], self.key_offset + hidden.shape[1]))
        self.layer_input = hidden if layer_idx in self.pruner.layers else None

    def after(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, meta: TokenMeta, cache: KVCache):
        if layer_idx not in self.pruner.layers:
            return None
        if cache.get_seq_length(layer_idx) != self.key_offset + hidden.shape[1]:
            raise RuntimeError("question blocks prune during a prefill over the image prefix only")
        view = PruningView(self, layer_idx, self.layer_input, hidden, positions, meta, cache)
        selection = self.pruner.select(view)
        return self._rebuild(layer_idx, view, selection, cache)

    def visual_output(self, hidden: torch.Tensor, questions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Hidden states after the current layer of visual tokens `index` of `questions` (same shapes)."""
        if self.visual_row is None:  # still the images' tokens: the shared prefill's output
            source, width, rows = self.image_hidden, self.image_tokens, self.prefix_len + index
        else:
            source, width, rows = hidden, hidden.shape[1], self.visual_row[questions, index]
        return source.reshape(-1, source.shape[-1])[self.image[questions] * width + rows]

    def _rebuild(self, layer_idx: int, view: PruningView, selection: VisualSelection, cache: KVCache):
        """[block of each question: kept visual (order kept) | extra | text], one packed row per image."""
        hidden, positions = view.hidden, view.positions
        device, n, dim = hidden.device, view.n_questions, hidden.shape[-1]
        kept = selection.kept[:, : view.visual_valid.shape[1]] & view.visual_valid
        n_kept = kept.sum(1)
        n_kept_host: list[int] = n_kept.tolist()  # the one host sync of a pruning layer
        n_extra_host = list(selection.n_extra) if selection.n_extra is not None else [0] * n
        n_extra = torch.tensor(n_extra_host, dtype=torch.long, device=device)
        block = torch.tensor(n_kept_host) + torch.tensor(n_extra_host, dtype=torch.long) + torch.tensor(self.text_length)  # (N,) CPU
        starts = torch.cumsum(block, 0) - block
        offset_cpu = starts - starts[torch.tensor(self.first_question[:-1])][self.image_cpu]  # block start in its image's row
        width = int(torch.zeros(self.n_images, dtype=torch.long).index_add_(0, self.image_cpu, block).max())
        offset = offset_cpu.to(device)
        row_base = self.image * width + offset  # (N,) flat index of each block's first token
        new_hidden = hidden.new_zeros(self.n_images * width, dim)
        new_positions = torch.zeros(self.n_images * width, dtype=positions.dtype, device=device)
        segment = torch.full((self.n_images * width,), -1, dtype=torch.long, device=device)
        compact = self.pruner.compact_positions
        visual_positions = None if compact else view.visual_positions()  # (N, V) before pruning
        order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)  # kept indices first, ascending

        def place(owner: torch.Tensor, within: torch.Tensor, values: torch.Tensor, original) -> None:
            """Write tokens of questions `owner` at their block index `within`; `original()` their positions."""
            dest = row_base[owner] + within
            new_hidden[dest] = values
            new_positions[dest] = (self.prefix_len + within if compact else original()).to(positions.dtype)
            segment[dest] = self.slot[owner] + 1

        owner, j = ragged(n_kept, sum(n_kept_host))  # kept visual tokens
        source = order[owner, j]
        place(owner, j, self.visual_output(hidden, owner, source), lambda: visual_positions[owner, source])
        if sum(n_extra_host):  # the method's tokens; original positions: the position of the token before them

            def before() -> torch.Tensor:
                last = order.gather(1, (n_kept - 1).clamp(min=0)[:, None])[:, 0]
                return torch.where(n_kept > 0, visual_positions.gather(1, last[:, None])[:, 0], max(self.prefix_len - 1, 0))[owner]

            owner, j = ragged(n_extra, sum(n_extra_host))
            place(owner, n_kept[owner] + j, selection.extra[owner, j].to(hidden.dtype), before)
        owner, j = ragged(self.text_length_t, sum(self.text_length))  # the text
        source = self.image[owner] * hidden.shape[1] + self.text_row[owner, j]
        place(owner, n_kept[owner] + n_extra[owner] + j, hidden.reshape(-1, dim)[source], lambda: positions.reshape(-1)[source])

        self.kept[layer_idx] = (kept, n_extra_host)
        self.n_visual = [k + e for k, e in zip(n_kept_host, n_extra_host)]
        self.n_visual_t = n_kept + n_extra
        self.visual_row = (offset[:, None] + torch.arange(max(self.n_visual), device=device)).clamp(max=width - 1)
        self.text_row = (offset[:, None] + self.n_visual_t[:, None] + torch.arange(self.text_row.shape[1], device=device)).clamp(max=width - 1)
        self.key_offset = self.prefix_len
        self.image_hidden = None  # the visual tokens live in the blocks from now on
        self.max_slot = max(self.max_slot, self.prefix_len + width)
        if self.pruner.compact_positions:  # decoding: each layer at its own length (docs/sparsevlm-official.md §5.3)
            shift = torch.zeros(self.n_images, self.n_slots, dtype=torch.long, device=device)
            shift[self.image, self.slot] = self.n_image_visual - self.n_visual_t
            for later in range(layer_idx + 1, self.lm.n_layers):
                cache.position_shift[later] = shift
        slot = (self.prefix_len + torch.arange(width, device=device)).expand(self.n_images, width)
        return new_hidden.view(self.n_images, width, dim), new_positions.view(self.n_images, width), TokenMeta(slot, segment.view(self.n_images, width))

    def last_rows(self) -> torch.Tensor:
        """(G, Q) row index of each question's last text token in the final layout (0 where absent)."""
        last = torch.zeros(self.n_images, self.n_slots, dtype=torch.long, device=self.image.device)
        last[self.image, self.slot] = self.text_row.gather(1, (self.text_length_t - 1)[:, None])[:, 0]
        return last

    def kept_sets(self) -> list[dict[int, tuple[list[int], int]]]:
        """Per question: pruning layer -> (kept visual tokens, as indices into that layer's visual
        tokens, and the number of tokens added after them). For tests and inspection (host copies)."""
        out: list[dict[int, tuple[list[int], int]]] = [{} for _ in self.text_length]
        for layer_idx, (kept, n_extra) in self.kept.items():
            for q, (row, extra) in enumerate(zip(kept.cpu(), n_extra)):
                out[q][layer_idx] = (row.nonzero()[:, 0].tolist(), extra)
        return out
