"""FastV: selection against a loop reference of the official rule (pkunlp-icler/FastV, see
prune_eval/methods/fastv.py), kept sets against HF's eager attention, cached decoding against a
recompute, and the fast path's question blocks against the reference path on the tiny and the toy
LLaVA."""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import REFERENCE_BATCH, answers_by_key, assert_same_answers, recorded_kept_sets, varied_questions

from prune_eval.analysis.compute import official_equal_tokens
from prune_eval.data import images, synthetic
from prune_eval.errors import PruneEvalError
from prune_eval.execution.engine import EvalSettings, evaluate_reference, generate_rows, visual_tokens
from prune_eval.execution.fast import evaluate_fast
from prune_eval.methods import ModelGeometry, get_method
from prune_eval.methods.fastv import FastVHook, resolve, top_r_keep, visual_scores
from prune_eval.models.llm import KVCache, TokenMeta, eager_probabilities, greedy_tokens, run_layers
from prune_eval.models.prompt import tokenize_prompts

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

LLAVA_7B = ModelGeometry(n_patches=576, vision_layers=24, vision_heads=16, text_layers=32, text_heads=32, text_hidden=4096, text_intermediate=11008)
SETTINGS = EvalSettings(batch_size=2, max_new_tokens=4, stop_when_decided=False, fast=False)


# ------------------------------------------------------------------ the official rule, as loops
def ref_keep(row: torch.Tensor, sys_length: int, n_image: int, rank: int) -> list[int]:
    """One recorded attention row (H, S) of the last token -> kept image positions (ascending).

    The official rule: mean over heads, the image columns [sys, sys + n_image), the `rank` best;
    on equal scores the earlier token (our documented tie rule; topk leaves it open).
    """
    heads = row.shape[0]
    scores = [sum(float(row[h, sys_length + j]) for h in range(heads)) / heads for j in range(n_image)]
    best = sorted(range(n_image), key=lambda j: (-scores[j], j))[:rank]
    return sorted(best)


def ref_attention_row(q: torch.Tensor, k: torch.Tensor, visible: list[bool]) -> torch.Tensor:
    """q (H, D), k (H, S, D) -> softmax(q k / sqrt(D)) over the visible keys, (H, S) float64."""
    heads, length, dim = k.shape
    out = torch.zeros(heads, length, dtype=torch.float64)
    for h in range(heads):
        logits = [float(q[h].double() @ k[h, s].double()) / math.sqrt(dim) if visible[s] else -math.inf for s in range(length)]
        top = max(logits)
        exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in logits]
        for s in range(length):
            out[h, s] = exps[s] / sum(exps)
    return out


def fastv_keep(row: torch.Tensor, start: int, n_image: int, rank: int) -> list[int]:
    """Our pure functions on one recorded row (H, S)."""
    return top_r_keep(visual_scores(row[None], torch.tensor([start]), n_image), rank)[0].tolist()


# ------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_on_recorded_rows_matches_the_official_rule(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    heads, sys_length, n_image, n_text = 4, 7, 40, 9
    row = (torch.randn(heads, sys_length + n_image + n_text, generator=g) * 3).softmax(-1)
    for rank in (1, 10, 39, 40):
        assert fastv_keep(row, sys_length, n_image, rank) == ref_keep(row, sys_length, n_image, rank)


def test_the_head_average_decides_not_one_head() -> None:
    """Head 0 puts all its mass on image token 2; heads 1-3 spread theirs on tokens 5 and 6: the
    head means are 0.25 (token 2), 0.3375 (5) and 0.30 (6), so R=2 keeps 5 and 6, where head 0
    alone or a max over heads would keep 2."""
    row = torch.zeros(4, 12)
    row[0, 1 + 2] = 1.0
    row[1:, 1 + 5] = 0.45
    row[1:, 1 + 6] = 0.40
    row[1:, 0] = 0.15  # the system token takes the rest; it is never a candidate
    assert fastv_keep(row, 1, 8, 2) == ref_keep(row, 1, 8, 2) == [5, 6]
    assert fastv_keep(row, 1, 8, 3) == [2, 5, 6]


