"""SparseVLM v1 / v1.5 / v2: pure functions against slow references written from the official code
(docs/sparsevlm-official.md), the plumbing on tiny LLaVAs, decoding with per-layer caches, and the
official equal-token figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model_cfg

from prune_eval.analysis.compute import official_equal_tokens
from prune_eval.data import images, synthetic
from prune_eval.execution.engine import EvalSettings, generate_rows, tokenized_prompts, visual_tokens
from prune_eval.errors import PruneEvalError
from prune_eval.methods import ModelGeometry, get_method
from prune_eval.methods import sparsevlm
from prune_eval.methods.sparsevlm import (
    RowDecision,
    SparseVLMHook,
    SparseVLMPruner,
    dpc_knn_merge,
    dpc_knn_merge_batched,
    gravity_divisor,
    masked_rater_mean,
    noise_stream,
    priority_heads,
    priority_heads_batched,
    ranks_batched,
    recycling_candidates,
    recycling_candidates_batched,
    resolve,
    select_raters,
    select_raters_batched,
    top_k_keep,
    top_k_kept,
    v1_keep_count,
    visual_scores,
)
from prune_eval.models import loading
from prune_eval.models.blocks import QuestionInputs
from prune_eval.models.prompt import tokenize_prompts
from prune_eval.models.llm import KVCache, TokenMeta, eager_probabilities, greedy_tokens, run_layers

pytestmark = pytest.mark.transformers  # also run against the lowest supported transformers (.ci/run)

LLAVA_7B = ModelGeometry(n_patches=576, vision_layers=24, vision_heads=16, text_layers=32, text_heads=32, text_hidden=4096, text_intermediate=11008)
SETTINGS = EvalSettings(batch_size=2, max_new_tokens=4, stop_when_decided=False, fast=False)


# ------------------------------------------------------------------ slow references (loops)
def ref_raters(visual: torch.Tensor, text: torch.Tensor) -> list[int]:
    n_visual, n_text = visual.shape[0], text.shape[0]
    share = [0.0] * n_text
    for i in range(n_visual):
        logits = [float(visual[i].double() @ text[j].double()) for j in range(n_text)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        for j in range(n_text):
            share[j] += exps[j] / sum(exps) / n_visual
    mean = sum(share) / n_text
    return [j for j in range(n_text) if share[j] > mean]


def ref_attention(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    heads, rows, cols = q.shape[0], q.shape[1], k.shape[1]
    out = torch.zeros(heads, rows, cols, dtype=torch.float64)
    for h in range(heads):
        for r in range(rows):
            logits = [float(q[h, r].double() @ k[h, c].double()) * scale if visible[r, c] else -math.inf for c in range(cols)]
            top = max(logits)
            exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in logits]
            for c in range(cols):
                out[h, r, c] = exps[c] / sum(exps)
    return out


def ref_scores(attention: torch.Tensor, visual: list[int]) -> list[float]:
    heads, rows = attention.shape[0], attention.shape[1]
    return [sum(float(attention[h, r, c]) for h in range(heads) for r in range(rows)) / (heads * rows) for c in visual]


def ref_dpc(x: torch.Tensor, c: int, noise: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
    """Official cluster_and_merge as loops: returns (centres, assignment, merged)."""
    n, channels = x.shape
    dist = [[float((x[i].double() - x[j].double()).norm()) / channels**0.5 for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:c]) / c) + float(noise[i]) for i in range(n)]
    global_max = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=global_max) for i in range(n)]
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:c]
    assignment = [min(range(c), key=lambda m: (dist[centres[m]][i], m)) for i in range(n)]
    for m, centre in enumerate(centres):
        assignment[centre] = m
    merged = torch.zeros(c, channels)
    for m in range(c):
        members = [i for i in range(n) if assignment[i] == m]
        weight = 1.0 / (torch.tensor(float(len(members))) + 1e-6)
        for i in members:
            merged[m] = merged[m] + x[i] * weight
    return centres, assignment, merged


# ------------------------------------------------------------------ pure functions
def test_raters_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        visual, text = torch.randn(40, 16, generator=g), torch.randn(12, 16, generator=g)
        assert select_raters(visual, text).tolist() == ref_raters(visual, text)


def test_rater_attention_and_scores_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 5, 8, generator=g), torch.randn(4, 30, 8, generator=g)
    visible = torch.ones(5, 30, dtype=torch.bool)
    visible[:, 27:] = torch.tensor([[c <= 25 + r for c in range(27, 30)] for r in range(5)])  # causal tail
    ours = eager_probabilities(q, k, visible, 8**-0.5)
    expected = ref_attention(q, k, visible, 8**-0.5)
    torch.testing.assert_close(ours.double(), expected, atol=1e-6, rtol=1e-6)
    visual = list(range(3, 20))
    scores = visual_scores(ours, torch.tensor(visual))
    np.testing.assert_allclose(scores.double().numpy(), ref_scores(expected, visual), rtol=1e-6)
    keep = top_k_keep(scores, 6)
    reference_order = sorted(range(len(visual)), key=lambda i: -ref_scores(expected, visual)[i])[:6]
    assert keep.tolist() == sorted(reference_order)


def test_v1_rank_rule() -> None:
    g = torch.Generator().manual_seed(2)
    attention = torch.rand(2, 4, 50, generator=g)
    visual = torch.arange(10, 40)
    rank = np.linalg.matrix_rank(attention.mean(0)[:, 10:40].numpy())
    k, got_rank = v1_keep_count(attention, visual, scale=9.0, bias=6.0)
    assert got_rank == rank == 4 and k == min(int(4 * 9.0 + 6.0), 29)
    small = torch.arange(10, 13)  # 3 visual tokens, 4 raters: rank 3 == nV -> no pruning
    assert v1_keep_count(attention, small, 9.0, 6.0) == (None, 3)


def test_recycling_candidates() -> None:
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.05, 0.6, 0.4, 0.15, 0.35])
    keep = top_k_keep(scores, 4)  # 0, 4, 6, 8
    candidates, clusters = recycling_candidates(scores, keep)
    deleted = [i for i in range(12) if i not in keep.tolist()]  # 8 deleted -> int(2.4) + 1 = 3 recycled
    assert candidates.tolist() == sorted(deleted, key=lambda i: -float(scores[i]))[:3] == [2, 9, 11]
    assert clusters == int(3 / 10) + 1 == 1


@pytest.mark.parametrize("n, c", [(7, 1), (25, 3), (40, 4)])
def test_dpc_knn_matches_reference(n: int, c: int) -> None:
    g = torch.Generator().manual_seed(n)
    centres_true = torch.randn(c, 32, generator=g) * 4
    x = (centres_true[torch.arange(n) % c] + torch.randn(n, 32, generator=g)).float()
    noise = torch.rand(n, generator=g) * 1e-6
    expected_centres, expected_assignment, expected = ref_dpc(x, c, noise)
    merged = dpc_knn_merge(x, c, noise)
    assert torch.equal(merged, expected)
    # well separated blobs come back as their means, whatever the noise
    if c > 1:
        blob_means = {tuple(torch.round(x[torch.arange(n) % c == m].mean(0), decimals=3).tolist()) for m in range(c)}
        assert {tuple(torch.round(row * 1.0, decimals=3).tolist()) for row in dpc_knn_merge(x, c, noise * 0)} == blob_means


def test_gravity_divisor_closed_form_and_priority_heads() -> None:
    head_dim, base = 16, 10000.0
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    positions = torch.tensor([0.0, 3.0, 40.0, 500.0])
    freqs = positions[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    ours = gravity_divisor(cos, sin, cos, sin)
    for a in range(4):
        for b in range(4):
            closed = 2 / head_dim**0.5 * sum(math.cos((positions[a] - positions[b]) * float(t)) for t in inv_freq)
            assert float(ours[a, b]) == pytest.approx(closed, abs=1e-5)
    batched = gravity_divisor(torch.stack([cos, cos.flip(0)]), torch.stack([sin, sin.flip(0)]), torch.stack([cos, cos]), torch.stack([sin, sin]))
    torch.testing.assert_close(batched[0], ours, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batched[1], gravity_divisor(cos.flip(0), sin.flip(0), cos, sin), atol=1e-6, rtol=1e-6)
    attention = torch.rand(6, 3, 20)
    visual = torch.arange(5, 15)
    mass = [float(attention[h][:, 5:15].sum()) for h in range(6)]
    assert sorted(priority_heads(attention, visual, 2).tolist()) == sorted(sorted(range(6), key=lambda h: -mass[h])[:2])


def test_resolve_versions_and_errors() -> None:
    assert resolve({"version": "v1.5"}, 64, LLAVA_7B)["schedule"] == [66, 30, 17]
    assert resolve({"version": "v1.5"}, 64, LLAVA_7B)["layers"] == [2, 6, 15]
    assert resolve({"version": "v2"}, 128, LLAVA_7B)["schedule"] == [238, 108, 60]
    assert resolve({"version": "v2"}, 64, LLAVA_7B)["priority_heads"] == 14
    v1 = resolve({"version": "v1"}, 128, LLAVA_7B)
    assert (v1["scale"], v1["bias"], v1["layers"]) == (9.0, 6.0, [2, 6, 15, 19]) and "pope.sh" in v1["scale_bias_source"]
    with pytest.raises(PruneEvalError, match="unknown SparseVLM version 'v3'; choices: v1, v1.5, v2"):
        resolve({"version": "v3"}, 64, LLAVA_7B)
    with pytest.raises(PruneEvalError, match="no schedule for budget=100; available budgets: 64, 96, 128, 192"):
        resolve({"version": "v1.5"}, 100, LLAVA_7B)
    with pytest.raises(PruneEvalError, match="v1 has no \\(scale, bias\\) for budget=100"):
        resolve({"version": "v1"}, 100, LLAVA_7B)
    assert resolve({"version": "v1", "scale": 2.0, "bias": 1.0}, 100, LLAVA_7B)["scale_bias_source"] == "user"
    small = ModelGeometry(576, 4, 4, 8, 4, 64, 128)
    assert resolve({"version": "v1.5"}, 64, small)["layers"] == [0, 1, 3]
    with pytest.raises(PruneEvalError, match="method.layer_rule=scaled"):
        resolve({"version": "v1.5", "layer_rule": "official"}, 64, small)


# ------------------------------------------------------------------ the batched versions against the per-row ones
def padded_rows(rows: list[torch.Tensor], fill: float = float("nan")) -> torch.Tensor:
    """Stack tensors of different leading sizes along a new first axis, padding with `fill`."""
    shape = [max(r.shape[i] for r in rows) for i in range(rows[0].dim())]
    out = torch.full((len(rows), *shape), fill)
    for n, r in enumerate(rows):
        out[(n, *[slice(0, d) for d in r.shape])] = r
    return out


def test_batched_raters_equal_per_question_raters() -> None:
    """Images with several questions of different lengths (and an absent question slot); one
    question with exactly one rater."""
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(2, 30, 16, generator=g)
    lengths = [[7, 3, 12], [5, 9, 0]]
    text = torch.zeros(2, 3, 12, 16)
    for i in range(2):
        for q in range(3):
            text[i, q, : lengths[i][q]] = torch.randn(lengths[i][q], 16, generator=g)
    text[1, 0, :5] = 0.01 * torch.randn(5, 16, generator=g)
    text[1, 0, 2] = visual[1].mean(0) * 40  # one token takes nearly all of the softmax mass
    valid = torch.arange(12) < torch.tensor(lengths)[..., None]
    batched = select_raters_batched(visual, text, valid)
    for i in range(2):
        for q in range(3):
            n = lengths[i][q]
            if n == 0:
                assert not batched[i, q].any()
                continue
            expected = select_raters(visual[i], text[i, q, :n]).tolist()
            assert batched[i, q].nonzero()[:, 0].tolist() == expected == ref_raters(visual[i], text[i, q, :n])
    assert batched[1, 0].nonzero()[:, 0].tolist() == [2]


def test_batched_scores_heads_and_ranks_equal_per_row() -> None:
    """Rows with different rater and visual counts; padding is NaN and must not leak. One row has
    duplicated rater rows (rank 2 of 4), one has more raters than visual tokens (full rank = nV),
    and two heads of one row carry equal mass (a tie)."""
    g = torch.Generator().manual_seed(4)
    shapes = [(4, 10), (1, 7), (3, 3), (4, 9)]  # (raters, visual tokens)
    rows = [torch.rand(5, r, v, generator=g) for r, v in shapes]
    rows[0][:, 2:] = rows[0][:, :2]  # rank 2
    rows[3][1] = rows[3][3]  # heads 1 and 3 tie
    attention = padded_rows(rows)
    rater_valid = torch.arange(4) < torch.tensor([r for r, _ in shapes])[:, None]
    visual_valid = torch.arange(10) < torch.tensor([v for _, v in shapes])[:, None]
    relation = attention.mean(dim=1)
    scores = masked_rater_mean(relation, rater_valid)
    heads = priority_heads_batched(attention, rater_valid, visual_valid, 2)
    ranks = ranks_batched(relation, rater_valid, visual_valid)
    for n, (r, v) in enumerate(shapes):
        visual = torch.arange(v)
        torch.testing.assert_close(scores[n, :v], visual_scores(rows[n], visual), atol=1e-7, rtol=1e-6)
        assert heads[n].tolist() == priority_heads(rows[n], visual, 2).tolist()
        assert int(ranks[n]) == v1_keep_count(rows[n], visual, 1.0, 0.0)[1] == np.linalg.matrix_rank(rows[n].mean(0).numpy())
    assert ranks.tolist() == [2, 1, 3, 4]


def test_batched_top_k_and_recycling_candidates_with_ties() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.8, 0.2, 0.5, 0.05, 0.6, 0.4, 0.15, 0.35],
                           [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2],
                           torch.linspace(0, 1, 12).tolist()])
    for k in (1, 4, 6, 11):
        kept = top_k_kept(scores, k)
        candidates, clusters = recycling_candidates_batched(scores, kept, k)
        for n in range(3):
            keep = top_k_keep(scores[n], k)
            assert kept[n].nonzero()[:, 0].tolist() == keep.tolist()
            expected, expected_clusters = recycling_candidates(scores[n], keep)
            assert candidates[n].tolist() == expected.tolist() and clusters == expected_clusters


@pytest.mark.parametrize("n, c", [(1, 1), (9, 1), (25, 3), (40, 5)])
def test_batched_dpc_knn_equals_per_row(monkeypatch, n: int, c: int) -> None:
    """Bit-identical to dpc_knn_merge row by row, also when the rows are split into chunks."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, 32, generator=g)
    x[2, n // 2 :] = x[2, : n - n // 2].clone()  # duplicated points (distance 0 ties)
    noise = torch.rand(5, n, generator=g) * 1e-6
    monkeypatch.setattr(sparsevlm, "DPC_CHUNK_ELEMENTS", 2 * n * n * 32)  # chunks of two rows
    merged = dpc_knn_merge_batched(x, c, noise)
    for row in range(5):
        assert torch.equal(merged[row], dpc_knn_merge(x[row], c, noise[row]))


def test_noise_stream_is_the_per_call_draws() -> None:
    """The per-row hook draws torch.rand(n_rec) at each recycling layer; the stream's consecutive
    slices are those draws (holds for the installed torch's CPU generator)."""
    stream = noise_stream([5, 77], 400)
    for row, seed in enumerate([5, 77]):
        generator = torch.Generator().manual_seed(seed)
        draws = [torch.rand(n, generator=generator) * 1e-6 for n in (154, 16, 5, 173)]
        assert torch.equal(torch.cat(draws), stream[row, :348])


def test_pruner_plans_with_the_official_counts_after_the_first_layer() -> None:
    """max_visual (batch planning) = tokens after layer 2: k + clusters (docs/sparsevlm-official.md §7.3)."""
    expected = {("v1.5", 192): 309, ("v1.5", 128): 312, ("v1.5", 64): 82, ("v2", 192): 300, ("v2", 128): 238, ("v2", 64): 66, ("v1", 128): 576}
    for (version, budget), count in expected.items():
        assert SparseVLMPruner(resolve({"version": version}, budget, LLAVA_7B), None, 35, 576).max_visual == count


class FakeView:
    """What SparseVLMPruner.select reads from a pruning layer, with chosen attention and features."""

    def __init__(self, layer_idx: int, attention: torch.Tensor, n_visual: list[int], features: torch.Tensor) -> None:
        self.layer_idx, self._attention, self.n_visual, self.features = layer_idx, attention, n_visual, features
        self.n_questions = len(n_visual)
        self.visual_valid = torch.arange(attention.shape[-1]) < torch.tensor(n_visual)[:, None]

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        return self._attention

    def visual_features(self, questions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.features[questions[:, None], index]


@pytest.mark.parametrize("options, budget", [({"version": "v1", "scale": 2.0, "bias": 1.0}, 128), ({"version": "v1.5"}, 64)])
def test_pruner_decisions_equal_the_per_row_hook(options, budget) -> None:
    """Two pruning layers for five questions with different rater counts and visual counts: the
    vectorised pruner keeps, merges and draws noise exactly as SparseVLMHook._decide does row by
    row. v1 (k = 2 rank + 1): rank-deficient rows keep fewer tokens, a row with as many
    independent raters as visual tokens is left unchanged (and draws nothing)."""
    params = resolve(options, budget, LLAVA_7B)
    params = {**params, "layers": [0, 1]}
    seeds = [11, 12, 13, 14, 15]
    raters = [3, 1, 4, 2, 5]
    n_visual = [40, 40, 4, 40, 33] if options["version"] == "v1" else [120] * 5
    g = torch.Generator().manual_seed(5)
    pruner = SparseVLMPruner(params, None, 0, max(n_visual))
    inputs = QuestionInputs(torch.randn(1, max(n_visual), 8, generator=g), torch.randn(1, 5, 6, 8, generator=g), torch.ones(1, 5, 6, dtype=torch.bool),
                            torch.zeros(5, dtype=torch.long), torch.arange(5), seeds)
    pruner.start(inputs)  # the per-question noise streams; the raters are set below
    pruner.rater_valid = torch.arange(5) < torch.tensor(raters)[:, None]
    pruner.rater_rows = torch.arange(5).expand(5, 5)
    hook = SparseVLMHook(params, None, seeds, 0, max(n_visual))
    counts = []
    for layer_idx in (0, 1):
        rows = [torch.rand(3, r, v, generator=g) for r, v in zip(raters, n_visual)]
        if options["version"] == "v1":
            rows[0][:, 1:] = rows[0][:, :1]  # rank 1: k = 3
        features = torch.randn(5, max(n_visual), 8, generator=g)
        selection = pruner.select(FakeView(layer_idx, padded_rows(rows), n_visual, features))
        new_counts = []
        for n in range(5):
            hook._scores = lambda layer, row, *_, n=n: (visual_scores(rows[n], torch.arange(n_visual[n])), rows[n])
            meta = TokenMeta(torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 1, dtype=torch.long))
            decision = hook._decide(layer_idx, n, features, None, meta, None)
            keep = list(range(n_visual[n])) if decision.keep is None else decision.keep.tolist()
            assert selection.kept[n].nonzero()[:, 0].tolist() == keep
            n_merged = 0 if decision.merged is None else decision.merged.shape[0]
            assert (selection.n_extra[n] if selection.n_extra else 0) == n_merged
            if n_merged:
                assert torch.equal(selection.extra[n, :n_merged], decision.merged)
            new_counts.append(len(keep) + n_merged)
        counts.append(selection.kept.sum(1).tolist())
        n_visual = new_counts
    if options["version"] == "v1":
        assert counts[0] == [3, 3, 4, 5, 11]  # k = 2 rank + 1 per row; row 2 untouched (rank 4 = nV)
        assert counts[1][2] == 4
    else:
        assert counts == [[66] * 5, [30] * 5] and selection.n_extra == [2] * 5


# ------------------------------------------------------------------ plumbing on tiny LLaVAs
@pytest.fixture(scope="module")
def deep_bundle():
    """32 LLM layers with 16 heads: the official layer indices and v2's 14 priority heads apply."""
    return loading.load(tiny_model_cfg(text_layers=32, text_heads=16, text_hidden=128), dtype=torch.float32, device=torch.device("cpu"))


def prepare(bundle, n: int, seed: int = 0):
    questions = synthetic.make_questions(n, seed=seed)[:: 7][:n]
    pixels = images.preprocess([synthetic.render_image(seed, 0)] * n, "pad", bundle.image_processor)
    visual = visual_tokens(bundle, get_method("vanilla"), {}, pixels, [0] * n)
    return tokenized_prompts(bundle, questions), visual


@pytest.mark.parametrize("budget, official, input_seen", [(192, 6145 / 32, 6608 / 32), (128, 4116 / 32, 4653 / 32), (64, 2074 / 32, 2632 / 32)])
def test_equivalent_tokens_v15(deep_bundle, budget, official, input_seen) -> None:
    """192.03 / 128.6 / 64.8 (the official log, issue #24) on a 576-token image with recycling."""
    params = resolve({"version": "v1.5"}, budget, deep_bundle.geometry)
    tokenized, visual = prepare(deep_bundle, 1)
    hook = SparseVLMHook(params, deep_bundle.lm, [0], len(tokenized.prefix), visual.shape[1])
    generation = generate_rows(deep_bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS, hook=hook)[0]
    assert official_equal_tokens(generation.visual_per_layer) == pytest.approx(official)
    assert np.mean(generation.visual_per_layer) == pytest.approx(input_seen)
    assert round(official, 2) in (192.03, 128.62, 64.81)


def test_rater_rows_equal_full_eager_attention(deep_bundle) -> None:
    bundle = deep_bundle
    params = resolve({"version": "v1.5"}, 64, bundle.geometry)
    tokenized, visual = prepare(bundle, 1)
    hook = SparseVLMHook(params, bundle.lm, [0], len(tokenized.prefix), visual.shape[1])
    captured = {}
    original_scores = hook._scores

    def spy(layer_idx, row, positions, meta, cache):
        scores, attention = original_scores(layer_idx, row, positions, meta, cache)
        captured[layer_idx] = (attention, hook._start(meta, row), hook.n_visual[row], hook.raters[row], positions[row].clone())
        return scores, attention

    hook._scores = spy
    generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS, hook=hook)
    # the same input through transformers' eager attention, full matrix, layer 2 (no pruning before it)
    attention, start, n_visual, raters, _ = captured[2]
    ids = list(tokenized.prefix) + [bundle.image_token_id] * 576 + list(tokenized.suffixes[0])
    pixels = images.preprocess([synthetic.render_image(0, 0)], "pad", bundle.image_processor)
    text_config = bundle.model.config.text_config
    text_config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = bundle.model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_attentions=True).attentions[2][0]
    finally:
        text_config._attn_implementation = "sdpa"
    rows = start + n_visual + raters
    torch.testing.assert_close(attention, eager[:, rows], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("version, budget, batch", [("v1", 128, 1), ("v1.5", 64, 2), ("v2", 64, 2)])
def test_cached_decoding_equals_no_cache_recompute(deep_bundle, version, budget, batch) -> None:
    """Generation with pruning and per-layer caches == recomputing the whole pruned sequence at
    every step with the same decisions (fp32; left-padded batch of 2 where the version allows)."""
    bundle = deep_bundle
    params = resolve({"version": version}, budget, bundle.geometry)
    questions = synthetic.make_questions(4, seed=2)
    prompts = [questions[0].prompt, questions[5].prompt.replace("?", "in the image ?")][:batch]
    tokenized = tokenize_prompts(prompts, bundle.tokenizer, mode="hf", image_token_id=bundle.image_token_id)
    assert batch == 1 or len(tokenized.suffixes[0]) != len(tokenized.suffixes[1]), "rows must differ in length"
    pixels = images.preprocess([synthetic.render_image(2, i) for i in range(batch)], "pad", bundle.image_processor)
    visual = visual_tokens(bundle, get_method("vanilla"), {}, pixels, [0] * batch)
    hook = SparseVLMHook(params, bundle.lm, list(range(batch)), len(tokenized.prefix), visual.shape[1])
    cached = generate_rows(bundle, tokenized.prefix, visual, tokenized.suffixes, SETTINGS, hook=hook, keep_step_logits=True)
    embed = bundle.lm.embed_tokens
    for row in range(batch):
        generated = cached[row].token_ids
        for step, logits in enumerate(cached[row].step_logits[: len(generated) + 1]):
            ids_after = list(tokenized.suffixes[row]) + generated[:step]
            sequence = torch.cat([embed(torch.tensor(list(tokenized.prefix))), visual[row], embed(torch.tensor(ids_after))])[None]
            length = sequence.shape[1]
            meta = TokenMeta(torch.arange(length)[None], torch.ones(1, length, dtype=torch.long))
            replay = SparseVLMHook(params, bundle.lm, [row], len(tokenized.prefix), visual.shape[1], replay=[hook.decisions[row]])
            with torch.no_grad():
                out, _ = run_layers(bundle.lm, sequence, torch.arange(length)[None], meta, KVCache(bundle.lm.n_layers), decoding=False, hook=replay)
            _, recomputed = greedy_tokens(bundle.lm, out[:, -1])
            torch.testing.assert_close(logits, recomputed[0], atol=1e-5, rtol=1e-5)


def test_v1_runs_one_row_at_a_time() -> None:
    assert resolve({"version": "v1"}, 128, LLAVA_7B)["max_batch_size"] == 1
    assert "max_batch_size" not in resolve({"version": "v1.5"}, 128, LLAVA_7B)


def test_no_text_after_the_image_is_an_error(tiny_bundle) -> None:
    params = resolve({"version": "v1.5"}, 64, tiny_bundle.geometry)
    tokenized, visual = prepare(tiny_bundle, 1)
    hook = SparseVLMHook(params, tiny_bundle.lm, [0], len(tokenized.prefix), visual.shape[1])
    with pytest.raises(PruneEvalError, match="needs text \\(the question\\) after the image"):
        generate_rows(tiny_bundle, tokenized.prefix, visual, [tokenized.suffixes[0][:1]], SETTINGS, hook=hook)


def test_placement_prefix_kept_merged_text(tiny_bundle) -> None:
    """After pruning a row reads [padding | prefix | kept visual (sequence order) | merged | text]."""
    params = resolve({"version": "v1.5"}, 64, tiny_bundle.geometry)
    prefix, n_visual, n_text, pad = 3, 6, 4, 2
    width = pad + prefix + n_visual + n_text
    hidden = torch.arange(width, dtype=torch.float32)[None, :, None].expand(2, width, 2).clone()
    segment = torch.ones(2, width, dtype=torch.long)
    segment[0, :pad] = -1
    segment[1, :] = 1
    hook = SparseVLMHook(params, tiny_bundle.lm, [0, 1], prefix, n_visual)
    hook.n_visual = [n_visual, n_visual + 0]
    decisions = [RowDecision(torch.tensor([1, 4]), torch.full((1, 2), 100.0)) for _ in range(2)]
    hidden[1] = torch.arange(width)[:, None].float()  # second row: no padding, so it is shifted by `pad`
    positions = torch.arange(width)[None].expand(2, width)
    meta = TokenMeta(torch.arange(width)[None].expand(2, width), segment)
    hook.prompt_valid = (segment >= 0).sum(1, keepdim=True)
    cache = KVCache(tiny_bundle.lm.n_layers)
    new_hidden, new_positions, new_meta = hook._rebuild(0, hidden, positions, meta, cache, decisions)
    row0 = new_hidden[0, :, 0].tolist()
    expected0 = [2.0, 3.0, 4.0] + [5 + 1.0, 5 + 4.0] + [100.0] + [11.0, 12.0, 13.0, 14.0]
    assert row0[-len(expected0):] == expected0 and new_meta.segment[0, : len(row0) - len(expected0)].eq(-1).all()
    expected1 = [0.0, 1.0, 2.0] + [3 + 1.0, 3 + 4.0] + [100.0] + [9.0, 10.0, 11.0, 12.0, 13.0, 14.0]
    assert new_hidden[1, :, 0].tolist() == expected1
    assert new_positions[1].tolist() == list(range(len(expected1)))  # v1.5 re-numbers positions
    assert hook.n_visual == [3, 3]
