"""The fast evaluation path (`eval.fast=true`): each image's work is done once, its questions share it.

POPE asks every image ~18 questions (8910 questions, 500 images), and LLaVA's prompt puts the image
before the question, so `system prompt + image` is an identical prefix for all of an image's
questions. Three savings, none of which changes an answer:
1. Image-level work once per image: vision tower and image-level pruning (vanilla, VisionZip,
   random) run once, whatever the number of questions.
2. Identical prompts once: the same question about the same image appears in several splits
   (8910 questions are 5043 distinct image/prompt pairs in POPE's pinned files); greedy decoding of
   the same input gives the same answer, which is recorded for each of them.
3. Packed rows: one row per image holds the prefix once, then all its questions back to back; a
   segment mask lets each question see the prefix and itself only, and positions restart after the
   prefix, so each question computes exactly what it would alone. Decoding appends one token per
   question to the row the same way.
Question-dependent pruning inside the LLM (SparseVLM, FastV; any method with a `make_pruner`) gets
1, 2 and 3 up to and including its first pruning layer (SparseVLM: layer 2; FastV: layer K-1, so
all of layers 0..K-1, the layers that see every visual token): with causal attention the image
prefix's keys and values do not depend on the question until a method changes the sequence. From
that layer's output on, each question has its own block [kept visual tokens | merged tokens
(SparseVLM v1/v1.5) | text] in its image's packed row, decided for all questions of the batch at
once; the system prompt, kept by every method at the same positions, stays shared (computed once,
written into every image's cache): see `generate_question_blocks` below and
prune_eval.models.blocks. A question-dependent method without a pruner gets 1 and 2 only: one
left-padded row per question.

The reference path (prune_eval.execution.engine.evaluate_reference) is what the tests compare this against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from prune_eval.data import images as image_ops
from prune_eval.data.pope import Question
from prune_eval.execution.engine import (
    STOP_DECIDED,
    STOP_EOS,
    STOP_LENGTH,
    Answer,
    EvalSettings,
    Generation,
    batches,
    decided_token_ids,
    decoded_text,
    generate_rows,
    row_seed,
    tokenized_prompts,
    visual_tokens,
)
from prune_eval.methods import Method
from prune_eval.models.blocks import QuestionBlocks, QuestionPruner
from prune_eval.models.llm import KVCache, TokenMeta, check_finite, forward_layers, greedy_tokens, run_layers
from prune_eval.models.loading import ModelBundle


@dataclass
class ImageWork:
    """One image's distinct prompts (token ids after the image) and the questions each answers."""

    image: str
    prompts: list[tuple[int, ...]]
    questions: list[list[Question]]


def group_by_image(questions: Sequence[Question], suffix_of: dict[str, tuple[int, ...]]) -> list[ImageWork]:
    """Images in order of first appearance; identical prompts of an image merged."""
    work: dict[str, ImageWork] = {}
    for q in questions:
        entry = work.setdefault(q.image, ImageWork(q.image, [], []))
        suffix = suffix_of[q.key]
        if suffix in entry.prompts:
            entry.questions[entry.prompts.index(suffix)].append(q)
        else:
            entry.prompts.append(suffix)
            entry.questions.append([q])
    return list(work.values())


@dataclass
class PackedRows:
    """Row layout of a packed batch, built on the CPU and moved to the device in one go."""

    ids: torch.Tensor  # (G, W) token ids (0 where the image or padding sits)
    is_visual: torch.Tensor  # (G, W) bool
    segment: torch.Tensor  # (G, W) -1 pad, 0 prefix + image, i + 1 question i
    positions: torch.Tensor  # (G, W) positions restart after the shared prefix for every question
    last: torch.Tensor  # (G, Q) index of each question's last token
    lengths: torch.Tensor  # (G, Q) each question's length (0 for absent questions)


