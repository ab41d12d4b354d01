"""The evaluation loop: images -> (pruned) visual tokens -> prompt -> greedy answer.

The reference path (`eval.fast=false`) does what LLaVA's model_vqa_loader does, one batch of questions
at a time with nothing shared: vision tower and pruning for every question, left-padded rows, greedy
decoding until EOS or `max_new_tokens`; pruning inside the LLM runs through the method's row-by-row
hook (`make_hook`). The fast path reuses image-level work and the image prefix, and runs
question-dependent pruning over all questions of a batch at once (prune_eval.execution.fast,
prune_eval.models.blocks); it is tested against this one, which depends on none of that.

Decoding may stop early once the answer is decided (`eval.stop_when_decided`): as soon as the text
contains a '.', LLaVA's rule only reads the text before it and the exact-match rule can no longer
match "yes"/"no", so no further token can change either parsed answer. The record keeps the reason.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prune_eval.data import images as image_ops
from prune_eval.data.pope import Question
from prune_eval.methods import Method
from prune_eval.models.llm import KVCache, LayerHook, TokenMeta, check_finite, greedy_tokens, run_layers
from prune_eval.models.loading import ModelBundle
from prune_eval.models.prompt import TokenizedPrompts, tokenize_prompts
from prune_eval.models.vision import encode_images

STOP_EOS, STOP_DECIDED, STOP_LENGTH = "eos", "decided", "max_new_tokens"


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int  # reference path: questions per batch
    max_new_tokens: int
    stop_when_decided: bool
    fast: bool
    batch_images: int = 64  # fast path: at most this many images per batch ...
    batch_tokens: int = 32768  # ... and at most this many prompt tokens
    compile: bool = False  # torch.compile the decoder layers (GPU; one-time compile cost)

    @classmethod
    def from_config(cls, eval_cfg) -> "EvalSettings":
        return cls(int(eval_cfg.batch_size), int(eval_cfg.max_new_tokens), bool(eval_cfg.stop_when_decided), bool(eval_cfg.fast),
                   int(eval_cfg.get("batch_images", 64)), int(eval_cfg.get("batch_tokens", 32768)), bool(eval_cfg.get("compile", False)))


@dataclass
class Generation:
    """One row's answer: generated ids (EOS excluded), decoded text, why decoding stopped."""

    token_ids: list[int]
    text: str
    stop_reason: str
    first_logits: torch.Tensor | None = None  # (V,) float32: the first answer token's logits
    visual_per_layer: list[int] | None = None  # visual tokens each decoder layer processed (prefill)
    prompt_tokens: int | None = None  # prompt length entering the LLM (prefix + visual + text)
    step_logits: list[torch.Tensor] | None = None  # (V,) per generated token, when asked for


@dataclass
class Answer:
    question: Question
    generation: Generation
    visual_tokens: int


def row_seed(seed: int, *parts: str) -> int:
    """A seed for one image or question that does not depend on batching or resume order."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def visual_tokens(
    bundle: ModelBundle, method: Method, params: dict[str, Any], pixel_values: torch.Tensor, seeds: Sequence[int]
) -> torch.Tensor:
    """(B, K, D_llm) visual embeddings after the method's image-level selection and the projector."""
    vision = encode_images(
        bundle.vision_tower,
        pixel_values.to(bundle.device),
        feature_layer=bundle.feature_layer,
        need_cls_attention=method.needs_cls_attention,
        need_keys=method.needs_keys,
    )
    selected = method.select(vision, params, seeds)  # (B, K, Dv)
    return bundle.projector(selected).to(bundle.dtype)


