"""The fast path (shared image prefix, packed questions, duplicates once, question blocks for
SparseVLM) against the reference path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import assert_same_answers, recorded_kept_sets, varied_questions
from conftest import answers_by_key as run

from prune_eval.data import images, synthetic
from prune_eval.execution.engine import EvalSettings, evaluate_reference
from prune_eval.execution.fast import evaluate_fast, generate_packed, group_by_image
from prune_eval.execution.engine import generate_rows, tokenized_prompts, visual_tokens
from prune_eval.methods import get_method
from prune_eval.models.prompt import tokenize_prompts

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

CASES = [("vanilla", {}, 576), ("visionzip", {}, 64), ("random", {}, 32)]


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
    fast_answers = run(evaluate_fast, tiny_bundle, method, options, budget, questions)
    assert reference.keys() == {q.key for q in questions}
    assert_same_answers(fast_answers, reference)


# ------------------------------------------------------------------ SparseVLM in question blocks
SPARSEVLM = [(version, budget) for version in ("v1", "v1.5", "v2") for budget in (64, 128, 192)]


@pytest.mark.parametrize("version, budget", SPARSEVLM)
@pytest.mark.parametrize("model", ["tiny", pytest.param("toy", marks=pytest.mark.slow)])
def test_sparsevlm_question_blocks_equal_the_reference(request, monkeypatch, model, version, budget) -> None:
    """Answers (4 greedy tokens each), first-token logits (1e-5), visual counts per layer and the
    kept visual sets (and merged-token counts) at every pruning layer equal the reference path's,
    for every question.

    The fast path shares the image prefix up to the first pruning layer and the system prompt
    beyond it; the reference path shares nothing (one left-padded row per question; v1: batch 1).
    """
    bundle = request.getfixturevalue(f"{model}_bundle")
    questions = varied_questions()
    method, reference_hooks, blocks = recorded_kept_sets(monkeypatch, get_method("sparsevlm"))
    reference = run(evaluate_reference, bundle, "sparsevlm", {"version": version}, budget, questions, method=method, decode_all=True)
    fast_answers = run(evaluate_fast, bundle, "sparsevlm", {"version": version}, budget, questions, method=method, decode_all=True)
    assert_same_answers(fast_answers, reference)  # 4 tokens each: decoding over the per-layer caches too
    # the reference answered the questions in order, one hook row each; the fast path once per distinct (image, prompt)
    reference_kept = dict(zip(reference, [kept for hook in reference_hooks for kept in hook.kept_sets()]))
    distinct = list(dict.fromkeys((a.question.image, a.question.prompt) for a in fast_answers.values()))
    fast_kept = dict(zip(distinct, [kept for hook in blocks for kept in hook.kept_sets()]))
    assert len(fast_kept) == len(distinct) == len(questions) - 2
    pruning_layers = get_method("sparsevlm").resolve({"version": version}, budget, bundle.geometry)["layers"]
    for key, answer in fast_answers.items():
        expected = reference_kept[key]
        assert sorted(expected) == pruning_layers
        assert fast_kept[(answer.question.image, answer.question.prompt)] == expected, key


def test_question_dependent_method_without_pruner_runs_one_row_per_question(tiny_bundle) -> None:
    """A method with a reference-path hook but no make_pruner (question blocks) still gets the
    fast path's image-level sharing, and the reference answers."""
    questions = varied_questions()
    method = dataclasses.replace(get_method("sparsevlm"), make_pruner=None)
    reference = run(evaluate_reference, tiny_bundle, "sparsevlm", {"version": "v1.5"}, 64, questions, method=method)
    assert_same_answers(run(evaluate_fast, tiny_bundle, "sparsevlm", {"version": "v1.5"}, 64, questions, method=method), reference)


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

    # every kind of call of the fast path (image prefix, packed questions, decoding) compiles on these;
    # more questions only rerun the same graphs (12 instead of 30: 11 s less in CI)
    questions = duplicated_questions()[:12]
    eager = run(evaluate_fast, tiny_bundle, "visionzip", {}, 64, questions)
    compiled_bundle = dataclasses.replace(tiny_bundle, lm=tiny_bundle.lm.compiled())
    compiled = run(evaluate_fast, compiled_bundle, "visionzip", {}, 64, questions)
    for key, expected in eager.items():
        assert compiled[key].generation.token_ids == expected.generation.token_ids
        torch.testing.assert_close(compiled[key].generation.first_logits, expected.generation.first_logits, atol=1e-4, rtol=1e-4)