def pack_rows(prefix: Sequence[int], n_visual: int, prompts: Sequence[Sequence[Sequence[int]]]) -> PackedRows:
    shared = len(prefix) + n_visual
    width = max(shared + sum(len(p) for p in row) for row in prompts)
    n_rows, n_questions = len(prompts), max(len(row) for row in prompts)
    ids = torch.zeros(n_rows, width, dtype=torch.long)
    is_visual = torch.zeros(n_rows, width, dtype=torch.bool)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    positions = torch.zeros(n_rows, width, dtype=torch.long)
    last = torch.zeros(n_rows, n_questions, dtype=torch.long)
    lengths = torch.zeros(n_rows, n_questions, dtype=torch.long)
    ids[:, : len(prefix)] = torch.tensor(list(prefix), dtype=torch.long)
    is_visual[:, len(prefix) : shared] = True
    segment[:, :shared] = 0
    positions[:, :shared] = torch.arange(shared)
    for g, row in enumerate(prompts):
        start = shared
        for i, prompt in enumerate(row):
            end = start + len(prompt)
            ids[g, start:end] = torch.tensor(prompt, dtype=torch.long)
            segment[g, start:end] = i + 1
            positions[g, start:end] = torch.arange(shared, shared + len(prompt))
            last[g, i], lengths[g, i] = end - 1, len(prompt)
            start = end
    return PackedRows(ids, is_visual, segment, positions, last, lengths)


@torch.no_grad()
def generate_packed(
    bundle: ModelBundle,
    prefix: Sequence[int],
    visual: torch.Tensor,
    prompts: Sequence[Sequence[Sequence[int]]],
    settings: EvalSettings,
) -> list[list[Generation]]:
    """Greedy answers for rows [prefix | visual_g | prompt_g1 | prompt_g2 | ...] (right-padded).

    visual: (G, K, D); prompts[g][i] are the token ids of row g's question i (segment i + 1).
    """
    lm, device = bundle.lm, bundle.device
    n_rows, n_visual, dim = visual.shape
    shared = len(prefix) + n_visual
    rows = pack_rows(prefix, n_visual, prompts)
    hidden, positions, meta = _embed_rows(bundle, rows, visual)
    width, n_questions = hidden.shape[1], rows.last.shape[1]
    cache = KVCache(lm.n_layers, reserve=settings.max_new_tokens * n_questions)
    # the shared prefix first (plain causal attention: flash), then the questions over its cache
    run_layers(lm, hidden[:, :shared], positions[:, :shared], _columns(meta, 0, shared), cache, decoding=False)
    out, _ = run_layers(lm, hidden[:, shared:], positions[:, shared:], _columns(meta, shared, width), cache, decoding=False)
    last = (rows.last.to(device) - shared).clamp(min=0)  # (G, Q) in the question part of the rows
    per_layer = [[[n_visual] * lm.n_layers for _ in row] for row in prompts]
    return _decode(bundle, cache, out.gather(1, last[..., None].expand(-1, -1, dim)), rows, prompts, settings, shared=shared, slot_base=width, per_layer=per_layer)