def test_ties_keep_the_earlier_token() -> None:
    row = torch.full((2, 10), 0.1)
    assert fastv_keep(row, 2, 6, 3) == ref_keep(row, 2, 6, 3) == [0, 1, 2]
    row[:, 2 + 4] = 0.3  # one clear winner, then a tie at the boundary among the rest
    assert fastv_keep(row, 2, 6, 3) == ref_keep(row, 2, 6, 3) == [0, 1, 4]


def test_one_attention_row_matches_a_loop_softmax() -> None:
    """The probabilities FastV reads (llm.attention_probabilities' eager recipe) for one query row
    per batch row, with left padding, against softmax(q k / sqrt(D)) written out."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 20, 8, generator=g)
    visible = torch.ones(2, 20, dtype=torch.bool)
    visible[1, :4] = False  # left padding of the second row
    ours = eager_probabilities(q[:, :, None], k, visible[:, None, None], 8**-0.5)[:, :, 0]
    for b in range(2):
        torch.testing.assert_close(ours[b].double(), ref_attention_row(q[b], k[b], visible[b].tolist()), atol=1e-6, rtol=1e-6)
    assert float(ours[1, :, :4].abs().max()) == 0.0


def test_resolve_defaults_rules_and_errors() -> None:
    params = resolve({}, 64, LLAVA_7B)
    assert (params["k"], params["layers"], params["kept_tokens"], params["visual_tokens"], params["positions"]) == (2, [1], 64, 576, "original")
    assert params["layer_average"] == (2 * 576 + 30 * 64) / 32 and "Ks=(2)" in params["k_source"]
    assert resolve({"k": 2}, 64, LLAVA_7B) == params  # the default written out is the same cell
    assert resolve({"k": 3}, 64, LLAVA_7B)["k_source"] == "user"
    averaged = [resolve({"budget_rule": "layer_average"}, b, LLAVA_7B)["kept_tokens"] for b in (64, 128, 192)]
    assert averaged == [round((32 * b - 2 * 576) / 30) for b in (64, 128, 192)] == [30, 98, 166]
    toy = ModelGeometry(576, 4, 2, 6, 2, 128, 256)
    assert resolve({}, 64, toy)["layer_rule"] == "official" and resolve({"k": 8}, 64, toy)["k"] == 8 * 6 // 32
    for options, budget, message in [
        ({"k": 0}, 64, "method.k=0; FastV's K is the number of layers that see every visual token"),
        ({"k": True}, 64, "method.k=True"),
        ({"k": 6, "layer_rule": "official"}, 64, "K=6 with the official rule is 6 on a 6-layer LLM; it must be in 1..5"),
        ({"k": 5, "layer_rule": "scaled"}, 64, "K=5 with the scaled rule is 0 on a 6-layer LLM"),
        ({"layer_rule": "every"}, 64, "method.layer_rule=every; choices: auto, official, scaled"),
        ({"budget_rule": "mean"}, 64, "method.budget_rule=mean; choices: kept, layer_average"),
        ({}, 577, "FastV budget=577 is the number of visual tokens kept from layer K on; it must be in 1..576"),
        ({"budget_rule": "layer_average"}, 16, "with K=2 (layers 0..1 see all 576) would keep -264 visual tokens; with method.budget_rule=layer_average the budget must be in 193..576"),
    ]:
        with pytest.raises(PruneEvalError, match=re.escape(message)) as error:
            resolve(options, budget, toy if "6-layer" in message or "193" in message else LLAVA_7B)
        assert "\n" not in str(error.value)


def test_yaml_options_compose_into_the_cell() -> None:
    """conf/method/fastv.yaml's keys are overridable and reach the resolved parameters and the name."""
    from hydra import compose, initialize_config_dir

    from prune_eval.config import CONF_DIR, plan_cell

    overrides = ["experiment=demo", "method=fastv", "budget=400", "method.k=3", "method.budget_rule=layer_average"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        spec = plan_cell(compose(config_name="config", overrides=overrides))
    assert spec.name.startswith("fastv-400_")  # the toy's 6 layers: K=3 official, R = round((6 x 400 - 3 x 576) / 3)
    assert (spec.params["k"], spec.params["layers"], spec.params["kept_tokens"]) == (3, [2], 224)


# ------------------------------------------------------------------ plumbing on tiny LLaVAs
def two_rows(bundle):
    """Two questions of different lengths (left padding) about two images."""
    prompts = ["Is there a red circle in the image ?", "Is there a cat ?"]
    tokenized = tokenize_prompts(prompts, bundle.tokenizer, mode="hf", image_token_id=bundle.image_token_id)
    assert len(tokenized.suffixes[0]) != len(tokenized.suffixes[1])
    pixels = images.preprocess([synthetic.render_image(0, 1), synthetic.render_image(0, 2)], "pad", bundle.image_processor)
    return tokenized, pixels, visual_tokens(bundle, get_method("fastv"), {}, pixels, [0, 0])


@pytest.mark.parametrize("model", ["tiny", "toy"])
def test_kept_tokens_equal_the_official_rule_on_eager_attention(model, tiny_bundle, toy_bundle) -> None:
    """Our kept sets (one query row, SDPA outputs, batch of 2 with left padding) equal the official
    rule applied to transformers' full eager attention of layer K-1, each row run alone."""
    bundle = tiny_bundle if model == "tiny" else toy_bundle
    params = resolve({}, 64, bundle.geometry)
    tokenized, pixels, visual = two_rows(bundle)
    hook = FastVHook(params, bundle.lm, 2, len(tokenized.prefix), visual.shape[1])
    generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS, hook=hook)
    text_config = bundle.model.config.text_config
    text_config._attn_implementation = "eager"
    try:
        for row in range(2):
            ids = list(tokenized.prefix) + [bundle.image_token_id] * 576 + list(tokenized.suffixes[row])
            with torch.no_grad():
                out = bundle.model(input_ids=torch.tensor([ids]), pixel_values=pixels[row : row + 1], output_attentions=True)
            recorded = out.attentions[params["k"] - 1][0, :, -1, :]  # (H, S): layer K-1, the last token's row
            assert hook.kept[row].tolist() == ref_keep(recorded, len(tokenized.prefix), 576, 64)
    finally:
        text_config._attn_implementation = "sdpa"
    k, n_layers = params["k"], bundle.lm.n_layers
    assert hook.visual_per_layer == [[576] * k + [64] * (n_layers - k)] * 2
    assert official_equal_tokens(hook.visual_per_layer[0]) == (576 * (k - 1) + 64 * (n_layers - k + 1)) / n_layers