def decoded_text(tokenizer, token_ids: list[int]) -> str:
    """The answer text as LLaVA's llava/eval/model_vqa_loader.py writes it to its answer file:
    `batch_decode(ids, skip_special_tokens=True)[0].strip()`. This stripped text is what a cell stores
    as `raw_answer` (records.RAW_ANSWER_DECODED) and what eval_pope.py's rule reads in LLaVA's pipeline."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def is_decided(text: str) -> bool:
    return "." in text


@functools.lru_cache(maxsize=8)
def decided_token_ids(tokenizer) -> frozenset[int]:
    """Tokens whose text contains '.': once one is generated the answer is decided (is_decided),
    checked per token instead of decoding the whole answer at every step."""
    return frozenset(i for i in range(len(tokenizer)) if "." in tokenizer.decode([i], skip_special_tokens=True))


@torch.no_grad()
def generate_rows(
    bundle: ModelBundle,
    prefix: Sequence[int],
    visual: torch.Tensor,
    suffixes: Sequence[Sequence[int]],
    settings: EvalSettings,
    *,
    hook: LayerHook | None = None,
    keep_step_logits: bool = False,
) -> list[Generation]:
    """Greedy answers for rows [prefix | visual_b | suffix_b], left-padded into one batch.

    visual: (B, K, D). Every row is its own question (segment 1); padding is segment -1.
    """
    lm, device = bundle.lm, bundle.device
    batch, n_visual, _ = visual.shape
    lengths = [len(prefix) + n_visual + len(s) for s in suffixes]
    width = max(lengths)
    embed = lm.embed_tokens
    prefix_embeds = embed(torch.tensor(list(prefix), device=device))  # (P, D)
    hidden = torch.zeros(batch, width, prefix_embeds.shape[-1], dtype=bundle.dtype, device=device)
    segment = torch.full((batch, width), -1, dtype=torch.long, device=device)
    for b, suffix in enumerate(suffixes):
        start = width - lengths[b]
        row = torch.cat([prefix_embeds, visual[b], embed(torch.tensor(list(suffix), device=device))])
        hidden[b, start:] = row
        segment[b, start:] = 1
    slot = torch.arange(width, device=device).expand(batch, width)
    positions = ((segment >= 0).long().cumsum(1) - 1).clamp(min=0)  # (B, L)
    cache = KVCache(lm.n_layers, reserve=settings.max_new_tokens)
    out, _ = run_layers(lm, hidden, positions, TokenMeta(slot, segment), cache, decoding=False, hook=hook)
    next_ids, logits = greedy_tokens(lm, out[:, -1])  # (B,), (B, V)
    check_finite(logits)
    first_logits = logits
    step_logits = [logits] if keep_step_logits else None
    per_layer = getattr(hook, "visual_per_layer", None) or [[n_visual] * lm.n_layers for _ in range(batch)]
    generated: list[list[int]] = [[] for _ in range(batch)]
    stop: list[str | None] = [None] * batch
    last_position = positions[:, -1]
    eos = bundle.tokenizer.eos_token_id
    decided = decided_token_ids(bundle.tokenizer) if settings.stop_when_decided else frozenset()
    ones = torch.ones(batch, 1, dtype=torch.long, device=device)
    for step in range(settings.max_new_tokens):
        for b in range(batch):
            if stop[b] is not None:
                continue
            token = int(next_ids[b])
            if token == eos:
                stop[b] = STOP_EOS
                continue
            generated[b].append(token)
            if token in decided:
                stop[b] = STOP_DECIDED
        if all(s is not None for s in stop) or step == settings.max_new_tokens - 1:
            break
        step_meta = TokenMeta(ones * (width + step), ones.clone())
        out, _ = run_layers(
            lm, embed(next_ids[:, None]), (last_position + 1 + step)[:, None], step_meta, cache, decoding=True
        )
        next_ids, logits = greedy_tokens(lm, out[:, -1])
        check_finite(logits, torch.tensor([s is None for s in stop]))
        if step_logits is not None:
            step_logits.append(logits)
    return [
        Generation(
            generated[b], decoded_text(bundle.tokenizer, generated[b]), stop[b] or STOP_LENGTH, first_logits[b],
            list(per_layer[b]), lengths[b], [s[b] for s in step_logits] if step_logits is not None else None,
        )
        for b in range(batch)
    ]


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_reference(
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
    """Answer `questions` batch by batch with nothing shared between questions.

    Batches are fixed slices of the full question list; already `answered` questions are left out
    of their batch. A resumed run therefore sees the same batch compositions as an uninterrupted
    one wherever whole batches remain, which keeps its answers bit-identical.
    """
    tokenized = tokenized_prompts(bundle, questions)
    suffix_of = dict(zip((q.key for q in questions), tokenized.suffixes))
    batch_size = min(settings.batch_size, params.get("max_batch_size") or settings.batch_size)
    for full_batch in batches(list(questions), batch_size):
        batch = [q for q in full_batch if q.key not in answered]
        if not batch:
            continue
        pixel_values = image_ops.load_and_preprocess([q.image for q in batch], load_image, preprocess, bundle.image_processor)
        visual = visual_tokens(bundle, method, params, pixel_values, [row_seed(seed, q.image) for q in batch])
        hook = None
        if method.make_hook is not None:
            hook = method.make_hook(params, bundle, [row_seed(seed, q.image, q.prompt) for q in batch], len(tokenized.prefix), visual.shape[1])
        generations = generate_rows(bundle, tokenized.prefix, visual, [suffix_of[q.key] for q in batch], settings, hook=hook)
        on_answers([Answer(q, g, int(visual.shape[1])) for q, g in zip(batch, generations)])


def tokenized_prompts(bundle: ModelBundle, questions: Sequence[Question]) -> TokenizedPrompts:
    return tokenize_prompts([q.prompt for q in questions], bundle.tokenizer, mode=bundle.tokenization, image_token_id=bundle.image_token_id)
