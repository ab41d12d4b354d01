"""LLaVA-1.5's POPE prompt (conv-mode vicuna_v1) and its tokenization around the image.

The prompt is `{system} USER: <image>\\n{question}\\nAnswer the question using a single word or phrase.
ASSISTANT:` (roles USER/ASSISTANT, sep " ", sep2 "</s>"; ../shared/notes/pope.md). The image comes
before the question, so the token sequence splits into a prefix shared by every question (BOS +
system + "USER:"), the visual tokens, and a per-question suffix. Everything downstream works with that
split, which is also what makes sharing the image prefix across questions possible.

Two tokenizations exist in the wild (a candidate cause of score differences, recorded per cell):
- `hf`: the whole prompt through the checkpoint's tokenizer with `<image>` as a special token, as the
  llava-hf processor does;
- `llava`: LLaVA's `tokenizer_image_token`: the text chunks around `<image>` are tokenized separately,
  each with BOS, and the BOS of every chunk after the first is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from prune_eval.errors import PruneEvalError

SYSTEM_VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
TOKENIZATIONS = ("hf", "llava")


def vicuna_v1_prompt(question_prompt: str) -> str:
    """The full prompt string LLaVA-1.5's model_vqa_loader builds for one POPE question."""
    return f"{SYSTEM_VICUNA_V1} USER: {IMAGE_PLACEHOLDER}\n{question_prompt} ASSISTANT:"


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids around the image: `prefix` is shared by all questions; `suffixes[i]` follows the
    visual tokens for question i."""

    prefix: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]


def _split_at_image(ids: list[int], image_token_id: int, prompt: str) -> tuple[list[int], list[int]]:
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != 1:
        raise PruneEvalError(f"prompt must contain exactly one image token, found {len(positions)} in {prompt!r}")
    return ids[: positions[0]], ids[positions[0] + 1 :]


def tokenize_prompts(question_prompts: list[str], tokenizer, *, mode: str, image_token_id: int) -> TokenizedPrompts:
    """Tokenize every question's prompt and split it around the image."""
    if mode not in TOKENIZATIONS:
        raise PruneEvalError(f"unknown tokenization '{mode}'; choices: {', '.join(TOKENIZATIONS)}")
    prefix: list[int] | None = None
    suffixes = []
    for question in question_prompts:
        if IMAGE_PLACEHOLDER in question:
            raise PruneEvalError(f"question text contains the image placeholder {IMAGE_PLACEHOLDER!r}: {question!r}")
        prompt = vicuna_v1_prompt(question)
        if mode == "hf":
            head, tail = _split_at_image(tokenizer(prompt).input_ids, image_token_id, prompt)
        else:
            first, second = prompt.split(IMAGE_PLACEHOLDER)
            head = tokenizer(first).input_ids
            tail = tokenizer(second).input_ids
            if head and head[0] == tokenizer.bos_token_id and tail and tail[0] == tokenizer.bos_token_id:
                tail = tail[1:]
        if prefix is None:
            prefix = head
        elif head != prefix:
            raise PruneEvalError("the tokens before the image differ between questions; the prompt prefix cannot be shared")
        if not tail:
            raise PruneEvalError(f"no text after the image in prompt {prompt!r}; POPE needs the question after the image")
        suffixes.append(tuple(tail))
    return TokenizedPrompts(tuple(prefix or ()), tuple(suffixes))