def test_keep_rows_layout_and_original_positions(tiny_bundle) -> None:
    """[pad | prefix | image | text] -> [pad | prefix | kept image | text], slots and positions kept."""
    params = resolve({}, 2, tiny_bundle.geometry)
    prefix, n_image, n_text, pad = 3, 5, 2, 2
    width = pad + prefix + n_image + n_text
    hidden = torch.arange(width, dtype=torch.float32)[None, :, None].repeat(2, 1, 1)
    segment = torch.ones(2, width, dtype=torch.long)
    segment[0, :pad] = -1
    positions = ((segment >= 0).long().cumsum(1) - 1).clamp(min=0)
    meta = TokenMeta(torch.arange(width).expand(2, width), segment)
    hook = FastVHook(params, tiny_bundle.lm, 2, prefix, n_image)
    start = (segment < 0).sum(1) + prefix
    new_hidden, new_positions, new_meta = hook.keep_rows(hidden, positions, meta, start, torch.tensor([[1, 4], [0, 3]]))
    # row 0: pad 0-1, prefix 2-4, image 5-9 (keep 5+1, 5+4), text 10-11; row 1: prefix 0-2, image 3-7 (keep 3, 6), text 8-11
    rows = [[0, 1, 2, 3, 4, 6, 9, 10, 11], [0, 1, 2, 3, 6, 8, 9, 10, 11]]
    assert new_hidden[..., 0].tolist() == rows and new_meta.slot.tolist() == rows
    assert new_positions.tolist() == [[0, 0, 0, 1, 2, 4, 7, 8, 9], rows[1]]  # original positions, gaps where tokens went
    assert new_meta.segment[0].tolist() == [-1, -1] + [1] * 7


def test_last_token_is_found_under_left_and_right_padding() -> None:
    from prune_eval.methods.fastv import last_token_index

    segment = torch.tensor([[-1, -1, 1, 1, 1], [1, 1, 1, -1, -1], [0, 0, 1, 2, 2]])
    assert last_token_index(TokenMeta(torch.arange(5).expand(3, 5), segment)).tolist() == [4, 2, 4]