@torch.no_grad()
def generate_question_blocks(
    bundle: ModelBundle,
    prefix: Sequence[int],
    visual: torch.Tensor,
    prompts: Sequence[Sequence[Sequence[int]]],
    settings: EvalSettings,
    pruner: QuestionPruner,
    seeds: Sequence[int],
) -> list[list[Generation]]:
    """Greedy answers with question-dependent pruning inside the LLM (prune_eval.models.blocks).

    visual (G, V, D): each image's visual tokens; prompts[g][i]: token ids of image g's question i;
    seeds: one per question, image by image. Up to and including `pruner.layers[0]` an image's
    [prefix | visual] is prefilled once (plain causal attention) and its questions run packed over
    that cache; the prefix (system prompt) runs once through the later layers and is written into
    every image's cache; from `pruner.layers[0]`'s output on each question has its own block of
    kept visual tokens in the packed row. Decoding appends one token per question, each layer at
    the question's position for that layer.
    """
    lm, device = bundle.lm, bundle.device
    n_images, n_visual, dim = visual.shape
    prefix_len, shared = len(prefix), len(prefix) + n_visual
    first = pruner.layers[0]
    rows = pack_rows(prefix, n_visual, prompts)
    hidden, positions, meta = _embed_rows(bundle, rows, visual)
    width, n_questions = hidden.shape[1], rows.last.shape[1]
    cache = KVCache(lm.n_layers, reserve=settings.max_new_tokens * n_questions)
    image_hidden, _, _ = forward_layers(lm, hidden[:, :shared], positions[:, :shared], _columns(meta, 0, shared), cache,
                                        decoding=False, layers=range(first + 1))
    _share_prompt(lm, cache, image_hidden[:1, :prefix_len], positions[:1, :prefix_len], n_images, range(first + 1, lm.n_layers))
    blocks = QuestionBlocks(lm, pruner, prefix_len=prefix_len, image_hidden=image_hidden, image_positions=positions[:, :shared],
                            text_lengths=rows.lengths, text_rows_width=width - shared)
    blocks.start(hidden[:, shared:], visual.to(hidden.dtype), list(seeds))
    out, _ = run_layers(lm, hidden[:, shared:], positions[:, shared:], _columns(meta, shared, width), cache, decoding=False, hook=blocks)
    per_question = [list(counts) for counts in zip(*blocks.visual_per_layer)]  # (N) lists over layers
    per_layer, position = [], 0
    for row in prompts:
        per_layer.append(per_question[position : position + len(row)])
        position += len(row)
    last = blocks.last_rows()
    return _decode(bundle, cache, out.gather(1, last[..., None].expand(-1, -1, dim)), rows, prompts, settings, shared=shared,
                   slot_base=blocks.max_slot, per_layer=per_layer)


def _embed_rows(bundle: ModelBundle, rows: PackedRows, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, TokenMeta]:
    """(G, W, D) input embeddings with the visual tokens in place, positions, slots and segments."""
    device = bundle.device
    ids, is_visual, segment, positions = (t.to(device, non_blocking=True) for t in (rows.ids, rows.is_visual, rows.segment, rows.positions))
    hidden = bundle.lm.embed_tokens(ids).masked_scatter(is_visual[..., None], visual.to(bundle.dtype))
    slot = torch.arange(ids.shape[1], device=device).expand(*ids.shape)
    return hidden, positions, TokenMeta(slot, segment)


def _columns(meta: TokenMeta, start: int, end: int) -> TokenMeta:
    return TokenMeta(meta.slot[:, start:end], meta.segment[:, start:end])


def _share_prompt(lm, cache: KVCache, hidden: torch.Tensor, positions: torch.Tensor, n_rows: int, layers: range) -> None:
    """The system prompt (1, P, D) through `layers` once; its keys/values written into all rows' caches.

    It precedes the image and every pruning method keeps it at positions 0..P-1, so it is the same
    for every image and question; computed in one row instead of one per image.
    """
    if not len(layers) or hidden.shape[1] == 0:
        return
    length = hidden.shape[1]
    alone = KVCache(lm.n_layers)
    forward_layers(lm, hidden, positions, TokenMeta(torch.arange(length, device=hidden.device)[None], torch.zeros(1, length, dtype=torch.long, device=hidden.device)),
                   alone, decoding=False, layers=layers)
    meta = TokenMeta(torch.arange(length, device=hidden.device).expand(n_rows, length), torch.zeros(n_rows, length, dtype=torch.long, device=hidden.device))
    for layer_idx in layers:
        keys, values = alone.key_states(layer_idx), alone.value_states(layer_idx)
        cache.update(keys.expand(n_rows, -1, -1, -1), values.expand(n_rows, -1, -1, -1), layer_idx)
        cache.meta[layer_idx] = meta


