"""The fast path (shared image prefix, packed questions, duplicates once) against the reference path."""

from __future__ import annotations

import pytest
import torch

from prune_eval.data import images, synthetic
from prune_eval.execution.engine import EvalSettings, evaluate_reference
from prune_eval.execution.fast import evaluate_fast, generate_packed, group_by_image
from prune_eval.execution.engine import generate_rows, tokenized_prompts, visual_tokens
from prune_eval.methods import get_method
from prune_eval.models.prompt import tokenize_prompts

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

REFERENCE = EvalSettings(batch_size=5, max_new_tokens=4, stop_when_decided=True, fast=False)
FAST = EvalSettings(batch_size=2, max_new_tokens=4, stop_when_decided=True, fast=True, batch_images=2, batch_tokens=4096)
CASES = [("vanilla", {}, 576), ("visionzip", {}, 64), ("random", {}, 32), ("sparsevlm", {"version": "v1.5"}, 64),
         ("sparsevlm", {"version": "v2"}, 64), ("sparsevlm", {"version": "v1"}, 128)]


def run(path, bundle, method_name, options, budget, questions, answered=frozenset()):
    method = get_method(method_name)
    params = method.resolve(options, budget, bundle.geometry)
    answers = []
    settings = FAST if path is evaluate_fast else REFERENCE
    path(bundle, method, params, questions, images.synthetic_loader(), preprocess="pad", settings=settings, seed=3,
         on_answers=answers.extend, answered=answered)
    return {a.question.key: a for a in answers}


def duplicated_questions():
    """Synthetic POPE asks some images the same question in several splits, as POPE does."""
    questions = synthetic.make_questions(3, seed=4)
    prompts = {(q.image, q.prompt) for q in questions}
    assert len(prompts) < len(questions), "the test needs duplicated prompts"
    return questions


@pytest.mark.parametrize("method, options, budget", CASES)
def test_fast_path_gives_the_reference_answers(tiny_bundle, method, options, budget) -> None:
    questions = duplicated_questions()
    reference = run(evaluate_reference, tiny_bundle, method, options, budget, questions)
    fast = run(evaluate_fast, tiny_bundle, method, options, budget, questions)
    assert reference.keys() == fast.keys() == {q.key for q in questions}
    for key, expected in reference.items():
        got = fast[key]
        assert got.generation.token_ids == expected.generation.token_ids, key
        assert got.generation.stop_reason == expected.generation.stop_reason
        assert got.generation.visual_per_layer == expected.generation.visual_per_layer
        assert got.generation.prompt_tokens == expected.generation.prompt_tokens
        torch.testing.assert_close(got.generation.first_logits, expected.generation.first_logits, atol=1e-5, rtol=1e-5)


def test_packed_questions_of_different_lengths(tiny_bundle) -> None:
    """Questions of different lengths packed into one row after a shared prefix answer exactly as alone."""
    bundle = tiny_bundle
    prompts = ["Is there a red circle in the image ?", "Is there a cat ?", "Is there a blue square in the image in the image ?"]
    tokenized = tokenize_prompts(prompts, bundle.tokenizer, mode="hf", image_token_id=bundle.image_token_id)
    assert len({len(s) for s in tokenized.suffixes}) == 3
    pixels = images.preprocess([synthetic.render_image(0, 1), synthetic.render_image(0, 2)], "crop", bundle.image_processor)
    visual = visual_tokens(bundle, get_method("vanilla"), {}, pixels, [0, 0])
    settings = EvalSettings(batch_size=1, max_new_tokens=5, stop_when_decided=False, fast=True)
    rows = [list(tokenized.suffixes), list(tokenized.suffixes[:2])]  # rows with 3 and 2 questions
    packed = generate_packed(bundle, tokenized.prefix, visual, rows, settings)
    for g, row in enumerate(rows):
        for i, suffix in enumerate(row):
            alone = generate_rows(bundle, tokenized.prefix, visual[g : g + 1], [suffix], settings)[0]
            assert packed[g][i].token_ids == alone.token_ids
            torch.testing.assert_close(packed[g][i].first_logits, alone.first_logits, atol=1e-5, rtol=1e-5)


def test_resume_skips_answered_questions(tiny_bundle) -> None:
    questions = duplicated_questions()
    done = frozenset(q.key for q in questions[:20])
    fast = run(evaluate_fast, tiny_bundle, "visionzip", {}, 64, questions, answered=done)
    assert set(fast) == {q.key for q in questions} - done


def test_duplicates_are_grouped_per_image(tiny_bundle) -> None:
    questions = duplicated_questions()
    tokenized = tokenized_prompts(tiny_bundle, questions)
    work = group_by_image(questions, dict(zip((q.key for q in questions), tokenized.suffixes)))
    assert [w.image for w in work] == sorted({q.image for q in questions}, key=[q.image for q in questions].index)
    assert sum(len(group) for w in work for group in w.questions) == len(questions)
    assert all(len(set(w.prompts)) == len(w.prompts) for w in work)


def test_decided_by_token_equals_decided_by_text(tiny_bundle) -> None:
    from prune_eval.execution.engine import decided_token_ids, decoded_text, is_decided

    tokenizer = tiny_bundle.tokenizer
    decided = decided_token_ids(tokenizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        ids = torch.randint(0, len(tokenizer), (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator).tolist()
        assert is_decided(decoded_text(tokenizer, ids)) == any(i in decided for i in ids)


def test_batches_respect_the_budgets_and_are_deterministic(tiny_bundle) -> None:
    from prune_eval.execution.fast import plan_batches

    questions = synthetic.make_questions(12, seed=1)
    tokenized = tokenized_prompts(tiny_bundle, questions)
    work = group_by_image(questions, dict(zip((q.key for q in questions), tokenized.suffixes)))
    width = lambda w: 100 + sum(len(p) for p in w.prompts)  # noqa: E731
    planned = plan_batches(work, width, max_images=5, max_tokens=3 * width(work[0]) + 50)
    assert sorted(w.image for batch in planned for w in batch) == sorted(w.image for w in work)
    assert all(len(batch) <= 5 and width(batch[0]) * len(batch) <= 3 * width(work[0]) + 50 for batch in planned)
    again = plan_batches(list(work), width, max_images=5, max_tokens=3 * width(work[0]) + 50)
    assert [[w.image for w in b] for b in planned] == [[w.image for w in b] for b in again]


@pytest.mark.slow
def test_compiled_layers_give_the_same_answers(tiny_bundle) -> None:
    """eval.compile=true (torch.compile of the decoder layers) changes no answer on the fast path."""
    import dataclasses

    questions = duplicated_questions()[:30]
    eager = run(evaluate_fast, tiny_bundle, "visionzip", {}, 64, questions)
    compiled_bundle = dataclasses.replace(tiny_bundle, lm=tiny_bundle.lm.compiled())
    compiled = run(evaluate_fast, compiled_bundle, "visionzip", {}, 64, questions)
    for key, expected in eager.items():
        assert compiled[key].generation.token_ids == expected.generation.token_ids
        torch.testing.assert_close(compiled[key].generation.first_logits, expected.generation.first_logits, atol=1e-4, rtol=1e-4)