def test_cached_decoding_equals_a_recompute_with_the_same_kept_tokens(tiny_bundle) -> None:
    """Decoding over per-layer caches (layers < K full, >= K pruned, original positions) gives the
    logits of recomputing the whole sequence with the same kept tokens at every step (fp32)."""
    bundle = tiny_bundle
    params = resolve({}, 64, bundle.geometry)
    tokenized, _, visual = two_rows(bundle)
    hook = FastVHook(params, bundle.lm, 2, len(tokenized.prefix), visual.shape[1])
    cached = generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS, hook=hook, keep_step_logits=True)
    embed = bundle.lm.embed_tokens
    for row in range(2):
        generated = cached[row].token_ids
        for step, logits in enumerate(cached[row].step_logits[: len(generated) + 1]):
            ids_after = list(tokenized.suffixes[row]) + generated[:step]
            sequence = torch.cat([embed(torch.tensor(list(tokenized.prefix))), visual[row], embed(torch.tensor(ids_after))])[None]
            length = sequence.shape[1]
            meta = TokenMeta(torch.arange(length)[None], torch.ones(1, length, dtype=torch.long))
            replay = FastVHook(params, bundle.lm, 1, len(tokenized.prefix), visual.shape[1], replay=hook.kept[row : row + 1])
            with torch.no_grad():
                out, _ = run_layers(bundle.lm, sequence, torch.arange(length)[None], meta, KVCache(bundle.lm.n_layers), decoding=False, hook=replay)
            _, recomputed = greedy_tokens(bundle.lm, out[:, -1])
            torch.testing.assert_close(logits, recomputed[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ fast path (question blocks) == reference path
# K = 2 (the default) and 3; R = the budget (64, 200) or the 32-layer-average rule's R (300 -> 208 on
# the tiny model's 8 layers, 162 on the toy's 6).
FAST_CASES = [({}, 64), ({}, 200), ({"k": 3}, 64), ({"budget_rule": "layer_average"}, 300)]


@pytest.mark.parametrize("options, budget", FAST_CASES)
@pytest.mark.parametrize("model", ["tiny", "toy"])
def test_question_blocks_equal_the_reference(request, monkeypatch, model, options, budget) -> None:
    """Answers (4 greedy tokens each), first-token logits (1e-5), visual counts per layer
    ([576] x K + [R] x (L - K)) and each question's kept set equal the reference path's.

    The fast path shares each image's prefix through layers 0..K-1 and the system prompt beyond
    (question blocks); the reference path shares nothing (one left-padded row per question).
    """
    bundle = request.getfixturevalue(f"{model}_bundle")
    questions = varied_questions()
    params = resolve(options, budget, bundle.geometry)
    method, reference_hooks, blocks = recorded_kept_sets(monkeypatch, get_method("fastv"))
    reference = answers_by_key(evaluate_reference, bundle, "fastv", options, budget, questions, method=method, decode_all=True)
    fast = answers_by_key(evaluate_fast, bundle, "fastv", options, budget, questions, method=method, decode_all=True)
    assert blocks and len(reference_hooks) == math.ceil(len(questions) / REFERENCE_BATCH)  # fast: no per-question hook rows
    assert_same_answers(fast, reference)
    k, kept, n_layers = params["k"], params["kept_tokens"], bundle.lm.n_layers
    assert all(a.generation.visual_per_layer == [576] * k + [kept] * (n_layers - k) for a in fast.values())
    # the reference answered the questions in order, one hook row each; the fast path once per distinct (image, prompt)
    reference_kept = dict(zip(reference, [row for hook in reference_hooks for row in hook.kept_sets()]))
    distinct = list(dict.fromkeys((a.question.image, a.question.prompt) for a in fast.values()))
    fast_kept = dict(zip(distinct, [row for recorder in blocks for row in recorder.kept_sets()]))
    assert len(fast_kept) == len(distinct) == len(questions) - 2
    n_images = len({q.image for q in questions})
    assert len({str(kept_set) for kept_set in fast_kept.values()}) > n_images  # questions of one image keep different tokens
    for key, answer in fast.items():
        expected = reference_kept[key]
        assert list(expected) == [k - 1] and len(expected[k - 1][0]) == kept
        assert fast_kept[(answer.question.image, answer.question.prompt)] == expected, key