def _decode(bundle: ModelBundle, cache: KVCache, last_hidden: torch.Tensor, rows: PackedRows, prompts: Sequence[Sequence[Sequence[int]]],
            settings: EvalSettings, *, shared: int, slot_base: int, per_layer: list[list[list[int]]]) -> list[list[Generation]]:
    """Greedy decoding of packed rows from last_hidden (G, Q, D), the normed final hidden state of
    each question's last prompt token. One token per question per step is appended to its image's
    row (slots from `slot_base`, above every cached slot); its position is the question's unpruned
    prompt length (`shared` + its own) + step, minus each layer's `cache.position_shift`."""
    lm, device, tokenizer = bundle.lm, bundle.device, bundle.tokenizer
    n_rows, n_questions = rows.last.shape
    next_ids, first_logits = greedy_tokens(lm, last_hidden)  # (G, Q), (G, Q, V)
    active = rows.lengths > 0  # (G, Q) on the CPU: which questions still decode
    check_finite(first_logits, active)
    generated = [[[] for _ in row] for row in prompts]
    stop: list[list[str | None]] = [[None] * len(row) for row in prompts]
    question_ids = torch.arange(1, n_questions + 1).expand(n_rows, n_questions)
    decided = decided_token_ids(tokenizer) if settings.stop_when_decided else frozenset()
    eos = tokenizer.eos_token_id
    for step in range(settings.max_new_tokens):
        tokens = next_ids.tolist()
        for g, row in enumerate(prompts):
            for i in range(len(row)):
                if stop[g][i] is not None:
                    continue
                token = tokens[g][i]
                if token == eos:
                    stop[g][i] = STOP_EOS
                else:
                    generated[g][i].append(token)
                    if token in decided:
                        stop[g][i] = STOP_DECIDED
                if stop[g][i] is not None:
                    active[g, i] = False
        if not bool(active.any()) or step == settings.max_new_tokens - 1:
            break
        step_slot = slot_base + step * n_questions + torch.arange(n_questions, device=device).expand(n_rows, n_questions)
        step_segment = torch.where(active, question_ids, torch.full_like(question_ids, -1)).to(device, non_blocking=True)
        step_positions = (shared + rows.lengths + step).to(device, non_blocking=True)
        out, _ = run_layers(lm, lm.embed_tokens(next_ids), step_positions, TokenMeta(step_slot, step_segment), cache, decoding=True)
        next_ids, logits = greedy_tokens(lm, out)
        check_finite(logits, active)
    return [
        [
            Generation(generated[g][i], decoded_text(tokenizer, generated[g][i]), stop[g][i] or STOP_LENGTH, first_logits[g, i],
                       per_layer[g][i], shared + len(prompts[g][i]))
            for i in range(len(row))
        ]
        for g, row in enumerate(prompts)
    ]


def plan_batches(work: list[ImageWork], row_width, *, max_images: int, max_tokens: int) -> list[list[ImageWork]]:
    """Images grouped into batches of similar row width (less padding) within a token budget.

    Deterministic in the full list of images, so a resumed run forms the same batches.
    """
    ordered = sorted(work, key=row_width, reverse=True)
    planned: list[list[ImageWork]] = []
    for w in ordered:
        current = planned[-1] if planned else None
        if current and len(current) < max_images and row_width(current[0]) * (len(current) + 1) <= max_tokens:
            current.append(w)
        else:
            planned.append([w])
    return planned


