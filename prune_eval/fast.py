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
Question-dependent pruning (SparseVLM) cannot share the prefix beyond its first pruning layer; it
gets 1 and 2 (vision once per image, duplicates once) and batches one row per question.

The reference path (prune_eval.engine.evaluate_reference) is what the tests compare this against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from prune_eval.data import images as image_ops
from prune_eval.data.pope import Question
from prune_eval.engine import (
    STOP_DECIDED,
    STOP_EOS,
    STOP_LENGTH,
    Answer,
    EvalSettings,
    Generation,
    batches,
    decoded_text,
    generate_rows,
    is_decided,
    row_seed,
    tokenized_prompts,
    visual_tokens,
)
from prune_eval.methods import Method
from prune_eval.models.llm import KVCache, TokenMeta, greedy_tokens, run_layers
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
    lm, device, tokenizer = bundle.lm, bundle.device, bundle.tokenizer
    n_rows, n_visual, dim = visual.shape
    shared = len(prefix) + n_visual  # segment 0: prefix + image
    widths = [shared + sum(len(p) for p in row) for row in prompts]
    width = max(widths)
    n_questions = max(len(row) for row in prompts)
    prefix_embeds = lm.embed_tokens(torch.tensor(list(prefix), device=device))
    hidden = torch.zeros(n_rows, width, dim, dtype=bundle.dtype, device=device)
    segment = torch.full((n_rows, width), -1, dtype=torch.long, device=device)
    positions = torch.zeros(n_rows, width, dtype=torch.long, device=device)
    last = torch.zeros(n_rows, n_questions, dtype=torch.long, device=device)  # each question's last token
    lengths = torch.zeros(n_rows, n_questions, dtype=torch.long, device=device)
    for g, row in enumerate(prompts):
        ids = torch.tensor([t for p in row for t in p], device=device)
        hidden[g, :widths[g]] = torch.cat([prefix_embeds, visual[g], lm.embed_tokens(ids)])
        segment[g, :shared] = 0
        positions[g, :shared] = torch.arange(shared, device=device)
        start = shared
        for i, prompt in enumerate(row):
            segment[g, start : start + len(prompt)] = i + 1
            positions[g, start : start + len(prompt)] = torch.arange(shared, shared + len(prompt), device=device)
            last[g, i], lengths[g, i] = start + len(prompt) - 1, len(prompt)
            start += len(prompt)
    slot = torch.arange(width, device=device).expand(n_rows, width)
    cache = KVCache(lm.n_layers, reserve=settings.max_new_tokens * n_questions)
    out, _ = run_layers(lm, hidden, positions, TokenMeta(slot, segment), cache, decoding=False)
    next_ids, logits = greedy_tokens(lm, out.gather(1, last[..., None].expand(-1, -1, dim)))  # (G, Q), (G, Q, V)
    first_logits = logits
    active = torch.tensor([[i < len(row) for i in range(n_questions)] for row in prompts], device=device)
    generated = [[[] for _ in row] for row in prompts]
    stop: list[list[str | None]] = [[None] * len(row) for row in prompts]
    question_ids = torch.arange(1, n_questions + 1, device=device).expand(n_rows, n_questions)
    eos = tokenizer.eos_token_id
    for step in range(settings.max_new_tokens):
        tokens = next_ids.tolist()
        for g, row in enumerate(prompts):
            for i in range(len(row)):
                if stop[g][i] is not None:
                    continue
                if tokens[g][i] == eos:
                    stop[g][i] = STOP_EOS
                else:
                    generated[g][i].append(tokens[g][i])
                    if settings.stop_when_decided and is_decided(decoded_text(tokenizer, generated[g][i])):
                        stop[g][i] = STOP_DECIDED
                if stop[g][i] is not None:
                    active[g, i] = False
        if not bool(active.any()) or step == settings.max_new_tokens - 1:
            break
        step_slot = width + step * n_questions + torch.arange(n_questions, device=device).expand(n_rows, n_questions)
        step_meta = TokenMeta(step_slot, torch.where(active, question_ids, torch.full_like(question_ids, -1)))
        step_positions = shared + lengths + step
        out, _ = run_layers(lm, lm.embed_tokens(next_ids), step_positions, step_meta, cache, decoding=True)
        next_ids, _ = greedy_tokens(lm, out)
    return [
        [
            Generation(generated[g][i], decoded_text(tokenizer, generated[g][i]), stop[g][i] or STOP_LENGTH, first_logits[g, i],
                       [n_visual] * lm.n_layers, shared + len(prompts[g][i]))
            for i in range(len(row))
        ]
        for g, row in enumerate(prompts)
    ]


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
    """Answer `questions` `settings.batch_size` images at a time (fixed slices of all images, so
    a resumed run forms the same batches), sharing each image's work between its questions."""
    tokenized = tokenized_prompts(bundle, questions)
    suffix_of = dict(zip((q.key for q in questions), tokenized.suffixes))
    jobs = [[w for w in (_unanswered(w, answered) for w in image_batch) if w.prompts]
            for image_batch in batches(group_by_image(questions, suffix_of), settings.batch_size)]
    jobs = [work for work in jobs if work]

    def pixels(work: list[ImageWork]) -> torch.Tensor:
        return image_ops.preprocess([load_image(w.image) for w in work], preprocess, bundle.image_processor)

    with ThreadPoolExecutor(max_workers=1) as pool:  # decode and resize the next batch's images meanwhile
        upcoming = pool.submit(pixels, jobs[0]) if jobs else None
        for index, work in enumerate(jobs):
            pixel_values = upcoming.result()
            if index + 1 < len(jobs):
                upcoming = pool.submit(pixels, jobs[index + 1])
            visual = visual_tokens(bundle, method, params, pixel_values, [row_seed(seed, w.image) for w in work])
            if method.text_dependent:
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
    """One left-padded row per distinct (image, prompt); the image's visual tokens are reused."""
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