def evaluate_fast(
    bundle: ModelBundle,
    method: Method,
    params: dict[str, Any],
    questions: Sequence[Question],
    load_image: image_ops.ImageLoader,
    *,
    preprocess: str,
    settings: EvalSettings,
    seed: int,
    on_answers: Callable[[list[Answer]], None],
    answered: frozenset[str] = frozenset(),
) -> None:
    """Answer `questions` image batch by image batch (at most `settings.batch_images` images and
    `settings.batch_tokens` tokens each), sharing each image's work between its questions."""
    tokenized = tokenized_prompts(bundle, questions)
    suffix_of = dict(zip((q.key for q in questions), tokenized.suffixes))
    prefix_len = len(tokenized.prefix)
    n_visual = int(params.get("visual_tokens", bundle.geometry.n_patches))
    shared = prefix_len + n_visual
    pruner = method.make_pruner(params, bundle, prefix_len, n_visual) if method.text_dependent and method.make_pruner else None
    if pruner is not None:  # question blocks: the widest of the image + questions rows and the block rows

        def row_width(w: ImageWork) -> int:
            text = sum(len(p) for p in w.prompts)
            return max(shared + text, prefix_len + len(w.prompts) * pruner.max_visual + text)
    elif method.text_dependent:  # one row per prompt, each with its own copy of the image

        def row_width(w: ImageWork) -> int:
            return sum(shared + len(p) for p in w.prompts)
    else:

        def row_width(w: ImageWork) -> int:
            return shared + sum(len(p) for p in w.prompts)

    planned = plan_batches(group_by_image(questions, suffix_of), row_width, max_images=settings.batch_images, max_tokens=settings.batch_tokens)
    jobs = [[w for w in (_unanswered(w, answered) for w in image_batch) if w.prompts] for image_batch in planned]
    jobs = [work for work in jobs if work]

    def pixels(work: list[ImageWork]) -> torch.Tensor:
        return image_ops.load_and_preprocess([w.image for w in work], load_image, preprocess, bundle.image_processor)

    with ThreadPoolExecutor(max_workers=1) as pool:  # decode and resize the next batch's images meanwhile
        upcoming = pool.submit(pixels, jobs[0]) if jobs else None
        for index, work in enumerate(jobs):
            pixel_values = upcoming.result()
            if index + 1 < len(jobs):
                upcoming = pool.submit(pixels, jobs[index + 1])
            visual = visual_tokens(bundle, method, params, pixel_values, [row_seed(seed, w.image) for w in work])
            if pruner is not None:
                # seeds (SparseVLM's clustering noise) follow the input, image and prompt, as on the reference path
                seeds = [row_seed(seed, w.image, group[0].prompt) for w in work for group in w.questions]
                generations = generate_question_blocks(bundle, tokenized.prefix, visual, [w.prompts for w in work], settings, pruner, seeds)
            elif method.text_dependent:
                generations = _per_question_rows(bundle, method, params, tokenized.prefix, visual, work, settings, seed)
            else:
                generations = generate_packed(bundle, tokenized.prefix, visual, [w.prompts for w in work], settings)
            on_answers([
                Answer(q, generation, int(visual.shape[1]))
                for w, row in zip(work, generations)
                for group, generation in zip(w.questions, row)
                for q in group
            ])


def _unanswered(work: ImageWork, answered: frozenset[str]) -> ImageWork:
    kept = [(p, [q for q in group if q.key not in answered]) for p, group in zip(work.prompts, work.questions)]
    kept = [(p, group) for p, group in kept if group]
    return ImageWork(work.image, [p for p, _ in kept], [group for _, group in kept])


def _per_question_rows(bundle, method: Method, params, prefix, visual: torch.Tensor, work: list[ImageWork], settings: EvalSettings, seed: int) -> list[list[Generation]]:
    """One left-padded row per distinct (image, prompt); the image's visual tokens are reused.

    For a question-dependent method that has a hook for the reference path but no `make_pruner`
    for question blocks: nothing of the image is shared in the LLM."""
    # seeds (SparseVLM's clustering noise) follow the input, image and prompt, as on the reference path
    rows = [(g, prompt, row_seed(seed, w.image, group[0].prompt)) for g, w in enumerate(work) for prompt, group in zip(w.prompts, w.questions)]
    row_limit = params.get("max_batch_size") or len(rows)
    generations: list[Generation] = []
    for chunk in batches(rows, row_limit):
        hook = method.make_hook(params, bundle, [row for _, _, row in chunk], len(prefix), visual.shape[1]) if method.make_hook else None
        chunk_visual = visual[torch.tensor([g for g, _, _ in chunk], device=visual.device)]
        generations.extend(generate_rows(bundle, prefix, chunk_visual, [p for _, p, _ in chunk], settings, hook=hook))
    out, position = [], 0
    for w in work:
        out.append(generations[position : position + len(w.prompts)])
        position += len(w.prompts)
    return out
